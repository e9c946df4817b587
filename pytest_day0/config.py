"""One validated description of the run, built once from CLI > environment > ini > defaults.

Every option lives in OPTIONS exactly once: the pytest option, its ini key, its environment variable
and its help text all come from the same row, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pytest_day0.checkpoint.recipes import Recipe, resolve_recipe
from pytest_day0.failures import Day0Error, FailureClass

DEMO_MODEL_ID = "demo"
DEMO_TASKS = ("arc_like", "gsm_like", "tau_like")


@dataclass(frozen=True)
class Option:
    name: str  # RunConfig field
    flag: str  # CLI flag
    help: str
    kind: Literal["str", "int", "float", "bool", "choice"] = "str"
    choices: tuple[str, ...] = ()
    default: Any = None
    secret: bool = False

    @property
    def ini(self) -> str:
        return "day0_" + self.name

    @property
    def env(self) -> str:
        return "DAY0_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", "--day0-model", "model to release: 'demo' (embedded), a local checkpoint path or a cached HF id"),
    Option("recipe", "--recipe", "quantization recipe(s), comma separated, as hf_ptq.py names them (fp8, nvfp4, "
           "int4_awq, ...)", default="fp8"),
    Option("tasks", "--day0-tasks", "comma separated built-in task names or task spec files (default: the demo tasks)"),
    Option("limit", "--day0-limit", "evaluate only the first N samples of each task", kind="int"),
    Option("threshold", "--day0-threshold", "quality tier: largest allowed drop as a fraction of the task's range "
           "(0.01 = 1 point on 0-100)", kind="float", default=0.01),
    Option("floor", "--day0-floor", "catastrophic floor: drop (fraction of range) that fails CI", kind="float",
           default=0.10),
    Option("relative", "--day0-relative", "measure drops relative to the baseline score instead of the task's range",
           kind="bool", default=False),
    Option("gate_mode", "--day0-gate-mode", "warn: quality breaches are reported; hard: they fail the run",
           kind="choice", choices=("warn", "hard"), default="warn"),
    Option("workdir", "--day0-workdir", "workspace for checkpoints, records and reports (default .day0 in rootdir)"),
    Option("quantize", "--day0-quantize", "quantize engine", kind="choice", choices=("modelopt", "existing"),
           default="modelopt"),
    Option("checkpoint", "--day0-checkpoint", "an already quantized checkpoint (with --day0-quantize existing)"),
    Option("serve", "--day0-serve", "serve engine", kind="choice", choices=("reference", "external"),
           default="reference"),
    Option("baseline_url", "--day0-baseline-url", "OpenAI-compatible URL serving the baseline (--day0-serve external)"),
    Option("candidate_url", "--day0-candidate-url", "URL serving the candidate (--day0-serve external)"),
    Option("api_key", "--day0-api-key", "API key for external endpoints (prefer the DAY0_API_KEY environment variable)",
           secret=True),
    Option("concurrency", "--day0-concurrency", "requests in flight per evaluation", kind="int", default=16),
    Option("fresh", "--day0-fresh", "ignore cached artifacts and run every stage again", kind="bool", default=False),
    Option("stage_timeout", "--day0-stage-timeout", "seconds any one stage may take", kind="float", default=3600.0),
    Option("calib_size", "--day0-calib-size", "calibration samples for PTQ", kind="int", default=64),
)


class RunConfig(BaseModel):
    """The run. Frozen: one object flows down to every stage and gate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    recipes: tuple[str, ...] = ("fp8",)
    tasks: tuple[str, ...] = DEMO_TASKS
    limit: int | None = Field(default=None, ge=1)
    threshold: float = Field(default=0.01, ge=0, le=1)
    floor: float = Field(default=0.10, ge=0, le=1)
    relative: bool = False
    gate_mode: Literal["warn", "hard"] = "warn"
    workdir: Path = Path(".day0")
    quantize: Literal["modelopt", "existing"] = "modelopt"
    checkpoint: Path | None = None
    serve: Literal["reference", "external"] = "reference"
    baseline_url: str | None = None
    candidate_url: str | None = None
    api_key: SecretStr | None = None
    concurrency: int = Field(default=16, ge=1, le=1024)
    fresh: bool = False
    stage_timeout: float = Field(default=3600.0, gt=0)
    calib_size: int = Field(default=64, ge=1)

    @field_validator("recipes")
    @classmethod
    def _canonical_recipes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for name in v:
            canonical = resolve_recipe(name).name  # raises Day0Error for unknown names
            if canonical not in out:
                out.append(canonical)
        if not out:
            raise ValueError("at least one recipe is required")
        return tuple(out)

    @field_validator("baseline_url", "candidate_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/").removesuffix("/v1") if v else v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.floor < self.threshold:
            raise ValueError(f"floor ({self.floor}) must be at least the quality threshold ({self.threshold})")
        if self.quantize == "existing" and self.checkpoint is None:
            raise ValueError("--day0-quantize existing needs --day0-checkpoint PATH")
        if self.quantize == "existing" and len(self.recipes) != 1:
            raise ValueError("--day0-quantize existing gates one checkpoint: give exactly one --recipe")
        if self.serve == "external" and not (self.baseline_url and self.candidate_url):
            raise ValueError("--day0-serve external needs --day0-baseline-url and --day0-candidate-url")
        if self.serve == "external" and len(self.recipes) != 1:
            raise ValueError("--day0-serve external serves one candidate: give exactly one --recipe")
        return self

    @property
    def enabled(self) -> bool:
        return self.model is not None

    @property
    def recipe_objects(self) -> tuple[Recipe, ...]:
        return tuple(resolve_recipe(r) for r in self.recipes)

    def public_dict(self) -> dict[str, Any]:
        """For reports: every value, secrets masked."""
        data = self.model_dump(mode="json")
        data["api_key"] = "**********" if self.api_key else None
        return data

    def fingerprint(self, *fields: str) -> str:
        data = {f: self.model_dump(mode="json")[f] for f in fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _coerce(option: Option, raw: Any) -> Any:
    """Environment and ini values are strings; CLI values are already typed by argparse."""
    if raw is None or not isinstance(raw, str):
        return raw
    if option.kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{option.flag}: expected a boolean, got {raw!r}")
    return raw


def build_config(
    cli: Mapping[str, Any],
    ini: Callable[[str], Any],
    environ: Mapping[str, str] | None = None,
    rootdir: Path | None = None,
) -> RunConfig:
    """CLI > environment > ini > default, validated once; any problem is one USER_CONFIG_ERROR line."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = cli.get(option.name)
        if raw is None or (option.kind == "bool" and raw is False):
            raw = environ.get(option.env)
        if raw is None or raw == "":
            ini_value = ini(option.ini)
            raw = ini_value if ini_value not in (None, "", []) else None
        if raw is None:
            continue
        try:
            values[option.name] = _coerce(option, raw)
        except ValueError as exc:
            raise Day0Error(FailureClass.USER_CONFIG_ERROR, str(exc)) from None
    if "recipe" in values:
        values["recipes"] = _split(str(values.pop("recipe")))
    if "tasks" in values:
        values["tasks"] = _split(str(values["tasks"]))
    if rootdir is not None:
        workdir = Path(values.get("workdir") or ".day0")
        values["workdir"] = workdir if workdir.is_absolute() else rootdir / workdir
    try:
        return RunConfig.model_validate(values)
    except Day0Error:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = next((o.flag for o in OPTIONS if o.name == field or (field == "recipes" and o.name == "recipe")), field)
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, Day0Error):
            raise ctx_error from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = f"{flag}: " if flag else ""
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"{where}{msg}") from None
