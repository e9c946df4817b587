"""One validated description of the run, built once from CLI > environment > ini > defaults.

Every option lives in OPTIONS exactly once: the pytest option, its ini key, its environment variable
and its help text all come from the same row, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pytest_day0.checkpoint.recipes import Recipe, resolve_recipe
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.options import DEMO_TASKS, OPTIONS, Option


def check_endpoint_url(url: str) -> str:
    """An OpenAI-compatible endpoint's base URL, checked before anything connects: http(s), a host, a port that
    exists, no credentials. Returned without a trailing ``/`` or ``/v1`` (Endpoint's contract). Raises ValueError
    with one line: a URL without a scheme is otherwise retried as a connection error, port 99999 an OverflowError.
    """
    url = url.strip()
    if urlsplit(url).username is not None:  # first: no later message may echo it
        raise ValueError("put no credentials in an endpoint URL (it is written to every report); "
                         "give the key as DAY0_API_KEY")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must be an http(s) URL, got {url!r}")
    import httpx

    try:  # here, as one line: later a bad port is a raw traceback that can show the key among its locals
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a port that is no number or out of range
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise ValueError(f"not a valid URL: {url!r} ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"names no host: {url!r}")
    if port == 0:
        raise ValueError(f"port 0 is not a port a server listens on: {url!r}")
    return url.rstrip("/").removesuffix("/v1")


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
    stat: Literal["paired", "point"] = "paired"
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    verbosity: float = Field(default=0.05, ge=0)
    divergence_texts: int = Field(default=32, ge=0)
    divergence_top_k: int = Field(default=20, ge=1)
    divergence_floor: float = Field(default=0.5, ge=0, le=1)
    divergence_kl: float = Field(default=0.25, ge=0)
    published: Path | None = None
    workdir: Path = Path(".day0")
    quantize: str = "modelopt"  # "none" or a registered quantize engine (pytest_day0.engines)
    checkpoint: Path | None = None
    eval: str = "scorer"  # a registered eval engine (scorer, lm-eval, a plugin's)
    suite: str | None = None
    suites: str | None = None
    lm_eval_include: tuple[Path, ...] = ()
    lm_eval_args: str | None = None
    lm_eval_python: str | None = None
    lm_eval_baseline: Path | None = None
    lm_eval_candidate: Path | None = None
    serve: str = "reference"  # a registered serve engine
    vllm_python: str | None = None
    vllm_args: str | None = None
    baseline_url: str | None = None
    candidate_url: str | None = None
    baseline_model: str | None = None
    candidate_model: str | None = None
    api_key: SecretStr | None = None
    concurrency: int = Field(default=16, ge=1, le=1024)
    adaptive: bool = False
    mlflow: bool = False
    mlflow_experiment: str = Field(default="pytest-day0", min_length=1)
    fresh: bool = False
    stage_timeout: float = Field(default=3600.0, gt=0)
    calib_size: int = Field(default=64, ge=1)
    executor: str = "local"
    ssh_key: Path | None = None
    ssh_key_passphrase: SecretStr | None = None
    known_hosts: Path | None = None
    trust_new_host: bool = False
    sbatch_args: str | None = None
    remote_workdir: str | None = None
    remote_python: str | None = None
    remote_model: str | None = None
    ptq_command: str | None = None
    serve_command: str | None = None

    @field_validator("executor")
    @classmethod
    def _executor_url(cls, v: str) -> str:
        from pytest_day0.remote import parse_executor

        parse_executor(v)  # ValueError -> one USER_CONFIG_ERROR line
        return v.strip() or "local"

    @field_validator("sbatch_args")
    @classmethod
    def _sbatch_args(cls, v: str | None) -> str | None:
        from pytest_day0.remote import split_sbatch_args

        split_sbatch_args(v)
        return v

    @field_validator("ptq_command", "serve_command")
    @classmethod
    def _command_template(cls, v: str | None, info: Any) -> str | None:
        from pytest_day0.remote import PTQ_FIELDS, SERVE_FIELDS, check_template

        if v is not None:
            check_template(v, PTQ_FIELDS if info.field_name == "ptq_command" else SERVE_FIELDS)
        return v

    @field_validator("quantize", "serve", "eval")
    @classmethod
    def _registered_engine(cls, v: str, info: Any) -> str:
        from pytest_day0.engines import registry

        v = v.strip()
        if (info.field_name, v) != ("quantize", "none"):
            registry().get(info.field_name, v)  # Day0Error: one USER_CONFIG_ERROR line naming the registered ones
        return v

    @field_validator("lm_eval_args")
    @classmethod
    def _lm_eval_args(cls, v: str | None) -> str | None:
        from pytest_day0.scoring.lm_eval_settings import parse_lm_eval_args

        parse_lm_eval_args(v)  # SettingsError (a ValueError) -> one USER_CONFIG_ERROR line
        return v

    @field_validator("lm_eval_include", mode="before")
    @classmethod
    def _include_dirs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = tuple(p.strip() for p in v.split(",") if p.strip())
        for folder in v or ():
            if not Path(folder).expanduser().is_dir():
                raise ValueError(f"{folder} is not a folder (of lm-eval task YAMLs)")
        return tuple(Path(folder).expanduser().resolve() for folder in v or ())

    @field_validator("vllm_args")
    @classmethod
    def _shell_words(cls, v: str | None) -> str | None:
        import shlex

        if v is not None:
            shlex.split(v)  # ValueError (an unclosed quote) -> one USER_CONFIG_ERROR line
        return v

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

    @model_validator(mode="before")
    @classmethod
    def _lm_eval_defaults(cls, data: Any) -> Any:
        """lm-eval folders imply ``eval=lm-eval`` in reading mode, which gates no PTQ (quantize none) over every
        logged task; a suite implies the lm-eval engine and gives the task list."""
        if not isinstance(data, dict):
            return data
        folders = bool(data.get("lm_eval_baseline") or data.get("lm_eval_candidate"))
        if (folders or data.get("suite")) and "eval" not in data:
            data = {**data, "eval": "lm-eval"}
        if data.get("eval") == "lm-eval" and folders:
            data = {"quantize": "none", "tasks": (), **data}
        if data.get("suite"):
            from pytest_day0.scoring.lm_eval_settings import load_suites, suite_tasks

            if data.get("tasks"):
                raise ValueError("give --day0-suite or --day0-tasks, not both")
            data = {**data, "tasks": suite_tasks(str(data["suite"]), load_suites(data.get("suites")))}
        return data

    @field_validator("mlflow")
    @classmethod
    def _mlflow_client(cls, v: bool) -> bool:
        """Checked now, not after an hour of PTQ: the client must be importable (found, not imported: seconds)."""
        import importlib.util

        if v and importlib.util.find_spec("mlflow") is None:
            raise ValueError("needs MLflow's client: pip install 'pytest-day0[mlflow]'")
        return v

    @field_validator("published")
    @classmethod
    def _published_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            from pytest_day0.scoring.published import load_published

            load_published(v)  # a bad file stops the session at start, as one line
        return v

    @field_validator("baseline_url", "candidate_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        return check_endpoint_url(v) if v is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.floor < self.threshold:
            raise ValueError(f"floor ({self.floor}) must be at least the quality threshold ({self.threshold})")
        if self.quantize not in {"none", "existing"}:
            from pytest_day0.engines import quantize_engine

            engine = quantize_engine(self.quantize)
            for recipe in self.recipe_objects:
                if not engine.supports(recipe):
                    raise ValueError(f"--recipe {recipe.name}: quantize engine {self.quantize} does not make it "
                                     f"(made by: {', '.join(recipe.engines)})")
        if self.quantize == "modelopt" and self.executor == "local":  # a remote node may well have a GPU
            _refuse_cuda_only_recipes(self.recipe_objects)
        if self.quantize == "llmcompressor" and self.serve == "reference" and not self.serve_command:
            raise ValueError("--day0-quantize llmcompressor writes compressed-tensors checkpoints, which the reference "
                             "server does not emulate: add --day0-serve vllm")
        if self.quantize == "existing" and self.checkpoint is None:
            raise ValueError("--day0-quantize existing needs --day0-checkpoint PATH")
        if self.quantize == "existing" and len(self.recipes) != 1:
            raise ValueError("--day0-quantize existing gates one checkpoint: give exactly one --recipe")
        if self.serve == "external" and not (self.baseline_url and self.candidate_url):
            raise ValueError("--day0-serve external needs --day0-baseline-url and --day0-candidate-url")
        if self.serve != "external" and (self.baseline_model or self.candidate_model):
            raise ValueError("--day0-baseline-model/--day0-candidate-model name the models of external endpoints: "
                             "add --day0-serve external")
        if self.serve == "external" and len(self.recipes) != 1:
            raise ValueError("--day0-serve external serves one candidate: give exactly one --recipe")
        if self.adaptive and self.stat != "paired":
            raise ValueError("--day0-adaptive decides on the paired confidence sequence: drop --day0-stat point")
        if self.adaptive and self.relative:
            raise ValueError("--day0-adaptive stops against fixed limits; --day0-relative makes them depend on the "
                             "measured baseline: use one or the other")
        if self.adaptive and self.lm_eval_folders:
            raise ValueError("--day0-adaptive chooses which items to evaluate: finished lm-eval folders have none "
                             "left to choose")
        if self.adaptive and self.eval == "lm-eval":
            raise ValueError("--day0-adaptive runs with the built-in scorer (--day0-eval builtin); the lm-eval "
                             "engine evaluates whole tasks")
        if self.lm_eval_folders:
            if not (self.lm_eval_baseline and self.lm_eval_candidate):
                raise ValueError("reading lm-eval folders needs --day0-lm-eval-baseline and --day0-lm-eval-candidate "
                                 "(without either, --day0-eval lm-eval runs lm-eval here)")
            if self.eval != "lm-eval":
                raise ValueError("--day0-lm-eval-baseline/--day0-lm-eval-candidate need --day0-eval lm-eval")
            if self.suite:
                raise ValueError("--day0-suite runs lm-eval here; lm-eval folders are read as they are "
                                 "(choose tasks with --day0-tasks)")
            if self.quantize == "modelopt":
                raise ValueError("--day0-eval lm-eval reads finished results: use --day0-quantize none (the "
                                 "default) or existing with --day0-checkpoint")
            if len(self.recipes) != 1:
                raise ValueError("--day0-eval lm-eval compares one candidate: give exactly one --recipe (its label)")
        elif self.quantize == "none" and self.serve != "external":
            raise ValueError("--day0-quantize none leaves nothing to serve: use --day0-serve external or "
                             "--day0-eval lm-eval")
        if self.lm_eval_engine:
            from pytest_day0.scoring.lm_eval_settings import parse_task_request

            for task in self.tasks:
                parse_task_request(task)
        elif self.suite or self.lm_eval_include or self.lm_eval_args or self.lm_eval_python:
            raise ValueError("--day0-suite, --day0-lm-eval-include, --day0-lm-eval-args and --day0-lm-eval-python "
                             "set the lm-eval engine: add --day0-eval lm-eval")
        if self.executor == "local":
            for name, flag in (("ptq_command", "--day0-ptq-command"), ("serve_command", "--day0-serve-command"),
                               ("remote_model", "--day0-remote-model"), ("sbatch_args", "--day0-sbatch-args")):
                if getattr(self, name):
                    raise ValueError(f"{flag} is for a remote executor: add --day0-executor ssh://... or slurm://...")
        elif self.sbatch_args and not self.executor.startswith("slurm://"):
            raise ValueError("--day0-sbatch-args needs --day0-executor slurm://...")
        return self

    @property
    def enabled(self) -> bool:
        return self.model is not None

    @property
    def lm_eval_folders(self) -> bool:
        """lm-eval output folders given: read them (nothing served); else ``eval=lm-eval`` runs lm-eval here."""
        return bool(self.lm_eval_baseline or self.lm_eval_candidate)

    @property
    def lm_eval_engine(self) -> bool:
        return self.eval == "lm-eval" and not self.lm_eval_folders

    @property
    def recipe_objects(self) -> tuple[Recipe, ...]:
        return tuple(resolve_recipe(r) for r in self.recipes)

    def public_dict(self) -> dict[str, Any]:
        """For reports: every value, secrets masked."""
        data = self.model_dump(mode="json")
        data["api_key"] = "**********" if self.api_key else None
        data["ssh_key_passphrase"] = "**********" if self.ssh_key_passphrase else None
        return data

    def fingerprint(self, *fields: str) -> str:
        data = {f: self.model_dump(mode="json")[f] for f in fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _refuse_cuda_only_recipes(recipes: tuple[Recipe, ...]) -> None:
    """A recipe whose calibration needs CUDA fails only after minutes of PTQ on a machine without it: say so now.
    torch is imported only when such a recipe is asked for, so validating any other configuration stays cheap."""
    needing = [r.name for r in recipes if r.needs_cuda]
    if not needing:
        return
    try:
        import torch
    except ImportError:  # no torch, no CUDA: the same answer
        pass
    else:
        if torch.cuda.is_available():
            return
    raise ValueError(f"--recipe {', '.join(needing)}: ModelOpt calibrates it with CUDA kernels and this machine has "
                     "no CUDA device; run it on a GPU node (--day0-executor slurm://user@host?partition=P or "
                     "ssh://user@host) or gate a checkpoint made there (--day0-quantize existing --day0-checkpoint "
                     "PATH)")


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
