"""NeMo Evaluator (``nel eval run``) output folders as an eval source: gate runs a team already has.

Read from nemo-evaluator 0.3.0's own code (github.com/NVIDIA-NeMo/Evaluator tag v0.3.0, d2f7b170, the same
files as the PyPI wheel: ``engine/artifacts.py`` ``write_all``, ``engine/eval_loop.py`` ``run_evaluation``,
``orchestration/orchestrator.py``) and checked against files it wrote (``tests/data/nemo_evaluator``).
``nel eval run -o OUT`` writes one folder per benchmark::

    OUT/<benchmark>/eval-<stamp>-<benchmark>.json   the bundle: {"run_id", "config": {"benchmark", "repeats", ...},
                                                    "benchmark": {"name", "samples" (problems), "repeats",
                                                    "scores": {"pass@1" | "mean_reward": {"value", ...}, ...}},
                                                    "n_results"}
    OUT/<benchmark>/results.jsonl                   one line per (problem, repeat): {"problem_idx", "repeat",
                                                    "reward", "prompt", "model_response", "expected_answer",
                                                    "scoring_details", "metadata", "tokens", "latency_ms", ...}

``nel compare`` (``engine/comparison.py``) keys lines by ``(problem_idx, repeat)``, averages the repeats of each
problem (``aggregate_repeats``) and pairs problems. So do we: one record per problem, its mean reward, the id the
problem index. Where ``nel compare`` keeps the last of duplicate lines, pairs whatever keys both sides share and
compares runs of different repeat counts, each of those is a one-line failure here: every problem must carry
repeats ``0..R-1`` of the bundle's ``repeats``, both sides the same R, the lines must add up to the bundle's
counts, and the per-problem mean must reproduce the bundle's headline score (``pass@1``, or ``mean_reward`` for
fractional rewards, rounded to 4 places by nel). A repeat nel graded 0.0 because the endpoint failed
(``scoring_details.error_category`` ``infra_error`` or ``system``) is an errored sample, not a wrong answer.
Rewards are on 0-1.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_day0.config import RunConfig
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, Task, TaskSpec
from pytest_day0.workspace import atomic_write_text, digest

SCALE = (0.0, 1.0)
HEADLINE_METRICS = ("pass@1", "mean_reward")  # what nel's metrics/headline.py emits, binary or fractional rewards
REPORTED_TOLERANCE = 5e-5 + 1e-9  # nel rounds the headline value to 4 places
# Graded 0.0 by nel although the model answered nothing. 0.3.0 writes infra_error and system (a repeat it grades
# 0.0 as the task's own failure is "graceful": a wrong answer, as nel counts it); its main branch after 0.3.0
# (observability/failure_classification.py, commit ac66aff5) adds these endpoint categories.
ENDPOINT_ERRORS = frozenset({"infra_error", "system", "rate_limit", "server_error", "model_timeout"})
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class NelBenchmark:
    name: str
    bundle_path: Path
    results_path: Path
    problems: int  # benchmark.samples: distinct problem_idx
    repeats: int
    n_results: int
    metric: str  # "pass@1" | "mean_reward"
    reported: float


def _config_error(why: str) -> Day0Error:
    return Day0Error(FailureClass.USER_CONFIG_ERROR, why)


def _accounting(why: str) -> Day0Error:
    return Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, why)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _bundles_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("eval-*.json"))


def is_nel_output(path: str | Path) -> bool:
    """An ``eval-*.json`` bundle, or a folder holding one (flat, or one level down as ``nel eval run -o`` writes)."""
    p = Path(path)
    if p.is_file():
        return p.name.startswith("eval-") and p.suffix == ".json"
    if not p.is_dir():
        return False
    return bool(_bundles_in(p)) or any(sub.is_dir() and _bundles_in(sub) for sub in p.iterdir())


def bundle_paths(path: str | Path) -> list[Path]:
    """Every benchmark's bundle under a ``nel eval run`` output folder (``nel compare``'s discovery: the folder
    itself, then one level down), one per folder: a second run in the same folder is refused, not guessed at."""
    p = Path(path)
    if p.is_file():  # its results.jsonl is the folder's: with two bundles there, nobody knows whose it is
        folders: tuple[Path, ...] = (p.parent,)
    elif p.is_dir():
        folders = (p, *sorted(d for d in p.iterdir() if d.is_dir()))
    else:
        raise _config_error(f"NeMo Evaluator folder {p} does not exist")
    found: list[Path] = []
    for folder in folders:
        here = _bundles_in(folder)
        if len(here) > 1:
            raise _config_error(f"{folder} holds {len(here)} eval-*.json bundles: keep one run per folder")
        found.extend(here)
    if not found:
        raise _config_error(f"{p} has no eval-*.json bundle (nel eval run -o DIR writes DIR/<benchmark>/eval-*.json)")
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _config_error(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None


def parse_bundle(data: Any, bundle_path: Path) -> NelBenchmark:
    """The counts and headline score a bundle declares (pure: ``bundle_path`` only names things)."""
    bench = data.get("benchmark") if isinstance(data, dict) else None
    if not isinstance(bench, dict) or not isinstance(bench.get("name"), str) or not bench["name"]:
        raise _config_error(f"{bundle_path} is not a NeMo Evaluator bundle (no benchmark.name)")
    name = bench["name"]
    problems, repeats, n_results = _count(bench.get("samples")), _count(bench.get("repeats")), \
        _count(data.get("n_results"))
    if problems is None or repeats is None or repeats < 1 or n_results is None:
        raise _config_error(f"{bundle_path}: benchmark {name} lacks its counts (samples, repeats, n_results)")
    scores: dict[str, Any] = bench["scores"] if isinstance(bench.get("scores"), dict) else {}
    metric = next((m for m in HEADLINE_METRICS if isinstance(scores.get(m), dict)), None)
    value = scores[metric].get("value") if metric is not None else None
    if metric is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _config_error(f"{bundle_path}: benchmark {name} reports no {' or '.join(HEADLINE_METRICS)} value")
    if not 0 <= value <= 1:
        raise _config_error(f"{bundle_path}: benchmark {name} reports {metric} = {value!r}, outside [0, 1]")
    return NelBenchmark(name=name, bundle_path=bundle_path, results_path=bundle_path.parent / RESULTS,
                        problems=problems, repeats=repeats, n_results=n_results, metric=metric,
                        reported=float(value))


def load_run(path: str | Path) -> dict[str, NelBenchmark]:
    """One side's benchmarks by name, from its bundles (no results read yet)."""
    out: dict[str, NelBenchmark] = {}
    for bundle in bundle_paths(path):
        b = parse_bundle(_read_json(bundle), bundle)
        if b.name in out:
            raise _config_error(f"benchmark {b.name} is in two bundles: {out[b.name].bundle_path} and {bundle}")
        if not _valid_task_name(b.name):
            raise _config_error(f"{bundle}: benchmark name {b.name!r} cannot name a task (letters, digits, _ . -)")
        out[b.name] = b
    return out


def _valid_task_name(name: str) -> bool:
    return all(ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in name)


def task_names(baseline: str | Path, wanted: Sequence[str] = ()) -> list[str]:
    """The baseline's benchmarks, or the ``wanted`` subset (each must exist)."""
    run = load_run(baseline)
    for name in wanted:
        if name not in run:
            raise _config_error(f"task {name!r} is not in NeMo Evaluator output {baseline} "
                                f"(it has: {', '.join(sorted(run))})")
    return list(wanted) if wanted else sorted(run)


# ---------------------------------------------------------------------------------------------- results


def parse_lines(text: str, source: str) -> list[dict[str, Any]]:
    """results.jsonl lines; a torn or keyless line is an accounting failure, never skipped (nel skips them)."""
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise _accounting(f"{source} line {lineno} is not JSON (torn file?)") from None
        if not isinstance(line, dict) or _count(line.get("problem_idx")) is None or _count(line.get("repeat")) is None:
            raise _accounting(f"{source} line {lineno} has no integer problem_idx and repeat")
        out.append(line)
    return out


def _reward(line: dict[str, Any]) -> float | None:
    v = line.get("reward")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _endpoint_error(line: dict[str, Any]) -> str | None:
    details = line.get("scoring_details")
    if not isinstance(details, dict) or details.get("error_category") not in ENDPOINT_ERRORS:
        return None
    return f"{details['error_category']}: {' '.join(str(details.get('error', '')).split())[:200]}"


def _prompt_hash(line: dict[str, Any]) -> str:
    prompt = line.get("prompt")
    payload = prompt if isinstance(prompt, str) else json.dumps(
        {"problem_idx": line["problem_idx"], "expected_answer": line.get("expected_answer")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def problem_records(bench: NelBenchmark, lines: Sequence[dict[str, Any]], limit: int | None = None
                    ) -> tuple[list[SampleRecord], list[str]]:
    """One record per problem (its repeats' mean reward), in problem order, and the accounting problems found.

    Pure. ``limit`` keeps the first N problems by index. A problem whose repeats are not exactly ``0..R-1`` is
    named in the problems, never averaged over what happens to be there."""
    by_problem: dict[int, dict[int, dict[str, Any]]] = {}
    problems: list[str] = []
    for line in lines:
        reps = by_problem.setdefault(line["problem_idx"], {})
        if line["repeat"] in reps:
            problems.append(f"problem {line['problem_idx']} repeat {line['repeat']} is logged twice")
        reps[line["repeat"]] = line
    ids = sorted(by_problem)
    if limit is not None:
        ids = ids[:limit]
    want = set(range(bench.repeats))
    records = []
    for idx in ids:
        reps = by_problem[idx]
        if set(reps) != want:
            problems.append(f"problem {idx} has repeats {sorted(reps)}, the bundle says {bench.repeats} "
                            f"(0..{bench.repeats - 1})")
        ordered = [reps[r] for r in sorted(reps)]
        first = ordered[0]
        if len({_prompt_hash(line) for line in ordered}) > 1:
            problems.append(f"problem {idx} was asked different prompts in its repeats")
        rewards = [_reward(line) for line in ordered]
        errors = [e for e in (_endpoint_error(line) for line in ordered) if e]
        error = None
        if errors:
            error = f"[{FailureClass.INFRA_TRANSIENT}] problem {idx}: nel graded {len(errors)} of {len(ordered)} " \
                    f"repeats 0.0 after an endpoint failure ({errors[0]})"
        elif any(r is None for r in rewards):
            error = f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] problem {idx} has no numeric reward"
        elif any(not 0 <= r <= 1 for r in rewards if r is not None):
            raise _config_error(f"{bench.name}: problem {idx} has a reward outside [0, 1] ({rewards}): only a mean "
                                "of per-sample correctness can be paired")
        response = first.get("model_response")
        target = first.get("expected_answer")
        records.append(SampleRecord(
            id=str(idx),
            task=bench.name,
            prompt_hash=_prompt_hash(first),
            prompt=first["prompt"] if isinstance(first.get("prompt"), str) else None,
            target="" if target is None else str(target),
            response=str(response)[:500] if response is not None else None,
            correct=None if error else math.fsum(r for r in rewards if r is not None) / len(rewards),
            error=error,
            attempts=len(ordered),
        ))
    return records, problems


def read_lines(bench: NelBenchmark) -> list[dict[str, Any]]:
    try:
        text = bench.results_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _accounting(f"{bench.bundle_path.parent} has the bundle but no {RESULTS} (the per-sample results "
                          "nel compare pairs)") from None
    except OSError as exc:
        raise _config_error(f"cannot read {bench.results_path}: {exc.strerror}") from None
    return parse_lines(text, f"{bench.name}/{RESULTS}")


def summarize(bench: NelBenchmark, side: str, records: Sequence[SampleRecord], problems: Sequence[str],
              n_lines: int, records_path: Path, limit: int | None = None) -> TaskResult:
    """The side's TaskResult from its records and the bundle's counts (pure)."""
    expected = min(bench.problems, limit) if limit is not None else bench.problems
    scored = [r for r in records if r.correct is not None]
    errors = [r.error for r in records if r.error]
    mean = math.fsum(r.correct for r in scored if r.correct is not None) / len(scored) if scored else None
    status, first_error = "SUCCESS", errors[0] if errors else None
    accounting = list(problems)
    if len(records) != expected:
        accounting.insert(0, f"{RESULTS} has {len(records)} problems, the bundle counted {expected}")
    if limit is None and n_lines != bench.n_results:
        accounting.append(f"{RESULTS} has {n_lines} lines, the bundle counted n_results {bench.n_results}")
    if accounting:
        status = "FAILED"
        more = f" (+{len(accounting) - 1} more)" if len(accounting) > 1 else ""
        first_error = f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] {side} {bench.name}: {accounting[0]}{more}"
    elif errors:
        status = "FAILED"
    elif limit is None and mean is not None and abs(mean - bench.reported) > REPORTED_TOLERANCE:
        status = "FAILED"
        first_error = (f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] the per-problem reward mean {mean:.6f} does not "
                       f"reproduce {bench.bundle_path.name}'s {bench.metric} {bench.reported:.4f}")
    return TaskResult(
        task=bench.name, side=side, status=status, expected_samples=expected, scored_samples=len(scored),
        errored_samples=len(records) - len(scored), score=mean, mean_completion_tokens=None,  # nel logs totals only
        scale=SCALE, metric=bench.metric, records_path=str(records_path), first_error=first_error,
    )


def task_result(folder: str | Path, task: str, side: str, records_path: Path, limit: int | None = None,
                baseline: str | Path | None = None) -> TaskResult:
    """One side's TaskResult from its ``nel eval run`` folder; records go to ``records_path`` for the gates.
    ``baseline``: the other side's folder, whose repeat count this side must share (averages of 2 and of 1
    repeats are not the same measurement)."""
    run = load_run(folder)
    bench = run.get(task)
    if bench is None:
        raise _accounting(f"{side} NeMo Evaluator output {folder} has no benchmark {task!r} "
                          f"(it has: {', '.join(sorted(run)) or 'none'})")
    if baseline is not None:
        other = load_run(baseline).get(task)
        if other is not None and other.repeats != bench.repeats:
            raise _accounting(f"{task}: the baseline ran {other.repeats} repeats per problem, {side} ran "
                              f"{bench.repeats}: per-problem means of different repeat counts do not pair")
    lines = read_lines(bench)
    records, problems = problem_records(bench, lines, limit)
    atomic_write_text(records_path, "".join(r.model_dump_json() + "\n" for r in records))
    return summarize(bench, side, records, problems, len(lines), records_path, limit)


def load_tasks(baseline: str | Path, names: Sequence[str], limit: int | None = None) -> list[Task]:
    """Task objects for the run, built from the baseline's logged problems (first repeat's prompt)."""
    run = load_run(baseline)
    tasks = []
    for name in names:
        bench = run.get(name)
        if bench is None:
            raise _config_error(f"task {name!r} is not in NeMo Evaluator output {baseline}")
        records, _ = problem_records(bench, read_lines(bench), limit)
        if not records:
            raise _config_error(f"{bench.results_path} has no results")
        spec = TaskSpec(name=name, kind="generate", metric=bench.metric, scale=SCALE, samples=RESULTS,
                        repeats=bench.repeats,
                        description=f"NeMo Evaluator {bench.metric} from {bench.bundle_path.name}")
        samples = tuple(Sample(id=r.id, prompt=r.prompt if r.prompt is not None else "", target=str(r.target))
                        for r in records)
        tasks.append(Task(spec=spec, samples=samples, source=str(bench.results_path)))
    return tasks


def folder_key(folder: str | Path, limit: int | None) -> str:
    """Changes whenever any of the side's bundles or results files does."""
    parts: list[object] = [limit]
    for bundle in bundle_paths(folder):
        for f in (bundle, bundle.parent / RESULTS):
            parts += [str(f.resolve()), f.stat().st_mtime_ns if f.exists() else None]
    return digest(*parts)


def side_result(config: RunConfig, side: str, task: str, workdir: Path) -> TaskResult:
    """The release chain's evaluation when the result folders are NeMo Evaluator's."""
    folder = config.lm_eval_baseline if side == "baseline" else config.lm_eval_candidate
    assert folder is not None and config.lm_eval_baseline is not None
    key = folder_key(folder, config.limit)
    return task_result(folder, task, side, workdir / "evals" / f"nel-{side}-{key}" / f"{task}.jsonl", config.limit,
                        baseline=None if side == "baseline" else config.lm_eval_baseline)
