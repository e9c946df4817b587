"""Engines are plugins: quantize, serve and eval engines register through one entry-point group.

A third party adds an engine without forking: it ships a package whose ``pyproject.toml`` declares

    [project.entry-points."pytest_day0.engines"]
    myserver = "my_pkg.day0:ENGINE"      # the entry point's name is the engine's name

where ``ENGINE`` is a :class:`QuantizeEngine`, :class:`ServeEngine` or :class:`EvalEngine`; then
``--day0-serve myserver`` selects it. The built-in engines register through the same group (see this
project's pyproject.toml); :data:`BUILTIN` mirrors those rows so a source checkout whose installed metadata
is stale still finds them (a test keeps the two equal).

Entry points, rather than a pytest hook, because the chain also runs outside pytest
(``python -m pytest_day0 quantize``) and because the engine names must be known when the configuration is
validated, before any conftest could answer a hook. Loading is lazy and cached; a third-party entry point
that fails to import is reported only when its name is asked for, so one broken package cannot stop a
session that does not use it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_day0.failures import Day0Error, FailureClass

if TYPE_CHECKING:  # the registry is imported by config.py; engines' heavy modules load only when used
    from pytest_day0.checkpoint.recipes import Recipe
    from pytest_day0.scoring.records import TaskResult
    from pytest_day0.scoring.tasks import Task
    from pytest_day0.serving.endpoint import Endpoint
    from pytest_day0.stages.quantize import QuantizeResult
    from pytest_day0.stages.serve import ServerHandle

GROUP = "pytest_day0.engines"
Kind = Literal["quantize", "serve", "eval"]

# name -> "module:attribute"; the same rows as [project.entry-points."pytest_day0.engines"] in pyproject.toml.
BUILTIN: dict[str, str] = {
    "modelopt": "pytest_day0.engines:MODELOPT",
    "existing": "pytest_day0.engines:EXISTING",
    "llmcompressor": "pytest_day0.stages.quantize_llmcompressor:ENGINE",
    "reference": "pytest_day0.engines:REFERENCE",
    "external": "pytest_day0.engines:EXTERNAL",
    "vllm": "pytest_day0.stages.serve_vllm:ENGINE",
    "scorer": "pytest_day0.engines:SCORER",
    "lm-eval": "pytest_day0.stages.evaluate_lm_eval:ENGINE",
}


# ---------------------------------------------------------------------- what an engine is given


@dataclass(frozen=True)
class QuantizeRequest:
    """One PTQ job. ``config`` is the RunConfig (engine-specific options are read from it)."""

    source: Path
    recipe: Recipe
    out_dir: Path  # write the finished checkpoint here, atomically
    calibration: Path
    calib_size: int
    timeout_s: float
    config: Any = None
    on_line: Callable[[str], None] | None = None  # the engine's log, line by line, for progress


@dataclass(frozen=True)
class ServeRequest:
    """Serve ``checkpoint`` as model ``name``; logs go under ``workdir``; ready within ``timeout_s`` or raise."""

    checkpoint: Path
    name: str
    workdir: Path
    timeout_s: float
    config: Any = None
    progress: Callable[[str], None] | None = None  # human-readable lines (a failed start's log tail)


@dataclass(frozen=True)
class EvalRequest:
    """Score ``task`` on ``endpoint`` into ``records_path`` (resumable); give up after ``timeout_s`` with
    Day0Error(INFRA_TRANSIENT) naming the stage, keeping every finished record for the retry.

    ``doc_ids``: evaluate only these samples of the task (None: all of ``task.samples``), for callers that pick a
    subset (adaptive rounds). ``tokenizer``: the served model's tokenizer (a local directory or a hub id), for
    engines that count tokens or tokenize requests themselves. ``log``: free-text progress lines."""

    task: Task
    endpoint: Endpoint
    records_path: Path
    side: str
    concurrency: int
    progress: Callable[[int, int], None] | None = None
    timeout_s: float | None = None
    config: Any = None
    doc_ids: tuple[str, ...] | None = None
    tokenizer: str | None = None
    log: Callable[[str], None] | None = None


# ---------------------------------------------------------------------- engine descriptors


def _always(_recipe: Recipe) -> bool:
    return True


def _no_version(_config: Any) -> str | None:
    return None


@dataclass(frozen=True)
class QuantizeEngine:
    """``run`` raises Day0Error (with a failure class) or returns a finished checkpoint.

    ``version(config)`` goes into the checkpoint cache key, so an engine upgrade re-quantizes; ``supports`` lets the
    configuration refuse a recipe the engine cannot make before anything runs.
    """

    name: str
    run: Callable[[QuantizeRequest], QuantizeResult]
    supports: Callable[[Recipe], bool] = _always
    version: Callable[[Any], str | None] = _no_version  # given the RunConfig
    description: str = ""
    kind: Literal["quantize"] = field(default="quantize", init=False)


@dataclass(frozen=True)
class ServeEngine:
    """``start`` returns a ServerHandle once the endpoint answers, or raises Day0Error.

    ``managed=False`` means someone else runs the server (``external``): nothing is started or stopped.
    ``version(config)`` goes into the key of everything served by it (its records), so an upgrade re-evaluates.
    """

    name: str
    start: Callable[[ServeRequest], ServerHandle]
    managed: bool = True
    description: str = ""
    version: Callable[[Any], str | None] = _no_version
    kind: Literal["serve"] = field(default="serve", init=False)


@dataclass(frozen=True)
class EvalEngine:
    """``evaluate`` scores one task on one side and returns its TaskResult (records at ``records_path``).

    ``version(config)`` goes into the records' key: a scorer whose semantics changed never reuses old records.
    ``cached(task, records_path, side)`` answers from an earlier run's records without a server, or None (default:
    the scorer's rule, every sample's record present with its prompt hash). ``progress_unit`` names what
    ``progress(done, total)`` counts. ``tasks(config, progress)``: an engine that resolves ``--day0-tasks`` names
    itself (lm-eval's registry) returns the run's tasks (default: pytest-day0's task files)."""

    name: str
    evaluate: Callable[[EvalRequest], TaskResult]
    description: str = ""
    version: Callable[[Any], str | None] = _no_version
    cached: Callable[[Task, Path, str], TaskResult | None] | None = None
    progress_unit: str = "samples"
    tasks: Callable[[Any, Callable[[str], None] | None], list[Task]] | None = None
    kind: Literal["eval"] = field(default="eval", init=False)


Engine = QuantizeEngine | ServeEngine | EvalEngine


# ---------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Registry:
    engines: Mapping[tuple[str, str], Engine]  # (kind, name) -> engine
    broken: Mapping[str, str]  # name -> why its entry point could not be loaded

    def names(self, kind: Kind) -> list[str]:
        return sorted(name for k, name in self.engines if k == kind)

    def get(self, kind: Kind, name: str) -> Engine:
        engine = self.engines.get((kind, name))
        if engine is not None:
            return engine
        if name in self.broken:
            raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                            f"{kind} engine {name!r} failed to load: {self.broken[name]}")
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"unknown {kind} engine {name!r}; registered: {', '.join(self.names(kind)) or 'none'}")


def _load(value: str) -> Any:
    module, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _as_engines(obj: Any) -> list[Engine]:
    """An entry point names one engine, a list of them, or a zero-argument callable returning either."""
    if callable(obj) and not isinstance(obj, (QuantizeEngine, ServeEngine, EvalEngine)):
        obj = obj()
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    if not all(isinstance(e, (QuantizeEngine, ServeEngine, EvalEngine)) for e in items):
        raise TypeError("not a QuantizeEngine, ServeEngine or EvalEngine")
    return list(items)


def build_registry(rows: list[tuple[str, str, Callable[[], Any]]]) -> Registry:
    """Pure assembly from (entry-point name, origin, loader) rows; the first row to claim a (kind, name) wins,
    a later row naming the very same object is a duplicate, anything else claiming it is reported broken."""
    engines: dict[tuple[str, str], Engine] = {}
    broken: dict[str, str] = {}
    for ep_name, origin, load in rows:
        try:
            loaded = _as_engines(load())
        except Exception as exc:  # a third party's import error must not take the session down
            broken.setdefault(ep_name, f"{origin}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        for engine in loaded:
            key = (engine.kind, engine.name)
            if key in engines and engines[key] is not engine:
                broken.setdefault(engine.name, f"{origin}: {engine.kind} engine {engine.name!r} is already "
                                               "registered by another package")
                continue
            engines[key] = engine
    return Registry(engines, broken)


@functools.cache
def registry() -> Registry:
    rows: list[tuple[str, str, Callable[[], Any]]] = [
        (name, "pytest-day0", functools.partial(_load, value)) for name, value in BUILTIN.items()]
    for ep in entry_points(group=GROUP):
        origin = ep.dist.name if ep.dist is not None else ep.value
        rows.append((ep.name, origin, ep.load))
    return build_registry(rows)


def reset_registry() -> None:
    """Forget the loaded engines (after installing a package into a running interpreter, and in tests)."""
    registry.cache_clear()


def quantize_engine(name: str) -> QuantizeEngine:
    engine = registry().get("quantize", name)
    assert isinstance(engine, QuantizeEngine)
    return engine


def serve_engine(name: str) -> ServeEngine:
    engine = registry().get("serve", name)
    assert isinstance(engine, ServeEngine)
    return engine


def eval_engine(name: str) -> EvalEngine:
    engine = registry().get("eval", name)
    assert isinstance(engine, EvalEngine)
    return engine


# ---------------------------------------------------------------------- the built-in engines' adapters


def _modelopt_run(req: QuantizeRequest) -> QuantizeResult:
    from pytest_day0.stages.quantize import quantize_modelopt

    calib_seq = 64
    return quantize_modelopt(req.source, req.recipe, req.out_dir, req.calibration, calib_size=req.calib_size,
                             calib_seq=calib_seq, timeout_s=req.timeout_s, on_line=req.on_line)


def _modelopt_version(_config: Any) -> str | None:
    from pytest_day0.stages.quantize import _modelopt_version as version

    return version()


def _modelopt_supports(recipe: Recipe) -> bool:
    return "modelopt" in recipe.engines


def _existing_run(req: QuantizeRequest) -> QuantizeResult:
    from pytest_day0.stages.quantize import use_existing

    checkpoint = getattr(req.config, "checkpoint", None)
    if checkpoint is None:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, "--day0-quantize existing needs --day0-checkpoint PATH")
    return use_existing(Path(checkpoint), req.recipe)


def code_version(*modules: str) -> str:
    """This package's version and the bytes of the modules whose behaviour an artifact depends on: an upgrade, or
    a fix in a source checkout, re-makes what those modules made (a server's numerics, a scorer's semantics)."""
    import importlib.util

    from pytest_day0 import __version__
    from pytest_day0.workspace import digest, file_digest

    files = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        files.append(file_digest(Path(origin)) if origin else module)
    return f"{__version__}+{digest(files)[:12]}"


@functools.cache
def _reference_version() -> str:
    return code_version("pytest_day0.serving.dequant", "pytest_day0.serving.reference_server")


@functools.cache
def _scorer_version() -> str:
    return code_version("pytest_day0.stages.evaluate", "pytest_day0.scoring.metrics", "pytest_day0.scoring.tasks")


def _reference_start(req: ServeRequest) -> ServerHandle:
    from pytest_day0.stages.serve import start_reference_server

    return start_reference_server(req.checkpoint, req.name, req.workdir, timeout_s=req.timeout_s)


def _external_start(req: ServeRequest) -> ServerHandle:
    """The side's URL and model name from the configuration; the one code path for external endpoints."""
    from pytest_day0.stages.serve import external_endpoint

    config = req.config
    baseline = req.name == "baseline"
    url = getattr(config, "baseline_url" if baseline else "candidate_url", None)
    if not url:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        "the external engine starts nothing: give --day0-baseline-url and --day0-candidate-url")
    model = getattr(config, "baseline_model" if baseline else "candidate_model", None)
    flag = "--day0-baseline-model" if baseline else "--day0-candidate-model"
    return external_endpoint(url, model, getattr(config, "api_key", None), timeout_s=min(req.timeout_s, 30.0),
                             model_flag=flag)


def _scorer_evaluate(req: EvalRequest) -> TaskResult:
    from pytest_day0.stages.evaluate import run_evaluation

    return run_evaluation(req.task, req.endpoint, req.records_path, req.side, concurrency=req.concurrency,
                          progress=req.progress, deadline_s=req.timeout_s)


MODELOPT = QuantizeEngine("modelopt", _modelopt_run, _modelopt_supports, _modelopt_version,
                          "NVIDIA ModelOpt PTQ + HF export, in a child process")
EXISTING = QuantizeEngine("existing", _existing_run, description="gate a checkpoint made elsewhere "
                          "(--day0-checkpoint)")
REFERENCE = ServeEngine("reference", _reference_start, description="the embedded CPU server (emulated numerics)",
                        version=lambda _config: _reference_version())
EXTERNAL = ServeEngine("external", _external_start, managed=False,
                       description="URLs someone else serves (--day0-baseline-url/--day0-candidate-url)")
SCORER = EvalEngine("scorer", _scorer_evaluate, description="the built-in OpenAI-API scorer (lm-eval semantics)",
                     version=lambda _config: _scorer_version())
