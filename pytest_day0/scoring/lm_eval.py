"""lm-eval-harness output folders as an eval source: gate results a team already has, with the same gates.

lm-eval (``--output_path DIR --log_samples``) writes ``DIR/<model_name_sanitized>/results_<stamp>.json`` and,
with the same stamp, one ``samples_<task>_<stamp>.jsonl`` per task::

    results_<stamp>.json   {"results": {task: {"alias", "acc,none", "acc_stderr,none", ...}},
                            "configs": {task: {"output_type", ...}}, "higher_is_better": {task: {"acc": true}},
                            "n-samples": {task: {"original", "effective"}}, "model_name", ...}
    samples_<task>_<stamp>.jsonl   one line per (doc, filter): {"doc_id", "doc", "target", "arguments",
                            "resps", "filtered_resps", "filter", "metrics": ["acc"], "acc": 1.0,
                            "doc_hash", "prompt_hash", "target_hash"}

A metric key is ``<metric>,<filter>``: ``acc,none`` reads the lines whose ``filter`` is ``none`` and their
``acc`` field; ``exact_match,strict-match`` the ``strict-match`` lines. The gated metric per task is the first
of ``METRIC_PREFERENCE`` the results hold. Lines are aligned by ``doc_id``; several lines of one doc and filter
(repeats) are averaged per doc before pairing (avg-of-N).

Checks that make a folder trustworthy (each a one-line failure with its class, never a silent drop): the
newest results file is used and its samples must carry its stamp; every doc the results counted
(``n-samples.effective``) must be in the samples file; every per-doc value must be a finite number in [0, 1]
(a corpus-level metric such as BLEU cannot be paired); the per-doc mean must reproduce the reported score.
Scores are on lm-eval's 0–1 scale.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_day0.config import RunConfig
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, Task, TaskSpec
from pytest_day0.workspace import atomic_write_text, digest

METRIC_PREFERENCE = (
    "acc,none",
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "exact_match,none",
    "acc_norm,none",
    "pass@1,none",
    "pass_at_1,none",
    "prompt_level_strict_acc,none",  # IFEval: per prompt, all instructions followed
)
SCALE = (0.0, 1.0)
_MC_TYPES = frozenset({"multiple_choice", "loglikelihood"})


@dataclass(frozen=True)
class LmEvalTask:
    name: str
    metric_key: str  # "acc,none"
    metric: str  # "acc"
    filter: str  # "none"
    higher_is_better: bool
    reported: float
    n_effective: int
    kind: str  # "multiple_choice" | "generate"
    samples_path: Path


@dataclass(frozen=True)
class LmEvalRun:
    folder: Path  # the model folder holding results_*.json
    results_path: Path
    stamp: str
    model_name: str
    tasks: dict[str, LmEvalTask] = field(default_factory=dict)
    unsampled: tuple[str, ...] = ()  # tasks (or groups) in the results without a samples file


def _config_error(why: str) -> Day0Error:
    return Day0Error(FailureClass.USER_CONFIG_ERROR, why)


def _results_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("results_*.json"))


def locate(path: Path) -> Path:
    """The newest results file under an lm-eval ``--output_path`` (or the model folder, or the file itself)."""
    if path.is_file() and path.name.startswith("results_") and path.suffix == ".json":
        return path
    if not path.is_dir():
        raise _config_error(f"lm-eval folder {path} does not exist")
    here = _results_files(path)
    if not here:
        models = sorted(d for d in path.iterdir() if d.is_dir() and _results_files(d))
        if len(models) > 1:
            raise _config_error(f"lm-eval folder {path} holds several models ({', '.join(d.name for d in models)}): "
                                "name the one to gate")
        if not models:
            raise _config_error(f"lm-eval folder {path} has no results_*.json (lm-eval --output_path ... "
                                "--log_samples writes <path>/<model>/results_<stamp>.json)")
        here = _results_files(models[0])
    return here[-1]  # ISO stamps sort in time order


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_fraction(value: Any) -> bool:
    """The preferred metrics are per-sample means: a finite number in [0, 1], never a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 <= value <= 1


def _pick_metric(name: str, results: dict[str, Any]) -> str | None:
    numeric = {k for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in METRIC_PREFERENCE:
        if key in numeric:
            return key
    rest = sorted(k for k in numeric if "," in k and "_stderr" not in k)
    return rest[0] if rest else None


def load_run(path: str | Path) -> LmEvalRun:
    """Read one side's newest results file and find each task's samples file (no samples read yet)."""
    results_path = locate(Path(path))
    try:
        data = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _config_error(f"cannot read {results_path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise _config_error(f"{results_path} is not an lm-eval results file (no 'results' mapping)")
    stamp = results_path.stem.removeprefix("results_")
    folder = results_path.parent
    configs = _mapping(data.get("configs"))
    hib = _mapping(data.get("higher_is_better"))
    nsamples = _mapping(data.get("n-samples"))
    tasks: dict[str, LmEvalTask] = {}
    unsampled: list[str] = []
    for name, res in data["results"].items():
        samples_path = folder / f"samples_{name}_{stamp}.jsonl"
        if not samples_path.is_file() or not isinstance(res, dict):
            unsampled.append(name)
            continue
        bad = next(((k, res[k]) for k in METRIC_PREFERENCE if k in res and not _is_fraction(res[k])), None)
        if bad is not None:  # a NaN, bool or string score would otherwise be skipped or compare as "equal"
            number = isinstance(bad[1], (int, float)) and not isinstance(bad[1], bool) and math.isfinite(bad[1])
            why = "is outside [0, 1] (a per-sample mean)" if number else "is not a finite number"
            raise _config_error(f"{results_path}: task {name} reports {bad[0]} = {bad[1]!r}, which {why}")
        key = _pick_metric(name, res)
        if key is None:
            raise _config_error(f"{results_path}: task {name} reports no numeric metric")
        metric, _, flt = key.partition(",")
        counts = _mapping(nsamples.get(name))
        effective = counts.get("effective", counts.get("original"))
        if not isinstance(effective, int) or isinstance(effective, bool) or effective < 0:
            raise _config_error(f"{results_path}: task {name} has no n-samples count (an lm-eval older than 0.4.3?)")
        output_type = _mapping(configs.get(name)).get("output_type")
        better = _mapping(hib.get(name)).get(metric, True)
        tasks[name] = LmEvalTask(
            name=name, metric_key=key, metric=metric, filter=flt or "none", higher_is_better=bool(better),
            reported=float(res[key]), n_effective=effective,
            kind="multiple_choice" if output_type in _MC_TYPES else "generate", samples_path=samples_path,
        )
    model = data.get("model_name") or folder.name
    return LmEvalRun(folder=folder, results_path=results_path, stamp=stamp, model_name=str(model), tasks=tasks,
                     unsampled=tuple(unsampled))


def task_names(baseline: str | Path, wanted: Sequence[str] = ()) -> list[str]:
    """The run's tasks: those the baseline logged samples for, or the ``wanted`` subset (each must exist)."""
    run = load_run(baseline)
    if not run.tasks:
        raise _config_error(f"{run.results_path}: no task has a samples_<task>_{run.stamp}.jsonl "
                            "(run lm-eval with --log_samples)")
    for name in wanted:
        if name not in run.tasks:
            hint = " (it has no samples file: a group, or --log_samples was off)" if name in run.unsampled else ""
            raise _config_error(f"task {name!r} is not in {run.results_path}{hint}")
    return list(wanted) if wanted else sorted(run.tasks)


# ---------------------------------------------------------------------------------------------- samples


def _lines(task: LmEvalTask) -> list[dict[str, Any]]:
    out = []
    try:
        with task.samples_path.open(encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED,
                                    f"{task.samples_path.name} line {lineno} is not JSON (torn file?)") from None
                if not isinstance(line, dict) or "doc_id" not in line:
                    raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED,
                                    f"{task.samples_path.name} line {lineno} has no doc_id")
                if str(line.get("filter", "none")) == task.filter:
                    out.append(line)
    except OSError as exc:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"cannot read {task.samples_path}: {exc.strerror}") from None
    return out


def _doc_key(doc_id: Any) -> tuple[int, str]:
    """Numeric doc ids sort numerically, so "first N" means the first N docs lm-eval saw."""
    text = str(doc_id)
    return (int(text), "") if text.lstrip("-").isdigit() else (1 << 62, text)


def _prompt_hash(line: dict[str, Any]) -> str:
    given = line.get("prompt_hash")
    if isinstance(given, str) and given:
        return given
    return hashlib.sha256(json.dumps(line.get("arguments"), sort_keys=True, default=str).encode()).hexdigest()


def _prompt_text(line: dict[str, Any]) -> str:
    args = line.get("arguments")
    if isinstance(args, dict):
        first = args.get("gen_args_0")
        if isinstance(first, dict) and isinstance(first.get("arg_0"), str):
            return str(first["arg_0"])
    if isinstance(args, list) and args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], str):
        return str(args[0][0])
    return json.dumps(line.get("doc"), default=str)[:2000]


def _value(line: dict[str, Any], metric: str) -> float | None:
    v = line.get(metric)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def doc_records(task: LmEvalTask, limit: int | None = None) -> list[SampleRecord]:
    """One SampleRecord per doc (repeats averaged), ordered by doc_id; ``limit`` keeps the first N docs."""
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for line in _lines(task):
        by_doc.setdefault(str(line["doc_id"]), []).append(line)
    ids = sorted(by_doc, key=_doc_key)
    if limit is not None:
        ids = ids[:limit]
    records = []
    for doc in ids:
        lines = by_doc[doc]
        values = [_value(line, task.metric) for line in lines]
        first = lines[0]
        error = None
        if any(v is None for v in values):
            error = f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] doc {doc} has no numeric {task.metric!r}"
        elif any(not 0 <= v <= 1 for v in values if v is not None):
            raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                            f"{task.name}: per-doc {task.metric!r} values outside [0, 1] (doc {doc}): only a mean of "
                            "per-sample correctness can be paired; pick another metric")
        response = first.get("filtered_resps")
        records.append(SampleRecord(
            id=doc,
            task=task.name,
            prompt_hash=_prompt_hash(first),
            prompt=_prompt_text(first),
            target=str(first.get("target", "")),
            response=json.dumps(response, default=str)[:500] if response is not None else None,
            correct=None if error else math.fsum(v for v in values if v is not None) / len(values),
            error=error,
            attempts=len(lines),
        ))
    return records


def load_tasks(baseline: str | Path, names: Sequence[str], limit: int | None = None) -> list[Task]:
    """Task objects (spec + samples) for the run, built from the baseline's logged docs."""
    run = load_run(baseline)
    tasks = []
    for name in names:
        t = run.tasks.get(name)
        if t is None:
            raise _config_error(f"task {name!r} is not in {run.results_path}")
        try:
            spec = TaskSpec(name=name, kind=t.kind, metric=t.metric_key, scale=SCALE,  # type: ignore[arg-type]
                            higher_is_better=t.higher_is_better, samples=t.samples_path.name,
                            description=f"lm-eval {t.metric_key} from {run.results_path.name}")
        except ValueError as exc:
            raise _config_error(f"lm-eval task {name!r} cannot be gated: {' '.join(str(exc).split())[:200]}") from None
        by_doc: dict[str, dict[str, Any]] = {}
        for line in _lines(t):
            by_doc.setdefault(str(line["doc_id"]), line)
        ids = sorted(by_doc, key=_doc_key)[:limit] if limit is not None else sorted(by_doc, key=_doc_key)
        samples = tuple(Sample(id=i, prompt=_prompt_text(by_doc[i]), target=str(by_doc[i].get("target", "")))
                        for i in ids)
        if not samples:
            raise _config_error(f"{t.samples_path} has no lines for filter {t.filter!r}")
        tasks.append(Task(spec=spec, samples=samples, source=str(t.samples_path)))
    return tasks


def task_result(folder: str | Path, task: str, side: str, records_path: Path, limit: int | None = None) -> TaskResult:
    """One side's TaskResult from its lm-eval folder; records are written to ``records_path`` for the gates."""
    run = load_run(folder)
    t = run.tasks.get(task)
    if t is None:
        hint = " (no samples file)" if task in run.unsampled else ""
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{side} lm-eval results {run.results_path} have no "
                        f"task {task!r}{hint}")
    records = doc_records(t, limit)
    atomic_write_text(records_path, "".join(r.model_dump_json() + "\n" for r in records))
    expected = min(t.n_effective, limit) if limit is not None else t.n_effective
    scored = [r for r in records if r.correct is not None]
    errors = [r.error for r in records if r.error]
    mean = math.fsum(r.correct for r in scored if r.correct is not None) / len(scored) if scored else None
    status, first_error = "SUCCESS", errors[0] if errors else None
    if len(records) != expected:
        status = "FAILED"
        first_error = (f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] {t.samples_path.name} has {len(records)} docs for "
                       f"filter {t.filter!r}, the results counted {expected}")
    elif errors:
        status = "FAILED"
    elif limit is None and mean is not None and abs(mean - t.reported) > 1e-6:
        status = "FAILED"
        first_error = (f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] the per-doc {t.metric} mean {mean:.6f} does not "
                       f"reproduce {run.results_path.name}'s {t.metric_key} {t.reported:.6f}")
    return TaskResult(
        task=task,
        side=side,
        status=status,
        expected_samples=expected,
        scored_samples=len(scored),
        errored_samples=len(records) - len(scored),
        score=mean,
        mean_completion_tokens=None,  # lm-eval logs no token counts
        scale=SCALE,
        metric=t.metric_key,
        records_path=str(records_path),
        first_error=first_error,
    )


# ---------------------------------------------------------------------------------------------- chain seam


def run_tasks(config: RunConfig) -> list[Task]:
    """The release chain's tasks in ``--day0-eval lm-eval`` mode."""
    assert config.lm_eval_baseline is not None
    return load_tasks(config.lm_eval_baseline, task_names(config.lm_eval_baseline, config.tasks), config.limit)


def side_result(config: RunConfig, side: str, task: str, workdir: Path) -> TaskResult:
    """The release chain's evaluation in lm-eval mode: records go to the workspace like scored ones."""
    folder = config.lm_eval_baseline if side == "baseline" else config.lm_eval_candidate
    assert folder is not None
    results = locate(Path(folder))
    key = digest(str(results.resolve()), results.stat().st_mtime_ns, config.limit)
    return task_result(folder, task, side, workdir / "evals" / f"lm-eval-{side}-{key}" / f"{task}.jsonl",
                       config.limit)
