"""Published baseline scores (``--day0-published FILE``): what the model's authors say the baseline scores.

A file maps task names to a score and the scale that score is on, in JSON or YAML::

    {"arc_like": {"score": 84.2, "scale": [0, 100], "source": "model card, 25-shot"},
     "tau_like": {"score": 0.5, "scale": 1}}

``scale`` is ``[lo, hi]`` or one number ``hi`` (meaning ``[0, hi]``); it may differ from the task's own scale
(a model card in percent, a task on 0–1): the check converts through the fraction of the range. Every problem
is one USER_CONFIG_ERROR line, raised when the session starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass


class PublishedScore(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    score: float
    scale: tuple[float, float]
    source: str = ""

    def fraction(self) -> float:
        lo, hi = self.scale
        return (self.score - lo) / (hi - lo)


def _error(where: str, why: str) -> Day0Error:
    return Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-published {where}: {why}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def parse_published(data: Any, where: str = "file") -> dict[str, PublishedScore]:
    """Validate the mapping read from the file (pure)."""
    if not isinstance(data, Mapping) or not data:
        raise _error(where, "expected a non-empty mapping of task name -> {score, scale}")
    out: dict[str, PublishedScore] = {}
    for task, entry in data.items():
        if not isinstance(entry, Mapping):
            raise _error(where, f"{task}: expected {{score, scale}}, got {type(entry).__name__}")
        unknown = set(entry) - {"score", "scale", "source"}
        if unknown:
            raise _error(where, f"{task}: unknown keys {sorted(unknown)} (score, scale, source)")
        score = _number(entry.get("score"))
        if score is None:
            raise _error(where, f"{task}: score must be a finite number, got {entry.get('score')!r}")
        raw = entry.get("scale")
        hi_only = _number(raw)
        if hi_only is not None:
            scale = (0.0, hi_only)
        elif isinstance(raw, (list, tuple)) and len(raw) == 2 and all(_number(v) is not None for v in raw):
            scale = (float(raw[0]), float(raw[1]))
        else:
            raise _error(where, f"{task}: scale must be [lo, hi] or a number hi, got {raw!r}")
        if not scale[0] < scale[1]:
            raise _error(where, f"{task}: scale must have lo < hi, got {list(scale)}")
        if not scale[0] <= score <= scale[1]:
            raise _error(where, f"{task}: score {score:g} is outside its scale [{scale[0]:g}, {scale[1]:g}]")
        out[str(task)] = PublishedScore(task=str(task), score=score, scale=scale, source=str(entry.get("source", "")))
    return out


def load_published(path: str | Path) -> dict[str, PublishedScore]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise _error(str(p), exc.strerror or str(exc)) from None
    try:
        if p.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json and yaml raise different types; either way the file is unreadable
        raise _error(str(p), f"not valid {'YAML' if p.suffix.lower() in {'.yaml', '.yml'} else 'JSON'}: "
                     f"{' '.join(str(exc).split())[:200]}") from None
    return parse_published(data, str(p))
