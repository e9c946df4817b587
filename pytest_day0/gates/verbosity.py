"""The verbosity gate: did quantization change how much the model says?

Pure. As in the ModelOpt day0-release skill's ``gate_verbosity`` (PR #2254): per task,
|Δ mean completion tokens| / baseline mean > ``threshold`` (default 0.05) is VERBOSITY_EXCEEDED, two-sided (an
answer that got much shorter changed too: truncated reasoning, early EOS), warn tier. Longer answers cost the
user latency and tokens and often mean degraded reasoning that still lands on the right answer, which no
accuracy metric sees.

Where we differ, deliberately:

* "very short" is ``short_tokens`` (default 100), not the skill's 1000: the skill was tuned on reasoning
  traces; at 100 tokens one token is already 1% of the mean, so the ratio is coarse — we add a note with the
  absolute counts and still gate (as the skill does).
* Sample alignment is not guessed from counts (the skill matches runs by ``successful_count`` within 1%): both
  sides' records are aligned by sample id upstream, and a side whose run gate failed is skipped here with its
  class.
* A task that generates nothing (multiple choice by log-likelihood) skips with a reason instead of reading 0.
* On evidence, not on a point estimate (a false REGRESSION is the worst thing a gate can say): with both sides'
  per-item token counts, each bounded by the task's ``max_tokens``, the paired difference gets the same exact
  betting interval as the quality gate (``stats.unit_interval``); VERBOSITY_EXCEEDED only when the whole interval
  of the change is beyond the limit, like the floor. Without per-item counts, the skill's point rule.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome, breach_status

DEFAULT_THRESHOLD = 0.05
SHORT_TOKENS = 100.0
_EPS = 1e-9


class VerbosityCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    passed: bool
    skipped: bool = False
    failure_class: FailureClass | None = None
    message: str = ""
    note: str = ""
    numbers: dict[str, float | int | str | None] = Field(default_factory=dict)


def _usable(v: float | None) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def token_change_interval(pairs: list[tuple[float, float]], cap: float, confidence: float) -> tuple[float, float]:
    """One-sided ``confidence`` bounds of the mean per-item change of completion tokens (candidate - baseline);
    exact at every n because each count lies in [0, cap] (the task's max_tokens)."""
    import numpy as np

    from pytest_day0.gates.stats import evaluation_order, unit_interval

    order = evaluation_order([str(i) for i in range(len(pairs))])
    x = np.array([((pairs[int(i)][1] - pairs[int(i)][0]) / cap + 1) / 2 for i in order], dtype=np.float64)
    low, high = unit_interval(np.clip(x, 0.0, 1.0), confidence)
    return (2 * low - 1) * cap, (2 * high - 1) * cap


def check_verbosity(
    task: str,
    kind: str,
    baseline_tokens: float | None,
    candidate_tokens: float | None,
    *,
    n: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    short_tokens: float = SHORT_TOKENS,
    paired_tokens: list[tuple[float, float]] | None = None,
    max_tokens: float | None = None,
    confidence: float = 0.95,
) -> VerbosityCheck:
    """Compare mean completion tokens per sample of the two sides of one task (on evidence when ``paired_tokens``
    and ``max_tokens`` are given: see the module docstring)."""
    numbers: dict[str, float | int | str | None] = {
        "baseline_tokens": baseline_tokens, "candidate_tokens": candidate_tokens, "n": n,
        "verbosity_threshold": threshold,
    }
    if kind == "multiple_choice":
        return VerbosityCheck(task=task, passed=False, skipped=True, numbers=numbers,
                              message=f"{task}: multiple choice by log-likelihood generates no text")
    if not (_usable(baseline_tokens) and _usable(candidate_tokens)):
        return VerbosityCheck(task=task, passed=False, skipped=True, numbers=numbers,
                              message=f"{task}: no completion token counts recorded (the server or the eval source "
                              "reports no usage)")
    assert baseline_tokens is not None and candidate_tokens is not None
    where = f"{task}: mean completion tokens {baseline_tokens:.1f} -> {candidate_tokens:.1f}" + (
        f" over n={n}" if n is not None else "")
    note = ""
    if min(baseline_tokens, candidate_tokens) < short_tokens:
        note = (f"outputs average under {short_tokens:g} tokens, so the ratio is coarse: read the absolute counts "
                f"({candidate_tokens - baseline_tokens:+.1f} tokens per sample)")
    if baseline_tokens <= _EPS:
        change = 0.0 if candidate_tokens <= _EPS else math.inf
    else:
        change = (candidate_tokens - baseline_tokens) / baseline_tokens
    numbers["verbosity_change"] = change if math.isfinite(change) else None
    text = f"{where} ({'+inf' if not math.isfinite(change) else f'{change:+.1%}'}, limit ±{threshold:.0%})"
    if note:
        text += f"; note: {note}"
    if paired_tokens and max_tokens and baseline_tokens > _EPS:
        low, high = token_change_interval(paired_tokens, max_tokens, confidence)
        low_f, high_f = low / baseline_tokens, high / baseline_tokens
        numbers.update({"verbosity_change_low": low_f, "verbosity_change_high": high_f})
        text += f"; interval of the change [{low_f:+.1%}, {high_f:+.1%}] ({2 * confidence - 1:.0%}, exact)"
        if low_f > threshold + _EPS or high_f < -threshold - _EPS:
            return VerbosityCheck(task=task, passed=False, failure_class=FailureClass.VERBOSITY_EXCEEDED,
                                  message=text + ": wholly beyond the limit", note=note, numbers=numbers)
        return VerbosityCheck(task=task, passed=True, message=text + (
            ": no evidence of a change beyond the limit" if abs(change) > threshold + _EPS else ""),
            note=note, numbers=numbers)
    if abs(change) > threshold + _EPS:
        return VerbosityCheck(task=task, passed=False, failure_class=FailureClass.VERBOSITY_EXCEEDED, message=text,
                              note=note, numbers=numbers)
    return VerbosityCheck(task=task, passed=True, message=text, note=note, numbers=numbers)


def verbosity_outcome(check: VerbosityCheck, recipe: str, *, warn_as_error: bool = False) -> GateOutcome:
    """The typed record of one task's verbosity check (warn tier)."""
    numbers = dict(check.numbers)
    if check.note:
        numbers["verbosity_note"] = check.note
    return GateOutcome(gate="verbosity", recipe=recipe, task=check.task, tier=Tier.WARN,
                       status=breach_status(check.passed, Tier.WARN, warn_as_error=warn_as_error,
                                            skipped=check.skipped),
                       failure_class=None if check.passed or check.skipped else check.failure_class or
                       FailureClass.VERBOSITY_EXCEEDED, message=check.message, numbers=numbers)


def assert_verbosity(check: VerbosityCheck) -> None:
    """Warn-tier GateFailure on a breach; callers turn ``skipped`` into a skip themselves."""
    if not check.passed and not check.skipped:
        raise GateFailure(check.failure_class or FailureClass.VERBOSITY_EXCEEDED, check.message, tier=Tier.WARN)
