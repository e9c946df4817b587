"""The divergence pre-check: do baseline and candidate predict the same next tokens on a small fixed text set?

Pure. Dutta et al. 2024 ("Accuracy is Not All You Need", arXiv 2407.09141) find that the share of answers a
quantized model flips and the KL divergence of its next-token distributions from the baseline's go together. Both
sides score the same texts (echo, top-k logprobs per position: ``stages/divergence.py``); from those this module
computes, per position where both sides report a distribution:

* **token KL**, KL(baseline || candidate) in nats. Servers return only the top-k of each distribution (plus the
  actual next token), so the two distributions are coarsened to the same partition: one bucket per token that
  *both* top-k lists hold, and one "rest" bucket for all other mass (1 minus the shared tokens' mass, per side).
  Every probability in that partition is known on both sides, nothing is guessed or renormalised, and by the
  data-processing inequality the result is a lower bound of the full KL, exact when the shared tokens hold all of
  both sides' mass. Probabilities under ``PROB_FLOOR`` count as ``PROB_FLOOR`` (servers clip log 0 to -9999).
* **top-1 agreement**: the likeliest token (ties broken by the token's text) is the same on both sides.

The mean KL and the agreement are token-weighted over the whole text set. The decision
(``check_divergence``): agreement below ``floor`` is CATASTROPHIC_REGRESSION, hard tier — the candidate predicts
another next token than its baseline at most positions, it is broken, and the chain skips its evaluation with that
class; mean KL above ``tolerance`` is REGRESSION, warn tier, like the quality gate's and the verbosity gate's
breaches (a measured, reproducible difference from the baseline beyond the tolerance, which the evaluation may or
may not turn into a score drop). Texts both sides tokenize differently cannot be paired: ANOMALOUS. Logprobs that
could not be had at all skip the check (``not_measured``): it blocks nothing, the evaluation decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome, breach_status
from pytest_day0.gates.stats import order_key
from pytest_day0.scoring.tasks import Sample, Task

PROB_FLOOR = 1e-10
TEXT_SEED = 20250715  # which samples the text set takes: fixed, so every session scores the same texts
TRUNCATION = ("KL over the tokens both top-k lists hold plus one bucket for the rest of the mass, "
              "a lower bound of the full KL")
_EPS = 1e-12


class TextLogprobs(BaseModel):
    """One side's echo of one text: its tokens and, per position, the top-k next-token logprobs (None: none)."""

    model_config = ConfigDict(frozen=True)

    tokens: list[str]
    top: list[dict[str, float] | None]


class DivergenceStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    texts: int
    positions: int
    mean_kl: float  # nats per position, KL(baseline || candidate) over the coarsened partition (module docstring)
    max_kl: float
    agreement: float  # share of positions whose top-1 token is the same on both sides
    top_k: int


class DivergenceCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    recipe: str
    passed: bool
    skipped: bool = False  # the endpoints return no top-k prompt logprobs: nothing to compare, nothing decided
    tier: Tier = Tier.HARD
    failure_class: FailureClass | None = None
    message: str
    stats: DivergenceStats | None = None
    floor: float
    tolerance: float
    seconds: float | None = None  # wall time of the candidate's requests (set by the chain)
    baseline_seconds: float | None = None  # the baseline's, made once for every recipe
    reused: bool = False  # the candidate's logprobs were measured by an earlier session
    numbers: dict[str, float | int | str | None] = Field(default_factory=dict)

    @property
    def catastrophic(self) -> bool:
        """The candidate is broken: its evaluation is not worth running (the chain skips it with this class)."""
        return self.failure_class is FailureClass.CATASTROPHIC_REGRESSION


# ---------------------------------------------------------------------- the text set


def sample_text(prompt: str, target: int | str, choices: Sequence[str] | None) -> str:
    """A sample's prompt followed by its reference answer, so the answer's positions are scored too."""
    if choices is not None and isinstance(target, int) and 0 <= target < len(choices):
        return prompt + choices[target]
    return prompt + (target if isinstance(target, str) else "")


def _seeded(task: Task) -> list[Sample]:
    return sorted(task.samples, key=lambda s: order_key(f"{task.name}/{s.id}", TEXT_SEED))


def text_set(tasks: Sequence[Task], size: int) -> list[str]:
    """``size`` texts taken in turn from each task, each task's samples in a fixed keyed-hash order (seeded, so the
    set depends only on the tasks' samples, not on their file order). Raw prompts: no few-shot examples, no chat
    template — the same text on both sides is all the comparison needs."""
    queues = [_seeded(t) for t in tasks]
    texts: list[str] = []
    depth = 0
    while len(texts) < size and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(texts) < size:
                s = queue[depth]
                texts.append(sample_text(s.prompt, s.target, s.choices))
        depth += 1
    return texts


# ---------------------------------------------------------------------- the metric


def _prob(logprob: float) -> float:
    return max(math.exp(logprob), PROB_FLOOR)  # exp of a clipped -9999 is 0.0, no error


def token_kl(baseline: Mapping[str, float], candidate: Mapping[str, float]) -> float:
    """KL(baseline || candidate) in nats at one position, from each side's top-k logprobs (module docstring)."""
    shared = sorted(baseline.keys() & candidate.keys())
    kl = 0.0
    p_shared = q_shared = 0.0
    for token in shared:
        p, q = math.exp(baseline[token]), _prob(candidate[token])
        p_shared += p
        q_shared += math.exp(candidate[token])
        if p > 0:
            kl += p * math.log(max(p, PROB_FLOOR) / q)
    p_rest = 1.0 - p_shared
    if p_rest > _EPS:
        kl += p_rest * math.log(p_rest / max(1.0 - q_shared, PROB_FLOOR))
    return max(kl, 0.0)  # float rounding of a zero divergence


def top1(top: Mapping[str, float]) -> str:
    """The likeliest token of a top-k dict; equal logprobs are broken by the token's text (same on both sides)."""
    return min(top, key=lambda t: (-top[t], t))


def divergence_stats(baseline: Sequence[TextLogprobs], candidate: Sequence[TextLogprobs],
                     top_k: int) -> DivergenceStats:
    """Mean token KL and top-1 agreement over every position both sides scored. Raises ValueError when the two
    sides' texts cannot be paired position by position (another tokenizer): the check turns that into ANOMALOUS."""
    if len(baseline) != len(candidate):
        raise ValueError(f"the sides scored {len(baseline)} and {len(candidate)} texts")
    kls: list[float] = []
    agree = 0
    for i, (b, c) in enumerate(zip(baseline, candidate, strict=True)):
        if b.tokens != c.tokens:
            raise ValueError(f"text {i} is tokenized differently ({len(b.tokens)} vs {len(c.tokens)} tokens)")
        for p, q in zip(b.top, c.top, strict=True):
            if not p or not q:
                continue
            kls.append(token_kl(p, q))
            agree += top1(p) == top1(q)
    n = len(kls)
    return DivergenceStats(texts=len(baseline), positions=n, mean_kl=math.fsum(kls) / n if n else 0.0,
                           max_kl=max(kls, default=0.0), agreement=agree / n if n else 0.0, top_k=top_k)


# ---------------------------------------------------------------------- the decision


def check_divergence(recipe: str, baseline: Sequence[TextLogprobs], candidate: Sequence[TextLogprobs], *,
                     top_k: int, floor: float, tolerance: float) -> DivergenceCheck:
    """Agreement below ``floor``: CATASTROPHIC_REGRESSION (hard); mean KL above ``tolerance``: REGRESSION (warn)."""
    try:
        stats = divergence_stats(baseline, candidate, top_k)
    except ValueError as exc:
        return DivergenceCheck(recipe=recipe, passed=False, failure_class=FailureClass.ANOMALOUS, floor=floor,
                               tolerance=tolerance, message=f"baseline and candidate cannot be compared position by "
                               f"position: {exc}")
    if stats.positions == 0:
        return DivergenceCheck(recipe=recipe, passed=False, failure_class=FailureClass.ANOMALOUS, stats=stats,
                               floor=floor, tolerance=tolerance,
                               message=f"no position of the {stats.texts} texts has top-{top_k} logprobs on both sides")
    numbers: dict[str, float | int | str | None] = {
        "divergence_kl": round(stats.mean_kl, 6), "divergence_max_kl": round(stats.max_kl, 4),
        "top1_agreement": round(stats.agreement, 6), "positions": stats.positions, "texts": stats.texts,
        "top_k": top_k, "agreement_floor": floor, "kl_tolerance": tolerance}
    where = (f"mean token KL {stats.mean_kl:.4f} nats, top-1 agreement {stats.agreement:.1%} over {stats.positions} "
             f"positions of {stats.texts} texts; top-{top_k} logprobs: {TRUNCATION}")
    if stats.agreement < floor - _EPS:
        return DivergenceCheck(recipe=recipe, passed=False, failure_class=FailureClass.CATASTROPHIC_REGRESSION,
                               stats=stats, floor=floor, tolerance=tolerance, numbers=numbers,
                               message=f"top-1 agreement {stats.agreement:.1%} < floor {floor:.0%}: the candidate is "
                               f"broken, its evaluation is skipped; {where}")
    if stats.mean_kl > tolerance + _EPS:
        return DivergenceCheck(recipe=recipe, passed=False, tier=Tier.WARN, failure_class=FailureClass.REGRESSION,
                               stats=stats, floor=floor, tolerance=tolerance, numbers=numbers,
                               message=f"mean token KL {stats.mean_kl:.4f} > tolerance {tolerance:g}; {where}")
    return DivergenceCheck(recipe=recipe, passed=True, stats=stats, floor=floor, tolerance=tolerance, numbers=numbers,
                           message=f"{where}; floor {floor:.0%}, tolerance {tolerance:g}")


def not_measured(recipe: str, why: str, *, floor: float, tolerance: float) -> DivergenceCheck:
    """The logprobs could not be had (an endpoint that refuses or garbles echo with top-k logprobs, or fails twice):
    the pre-check is a screen, not a measurement of the release, so it skips with the reason and blocks nothing;
    the evaluation measures the candidate and meets any real trouble with its own classes."""
    return DivergenceCheck(recipe=recipe, passed=False, skipped=True, floor=floor, tolerance=tolerance,
                           message=f"pre-check not possible, the evaluation decides: {why}")


def divergence_outcome(check: DivergenceCheck, *, warn_as_error: bool = False) -> GateOutcome:
    """The typed record of one recipe's pre-check: hard when catastrophic or not comparable, warn above tolerance."""
    numbers = dict(check.numbers)
    if check.seconds is not None:
        numbers["precheck_seconds"] = round(check.seconds, 3)
    if check.baseline_seconds is not None:
        numbers["precheck_baseline_seconds"] = round(check.baseline_seconds, 3)
    numbers["precheck_reused"] = int(check.reused)
    status = breach_status(check.passed, check.tier, warn_as_error=warn_as_error, skipped=check.skipped)
    return GateOutcome(gate="divergence", recipe=check.recipe, tier=check.tier, status=status,
                       failure_class=None if check.passed or check.skipped else check.failure_class,
                       message=check.message, numbers=numbers,
                       advisory=status == "warned")  # the evaluation measures what the KL only predicts


def assert_divergence(check: DivergenceCheck) -> None:
    """GateFailure of the check's class and tier on a breach; callers turn ``skipped`` into a skip themselves."""
    if not check.passed and not check.skipped:
        raise GateFailure(check.failure_class or FailureClass.ANOMALOUS, check.message, tier=check.tier)
