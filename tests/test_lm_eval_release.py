"""``pytest --day0-model demo --day0-eval lm-eval``, as a user runs it: real lm-eval 0.4.13, real PTQ, real servers.

* the proof of agreement: on the demo (bf16 baseline, fp8 and int4_awq candidates, and an fp8 copy damaged so that
  its answers change), the lm-eval engine's per-document correctness equals the built-in scorer's on every
  document of every demo task, its per-choice log-likelihoods agree within 1e-4, and both engines end in the same
  table and the same verdicts;
* the smoke suite (the demo tasks and the MMLU-shaped group) under ``-n 2``: each (side, task) is one lm-eval job,
  lm-eval's progress shows as progress lines, and a re-run of the finished session runs no lm-eval at all;
* an unknown task and a dataset that is neither cached nor reachable: one line each, before anything runs.

The sessions that need the demo's fp8 / int4_awq checkpoints use the workspace ``tests/test_plugin_release.py``
fills (same path, same calibration size), so the recipes are quantized once per test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.config import build_config
from pytest_day0.release.chain import ReleaseChain
from pytest_day0.scoring.records import SampleRecord
from pytest_day0.workspace import read_events

pytest_plugins = ["pytester"]
DEMO_TASKS = ("arc_like", "gsm_like", "tau_like")
SIZES = {"arc_like": 500, "gsm_like": 1000, "tau_like": 500}  # the demo's tasks, every document
COMMON = ("-p", "no:cacheprovider", "--day0-model=demo", "--day0-calib-size=16")
# layer 0's down_proj x2.5 changes answers of every task (tests/test_plugin_release.py, MODERATE; on the demo with
# outlier channels, calibration 16: 1 / 19 / 6 items of arc_like / gsm_like / tau_like lost, measured by this file)
MODERATE = {"model.layers.0.mlp.down_proj.weight_scale": 2.5}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if (name.startswith(("PYTEST_XDIST_", "GITHUB_", "DAY0_"))
                or name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_ws(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if hasattr(request.config, "workerinput") else base) / "day0-shared-ws"


def run(pytester: pytest.Pytester, *args: str, timeout: float = 900) -> tuple[pytest.RunResult, dict[str, Any]]:
    """One session in a subprocess; its own verdict.json (by session id, from the JSON report)."""
    report = pytester.path / f"report-{len(list(pytester.path.glob('report-*.json')))}.json"
    result = pytester.runpytest_subprocess(*args, "--json-report", f"--json-report-file={report}", timeout=timeout)
    data = json.loads(report.read_text()) if report.exists() else {}
    workdir = next(Path(a.split("=", 1)[1]) for a in args if a.startswith("--day0-workdir="))
    session = data.get("day0", {}).get("extra", {}).get("session_id")
    verdict = json.loads((workdir / "runs" / session / "verdict.json").read_text()) if session else {}
    return result, verdict


def chain_of(ws: Path, **values: str) -> ReleaseChain:
    """A chain over a finished session's configuration: its records are read back, nothing is run again."""
    cli = {"model": "demo", "calib_size": "16", "workdir": str(ws), **values}
    return ReleaseChain(build_config(cli, lambda _key: None, environ={}), "test-reader")


def records(chain: ReleaseChain, side: str, task: str) -> list[SampleRecord]:
    return chain.records(side, task)


def table(verdict: dict[str, Any]) -> list[tuple[Any, ...]]:
    keys = ("recipe", "task", "scale", "baseline", "candidate", "delta", "n", "ci_low", "ci_high", "p_value", "stat")
    rows = [tuple(c[k] for k in keys) + tuple(c[g]["passed"] for g in ("floor", "quality", "anomaly"))
            for c in verdict["comparisons"]]
    return sorted(rows, key=str)


def without_bounds(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Table rows without ci_low / ci_high (positions 7 and 8)."""
    return [row[:7] + row[9:] for row in rows]


def without_gates(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Table rows without the floor / quality / anomaly flags (the last three)."""
    return [row[:-3] for row in rows]


def by_task(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(verdict["comparisons"], key=lambda c: (c["recipe"], c["task"]))


def decisions(verdict: dict[str, Any]) -> dict[str, str]:
    return {v["recipe"]: v["decision"] for v in verdict["session"]["verdicts"]}


def terminal_table(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "pytest-day0 release" in line)
    return [line for line in lines[start:] if line.strip().startswith(("task ", *DEMO_TASKS))]


def agreement(scorer: list[SampleRecord], lm: list[SampleRecord]) -> tuple[int, int, float]:
    """(documents compared, correctness differences, largest |log-likelihood difference|); document i of the
    lm-eval task is line i of the demo task, the scorer's sample i."""
    assert len(scorer) == len(lm) == SIZES[scorer[0].id.rsplit("-", 1)[0]]
    wrong, worst = 0, 0.0
    for i, (a, b) in enumerate(zip(scorer, lm, strict=True)):
        assert b.id == str(i) and a.prompt == b.prompt, (a.id, b.id)
        wrong += a.correct != b.correct
        if a.choice_logprobs is not None:
            assert b.choice_logprobs is not None and len(a.choice_logprobs) == len(b.choice_logprobs)
            worst = max([worst, *(abs(x - y) for x, y in zip(a.choice_logprobs, b.choice_logprobs, strict=True))])
        else:
            assert a.response == b.response, (a.id, a.response, b.response)
    return len(scorer), wrong, worst


def damaged_copy(source: Path, target: Path, factors: dict[str, float]) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name, factor in factors.items():
        tensors[name] = tensors[name] * factor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


# ---------------------------------------------------------------------- agreement


def test_lm_eval_engine_agrees_with_the_scorer_on_every_document(pytester: pytest.Pytester, shared_ws: Path) -> None:
    ws = shared_ws
    args = (*COMMON, "--recipe=fp8,int4_awq", f"--day0-workdir={ws}")
    scored, scored_verdict = run(pytester, *args)
    lm, lm_verdict = run(pytester, *args, "--day0-eval=lm-eval")
    assert scored.ret == 0 and lm.ret == 0, lm.stdout.str()[-3000:]
    assert decisions(lm_verdict) == decisions(scored_verdict) == {"fp8": "ACCEPT", "int4_awq": "ACCEPT"}
    assert table(lm_verdict) == table(scored_verdict)
    assert terminal_table(lm.stdout.str()) == terminal_table(scored.stdout.str())
    # every document of every demo task, on all three sides
    by_scorer, by_lm = chain_of(ws, recipe="fp8,int4_awq"), chain_of(ws, recipe="fp8,int4_awq", eval="lm-eval")
    for side in ("baseline", "fp8", "int4_awq"):
        for task in DEMO_TASKS:
            n, wrong, worst = agreement(records(by_scorer, side, task), records(by_lm, side, task))
            assert (n, wrong) == (SIZES[task], 0) and worst <= 1e-4, (side, task, worst)
    # a candidate whose answers do change: damaged fp8 weights, served as an existing checkpoint
    fp8 = by_scorer.quantized("fp8").checkpoint  # already made: the marker says so, nothing runs
    damaged = damaged_copy(fp8, pytester.path / "fp8-damaged", MODERATE)
    existing = (*COMMON, "--recipe=fp8", f"--day0-workdir={ws}", "--day0-quantize=existing",
                f"--day0-checkpoint={damaged}")
    scored_d, scored_dv = run(pytester, *existing)
    lm_d, lm_dv = run(pytester, *existing, "--day0-eval=lm-eval")
    # Same items, same answers, same deltas, flips and McNemar p: the same table but for the interval bounds. The
    # betting interval reads the items in a keyed-hash order of their ids, and the engines name them differently
    # ("arc_like-0001" / "1"): two valid intervals, not the same digits (with no disagreement, as above, they are).
    # The gates read those bounds, so a gate may differ only where the two intervals end on different sides of its
    # limit (measured on the demo with outlier channels: arc_like, 1 item lost, [-0.8, +0.5] PASS by the scorer's
    # order, [-1.2, +0.5] INCONCLUSIVE by lm-eval's).
    assert without_gates(without_bounds(table(lm_dv))) == without_gates(without_bounds(table(scored_dv))), (
        table(lm_dv), table(scored_dv))
    for lm_c, sc_c in zip(by_task(lm_dv), by_task(scored_dv), strict=True):
        for gate in ("floor", "quality", "anomaly"):
            if lm_c[gate]["passed"] != sc_c[gate]["passed"]:
                limit = -(lm_c["floor_points"] if gate == "floor" else lm_c["threshold_points"])
                assert gate != "anomaly" and (lm_c["ci_low"] > limit) != (sc_c["ci_low"] > limit), (gate, lm_c, sc_c)
    # The same verdict. The divergence pre-check runs with the scorer only (its texts are the scorer's task
    # samples) and warns on this damage, but a warn is a reason line, never the decision: the evaluation decides.
    assert decisions(lm_dv) == decisions(scored_dv) == {"fp8": "INCONCLUSIVE"}, lm_d.stdout.str()[-3000:]
    (scored_only,) = scored_dv["session"]["verdicts"]
    assert any(r.startswith("[REGRESSION] divergence warned") for r in scored_only["reasons"]), scored_only
    assert scored_d.ret == lm_d.ret
    values = {"quantize": "existing", "checkpoint": str(damaged), "recipe": "fp8"}
    changed = 0
    for task in DEMO_TASKS:
        sc = records(chain_of(ws, **values), "fp8", task)
        n, wrong, worst = agreement(sc, records(chain_of(ws, **values, eval="lm-eval"), "fp8", task))
        assert (n, wrong) == (SIZES[task], 0) and worst <= 1e-4, (task, worst)
        base = {r.id: r.correct for r in records(by_scorer, "baseline", task)}
        changed += sum(base[r.id] != r.correct for r in sc)
    assert changed > 0  # the damage changed answers, and both engines saw the same ones


# ---------------------------------------------------------------------- smoke suite, xdist, re-run


def test_smoke_suite_under_xdist_runs_each_job_once_and_a_rerun_runs_none(pytester: pytest.Pytester,
                                                                          shared_ws: Path) -> None:
    ws = pytester.path / "ws"
    # the shared workspace's fp8 export, so this session quantizes nothing
    fp8 = chain_of(shared_ws, recipe="fp8").quantized("fp8").checkpoint
    args = (*COMMON, "--recipe=fp8", "--day0-quantize=existing", f"--day0-checkpoint={fp8}", "--day0-suite=smoke",
            "--day0-limit=20", "--day0-stat=point", f"--day0-workdir={ws}", "-n", "2")
    first, verdict = run(pytester, *args)
    out = first.stdout.str()
    assert first.ret == 0, out[-3000:]
    assert decisions(verdict) == {"fp8": "ACCEPT"}
    compared = {c["task"] for c in verdict["comparisons"]}
    assert compared == {"arc_like", "gsm_like", "tau_like", "demo_mmlu_like", "demo_mmlu_like_stem",
                        "demo_mmlu_like_other", "demo_mmlu_like_p0", "demo_mmlu_like_p1", "demo_mmlu_like_p2",
                        "demo_mmlu_like_p3"}
    group = next(c for c in verdict["comparisons"] if c["task"] == "demo_mmlu_like")
    assert group["n"] == 80  # 4 subtasks x 20 documents, paired as one union
    jobs = Counter((e["side"], e["task"]) for e in read_events(ws, "lm_eval_job"))
    leaves = {"arc_like", "gsm_like", "tau_like", *(f"demo_mmlu_like_p{i}" for i in range(4))}
    assert set(jobs) == {(side, t) for side in ("baseline", "fp8") for t in leaves} and set(jobs.values()) == {1}
    assert len({e["pid"] for e in read_events(ws, "lm_eval_job")}) == 2  # both xdist workers ran lm-eval jobs
    assert "[day0]   baseline/arc_like: 80/80 requests (" in out  # lm-eval's progress, as our progress lines
    assert "lm-eval request cache answers 0, 80 to send" in out
    workers = sorted(p.name for p in (ws / "logs").glob("lm-eval-worker-*.log"))

    again, verdict2 = run(pytester, *args)
    assert again.ret == 0 and decisions(verdict2) == {"fp8": "ACCEPT"}
    assert table(verdict2) == table(verdict)
    assert len(read_events(ws, "lm_eval_job")) == sum(jobs.values())  # no lm-eval job
    assert sorted(p.name for p in (ws / "logs").glob("lm-eval-worker-*.log")) == workers  # no worker started
    assert len(read_events(ws, "server_start")) == 2  # no server either
    assert "requests (" not in again.stdout.str()


# ---------------------------------------------------------------------- one line each


def _one_usage_line(result: pytest.RunResult) -> str:
    assert result.ret == 4, result.stdout.str() + result.stderr.str()
    lines = [line for line in result.stderr.str().splitlines() if line.strip() and not line.startswith("[day0] ")]
    assert len(lines) == 1 and "Traceback" not in result.stdout.str() + result.stderr.str(), result.stderr.str()
    assert lines[0].startswith("ERROR: [USER_CONFIG_ERROR] ")
    return lines[0]


def test_an_unknown_task_is_one_line_before_anything_runs(pytester: pytest.Pytester) -> None:
    ws = pytester.path / "ws"
    result = pytester.runpytest_subprocess(*COMMON, f"--day0-workdir={ws}", "--day0-eval=lm-eval",
                                           "--day0-tasks=arc_like,arc_easyy")
    line = _one_usage_line(result)
    assert "lm-eval has no task, group or tag named 'arc_easyy' (close: arc_easy" in line
    assert not (ws / "events.jsonl").exists()  # nothing quantized, served or evaluated


def test_a_dataset_neither_cached_nor_reachable_is_one_line_before_anything_runs(pytester: pytest.Pytester,
                                                                                 tmp_path: Path) -> None:
    """A user's task (--day0-lm-eval-include) on a hub dataset this machine has not cached. The hub is out of reach
    here; HF_HUB_OFFLINE=1 is set by this test, not by the plugin, so the answer comes without datasets' retries."""
    include = tmp_path / "my_tasks"
    include.mkdir()
    (include / "my_mc.yaml").write_text(
        "task: my_mc\ndataset_path: day0-tests/never-cached\ndataset_name: main\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    ws = pytester.path / "ws"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        result = pytester.runpytest_subprocess(*COMMON, f"--day0-workdir={ws}", "--day0-eval=lm-eval",
                                               f"--day0-lm-eval-include={include}", "--day0-tasks=arc_like,my_mc")
    line = _one_usage_line(result)
    assert "lm-eval task my_mc: dataset day0-tests/never-cached (main) is neither cached nor reachable" in line
    assert "python -c \"import datasets; datasets.load_dataset('day0-tests/never-cached', 'main')\"" in line
    assert not (ws / "events.jsonl").exists()


# ---------------------------------------------------------------------- signals


def _lm_eval_workers_of(parent: int) -> list[int]:
    """Live lm-eval worker processes whose parent is ``parent`` (from /proc, not from the plugin)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "pytest_day0.stages.lm_eval_worker" in cmd and ppid == parent:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_the_lm_eval_worker(tmp_path: Path, shared_ws: Path, signum: int) -> None:
    fp8 = chain_of(shared_ws, recipe="fp8").quantized("fp8").checkpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *COMMON, "--recipe=fp8", "--day0-quantize=existing",
         f"--day0-checkpoint={fp8}", "--day0-eval=lm-eval", "--day0-tasks=arc_like", f"--day0-workdir={tmp_path}/ws",
         "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _lm_eval_workers_of(proc.pid) and proc.poll() is None:
            time.sleep(0.2)
        workers = _lm_eval_workers_of(proc.pid)
        assert workers, "no lm-eval worker came up to be interrupted"
        time.sleep(2.0)  # the worker is evaluating arc_like (1,200 requests)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out[-2000:]
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), out[-2000:]
