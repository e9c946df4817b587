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
