"""The flipped items of one comparison with what each side answered: the flip viewer's and the trackers' input.

Pure: ``Flips`` (which ids changed, from ``compare.flips_of``) plus both sides' records in memory -> ``FlipDetail``.
The chain saves one per (recipe, task) beside the comparison, on whichever process computed it, so the controller
can write report.html without reading the records again (or starting an evaluation that never ran).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pytest_day0.gates.compare import Flips
from pytest_day0.scoring.records import SampleRecord
from pytest_day0.scoring.tasks import Sample

Direction = Literal["lost", "gained"]  # lost: right -> wrong (the candidate is worse on it); gained: the reverse


class SideAnswer(BaseModel):
    """One side's answer to one item, as its record has it."""

    model_config = ConfigDict(frozen=True)

    response: str | None = None
    choice_logprobs: list[float] | None = None
    correct: float | None = None
    error: str | None = None


class FlipItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    direction: Direction
    prompt: str | None = None
    target: int | str | None = None
    choices: list[str] | None = None  # multiple choice: the continuations the log-likelihoods are of
    baseline: SideAnswer
    candidate: SideAnswer


class FlipDetail(BaseModel):
    """Every flipped item of one (recipe, task), lost first; ``records`` names each side's JSONL file."""

    model_config = ConfigDict(frozen=True)

    recipe: str
    task: str
    n: int
    tolerance: float
    records: dict[str, str]  # "baseline" / "candidate" -> records path
    items: list[FlipItem]

    @property
    def lost(self) -> int:
        return sum(1 for i in self.items if i.direction == "lost")

    @property
    def gained(self) -> int:
        return len(self.items) - self.lost


def _answer(record: SampleRecord | None) -> SideAnswer:
    if record is None:
        return SideAnswer()
    return SideAnswer(response=record.response, choice_logprobs=record.choice_logprobs, correct=record.correct,
                      error=record.error)


def flip_detail(
    flips: Flips,
    baseline: Sequence[SampleRecord],
    candidate: Sequence[SampleRecord],
    *,
    recipe: str,
    task: str,
    records: Mapping[str, str],
    samples: Sequence[Sample] = (),
) -> FlipDetail:
    """The flipped ids' records side by side; the prompt and target come from the baseline's record (the run gate
    has checked the two agree), the choices from the task's samples where it has them."""
    base = {r.id: r for r in baseline}  # the last record per id wins, as everywhere
    cand = {r.id: r for r in candidate}
    by_id = {s.id: s for s in samples}
    items: list[FlipItem] = []
    for direction, ids in (("lost", flips.lost), ("gained", flips.gained)):
        for item_id in ids:
            b, c, sample = base.get(item_id), cand.get(item_id), by_id.get(item_id)
            source = b or c
            prompt = source.prompt if source is not None and source.prompt is not None else (
                sample.prompt if sample is not None else None)
            target = source.target if source is not None else (sample.target if sample is not None else None)
            choices = list(sample.choices) if sample is not None and sample.choices is not None else None
            items.append(FlipItem(id=item_id, direction=direction, prompt=prompt, target=target,  # type: ignore[arg-type]
                                  choices=choices, baseline=_answer(b), candidate=_answer(c)))
    return FlipDetail(recipe=recipe, task=task, n=flips.n, tolerance=flips.tolerance, records=dict(records),
                      items=items)
