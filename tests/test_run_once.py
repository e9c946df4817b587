"""The run-once core: stage records shared by real processes, timeouts that hold, keys that see every input.

Each test here failed on the chain it replaced: the "fresh" flag and transient retries lived in process memory
(every xdist worker discarded and retried for itself), a PTQ child was only timed out when it printed a line and
then only its own pid was killed, and the records' key ignored the server's arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_day0.config import build_config
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.release.runner import StageRunner, start_session
from pytest_day0.workspace import Workspace

WORKER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    from pytest_day0.failures import Day0Error, FailureClass
    from pytest_day0.release.runner import StageRunner
    from pytest_day0.workspace import Workspace

    root, session, mode, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    runner = StageRunner(Workspace(root), session, fresh=False)

    def build():
        with log.open("a") as fh:
            fh.write(json.dumps({"pid": __import__("os").getpid(), "what": "build"}) + "\\n")
        if mode == "transient":
            raise Day0Error(FailureClass.INFRA_TRANSIENT, "the endpoint reset the connection")
        time.sleep(0.3)
        return "built"

    def reset():
        with log.open("a") as fh:
            fh.write(json.dumps({"pid": __import__("os").getpid(), "what": "reset"}) + "\\n")

    try:
        print(runner.run("eval-baseline-arc_like", build, lock="eval-key", reset=reset))
    except Day0Error as exc:
        print(f"{exc.failure_class}: {exc.message}")
''')


def _two_workers(tmp_path: Path, session: str, mode: str) -> tuple[list[str], list[dict[str, object]]]:
    """Two real processes (as two xdist workers would) ask for the same stage at once."""
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "ws"), session, mode, str(log)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return outs, calls


def test_a_transient_failure_is_retried_once_per_session_not_per_worker(tmp_path: Path) -> None:
    outs, calls = _two_workers(tmp_path, "s1", "transient")
    builds = [c for c in calls if c["what"] == "build"]
    assert len(builds) == 2  # the first try and one retry, in the whole session (per worker it was 4)
    assert len({c["pid"] for c in builds}) == 1  # the one that held the lock did both; the other read the record
    for out in outs:
        assert out.startswith("SYSTEMIC: eval-baseline-arc_like failed twice with INFRA_TRANSIENT"), outs
    record = StageRunner(Workspace(tmp_path / "ws"), "s1").record("eval-baseline-arc_like")
    assert (record.transient, record.failure_class) == (2, FailureClass.SYSTEMIC)
    # a later session tries again from scratch
    outs, calls = _two_workers(tmp_path, "s2", "transient")
    assert len([c for c in calls if c["what"] == "build"]) == 4


def test_fresh_is_decided_once_and_each_artifact_reset_once(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    start_session(ws, "s1", fresh=True)  # the controller's decision; the workers' own configs are not asked
    outs, calls = _two_workers(tmp_path, "s1", "ok")
    assert outs == ["built", "built"]
    assert [c["what"] for c in calls].count("reset") == 1  # a per-process flag reset it once per worker
    assert [c["what"] for c in calls].count("build") == 2  # each process builds (finds) its artifact under the lock
    assert StageRunner(ws, "s1").fresh is True and StageRunner(ws, "s2", fresh=False).fresh is False


def test_runner_memo_and_remembered_failure(tmp_path: Path) -> None:
    runner = StageRunner(Workspace(tmp_path), "s1")
    calls: list[int] = []

    def fail() -> str:
        calls.append(1)
        raise Day0Error(FailureClass.MODEL_UNSUPPORTED, "no layer matched")

    for _ in range(3):
        with pytest.raises(Day0Error, match="no layer matched"):
            runner.run("ptq-nvfp4", fail)
    assert len(calls) == 1
    other = StageRunner(Workspace(tmp_path), "s1")  # another process of the same session
    with pytest.raises(Day0Error) as info:
        other.run("ptq-nvfp4", fail)
    assert info.value.failure_class is FailureClass.MODEL_UNSUPPORTED and len(calls) == 1


# ---------------------------------------------------------------------- timeouts that hold


def _alive_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().split(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            if marker in cmd and state != "Z":
                found.append(int(proc.name))
    return found


def test_a_silent_ptq_child_is_killed_at_the_timeout_with_its_group(tmp_path: Path) -> None:
    from pytest_day0.stages.quantize import run_quantize_child

    marker = f"day0-silent-{os.getpid()}-{time.monotonic_ns()}"
    # prints nothing, starts a grandchild in its own group, and would sleep for five minutes
    cmd = ["bash", "-c", f"sleep 300 --{marker}-grandchild & exec -a {marker} sleep 300", "child"]
    started = time.monotonic()
    with pytest.raises(Day0Error) as info:
        run_quantize_child(cmd, tmp_path / "ckpt", what="PTQ fp8", timeout_s=1.0, marker={"engine": "test"})
    took = time.monotonic() - started
    assert info.value.failure_class is FailureClass.INFRA_TRANSIENT
    assert "PTQ fp8 reached the stage timeout (1s)" in info.value.message and took < 8, took
    deadline = time.monotonic() + 5
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive_with(marker) == []  # the child and its grandchild: the whole group
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt.staging-*"))


def test_an_evaluation_past_the_stage_timeout_is_transient_and_keeps_its_records(tmp_path: Path) -> None:
    """A slow endpoint: the stage stops at its deadline, keeps what finished, and a retry resumes from there."""
    from fakes.openai_server import ToyOpenAIServer

    from pytest_day0.scoring.tasks import load_task
    from pytest_day0.serving.endpoint import Endpoint
    from pytest_day0.stages.evaluate import read_records, run_evaluation

    task = load_task("gsm_like", 40)
    records = tmp_path / "r.jsonl"
    with ToyOpenAIServer() as server:
        server.faults.slow_s = 0.2
        endpoint = Endpoint(url=server.url, model="toy")
        started = time.monotonic()
        with pytest.raises(Day0Error) as info:
            run_evaluation(task, endpoint, records, "fp8", concurrency=2, deadline_s=1.5)
        assert time.monotonic() - started < 6
        assert info.value.failure_class is FailureClass.INFRA_TRANSIENT
        assert info.value.message.startswith("eval fp8/gsm_like reached the stage timeout (1.5s) with ")
        kept, _ = read_records(records)
        assert 0 < len(kept) < 40
        server.faults.slow_s = 0.0
        before = server.request_count("/v1/completions")
        result = run_evaluation(task, endpoint, records, "fp8", concurrency=16)
        assert result.scored_samples == 40
        assert server.request_count("/v1/completions") - before == 40 - len(kept)  # only what had not finished


# ---------------------------------------------------------------------- keys see every input


def _chain(tmp_path: Path, **values: object):  # type: ignore[no-untyped-def]
    from pytest_day0.release.chain import ReleaseChain

    config = build_config({"model": "demo", "workdir": str(tmp_path / "ws"), **values}, lambda _k: None)
    return ReleaseChain(config, "s1")


def test_server_arguments_and_commands_are_in_the_records_key(tmp_path: Path) -> None:
    from pytest_day0.scoring.tasks import load_task

    task = load_task("arc_like", 5)
    plain = _chain(tmp_path, serve="vllm")
    path = plain.records_path("baseline", task)
    assert _chain(tmp_path, serve="vllm", vllm_args="--dtype float32").records_path("baseline", task) != path
    assert _chain(tmp_path, serve="vllm", vllm_args="--dtype bfloat16").records_path("baseline", task) != \
        _chain(tmp_path, serve="vllm", vllm_args="--dtype float32").records_path("baseline", task)
    assert _chain(tmp_path, serve="vllm").records_path("baseline", task) == path  # and nothing else moves it
    assert _chain(tmp_path).records_path("baseline", task) != path  # another engine
    assert _chain(tmp_path, limit=7).records_path("baseline", task) == _chain(tmp_path).records_path("baseline", task)


def test_the_scorer_and_server_versions_are_in_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed dequantizer or scorer must not reuse what the broken one measured."""
    from pytest_day0 import engines
    from pytest_day0.scoring.tasks import load_task

    task = load_task("arc_like", 5)
    before = _chain(tmp_path).records_path("baseline", task)
    monkeypatch.setattr(engines, "_reference_version", lambda: "0.1.0+fixed-dequant")
    assert _chain(tmp_path).records_path("baseline", task) != before
    monkeypatch.undo()
    monkeypatch.setattr(engines, "_scorer_version", lambda: "0.1.0+fixed-scorer")
    assert _chain(tmp_path).records_path("baseline", task) != before
