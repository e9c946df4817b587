"""The loopback SLURM cluster + sshd that tests/cluster/start-cluster.sh brings up, as the tests see it.

Tests that need it call :func:`cluster_or_skip`: they skip with the command to run when it is absent, and
fail instead when ``DAY0_REQUIRE_CLUSTER=1`` (``.ci/run`` sets it after starting the cluster), so CI can never
pass by skipping them. Checks of what is left behind (``squeue``, processes) go around the code under test:
the cluster is this machine, so they read SLURM and /proc directly.
"""

from __future__ import annotations

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


def start_and_find(why: str) -> tuple[LoopbackCluster | None, str]:
    """As root, run the tests' own start script (idempotent: ~1 s when up, its packages once on a fresh machine)
    for this interpreter, so `pytest tests` in a fresh clone needs no separate step; one xdist worker does it."""
    if os.geteuid() != 0 or os.environ.get("DAY0_START_CLUSTER", "1") == "0":
        return None, why
    with FileLock(str(Path(f"{BASE}.start.lock"))):
        found = find_cluster()
        if found[0] is not None:
            return found
        run = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=1200,
                             env={**os.environ, "SLURM_CI_PYTHON": sys.executable})
        if run.returncode != 0:
            tail = " | ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
            return None, f"{why}; {START_SCRIPT.name} failed (exit {run.returncode}: {tail})"
        return find_cluster()


def cluster_or_skip() -> LoopbackCluster:
    if not _FOUND:
        found = find_cluster()
        _FOUND.append(found if found[0] is not None else start_and_find(found[1]))
    cluster, why = _FOUND[0]
    if cluster is None:
        message = f"loopback SLURM cluster unavailable: {why}; run `{START}`"
        if os.environ.get("DAY0_REQUIRE_CLUSTER") == "1":
            pytest.fail(message + " (DAY0_REQUIRE_CLUSTER=1: CI must not skip these tests)")
        pytest.skip(message)
    return cluster
