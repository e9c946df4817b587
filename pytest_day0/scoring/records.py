"""Per-sample records: the unit every gate and comparison works on.

Records are appended to a JSONL file per (side, task) as they finish, so a killed run loses nothing
and a re-run re-scores only what is missing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SampleRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    task: str
    prompt_hash: str  # sha256 of the exact prompt text sent; a changed task spec never reuses old records
    prompt: str | None = None  # the prompt text sent (context for multiple choice): pairing names where sides differ
    target: int | str
    response: str | None = None  # generated text (generate) or the chosen continuation (multiple choice)
    choice_logprobs: list[float] | None = None  # sum of continuation token logprobs per choice
    choice_greedy: list[bool] | None = None
    correct: float | None = None  # 0/1 for exact metrics; None when the sample errored
    correct_norm: float | None = None  # acc_norm for multiple choice (logprob / byte length)
    completion_tokens: int | None = None
    error: str | None = None  # one line, starts with the failure class when known
    attempts: int = 1
    latency_s: float | None = None


class TaskResult(BaseModel):
    """One side's evaluation of one task: the run gate's input."""

    model_config = ConfigDict(extra="forbid")

    task: str
    side: str  # "baseline" | "candidate"
    status: str  # "SUCCESS" | "INCOMPLETE" | "FAILED"
    expected_samples: int
    scored_samples: int
    errored_samples: int
    score: float | None  # on the task's own scale
    score_norm: float | None = None  # acc_norm for multiple choice
    mean_completion_tokens: float | None = None
    scale: tuple[float, float]
    metric: str
    wall_s: float = 0.0
    records_path: str
    first_error: str | None = None
