"""The loopback SLURM cluster + sshd that tests/cluster/start-cluster.sh brings up, as the tests see it.

Tests that need it call :func:`cluster_or_skip`: they skip with the command to run when it is absent, and
fail instead when ``DAY0_REQUIRE_CLUSTER=1`` (``.ci/run`` sets it after starting the cluster), so CI can never
pass by skipping them. Checks of what is left behind (``squeue``, processes) go around the code under test:
the cluster is this machine, so they read SLURM and /proc directly.

As root the suite starts the cluster itself when none answers, and then stops what it started when the session
ends (tests/conftest.py, in the xdist controller only): the daemons that start recorded in ``started-by-tests``,
once no other live test session uses the cluster (each registers a lease in ``sessions/``). A cluster found
running (.ci/run's, or one a person started: start-cluster.sh run by hand drops the record) is left running.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

BASE = Path(os.environ.get("SLURM_CI_BASE", "/tmp/day0-cluster"))
START = "sudo bash tests/cluster/start-cluster.sh"
STARTED_BY_TESTS = BASE / "started-by-tests"  # JSON {"daemons": [...]}: what a test session's start started
LEASES = BASE / "sessions"  # one empty file per test session (its controller) that used the cluster
SESSION_ENV = "SLURM_CI_TEST_SESSION"  # the controller's identity, inherited by its xdist workers


@dataclass(frozen=True)
class LoopbackCluster:
    base: Path
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    home: str
    slurm_conf: str

    def url(self, kind: str = "slurm", query: str = "partition=debug&time=00:30:00") -> str:
        return f"{kind}://{self.user}@{self.host}:{self.port}" + (f"?{query}" if query and kind == "slurm" else "")

    def target(self, **overrides: object) -> object:
        from pytest_day0.remote.ssh import SSHTarget

        fields: dict[str, object] = {"host": self.host, "user": self.user, "port": self.port, "key_file": self.key,
                                     "known_hosts": self.known_hosts}
        fields.update(overrides)
        return SSHTarget(**fields)  # type: ignore[arg-type]

    def slurm(self, *argv: str) -> str:
        """A SLURM client command run here as root (sees every user's jobs), independent of the code under test."""
        env = dict(os.environ, SLURM_CONF=self.slurm_conf)
        return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=60).stdout

    def queued_jobs(self) -> list[str]:
        """``jobid|name|state`` of every job the test user has in the queue."""
        out = self.slurm("squeue", "-h", "-u", self.user, "-o", "%i|%j|%T")
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def workdir(self) -> str:
        """A fresh remote workspace, absolute, inside the test user's home."""
        return f"{self.home}/day0-test-{uuid.uuid4().hex[:8]}"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Tests that assert an empty queue must not see a sibling xdist worker's jobs: one at a time."""
        with FileLock(str(self.base / "tests.lock")):
            yield


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("export ")
        if "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def find_cluster() -> tuple[LoopbackCluster | None, str]:
    env_file = BASE / "cluster.env"
    if not env_file.is_file():
        return None, f"no {env_file}"
    env = _read_env(env_file)
    try:
        cluster = LoopbackCluster(BASE, env["SLURM_SSH_HOST"], int(env["SLURM_SSH_PORT"]), env["SLURM_SSH_USER"],
                                  Path(env["SLURM_SSH_KEY"]), Path(env["SLURM_SSH_KNOWN_HOSTS"]),
                                  env["SLURM_SSH_HOME"], env["SLURM_CONF"])
    except (KeyError, ValueError) as exc:
        return None, f"{env_file} is incomplete ({exc})"
    try:
        socket.create_connection((cluster.host, cluster.port), timeout=3).close()
    except OSError as exc:
        return None, f"sshd on {cluster.host}:{cluster.port} is not answering ({exc.strerror or exc})"
    if not cluster.slurm("sinfo", "-h", "-o", "%t").strip():
        return None, "slurmctld is not answering (sinfo printed nothing)"
    # Jobs run this very interpreter as the test user (remote python default = sys.executable).
    probe = subprocess.run(
        ["ssh", "-p", str(cluster.port), "-i", str(cluster.key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={cluster.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         f"{cluster.user}@{cluster.host}", shlex.join([sys.executable, "-c", "import pytest_day0"])],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return None, (f"{cluster.user} cannot run {sys.executable} -c 'import pytest_day0' "
                      f"({probe.stderr.strip()[-200:]}); start the cluster with SLURM_CI_PYTHON={sys.executable}")
    return cluster, ""


_FOUND: list[tuple[LoopbackCluster | None, str]] = []
START_SCRIPT = Path(__file__).with_name("start-cluster.sh")
STOP_SCRIPT = Path(__file__).with_name("stop-cluster.sh")
START_LOCK = Path(f"{BASE}.start.lock")


def _identity(pid: int) -> str | None:
    """``pid-starttime``: a process's name that a later process reusing the pid does not share."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else f"{pid}-{fields[19]}"


def begin_test_session() -> None:
    """In the controller: name this session for its workers (they inherit the environment)."""
    os.environ[SESSION_ENV] = _identity(os.getpid()) or str(os.getpid())


def _lease() -> Path | None:
    session = os.environ.get(SESSION_ENV)
    return LEASES / session if session else None


def _live_leases() -> list[str]:
    """Sessions whose controller still runs; leases of dead ones are removed."""
    live = []
    for lease in LEASES.glob("*") if LEASES.is_dir() else []:
        pid = lease.name.split("-", 1)[0]
        if pid.isdigit() and _identity(int(pid)) == lease.name:
            live.append(lease.name)
        else:
            lease.unlink(missing_ok=True)
    return live


def start_and_find(why: str) -> tuple[LoopbackCluster | None, str]:
    """As root, run the tests' own start script (idempotent: ~1 s when up, its packages once on a fresh machine)
    for this interpreter, so `pytest tests` in a fresh clone needs no separate step; one xdist worker does it.
    The daemons it starts are recorded, so that the session stops them at its end (:func:`end_test_session`)."""
    if os.geteuid() != 0 or os.environ.get("DAY0_START_CLUSTER", "1") == "0":
        return None, why
    with FileLock(str(START_LOCK)):
        found = find_cluster()
        if found[0] is not None:
            return found
        BASE.mkdir(parents=True, exist_ok=True)
        record = BASE / f".started.{os.getpid()}"
        record.unlink(missing_ok=True)
        try:
            run = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=1200,
                                 env={**os.environ, "SLURM_CI_PYTHON": sys.executable,
                                      "SLURM_CI_STARTED": str(record), "SLURM_CI_BY_TESTS": "1"})
        finally:  # a failed (or timed-out) start may have started some daemons: those are ours to stop too
            daemons = record.read_text().split() if record.exists() else []
            record.unlink(missing_ok=True)
            if daemons:
                known = json.loads(STARTED_BY_TESTS.read_text())["daemons"] if STARTED_BY_TESTS.exists() else []
                STARTED_BY_TESTS.write_text(json.dumps({"daemons": sorted(set(known) | set(daemons))}) + "\n")
        if run.returncode != 0:
            tail = " | ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
            return None, f"{why}; {START_SCRIPT.name} failed (exit {run.returncode}: {tail})"
        return find_cluster()


def _use_cluster() -> tuple[LoopbackCluster | None, str]:
    """Find (or start) the cluster with this session's lease taken under the start lock, so a session that
    ends meanwhile sees it and does not stop the cluster under it."""
    lease = _lease()
    if lease is not None and os.geteuid() == 0:
        with FileLock(str(START_LOCK)):
            LEASES.mkdir(parents=True, exist_ok=True)
            lease.touch()
    found = find_cluster()
    return found if found[0] is not None else start_and_find(found[1])


def end_test_session() -> str | None:
    """In the controller, after its workers are gone: stop what this suite's start started, unless another live
    test session still uses it. Returns a line for the terminal, or None when this session never used it."""
    lease = _lease()
    if lease is None or not lease.exists():
        return None
    with FileLock(str(START_LOCK)):
        lease.unlink(missing_ok=True)
        if not STARTED_BY_TESTS.exists():
            return f"loopback cluster ({BASE}) left running: this test suite did not start it"
        others = _live_leases()
        if others:
            return f"loopback cluster ({BASE}) left running: {len(others)} other test session(s) still use it"
        daemons = json.loads(STARTED_BY_TESTS.read_text())["daemons"]
        run = subprocess.run(["bash", str(STOP_SCRIPT)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "SLURM_CI_ONLY": " ".join(daemons)})
        if run.returncode != 0:
            return f"loopback cluster ({BASE}): {STOP_SCRIPT.name} failed: {(run.stdout + run.stderr)[-500:]}"
        STARTED_BY_TESTS.unlink()
        return (f"loopback cluster ({BASE}) stopped: {', '.join(daemons)}, started by this test session "
                "(`bash tests/cluster/stop-cluster.sh --purge` also removes its user, ACLs and files)")


def cluster_or_skip() -> LoopbackCluster:
    if not _FOUND:
        _FOUND.append(_use_cluster())
    cluster, why = _FOUND[0]
    if cluster is None:
        message = f"loopback SLURM cluster unavailable: {why}; run `{START}`"
        if os.environ.get("DAY0_REQUIRE_CLUSTER") == "1":
            pytest.fail(message + " (DAY0_REQUIRE_CLUSTER=1: CI must not skip these tests)")
        pytest.skip(message)
    return cluster
