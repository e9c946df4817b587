"""MLflow: one run per session, one nested run per recipe, so a release sits in the tracker teams already host.

With ``--day0-mlflow`` the controller logs, after the verdict: per recipe a run nested under the session's run with
params from the RunConfig (secret options are left out, not masked), metrics per task (baseline, candidate, delta,
interval bounds, n, flips), tags with the verdict and failure classes, and artifacts (verdict.json, report.html,
the plot, both sides' records). The destination is MLflow's own: ``MLFLOW_TRACKING_URI``, else its default local
store (``sqlite:///mlflow.db`` and ``./mlruns`` in the working directory, what ``mlflow ui`` opens there).

A tracker is a copy, never a gate: any failure to reach or write it is one warning line, and the verdict and the
exit code are what they would be without it. MLflow's client retries a dead server for minutes by default, so an
HTTP server is asked ``/health`` first (5 s) and our calls run with few retries (unless the user set MLflow's
variables). The client is ``mlflow-skinny`` (the ``[mlflow]`` extra); the pure parts (params, metrics, tags) are
plain functions of the verdict and the comparisons.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pytest_day0.gates.compare import TaskComparison
from pytest_day0.options import OPTIONS
from pytest_day0.verdict import SessionVerdict, Verdict

EXPERIMENT = "pytest-day0"
MAX_PARAM = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
BATCH = 100  # params or tags per log_batch call (MLflow's limit)
HEALTH_TIMEOUT_S = 5.0
# bounded retries for our calls only; a variable the user set wins
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SECRET_FIELDS = frozenset(o.name for o in OPTIONS if o.secret)


# ---------------------------------------------------------------------------------------------- pure


def public_uri(uri: str) -> str:
    """The tracking URI without credentials, for the terminal and the reports."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def run_params(public_config: Mapping[str, Any], **more: str) -> dict[str, str]:
    """The RunConfig as MLflow params: secret options are not logged at all (not even masked), None is left out."""
    out: dict[str, str] = {}
    for key, value in {**public_config, **more}.items():
        if key in SECRET_FIELDS or value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        out[key] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"
    return out


def metric_key(*parts: str) -> str:
    """MLflow accepts letters, digits, ``_ - . space /`` in keys; anything else in a task name becomes ``_``."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", p) for p in parts)


def task_metrics(comparisons: Sequence[TaskComparison]) -> dict[str, float]:
    """Per task: baseline, candidate, delta, interval bounds (own scale), n, flips; what was not measured is absent."""
    out: dict[str, float] = {}
    for c in comparisons:
        values: dict[str, float | int | None] = {
            "baseline": c.baseline, "candidate": c.candidate, "delta": c.delta, "ci_low": c.ci_low,
            "ci_high": c.ci_high, "n": c.n if c.delta is not None else None,
        }
        if c.flips is not None and c.delta is not None:
            values |= {"flips_lost": len(c.flips.lost), "flips_gained": len(c.flips.gained),
                       "flip_rate": c.flips.rate}
        out |= {metric_key(c.task, k): float(v) for k, v in values.items() if v is not None}
    return out


def recipe_tags(verdict: Verdict, session_id: str, model: str | None) -> dict[str, str]:
    return {
        "day0.verdict": verdict.decision,
        "day0.failure_classes": ",".join(str(c) for c in verdict.failure_classes),
        "day0.regressed_tasks": ",".join(verdict.regressed_tasks),
        "day0.recommendation": verdict.recommendation[:5000],
        "day0.recipe": verdict.recipe,
        "day0.session_id": session_id,
        "day0.model": model or "",
    }


def session_tags(session: SessionVerdict, session_id: str, model: str | None) -> dict[str, str]:
    return {
        "day0.recommendation": session.recommendation[:5000],
        "day0.recommended": session.recommended or "",
        "day0.verdicts": ",".join(f"{v.recipe}={v.decision}" for v in session.verdicts),
        "day0.failure_classes": ",".join(sorted({str(c) for v in session.verdicts for c in v.failure_classes})),
        "day0.session_id": session_id,
        "day0.model": model or "",
    }


# ---------------------------------------------------------------------------------------------- I/O


@dataclass
class RecipeFiles:
    """What one recipe's run gets as artifacts: its plot, and each task's records (side -> path)."""

    plot: Path | None = None
    records: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {"baseline": path, ...}


@dataclass
class MlflowRuns:
    """The runs of one session, created before the reports so their ids can go into verdict.json."""

    client: Any
    tracking_uri: str
    experiment_id: str
    session_run: str
    recipe_runs: dict[str, str]

    def ids(self) -> dict[str, Any]:
        return {"tracking_uri": public_uri(self.tracking_uri), "experiment_id": self.experiment_id,
                "session_run_id": self.session_run, "recipe_run_ids": dict(self.recipe_runs)}

    def line(self) -> str:
        runs = ", ".join(f"{r}: {i}" for r, i in self.recipe_runs.items())
        return (f"mlflow: session run {self.session_run} ({runs}), experiment {self.experiment_id} at "
                f"{public_uri(self.tracking_uri)}")


@contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's retry settings for our calls (read per request), put back after."""
    added = [k for k in HTTP_DEFAULTS if k not in os.environ]
    for key in added:
        os.environ[key] = HTTP_DEFAULTS[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _check_server(uri: str) -> None:
    """An HTTP tracking server must answer /health now; MLflow's own client would retry it for minutes."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    import httpx

    response = httpx.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    if response.status_code != 200:
        raise ConnectionError(f"GET /health answered {response.status_code}")


def start_runs(session: SessionVerdict, *, session_id: str, model: str | None,
               experiment: str = EXPERIMENT) -> tuple[MlflowRuns | None, str | None]:
    """The session's run and one nested run per recipe (status RUNNING); (None, warning) when the tracker fails."""
    uri = ""
    try:
        with bounded_http():
            import mlflow
            from mlflow.tracking import MlflowClient

            uri = mlflow.get_tracking_uri()
            _check_server(uri)
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            parent = client.create_run(experiment_id, run_name=f"day0 {model or ''} {session_id}".replace("  ", " "),
                                       tags=session_tags(session, session_id, model)).info.run_id
            children = {}
            for v in session.verdicts:
                children[v.recipe] = client.create_run(
                    experiment_id, run_name=v.recipe,
                    tags={"mlflow.parentRunId": parent, **recipe_tags(v, session_id, model)}).info.run_id
    except Exception as exc:  # a tracker never changes the verdict: whatever it raised is one warning line
        return None, f"mlflow: nothing logged to {public_uri(uri) or 'the tracking store'} ({_one_line(exc)}); " \
                     "the verdict and the exit code stand"
    return MlflowRuns(client, uri, experiment_id, parent, children), None


def _log(client: Any, run_id: str, params: Mapping[str, str], metrics: Mapping[str, float],
         artifacts: Sequence[tuple[Path, str | None]]) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    items = list(params.items())
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + BATCH]], synchronous=True)
    metric_items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(metric_items), 1000):
        client.log_batch(run_id, metrics=metric_items[i:i + 1000], synchronous=True)
    for path, folder in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=folder)


def finish_runs(runs: MlflowRuns, session: SessionVerdict, comparisons: Sequence[TaskComparison], *,
                public_config: Mapping[str, Any], session_files: Sequence[Path],
                recipe_files: Mapping[str, RecipeFiles]) -> str | None:
    """Params, metrics, artifacts, then FINISHED; on any failure the runs are marked FAILED and one line returned."""
    client = runs.client
    try:
        with bounded_http():
            params = run_params(public_config)
            _log(client, runs.session_run, params, {}, [(p, None) for p in session_files])
            for v in session.verdicts:
                run_id = runs.recipe_runs[v.recipe]
                mine = [c for c in comparisons if c.recipe == v.recipe]
                metrics = task_metrics(mine)
                if v.size_ratio is not None:
                    metrics["size_ratio"] = v.size_ratio
                files = recipe_files.get(v.recipe, RecipeFiles())
                artifacts: list[tuple[Path, str | None]] = [(p, None) for p in session_files if p.name != "delta.svg"]
                if files.plot is not None:
                    artifacts.append((files.plot, None))
                for task, sides in files.records.items():
                    artifacts += [(Path(path), f"records/{task}/{side}") for side, path in sides.items()]
                _log(client, run_id, run_params(public_config, recipe_run=v.recipe), metrics, artifacts)
                client.set_terminated(run_id, "FINISHED")
            client.set_terminated(runs.session_run, "FINISHED")
    except Exception as exc:  # a tracker never changes the verdict
        _mark_failed(runs)
        return (f"mlflow: logging to {public_uri(runs.tracking_uri)} failed ({_one_line(exc)}); the runs are marked "
                "FAILED; the verdict and the exit code stand")
    return None


def _mark_failed(runs: MlflowRuns) -> None:
    try:
        with bounded_http():
            for run_id in (*runs.recipe_runs.values(), runs.session_run):
                if runs.client.get_run(run_id).info.status == "RUNNING":
                    runs.client.set_terminated(run_id, "FAILED")
    except Exception:  # the server that failed the logging may be gone: the runs stay RUNNING there
        return
