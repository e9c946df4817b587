"""Task files: what a task is, how its samples are scored, and on which scale its metric lives.

A task is two files so users can bring their own: ``<name>.task.json`` (or ``.yaml``) — the spec — and
the JSONL of samples it names. The scale is declared, never inferred from values: a 0-100 task whose
scores happen to be <= 1 must not be read as 0-1 (a known weakness of the ModelOpt skill's gate).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pytest_day0.failures import Day0Error, FailureClass

BUILTIN_TASK_DIR = Path(__file__).resolve().parent.parent / "demo" / "tasks"


class TaskSpec(BaseModel):
    """One task's spec. ``scale`` is [lo, hi] of the reported metric: [0, 1], [0, 100], [-100, 100]..."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    kind: Literal["multiple_choice", "generate"]
    metric: str
    scale: tuple[float, float]
    higher_is_better: bool = True
    samples: str
    stop: tuple[str, ...] = ()
    max_tokens: int = Field(default=16, ge=1, le=4096)
    answer_pattern: str | None = None
    few_shot: int = Field(default=0, ge=0)
    chat: bool = False
    repeats: int = Field(default=1, ge=1)

    @field_validator("scale")
    @classmethod
    def _ordered_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"scale must be [lo, hi] with lo < hi, got {list(v)}")
        return v

    @field_validator("few_shot")
    @classmethod
    def _no_silent_few_shot(cls, v: int) -> int:
        # declared for years, never applied by the scorer: refusing it beats scoring 0-shot while the spec says 5
        if v:
            raise ValueError("few_shot is not applied by the built-in scorer: write the examples into each "
                             "sample's prompt, or use the lm-eval engine (--day0-lm-eval-args num_fewshot=...)")
        return v

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        # a bad regex must fail when the task loads, not as an UNKNOWN error on every sample
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"answer_pattern {v!r} is not a valid regex ({exc})") from None
        return v

    @property
    def scale_range(self) -> float:
        return self.scale[1] - self.scale[0]

    def to_scale(self, fraction: float) -> float:
        """A 0..1 per-sample correctness mean, expressed on the task's own scale."""
        return self.scale[0] + fraction * self.scale_range


class Sample(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    prompt: str
    target: int | str
    choices: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _target_fits(self) -> Sample:
        bad_index = not isinstance(self.target, int) or not 0 <= self.target < len(self.choices or ())
        if self.choices is not None and bad_index:
            raise ValueError(f"target must index choices (0..{len(self.choices) - 1})")
        return self


class Task(BaseModel):
    model_config = ConfigDict(frozen=True)

    spec: TaskSpec
    samples: tuple[Sample, ...]
    source: str  # where it came from, for messages
    members: tuple[str, ...] = ()  # an aggregate of other tasks (an lm-eval group): their records, ids <task>/<id>

    @property
    def name(self) -> str:
        return self.spec.name


def builtin_task_names() -> list[str]:
    return sorted(p.name.removesuffix(".task.json") for p in BUILTIN_TASK_DIR.glob("*.task.json"))


def _read_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # not a ValueError: would escape load_task as a traceback
            raise ValueError(f"not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("a task spec must be a mapping")
    return data


def load_task(name_or_path: str, limit: int | None = None) -> Task:
    """A built-in name (``arc_like``) or a path to a spec file; errors are one USER_CONFIG_ERROR line."""
    path = Path(name_or_path)
    if not path.suffix:
        candidate = BUILTIN_TASK_DIR / f"{name_or_path}.task.json"
        if not candidate.exists():
            raise Day0Error(
                FailureClass.USER_CONFIG_ERROR,
                f"unknown task {name_or_path!r}: not a built-in ({', '.join(builtin_task_names())}) nor a spec file",
            )
        path = candidate
    if not path.is_file():
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task spec {path} does not exist")
    try:
        spec = TaskSpec.model_validate(_read_spec(path))
    except (ValueError, ValidationError, OSError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc)
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task spec {path}: {why}") from None
    samples_path = (path.parent / spec.samples).resolve()
    if not samples_path.is_file():
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task {spec.name}: samples file {samples_path} does not exist")
    samples: list[Sample] = []
    seen: set[str] = set()
    try:
        raw_lines = samples_path.read_bytes().decode("utf-8").split("\n")  # not splitlines: JSON may hold U+2028
    except (OSError, UnicodeDecodeError) as exc:
        why = (f"not UTF-8 ({exc.reason} at byte {exc.start})" if isinstance(exc, UnicodeDecodeError)
               else exc.strerror or str(exc))
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task {spec.name}: {samples_path.name}: {why}") from None
    for lineno, line in enumerate(raw_lines, 1):
        if not line.strip():
            continue
        try:
            sample = Sample.model_validate(json.loads(line))
        except (ValueError, ValidationError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc)
            raise Day0Error(
                FailureClass.USER_CONFIG_ERROR, f"task {spec.name}: {samples_path.name} line {lineno}: {why}"
            ) from None
        if spec.kind == "multiple_choice" and sample.choices is None:
            raise Day0Error(
                FailureClass.USER_CONFIG_ERROR,
                f"task {spec.name}: {samples_path.name} line {lineno}: multiple_choice sample has no choices",
            )
        if sample.id in seen:
            raise Day0Error(
                FailureClass.USER_CONFIG_ERROR,
                f"task {spec.name}: {samples_path.name} line {lineno}: duplicate sample id {sample.id!r}",
            )
        seen.add(sample.id)
        samples.append(sample)
    if not samples:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task {spec.name}: {samples_path.name} has no samples")
    if limit is not None:
        samples = samples[:limit]
    return Task(spec=spec, samples=tuple(samples), source=str(path))
