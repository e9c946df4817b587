"""The failure taxonomy every stage and gate speaks.

The classes are the ModelOpt day0-release skill's strawman plus ours; their string values are a
stable public contract (JUnit properties, verdict.json, GitHub annotations read them), so never rename one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class FailureClass(StrEnum):
    SYSTEMIC = "SYSTEMIC"
    USER_CONFIG_ERROR = "USER_CONFIG_ERROR"
    MODEL_UNSUPPORTED = "MODEL_UNSUPPORTED"
    QUANT_COVERAGE_FAILURE = "QUANT_COVERAGE_FAILURE"
    SIZE_NOT_REDUCED = "SIZE_NOT_REDUCED"
    METADATA_MISMATCH = "METADATA_MISMATCH"
    DEPLOYMENT_HEALTH_FAILED = "DEPLOYMENT_HEALTH_FAILED"
    CHECKPOINT_NOT_SERVABLE = "CHECKPOINT_NOT_SERVABLE"
    INFRA_TRANSIENT = "INFRA_TRANSIENT"
    EVAL_JUDGE_FAILED = "EVAL_JUDGE_FAILED"
    SAMPLE_ACCOUNTING_FAILED = "SAMPLE_ACCOUNTING_FAILED"
    REGRESSION = "REGRESSION"
    CATASTROPHIC_REGRESSION = "CATASTROPHIC_REGRESSION"
    VERBOSITY_EXCEEDED = "VERBOSITY_EXCEEDED"
    EXTERNAL_BASELINE_MISMATCH = "EXTERNAL_BASELINE_MISMATCH"
    INCONCLUSIVE = "INCONCLUSIVE"
    ANOMALOUS = "ANOMALOUS"
    UNKNOWN = "UNKNOWN"


# A failure of one of these means the model+recipe cannot be released as asked: no amount of
# re-running helps, so downstream gates skip and the verdict is INFEASIBLE.
INFEASIBLE_CLASSES = frozenset(
    {FailureClass.MODEL_UNSUPPORTED, FailureClass.QUANT_COVERAGE_FAILURE, FailureClass.CHECKPOINT_NOT_SERVABLE}
)


class Tier(StrEnum):
    HARD = "hard"  # fails the run
    WARN = "warn"  # reported, fails only under --day0-gate-mode hard


class Day0Error(Exception):
    """A stage could not produce its artifact; carries the class so the gate tests can report it.

    Raised by stages (I/O side). ``str()`` is one line that starts with the class, so whatever prints
    it (a skip reason, a usage error, a log) tells the reader what kind of failure it was.
    """

    def __init__(self, failure_class: FailureClass, message: str, **detail: Any) -> None:
        self.failure_class = FailureClass(failure_class)
        self.message = " ".join(str(message).split())  # always one line
        self.detail = detail
        super().__init__(f"[{self.failure_class}] {self.message}")


class GateFailure(AssertionError):
    """A gate that did not pass: an ordinary assertion, so pytest reports it like any other test failure."""

    def __init__(
        self, failure_class: FailureClass, message: str, tier: Tier = Tier.HARD, **detail: Any
    ) -> None:
        self.failure_class = FailureClass(failure_class)
        self.tier = Tier(tier)
        self.message = " ".join(str(message).split())
        self.detail = detail
        super().__init__(f"[{self.failure_class}] {self.message}")
