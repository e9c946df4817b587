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
from urllib.parse import urlsplit

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
    Option("stat", "--day0-stat", "paired: decide on a paired per-sample confidence interval (PASS / REGRESSION / "
           "INCONCLUSIVE); point: the plain point-estimate rule of the ModelOpt skill", kind="choice",
           choices=("paired", "point"), default="paired"),
    Option("confidence", "--day0-confidence", "one-sided confidence of each verdict (the interval shown is two-sided "
           "2c-1: 0.95 gives a 90 percent interval)", kind="float", default=0.95),
    Option("verbosity", "--day0-verbosity", "largest |change| of mean completion tokens, as a fraction of the "
           "baseline's (VERBOSITY_EXCEEDED)", kind="float", default=0.05),
    Option("published", "--day0-published", "JSON/YAML file: task -> {score, scale} published for the baseline "
           "(EXTERNAL_BASELINE_MISMATCH beyond 5 percent of the range)"),
    Option("workdir", "--day0-workdir", "workspace for checkpoints, records and reports (default .day0 in rootdir)"),
    Option("quantize", "--day0-quantize", "quantize engine: modelopt, llmcompressor, existing, one a plugin registers "
           "(pytest_day0.engines), or none (no checkpoint, the PTQ gates skip)", default="modelopt"),
    Option("checkpoint", "--day0-checkpoint", "an already quantized checkpoint (with --day0-quantize existing)"),
    Option("eval", "--day0-eval", "where scores come from: scorer (serve and score here), lm-eval (read two "
           "lm-eval-harness output folders) or an eval engine a plugin registers", default="scorer"),
    Option("lm_eval_baseline", "--day0-lm-eval-baseline", "lm-eval --output_path folder of the baseline (run with "
           "--log_samples); implies --day0-eval lm-eval"),
    Option("lm_eval_candidate", "--day0-lm-eval-candidate", "lm-eval --output_path folder of the candidate"),
    Option("serve", "--day0-serve", "serve engine: reference, vllm, external, or one a plugin registers",
           default="reference"),
    Option("vllm_python", "--day0-vllm-python", "python of the environment with vLLM and llm-compressor (default: "
           ".venv-engines/bin/python next to the project, made by scripts/install-engines.sh)"),
    Option("vllm_args", "--day0-vllm-args", "extra vLLM server arguments, shell syntax (e.g. '--tensor-parallel-size 2 "
           "--dtype float32'); they override ours"),
    Option("baseline_url", "--day0-baseline-url", "OpenAI-compatible URL serving the baseline (--day0-serve external)"),
    Option("candidate_url", "--day0-candidate-url", "URL serving the candidate (--day0-serve external)"),
    Option("api_key", "--day0-api-key", "API key for external endpoints (prefer the DAY0_API_KEY environment variable)",
           secret=True),
    Option("concurrency", "--day0-concurrency", "requests in flight per evaluation", kind="int", default=16),
    Option("fresh", "--day0-fresh", "ignore cached artifacts and run every stage again", kind="bool", default=False),
    Option("stage_timeout", "--day0-stage-timeout", "seconds any one stage may take", kind="float", default=3600.0),
    Option("calib_size", "--day0-calib-size", "calibration samples for PTQ", kind="int", default=64),
    # where PTQ and serving run (pytest_day0/remote): this machine, an SSH host, or a SLURM cluster over SSH
    Option("executor", "--day0-executor", "where PTQ and serving run: local, ssh://user@host[:port] or "
           "slurm://user@host[:port]?partition=P&time=HH:MM:SS (query = sbatch options)", default="local"),
    Option("ssh_key", "--day0-ssh-key", "private key for ssh:// and slurm:// (default: ssh-agent, ~/.ssh keys)"),
    Option("ssh_key_passphrase", "--day0-ssh-key-passphrase", "the key's passphrase (prefer the "
           "DAY0_SSH_KEY_PASSPHRASE environment variable)", secret=True),
    Option("known_hosts", "--day0-known-hosts", "known_hosts file the host key is verified against "
           "(default ~/.ssh/known_hosts)"),
    Option("trust_new_host", "--day0-trust-new-host", "accept and record the key of a host not in known_hosts "
           "(a changed key is always refused)", kind="bool", default=False),
    Option("sbatch_args", "--day0-sbatch-args", "extra sbatch options, shell syntax (e.g. '--gres=gpu:1 "
           "--account=proj')"),
    Option("remote_workdir", "--day0-remote-workdir", "workspace on the remote host (default ~/.day0-remote)"),
    Option("remote_python", "--day0-remote-python", "python with pytest-day0 on the remote host (default: this "
           "interpreter's path)"),
    Option("remote_model", "--day0-remote-model", "the source checkpoint's path on the remote host (default: "
           "uploaded over SFTP once)"),
    Option("ptq_command", "--day0-ptq-command", "remote PTQ command template, e.g. 'python hf_ptq.py "
           "--pyt_ckpt_path {model} --qformat {qformat} --export_path {export_path}' (default: pytest-day0's)"),
    Option("serve_command", "--day0-serve-command", "remote serve command template, e.g. 'vllm serve {checkpoint} "
           "--served-model-name {name} --host 0.0.0.0 --port {port}' (default: the reference server)"),
)


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
    published: Path | None = None
    workdir: Path = Path(".day0")
    quantize: str = "modelopt"  # "none" or a registered quantize engine (pytest_day0.engines)
    checkpoint: Path | None = None
    eval: str = "scorer"  # "lm-eval" or a registered eval engine
    lm_eval_baseline: Path | None = None
    lm_eval_candidate: Path | None = None
    serve: str = "reference"  # a registered serve engine
    vllm_python: str | None = None
    vllm_args: str | None = None
    baseline_url: str | None = None
    candidate_url: str | None = None
    api_key: SecretStr | None = None
    concurrency: int = Field(default=16, ge=1, le=1024)
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
        if (info.field_name, v) not in {("quantize", "none"), ("eval", "lm-eval")}:
            registry().get(info.field_name, v)  # Day0Error: one USER_CONFIG_ERROR line naming the registered ones
        return v

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
        """lm-eval folders imply ``eval=lm-eval``, which gates no PTQ (quantize none) over every logged task."""
        if not isinstance(data, dict):
            return data
        if (data.get("lm_eval_baseline") or data.get("lm_eval_candidate")) and "eval" not in data:
            data = {**data, "eval": "lm-eval"}
        if data.get("eval") == "lm-eval":
            data = {"quantize": "none", "tasks": (), **data}
        return data

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
        if self.quantize == "existing" and self.checkpoint is None:
            raise ValueError("--day0-quantize existing needs --day0-checkpoint PATH")
        if self.quantize == "existing" and len(self.recipes) != 1:
            raise ValueError("--day0-quantize existing gates one checkpoint: give exactly one --recipe")
        if self.serve == "external" and not (self.baseline_url and self.candidate_url):
            raise ValueError("--day0-serve external needs --day0-baseline-url and --day0-candidate-url")
        if self.serve == "external" and len(self.recipes) != 1:
            raise ValueError("--day0-serve external serves one candidate: give exactly one --recipe")
        if self.eval == "lm-eval":
            if not (self.lm_eval_baseline and self.lm_eval_candidate):
                raise ValueError("--day0-eval lm-eval needs --day0-lm-eval-baseline and --day0-lm-eval-candidate")
            if self.quantize == "modelopt":
                raise ValueError("--day0-eval lm-eval reads finished results: use --day0-quantize none (the "
                                 "default) or existing with --day0-checkpoint")
            if len(self.recipes) != 1:
                raise ValueError("--day0-eval lm-eval compares one candidate: give exactly one --recipe (its label)")
        elif self.lm_eval_baseline or self.lm_eval_candidate:
            raise ValueError("--day0-lm-eval-baseline/--day0-lm-eval-candidate need --day0-eval lm-eval")
        elif self.quantize == "none" and self.serve != "external":
            raise ValueError("--day0-quantize none leaves nothing to serve: use --day0-serve external or "
                             "--day0-eval lm-eval")
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
