"""Faults, nothing lost: a server killed mid-evaluation, Ctrl-C at every stage, a disk that fills up.

All real: the demo model served by real reference-server processes on 127.0.0.1, the real ReleaseChain and
evaluate stage, real ``pytest --day0-model demo`` sessions interrupted with SIGINT, a real tmpfs filled to the
brim (root only), and the loopback SLURM cluster for a PTQ job interrupted while it runs. What is left behind is
read from /proc, sockets, squeue and the files themselves, never from the code under test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _procs import events, pids_mentioning, port_refuses, processes_mentioning, wait_for

from pytest_day0.config import RunConfig, build_config
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.run import check_run
from pytest_day0.release.chain import ReleaseChain
from pytest_day0.scoring.records import SampleRecord
from pytest_day0.scoring.tasks import load_task
from pytest_day0.stages.evaluate import EvalStats, run_evaluation
from pytest_day0.stages.serve import start_reference_server
from pytest_day0.stages.source import resolve_model
from pytest_day0.workspace import atomic_write_json, atomic_write_text

SERVER = "pytest_day0.serving.reference_server"
N = 60  # gsm_like samples per evaluation: enough to kill a server mid-way, quick to score


def _config(ws: Path, **cli: object) -> RunConfig:
    return build_config({"model": "demo", "tasks": "gsm_like", "limit": N, "workdir": str(ws), "concurrency": 4,
                         **cli}, lambda _k: None, environ={})


def _lines(path: Path) -> list[SampleRecord]:
    """Every line of a records file as a SampleRecord; fails the test on a torn or corrupt line."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"torn last line in {path}: {raw[-80:]!r}"
    return [SampleRecord.model_validate_json(line) for line in raw.splitlines()]


def _registered_pid(ws: Path, session: str) -> int | None:
    for path in (ws / "servers").glob(f"baseline-*.{session}.json"):  # session "*": whichever ran
        try:
            return int(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
    return None


class _Killer(threading.Thread):
    """SIGKILLs the session's baseline server once ``after`` records are on disk; with ``every``, also each
    server started after that, as soon as it is registered (a host that keeps losing its server)."""

    def __init__(self, ws: Path, session: str, after: int, every: bool) -> None:
        super().__init__(daemon=True)
        self.ws, self.session, self.after, self.every = ws, session, after, every
        self.killed: list[int] = []
        self.on_disk_at_kill: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pid = _registered_pid(self.ws, self.session)
            if pid and pid not in self.killed:
                if not self.killed:
                    records = list((self.ws / "evals").glob("baseline-*/*.jsonl"))
                    count = records[0].read_bytes().count(b"\n") if records else 0
                    if count >= self.after:
                        os.killpg(pid, signal.SIGKILL)
                        self.killed.append(pid)
                        self.on_disk_at_kill = count
                elif self.every:
                    os.killpg(pid, signal.SIGKILL)
                    self.killed.append(pid)
            time.sleep(0.005)


@pytest.fixture()
def chains() -> Iterator[list[ReleaseChain]]:
    made: list[ReleaseChain] = []
    yield made
    for chain in made:
        chain.stop_servers()


def test_server_killed_mid_evaluation_is_restarted_and_only_the_rest_is_scored(
        tmp_path: Path, chains: list[ReleaseChain]) -> None:
    ws = tmp_path / "ws"
    chain = ReleaseChain(_config(ws), "s1")
    chains.append(chain)
    killer = _Killer(ws, "s1", after=10, every=False)
    killer.start()
    try:
        result = chain.evaluation("baseline", "gsm_like")
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "the server was never killed: the evaluation finished before 10 records"
    assert check_run(result).passed, check_run(result).message
    assert (result.status, result.scored_samples) == ("SUCCESS", N)

    done = [e for e in events(ws, "eval_done") if e["session"] == "s1"]
    assert [e["attempt"] for e in done] == [1, 2]
    first, second = done
    finished = first["scored"]  # samples finished (on disk) before the server died
    assert killer.on_disk_at_kill is not None and killer.on_disk_at_kill <= finished < N
    assert first["errored"] == N - finished
    # the retry sent only what the dead server never answered: zero finished samples re-scored
    assert (second["reused"], second["requested"], second["scored"]) == (finished, N - finished, N)
    assert len(events(ws, "server_start")) == 2 and len(events(ws, "server_lost")) == 1
    assert _registered_pid(ws, "s1") not in killer.killed  # a new server process, not the dead one
    recs = _lines(Path(result.records_path))
    assert len(recs) == N and len({r.id for r in recs}) == N and all(r.error is None for r in recs)
    print(f"killed after {killer.on_disk_at_kill} records on disk; {finished}/{N} finished before the kill; "
          f"retry requested {second['requested']}")


def _session(ws: Path, cwd: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--day0-model=demo", "--recipe=fp8",
            "--day0-tasks=gsm_like", f"--day0-limit={N}", "--day0-concurrency=4", f"--day0-workdir={ws}", *extra]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    return dict(env, PYTHONUNBUFFERED="1")


def test_server_lost_twice_ends_infra_transient_and_a_rerun_rescores_no_finished_sample(tmp_path: Path) -> None:
    """The whole session, as a user runs it: the run gate fails INFRA_TRANSIENT, the re-run sends only the rest."""
    ws = tmp_path / "ws"
    only = ["-k", "test_eval_complete and baseline"]  # deploy + evaluate the baseline: no PTQ needed
    killer = _Killer(ws, "*", after=10, every=True)
    killer.start()
    try:
        first = subprocess.run(_session(ws, tmp_path, *only), cwd=tmp_path, env=_clean_env(), capture_output=True,
                               text=True, timeout=300)
    finally:
        killer.stop.set()
        killer.join()
    out = first.stdout + first.stderr
    assert len(killer.killed) == 2, (killer.killed, out[-3000:])  # the first server and the one the retry started
    assert first.returncode == 1, out[-3000:]
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED ")]
    assert len(failed) == 1 and "test_eval_complete[baseline-gsm_like] - [INFRA_TRANSIENT]" in failed[0], failed
    message = next(ln for ln in out.splitlines() if ln.startswith("[INFRA_TRANSIENT] baseline/gsm_like: "))
    assert "evaluation not finished (status INCOMPLETE)" in message and "connection error" in message, message
    assert "Traceback" not in out
    assert "restarting it and resuming once" in out
    session1 = {e["session"] for e in events(ws, "eval_done")}
    assert len(session1) == 1 and [e["attempt"] for e in events(ws, "eval_done")] == [1, 2]

    # nothing lost: every finished sample is a whole, parseable record on disk
    (path,) = ws.glob("evals/baseline-*/gsm_like-*.jsonl")
    before = {r.id: r for r in _lines(path) if r.error is None}
    finished = len(before)
    assert 0 < finished < N
    assert wait_for(lambda: not pids_mentioning(SERVER, str(ws)), 15) is True  # the session stopped its servers

    again = subprocess.run(_session(ws, tmp_path, *only), cwd=tmp_path, env=_clean_env(), capture_output=True,
                           text=True, timeout=300)  # same workspace, nobody killing servers
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    done = [e for e in events(ws, "eval_done") if e["session"] not in session1]
    assert len(done) == 1
    assert (done[0]["reused"], done[0]["requested"], done[0]["scored"]) == (finished, N - finished, N)
    after = {r.id: r for r in _lines(path)}
    assert len(after) == N and all(r.error is None for r in after.values())
    # the finished samples were not sent again: their records are exactly the ones written before
    assert all(after[i] == rec for i, rec in before.items())
    assert len(events(ws, "server_start")) == 3  # two in the first session (start + restart), one in the re-run
    print(f"{finished}/{N} finished before the server was lost twice; the re-run requested {N - finished}; "
          f"gate: {message}")


# ---------------------------------------------------------------------- SIGINT at each stage

STAGES: dict[str, tuple[str, list[str], Callable[[Path], object]]] = {
    # stage: (pytest -k selection, extra options, how to see that the stage is underway)
    "quantize": ("test_ptq and not size and not coverage and not metadata", ["--day0-limit=5"],
                 lambda ws: pids_mentioning("pytest_day0.stages.quantize", str(ws)) and _calibrating(ws)),
    "serve": ("test_deploy and baseline", ["--day0-limit=5"],
              lambda ws: pids_mentioning(SERVER, str(ws))),
    "evaluate": ("test_eval_complete and baseline", ["--day0-limit=300", "--day0-tasks=arc_like",
                                                     "--day0-concurrency=2"],
                 lambda ws: events(ws, "eval_run")),
}


def _calibrating(ws: Path) -> bool:
    """The ModelOpt child has loaded the model and is inside mtq.quantize (it prints this line right before)."""
    return any("[day0] quantizing" in log.read_text(errors="replace") for log in ws.glob("checkpoints/*.log"))


def _leftovers(ws: Path) -> list[str]:
    return processes_mentioning(str(ws))


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigint_at_each_stage_leaves_no_process_and_no_port(stage: str, tmp_path: Path) -> None:
    selection, extra, underway = STAGES[stage]
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--day0-model=demo", "--recipe=fp8",
         "--day0-stat=point", f"--day0-workdir={ws}", "-k", selection, *extra],
        cwd=tmp_path, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        seen = wait_for(lambda: underway(ws) or proc.poll() is not None, 180)
        assert proc.poll() is None, f"the session ended before {stage} was interrupted"
        assert seen, f"{stage} never started"
        if stage == "evaluate":  # well inside the evaluation: 300 multiple-choice samples at concurrency 2
            wait_for(lambda: sum(p.read_bytes().count(b"\n") for p in ws.glob("evals/baseline-*/*.jsonl")) >= 3, 60)
        if stage == "serve":
            time.sleep(0.5)  # past Popen, while the server loads the model (seconds) and is not yet healthy
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out[-3000:]  # pytest's INTERRUPTED
    assert "KeyboardInterrupt" in out
    wait_for(lambda: not _leftovers(ws), 15)
    assert _leftovers(ws) == []
    for ready in (ws / "logs").glob("*.ready.json"):  # every server that got as far as listening
        url = json.loads(ready.read_text())["url"]
        assert port_refuses(url), f"{url} still accepts connections after the session ended"
    if stage == "quantize":
        assert not list((ws / "checkpoints").glob(".*staging*")), "a half-written export was left behind"
        assert not list((ws / "checkpoints").glob("*/day0_ptq.json")), "an interrupted PTQ counted as finished"
    if stage == "evaluate":
        assert not events(ws, "eval_done"), "interrupted too late: the evaluation had finished"
        records = list((ws / "evals").glob("baseline-*/*.jsonl"))
        assert len(records) == 1
        recs = _lines(records[0])  # whatever was appended before Ctrl-C is whole lines only
        assert 0 < len(recs) < 300
        assert list((ws / "logs").glob("*.ready.json")), "the server never listened: no port was checked"
    assert list((ws / "servers").glob("*.json")) == []  # the registry is empty: nothing claims to run


def test_sigint_during_a_slurm_ptq_job_cancels_it(tmp_path: Path) -> None:
    from cluster.loopback import cluster_or_skip

    cluster = cluster_or_skip()
    remote_wd = cluster.workdir()
    ws = tmp_path / "ws"
    args = ["--day0-model=demo", "--recipe", "fp8", "--day0-limit=5", f"--day0-workdir={ws}",
            f"--day0-executor={cluster.url()}", f"--day0-ssh-key={cluster.key}",
            f"--day0-known-hosts={cluster.known_hosts}", f"--day0-remote-workdir={remote_wd}",
            "-p", "no:cacheprovider", "-k", "test_ptq and not size and not coverage and not metadata"]
    try:
        with cluster.exclusive():
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                def running() -> bool:
                    return any(line.endswith("|RUNNING") and "ptq" in line for line in cluster.queued_jobs())

                wait_for(lambda: running() or proc.poll() is not None, 240, every_s=0.3)
                assert proc.poll() is None, "the session ended before the PTQ job was interrupted"
                submitted = events(ws, "remote_job")
                assert len(submitted) == 1 and running(), (submitted, cluster.queued_jobs())
                proc.send_signal(signal.SIGINT)
                out, _ = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            ours = str(submitted[0]["name"]).rsplit("-", 1)[0]  # day0-<session>
            wait_for(lambda: not [j for j in cluster.queued_jobs() if ours in j], 30, every_s=0.3)
            queued = [j for j in cluster.queued_jobs() if ours in j]
            wait_for(lambda: not processes_mentioning(remote_wd), 30, every_s=0.3)
            alive = processes_mentioning(remote_wd)
    finally:
        shutil.rmtree(remote_wd, ignore_errors=True)
    assert proc.returncode == 2, out[-3000:]
    assert queued == [], queued
    assert alive == [], alive
    state = cluster.slurm("scontrol", "show", "job", "-o", str(submitted[0]["job_id"]))
    assert "JobState=CANCELLED" in state or state == "", state  # cancelled (or already purged from memory)


# ---------------------------------------------------------------------- a full disk

PAGE = 4096


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that really fills up (ENOSPC from the kernel, not a mock)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Take all free space but ``leave_bytes`` (rounded to pages) with one file; deleting it frees it all."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler.bin"
    with filler.open("wb") as fh:
        fh.write(b"\0" * (free - leave_bytes))  # tmpfs allocates what is written: no sparse shortcut
    left = os.statvfs(disk).f_bavail * st.f_frsize
    assert 0 < left <= leave_bytes + PAGE, left
    return filler


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_reference_server(resolve_model("demo"), "baseline", tmp_path_factory.mktemp("srv")) as handle:
        yield handle.url


def test_full_disk_while_appending_records_is_one_line_and_leaves_no_torn_record(
        small_disk: Path, demo_server: str) -> None:
    from pytest_day0.serving.endpoint import Endpoint

    task = load_task("gsm_like", N)
    endpoint = Endpoint(url=demo_server, model="baseline")
    records = small_disk / "evals" / "gsm_like.jsonl"
    records.parent.mkdir()
    filler = _fill(small_disk, PAGE)  # one page: room for about a third of the records
    with pytest.raises(Day0Error) as info:
        run_evaluation(task, endpoint, records, "baseline", concurrency=4)
    err = info.value
    # SYSTEMIC: the disk is the host's problem, every later stage would hit it too, and a retry refills it
    assert err.failure_class is FailureClass.SYSTEMIC
    assert "\n" not in str(err)
    assert str(err).startswith(f"[SYSTEMIC] records file {records}: cannot append: No space left on device (")
    kept = _lines(records)  # every line whole; the one that did not fit was cut back, not left half-written
    assert 0 < len(kept) < N and all(r.error is None for r in kept)
    assert f"({len(kept)} finished samples kept intact" in str(err)
    assert sorted(p.name for p in records.parent.iterdir()) == ["gsm_like.jsonl"]  # no temporary copy left

    filler.unlink()  # free space, run again: only what was missing is sent
    stats = EvalStats()
    result = run_evaluation(task, endpoint, records, "baseline", concurrency=4, stats=stats)
    assert (result.status, result.scored_samples) == ("SUCCESS", N)
    assert (stats.reused, stats.requested, stats.unreadable_lines) == (len(kept), N - len(kept), 0)
    assert [r.id for r in _lines(records)] == [s.id for s in task.samples]
    print(f"disk full after {len(kept)}/{N} records; the re-run requested {stats.requested}")


def test_full_disk_while_compacting_keeps_the_appended_records(small_disk: Path, demo_server: str,
                                                               tmp_path: Path) -> None:
    from pytest_day0.serving.endpoint import Endpoint

    task = load_task("gsm_like", N)
    endpoint = Endpoint(url=demo_server, model="baseline")
    probe = tmp_path / "probe.jsonl"
    run_evaluation(task, endpoint, probe, "baseline", concurrency=4)
    pages = -(-probe.stat().st_size // PAGE)
    assert pages >= 2  # the compacted copy needs more than the one spare page left below

    records = small_disk / "gsm_like.jsonl"
    filler = _fill(small_disk, (pages + 1) * PAGE)  # every record fits once, the compacted copy does not
    with pytest.raises(Day0Error) as info:
        run_evaluation(task, endpoint, records, "baseline", concurrency=4)
    assert info.value.failure_class is FailureClass.SYSTEMIC
    assert str(info.value).startswith(f"[SYSTEMIC] records file {records}: cannot compact: No space left on device")
    assert len(_lines(records)) == N  # the appended records are all there and whole
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin", "gsm_like.jsonl"]  # no .tmp left
    filler.unlink()
    stats = EvalStats()
    result = run_evaluation(task, endpoint, records, "baseline", concurrency=4, stats=stats)
    assert result.status == "SUCCESS" and (stats.reused, stats.requested) == (N, 0)


def test_atomic_writes_on_a_full_disk_leave_the_old_file_whole(small_disk: Path) -> None:
    target = small_disk / "state" / "verdict.json"
    atomic_write_json(target, {"decision": "ACCEPT", "pad": "x" * 3000})
    old = target.read_bytes()
    filler = _fill(small_disk, 2 * PAGE)
    big = {"decision": "REGRESSION", "pad": "y" * (4 * PAGE)}  # larger than the space left
    with pytest.raises(Day0Error) as info:
        atomic_write_json(target, big)
    assert info.value.failure_class is FailureClass.SYSTEMIC and info.value.detail["errno"] == errno.ENOSPC
    assert str(info.value).startswith(f"[SYSTEMIC] cannot write {target}: No space left on device")
    assert target.read_bytes() == old  # the old file, whole: never a truncated one
    assert sorted(p.name for p in target.parent.iterdir()) == ["verdict.json"]  # the temporary file was removed
    with pytest.raises(Day0Error):
        atomic_write_text(small_disk / "new.txt", "z" * (4 * PAGE))
    assert not (small_disk / "new.txt").exists()
    assert [p.name for p in small_disk.iterdir() if p.name.startswith(".")] == []

    filler.unlink()
    atomic_write_json(target, big)  # with room, the new file, whole
    assert json.loads(target.read_text()) == big
