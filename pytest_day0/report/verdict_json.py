"""verdict.json: the machine-readable result of a release session.

Schema ``pytest-day0/verdict/v1`` (a consumer checks ``schema`` first; a breaking change bumps the suffix)::

    {
      "schema": "pytest-day0/verdict/v1",
      "session": {                        # SessionVerdict
        "verdicts": [                     # one per recipe
          {"recipe", "decision": "ACCEPT|INCONCLUSIVE|REGRESSION|ANOMALOUS|INFEASIBLE", "reasons": [str],
           "regressed_tasks": [str], "inconclusive_tasks": [str], "samples_needed": int|null,
           "failure_classes": [str], "size_ratio": float|null,
           "recommendation": str, "hard_failed": bool, "exit_status": int, "counts": {status: int}}
        ],
        "recommended": str|null,          # the smallest recipe that ACCEPTs
        "recommendation": str,
        "exit_status": int                # 0 pass, 1 a hard gate failed, 2 bad input
      },
      "comparisons": [                    # TaskComparison, one per (recipe, task); scores on the task's own scale
        {"task", "recipe", "scale": [lo, hi], "higher_is_better", "metric", "baseline", "candidate", "delta",
         "drop_fraction", "gain_fraction", "relative", "threshold", "floor_fraction", "threshold_points",
         "floor_points", "abstain",
         "stat": "paired|point", "n", "ci_low", "ci_high" (interval of delta, own scale), "confidence"
         (one-sided, of each bound), "test", "p_value", "drop_fraction_low", "drop_fraction_high",
         "mde_points", "samples_needed",
         "floor" | "quality" | "anomaly": {"gate", "tier", "passed", "skipped", "failure_class", "message"}}
      ],
      "extra": {...}                      # free-form: model, versions, timings, paths
    }

Written atomically (temp file in the same directory + ``os.replace``) so a killed run never leaves half a file
where a CI step expects a verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.compare import TaskComparison
from pytest_day0.verdict import SessionVerdict
from pytest_day0.workspace import atomic_write_text

SCHEMA = "pytest-day0/verdict/v1"


class VerdictDocument(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_: Literal["pytest-day0/verdict/v1"] = Field(default="pytest-day0/verdict/v1", alias="schema")
    session: SessionVerdict
    comparisons: list[TaskComparison] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity; a number that is not one is written as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def verdict_document(
    session_verdict: SessionVerdict, comparisons: Sequence[TaskComparison], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    doc = VerdictDocument(session=session_verdict, comparisons=list(comparisons), extra=dict(extra or {}))
    data: dict[str, Any] = _finite(doc.model_dump(mode="json", by_alias=True))
    return data


def write_verdict_json(
    path: str | os.PathLike[str],
    session_verdict: SessionVerdict,
    comparisons: Sequence[TaskComparison],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the document atomically; ``extra`` values that JSON cannot hold are written as strings."""
    target = Path(path)
    text = json.dumps(verdict_document(session_verdict, comparisons, extra), indent=2, default=str, allow_nan=False)
    atomic_write_text(target, text + "\n")
    return target


def load_verdict_json(path: str | os.PathLike[str]) -> VerdictDocument:
    """Read a verdict.json back; anything unreadable or of another schema is one USER_CONFIG_ERROR line."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"cannot read verdict {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"{p} is not a {SCHEMA} document (schema: {found!r})")
    try:
        return VerdictDocument.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"{p}: {where}: {first['msg']}") from None
