"""Test report properties -> GateOutcome: the one place that knows how gate tests label themselves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pytest_day0.failures import FailureClass, Tier
from pytest_day0.gates.outcome import GateOutcome

_IDENTITY = {"day0_gate", "day0_status", "tier", "failure_class", "recipe", "task", "side", "day0_message"}
_NUMERIC_KEYS = {"size_ratio", "source_bytes", "output_bytes", "baseline", "candidate", "delta", "drop_fraction"}


def _number(value: Any) -> float | int | str | None:
    if isinstance(value, (int, float)) or value is None:
        return value
    try:
        return float(value) if "." in str(value) or "e" in str(value).lower() else int(value)
    except (TypeError, ValueError):
        return str(value)


def outcome_from_properties(nodeid: str, properties: Iterable[tuple[str, Any]]) -> GateOutcome | None:
    props: dict[str, Any] = {}
    for key, value in properties:
        props[key] = value  # later values win (a status set at call time overrides none)
    gate = props.get("day0_gate")
    status = props.get("day0_status")
    if not gate or status not in ("passed", "failed", "warned", "skipped"):
        return None
    side = props.get("side")
    recipe = props.get("recipe") or (side if side and side != "baseline" else None)
    cls = props.get("failure_class")
    try:
        failure_class = FailureClass(cls) if cls else None
    except ValueError:
        failure_class = FailureClass.UNKNOWN
    numbers = {k: _number(v) for k, v in props.items() if k not in _IDENTITY}
    return GateOutcome(
        gate=gate, recipe=recipe, task=props.get("task"), side=side, status=status,
        tier=Tier(props.get("tier", "hard")), failure_class=failure_class,
        message=str(props.get("day0_message", "")), numbers=numbers, nodeid=nodeid,
    )
