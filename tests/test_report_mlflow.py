"""MLflow: the runs a session logs, read back through MLflow's own client from a real tracking server.

The server is the full ``mlflow`` package in its own environment (``scripts/install-mlflow.sh`` makes
``.venv-mlflow``; CI runs it), started once for this file on 127.0.0.1 with a SQLite backend and a local artifact
root, and stopped with its whole process group. Without that environment the server test skips, unless
``DAY0_REQUIRE_MLFLOW=1`` (set by .ci/run), where it fails. The sessions are lm-eval folder pairs
(tests/test_lm_eval_source.py's fixtures: a REGRESSION with 25 + 3 flipped docs in seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_lm_eval_source import sides

from pytest_day0.failures import Day0Error
from pytest_day0.report import mlflow_log

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-mlflow-test-never-logged-77"
SERVER_START_S = 240  # a cold start migrates the SQLite schema: ~30 s quiet, minutes on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_command() -> str | None:
    explicit = os.environ.get("DAY0_MLFLOW_SERVER")
    venv = ROOT / ".venv-mlflow" / "bin" / "mlflow"
    return explicit or (str(venv) if venv.is_file() else None)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    command = _server_command()
    if command is None:
        why = "no MLflow tracking server environment (.venv-mlflow: bash scripts/install-mlflow.sh)"
        if os.environ.get("DAY0_REQUIRE_MLFLOW") == "1":
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: 8 fewer processes
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no /health after {SERVER_START_S}s"
            time.sleep(0.5)
        yield url
    finally:  # the whole group: the CLI, uvicorn's parent and its worker
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived its parent
        proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def mlflow_client() -> types.SimpleNamespace:
    """MLflow's client, imported before any pytester fixture snapshots ``sys.modules`` (pytester puts the snapshot
    back after each test, which would leave half of MLflow's modules behind for the next import), and not at
    collection (seconds in every xdist worker)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    return types.SimpleNamespace(MlflowClient=MlflowClient, download_artifacts=download_artifacts)


def _session(pytester: pytest.Pytester, tmp_path: Path, *extra: str) -> tuple[Any, dict[str, Any], float]:
    base, cand = sides(tmp_path, gsm_lost=25, arc_lost=3)
    ws = pytester.path / "ws"
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--day0-model=org/Model-8B", "--recipe", "fp8",
        f"--day0-lm-eval-baseline={base}", f"--day0-lm-eval-candidate={cand}", f"--day0-workdir={ws}", *extra)
    return result, json.loads((ws / "verdict.json").read_text()), time.monotonic() - started


def _decisions(verdict: dict[str, Any]) -> dict[str, str]:
    return {v["recipe"]: v["decision"] for v in verdict["session"]["verdicts"]}


def _artifacts(client: Any, run_id: str, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= _artifacts(client, run_id, f.path)
        else:
            out[f.path] = f.file_size
    return out


# ---------------------------------------------------------------------------------------------- a real server


def test_session_logs_nested_runs_to_a_real_tracking_server(mlflow_client: types.SimpleNamespace,
                                                            mlflow_server: str, pytester: pytest.Pytester,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    MlflowClient, download_artifacts = mlflow_client.MlflowClient, mlflow_client.download_artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DAY0_API_KEY", SECRET)
    experiment = f"day0-test-{pytester.path.name}"
    result, verdict, _ = _session(pytester, tmp_path, "--day0-mlflow", f"--day0-mlflow-experiment={experiment}")
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]  # a warn-tier REGRESSION, as without MLflow
    ids = verdict["extra"]["mlflow"]
    session_run, fp8_run = ids["session_run_id"], ids["recipe_run_ids"]["fp8"]
    assert ids["tracking_uri"] == mlflow_server
    assert f"mlflow: session run {session_run} (fp8: {fp8_run}), experiment {ids['experiment_id']} at " \
           f"{mlflow_server}" in out

    client = MlflowClient(mlflow_server)
    assert client.get_experiment_by_name(experiment).experiment_id == ids["experiment_id"]
    parent, child = client.get_run(session_run), client.get_run(fp8_run)
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == session_run and child.info.run_name == "fp8"
    assert child.data.tags["day0.verdict"] == "REGRESSION"
    assert set(child.data.tags["day0.failure_classes"].split(",")) == {"REGRESSION", "INCONCLUSIVE"}
    assert child.data.tags["day0.regressed_tasks"] == "gsm8k"
    assert parent.data.tags["day0.verdicts"] == "fp8=REGRESSION"
    assert parent.data.tags["day0.session_id"] == verdict["extra"]["session_id"]
    # metrics: the verdict's own numbers, per task
    metrics = child.data.metrics
    for c in verdict["comparisons"]:
        for key in ("baseline", "candidate", "delta", "ci_low", "ci_high", "n"):
            assert metrics[f"{c['task']}/{key}"] == pytest.approx(c[key]), (c["task"], key)
        assert metrics[f"{c['task']}/flips_lost"] == len(c["flips"]["lost"])
        assert metrics[f"{c['task']}/flips_gained"] == len(c["flips"]["gained"])
    assert metrics["gsm8k/flips_lost"] == 25 and metrics["arc_easy/flips_lost"] == 3
    # params: the configuration, secrets not at all
    params = child.data.params
    assert params["model"] == "org/Model-8B" and params["recipes"] == "fp8" and params["threshold"] == "0.01"
    assert params["eval"] == "lm-eval" and params["recipe_run"] == "fp8"
    assert "api_key" not in params and "ssh_key_passphrase" not in params
    assert SECRET not in json.dumps([params, child.data.tags, parent.data.params, parent.data.tags])
    # artifacts: verdict.json, report.html, the plot and both sides' records of every task
    arts = _artifacts(client, fp8_run)
    assert {"verdict.json", "report.html", "delta.svg"} <= set(arts)
    for task in ("arc_easy", "gsm8k"):
        for side in ("baseline", "candidate"):
            assert any(p.startswith(f"records/{task}/{side}/") and p.endswith(".jsonl") for p in arts), arts
    assert set(_artifacts(client, session_run)) == {"verdict.json", "report.html", "delta.svg"}
    run_dir = pytester.path / "ws" / "runs" / verdict["extra"]["session_id"]
    got = Path(download_artifacts(run_id=fp8_run, artifact_path="report.html", dst_path=str(tmp_path / "dl"),
                                  tracking_uri=mlflow_server))
    assert got.read_bytes() == (run_dir / "report.html").read_bytes()
    record_path = next(p for p in arts if p.startswith("records/gsm8k/candidate/"))
    flips = json.loads((run_dir / "flips" / "fp8-gsm8k.json").read_text())
    records = Path(download_artifacts(run_id=fp8_run, artifact_path=record_path, dst_path=str(tmp_path / "dl2"),
                                      tracking_uri=mlflow_server))
    assert records.read_bytes() == Path(flips["records"]["candidate"]).read_bytes()
    logged_verdict = Path(download_artifacts(run_id=session_run, artifact_path="verdict.json",
                                             dst_path=str(tmp_path / "dl3"), tracking_uri=mlflow_server))
    assert SECRET not in logged_verdict.read_text() and SECRET not in got.read_text()


# ---------------------------------------------------------------------------------------------- no server


def test_a_tracking_server_that_is_down_is_one_warning_line(pytester: pytest.Pytester, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plain, plain_verdict, _ = _session(pytester, tmp_path)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    result, verdict, seconds = _session(pytester, tmp_path, "--day0-mlflow")
    out = result.stdout.str()
    lines = [line for line in out.splitlines() if line.startswith("mlflow:")]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"mlflow: nothing logged to {dead} (ConnectError") and \
        lines[0].endswith("the verdict and the exit code stand")
    assert result.ret == plain.ret == 0 and _decisions(verdict) == _decisions(plain_verdict) == {"fp8": "REGRESSION"}
    assert verdict["session"] == plain_verdict["session"] and verdict["extra"]["mlflow"] == {"error": lines[0]}
    assert seconds < 120  # MLflow's client alone would retry a dead server for minutes
    assert "Traceback" not in out and "Traceback" not in result.stderr.str()


def test_without_a_tracking_uri_the_runs_go_to_mlflows_default_local_store(
        mlflow_client: types.SimpleNamespace, pytester: pytest.Pytester, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    MlflowClient = mlflow_client.MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result, verdict, _ = _session(pytester, tmp_path, "--day0-mlflow")
    assert result.ret == 0, result.stdout.str()[-3000:]
    ids = verdict["extra"]["mlflow"]
    store = pytester.path / "mlflow.db"  # MLflow's default: sqlite:///mlflow.db and ./mlruns where pytest ran
    assert ids["tracking_uri"] == f"sqlite:///{store}" and store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    run = client.get_run(ids["recipe_run_ids"]["fp8"])
    assert run.data.tags["day0.verdict"] == "REGRESSION" and run.data.metrics["gsm8k/flips_lost"] == 25
    assert {"verdict.json", "report.html", "delta.svg"} <= set(_artifacts(client, run.info.run_id))
    assert list((pytester.path / "mlruns").rglob("report.html"))


# ---------------------------------------------------------------------------------------------- pure parts


def test_params_leave_secret_options_out_and_fit_mlflows_limit() -> None:
    params = mlflow_log.run_params({"model": "m", "api_key": "**********", "ssh_key_passphrase": "**********",
                                    "recipes": ["fp8", "nvfp4"], "limit": None, "vllm_args": "x" * 7000})
    assert params == {"model": "m", "recipes": "fp8,nvfp4", "vllm_args": "x" * 5999 + "…"}


def test_metric_keys_and_uris_are_safe_to_log_and_print() -> None:
    assert mlflow_log.metric_key("mmlu:high_school (5-shot)", "delta") == "mmlu_high_school _5-shot_/delta"
    assert mlflow_log.public_uri("https://user:tok@mlflow.example.com:8443/path") == \
        "https://mlflow.example.com:8443/path"
    assert mlflow_log.public_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_the_option_needs_mlflows_client_and_says_so_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from pytest_day0.config import build_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(Day0Error, match=r"--day0-mlflow: needs MLflow's client: pip install 'pytest-day0\[mlflow\]'"):
        build_config({"model": "demo", "mlflow": True}, lambda _k: None, environ={})
