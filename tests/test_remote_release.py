"""The whole release with ``--day0-executor slurm://`` against the loopback cluster, as a user runs it.

``pytest --day0-model demo --recipe fp8 --day0-executor slurm://...`` in a subprocess: PTQ is a SLURM job
whose checkpoint stays on the cluster, the PTQ gate reads it over SFTP, baseline and candidate are two serving
jobs reached through SSH tunnels, evaluation runs here through them, the verdict is ACCEPT, and afterwards no
job is left in ``squeue`` and no server process lives. The same after SIGINT in the middle of evaluation. A
wrong host key and a failing PTQ job each end as one line with their failure class.

About two and a half minutes in all (real PTQ, two real servers); the cluster is shared with
test_slurm_executor.py / test_ssh_executor.py, so the queue checks hold the cluster's test lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.loopback import LoopbackCluster, cluster_or_skip, processes_mentioning

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> LoopbackCluster:
    return cluster_or_skip()


@pytest.fixture()
def remote_wd(cluster: LoopbackCluster) -> Iterator[str]:
    """A fresh remote workspace for one session; the cluster is this machine, so it is removed directly."""
    path = cluster.workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _args(cluster: LoopbackCluster, ws: Path, remote_wd: str, *extra: str, limit: int = 20) -> list[str]:
    return ["--day0-model=demo", "--recipe", "fp8", f"--day0-limit={limit}", f"--day0-workdir={ws}",
            f"--day0-executor={cluster.url()}", f"--day0-ssh-key={cluster.key}",
            f"--day0-known-hosts={cluster.known_hosts}", f"--day0-remote-workdir={remote_wd}",
            "-p", "no:cacheprovider", *extra]


def _events(ws: Path, kind: str) -> list[dict[str, object]]:
    path = ws / "events.jsonl"
    if not path.is_file():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == kind]


def _settled(cluster: LoopbackCluster, remote_wd: str, within_s: float = 30) -> tuple[list[str], list[str]]:
    """(queued jobs, live processes using the remote workspace) once both are empty or the time is up."""
    deadline = time.monotonic() + within_s
    while True:
        jobs, procs = cluster.queued_jobs(), processes_mentioning(remote_wd)
        if (not jobs and not procs) or time.monotonic() > deadline:
            return jobs, procs
        time.sleep(0.5)


def _job_state(cluster: LoopbackCluster, job_id: str) -> str:
    shown = cluster.slurm("scontrol", "show", "job", "-o", job_id)
    match = re.search(r"JobState=(\w+)", shown)
    return match.group(1) if match else "UNKNOWN"


def test_release_over_slurm_accepts_and_leaves_nothing_running(
        cluster: LoopbackCluster, pytester: pytest.Pytester, tmp_path: Path, remote_wd: str) -> None:
    ws = tmp_path / "ws"
    with cluster.exclusive():
        # 20 samples keep it quick; at n=20 the paired interval cannot decide, the point rule can
        result = pytester.runpytest_subprocess(*_args(cluster, ws, remote_wd, "--day0-stat=point"), timeout=480)
        jobs, procs = _settled(cluster, remote_wd)
    out = result.outlines
    assert result.ret == 0, "\n".join(out[-40:])
    assert any(line.startswith("VERDICT fp8: ACCEPT") for line in out), "\n".join(out[-20:])
    verdict = json.loads((ws / "verdict.json").read_text())
    assert [v["decision"] for v in verdict["session"]["verdicts"]] == ["ACCEPT"]

    submitted = {str(e["name"]).rsplit("-", 1)[-1] if "serve" in str(e["name"]) else "ptq": str(e["job_id"])
                 for e in _events(ws, "remote_job")}
    assert set(submitted) == {"ptq", "baseline", "fp8"}, submitted  # one PTQ job, two serving jobs
    assert all(e["executor"] == "slurm" for e in _events(ws, "remote_job"))
    assert _job_state(cluster, submitted["ptq"]) == "COMPLETED"
    assert {_job_state(cluster, submitted[s]) for s in ("baseline", "fp8")} == {"CANCELLED"}  # stopped at the end
    assert sum("(SSH tunnel)" in line for line in out) == 2

    # the checkpoint stayed on the cluster; only logs and records came back
    ckpts = list(Path(remote_wd).glob("checkpoints/fp8-*/day0_ptq.json"))
    assert len(ckpts) == 1 and (ckpts[0].parent / "model.safetensors").is_file()
    assert not list(ws.rglob("*.safetensors"))
    records = list(ws.glob("evals/fp8-*/*.jsonl"))
    assert len(records) == 3 and all(len(p.read_text().splitlines()) == 20 for p in records)

    assert jobs == [], jobs
    assert procs == [], procs


def test_sigint_during_evaluation_cancels_every_job(cluster: LoopbackCluster, pytester: pytest.Pytester,
                                                    tmp_path: Path, remote_wd: str) -> None:
    ws = tmp_path / "ws"
    with cluster.exclusive():
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *_args(cluster, ws, remote_wd, limit=300)],
                                cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            deadline = time.monotonic() + 400
            while not _events(ws, "eval_run") and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, "the run ended before evaluation started"
            assert _events(ws, "eval_run"), "evaluation never started"
            serving = [e for e in _events(ws, "remote_job") if "serve" in str(e["name"])]
            assert len(serving) == 2 and cluster.queued_jobs(), "both servers run as jobs while we evaluate"
            time.sleep(0.5)  # well inside the first task's evaluation
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        jobs, procs = _settled(cluster, remote_wd)
    assert proc.returncode == 2, out[-3000:]  # pytest's INTERRUPTED
    assert "KeyboardInterrupt" in out
    assert "VERDICT fp8: ACCEPT" not in out
    assert jobs == [], jobs
    assert procs == [], procs
    assert {_job_state(cluster, str(e["job_id"])) for e in serving} == {"CANCELLED"}


def test_wrong_host_key_is_one_systemic_line(cluster: LoopbackCluster, pytester: pytest.Pytester,
                                             tmp_path: Path, remote_wd: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = (tmp_path / "impostor.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{cluster.host}]:{cluster.port} {' '.join(impostor)}\n")
    ws = tmp_path / "ws"
    args = [a for a in _args(cluster, ws, remote_wd) if not a.startswith("--day0-known-hosts=")]
    args.append(f"--day0-known-hosts={known}")
    result = pytester.runpytest_subprocess(*args, timeout=120)
    out = result.outlines
    text = "\n".join(out)
    assert result.ret == 1
    header = next(i for i, ln in enumerate(out) if ln.startswith("_") and " test_setup " in ln)
    message = out[header + 1]
    assert re.match(r"\[SYSTEMIC\] ssh slurmci@127\.0\.0\.1:2222: host key ssh-ed25519 SHA256:\S+ does NOT "
                    r"match .*known_hosts \(possible man-in-the-middle", message), message
    assert next(ln for ln in out[header + 2:] if ln.strip()).startswith("="), "the failure is that one line"
    assert any(re.match(r"FAILED \S*day0::test_setup - \[SYSTEMIC\]", ln) for ln in out)
    assert "Traceback" not in text and "paramiko" not in text
    assert "passed" not in out[-1]  # SYSTEMIC stops the session: nothing after setup ran
    assert _events(ws, "remote_job") == []  # nothing ran anywhere on a host we could not verify


def test_failing_ptq_job_is_one_line_with_its_class(cluster: LoopbackCluster, pytester: pytest.Pytester,
                                                     tmp_path: Path, remote_wd: str) -> None:
    ws = tmp_path / "ws"
    failing = "echo loading {model}; echo 'torch.OutOfMemoryError: CUDA out of memory' >&2; exit 1"
    with cluster.exclusive():
        result = pytester.runpytest_subprocess(*_args(cluster, ws, remote_wd, f"--day0-ptq-command={failing}"),
                                               timeout=180)
        jobs, procs = _settled(cluster, remote_wd)
    text = "\n".join(result.outlines)
    assert result.ret == 1
    assert any(re.match(r"FAILED \S*day0::test_ptq\[fp8\] - \[UNKNOWN\] PTQ fp8: job \d+ FAILED", ln)
               for ln in result.outlines), text[-3000:]
    header = next(i for i, ln in enumerate(result.outlines) if ln.startswith("_") and " test_ptq[fp8] " in ln)
    message = result.outlines[header + 1]
    assert re.fullmatch(r"\[UNKNOWN\] PTQ fp8: job \d+ FAILED, exit 1: loading \S+/sources/\w+ \| "
                        r"torch.OutOfMemoryError: CUDA out of memory", message), message
    assert next(ln for ln in result.outlines[header + 2:] if ln.strip()).startswith(("=", "_"))
    assert "Traceback" not in text
    assert re.search(r"VERDICT fp8: ANOMALOUS", text)
    assert jobs == [] and procs == []
