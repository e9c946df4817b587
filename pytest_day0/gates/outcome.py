"""The record one gate test leaves behind: what the verdict and every report are computed from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import FailureClass, Tier

Status = Literal["passed", "failed", "warned", "skipped"]


class GateOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    gate: str  # "setup", "ptq.size", "ptq.coverage", "ptq.metadata", "deploy", "run", "floor", "quality", "task_set"
    recipe: str | None = None
    task: str | None = None
    side: str | None = None  # "baseline" | "candidate" for deploy/run gates
    status: Status
    tier: Tier = Tier.HARD
    failure_class: FailureClass | None = None
    message: str = ""
    numbers: dict[str, float | int | str | None] = Field(default_factory=dict)
    nodeid: str | None = None
    # a screen's prediction (e.g. the divergence pre-check's KL above a tolerance): in the reasons, never a decision
    advisory: bool = False


def breach_status(passed: bool, tier: Tier, *, warn_as_error: bool = False, skipped: bool = False) -> Status:
    """passed / skipped, or a breach: failed for the hard tier, warned for the warn tier (unless it counts as hard)."""
    if skipped:
        return "skipped"
    if passed:
        return "passed"
    return "warned" if tier is Tier.WARN and not warn_as_error else "failed"


def stage_outcome(gate: str, *, recipe: str | None = None, task: str | None = None, side: str | None = None,
                  numbers: dict[str, float | int | str | None] | None = None, message: str = "") -> GateOutcome:
    """A gate whose test only needed its stage to succeed (setup, ptq, deploy): passed, with its numbers."""
    return GateOutcome(gate=gate, recipe=recipe, task=task, side=side, status="passed", message=message,
                       numbers=dict(numbers or {}))
