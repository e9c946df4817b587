"""The test suite stops the loopback cluster it started, and leaves one it found running.

A second, private loopback cluster (its own base directory, test user, sshd/slurmctld/slurmd ports) so that the
one other sessions on this machine may be using is never touched. The suite is run as a user runs it (``python -m
pytest -n 2`` on two of the remote tests, as root, in a subprocess); what is left is read from /proc (command
lines and environments naming the private base) and sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _procs import port_refuses

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "cluster"
SUITE = ["-p", "no:cacheprovider", "-n", "2", "tests/test_ssh_executor.py", "-k",
         "run_streams_output or semicolons", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_using(base: Path) -> list[str]:
    """Live processes whose command line or environment names ``base`` (slurmctld's names it only in SLURM_CONF)."""
    found = []
    needle = str(base).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and (needle in cmdline or needle in environ):
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{proc.name}: {shown}")
    return found


@pytest.fixture()
def private_cluster_env() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("starting a loopback cluster needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install SLURM with, and no SLURM installed")
    base = Path(tempfile.mkdtemp(prefix="day0-lc-", dir="/tmp"))
    base.chmod(0o755)  # the test user's home is inside it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "SLURM_", "GITHUB_"))}
    env.update(SLURM_CI_BASE=str(base), SLURM_CI_USER=f"d0lc{uuid.uuid4().hex[:6]}",
               SLURM_CI_SSH_PORT=str(_free_port()), SLURM_CI_CTLD_PORT=str(_free_port()),
               SLURM_CI_SLURMD_PORT=str(_free_port()), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    try:
        yield env
    finally:  # whatever happened: daemons, test user, ACLs and files of the private cluster go
        subprocess.run(["bash", str(CLUSTER / "stop-cluster.sh"), "--purge"], env=env, capture_output=True,
                       timeout=300)
        Path(f"{base}.start.lock").unlink(missing_ok=True)  # loopback.START_LOCK of the private cluster
        assert subprocess.run(["id", env["SLURM_CI_USER"]], capture_output=True).returncode != 0
        assert processes_using(base) == []


def _suite(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", *SUITE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_suite_stops_the_cluster_it_started_and_leaves_one_it_found(private_cluster_env: dict[str, str]) -> None:
    env = private_cluster_env
    base = Path(env["SLURM_CI_BASE"])
    ports = [int(env["SLURM_CI_SSH_PORT"]), int(env["SLURM_CI_CTLD_PORT"])]

    # 1. nothing runs: the suite starts the cluster for its remote tests and stops it when it ends
    first = _suite(env)
    out = first.stdout + first.stderr
    assert first.returncode == 0 and "2 passed" in out, out[-3000:]
    assert (base / "cluster.env").is_file(), "the suite did not start the cluster"
    assert processes_using(base) == []
    assert f"loopback cluster ({base}) stopped: munged, slurmctld, slurmd, sshd" in out, out[-3000:]
    assert all(port_refuses(port) for port in ports)
    assert not (base / "started-by-tests").exists()

    # 2. a cluster someone started (as .ci/run does): the suite uses it and leaves it running
    start = subprocess.run(["bash", str(CLUSTER / "start-cluster.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert start.returncode == 0, (start.stdout + start.stderr)[-3000:]
    running = processes_using(base)
    assert len(running) >= 4, running  # munged, slurmctld, slurmd, sshd
    second = _suite(env)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "2 passed" in out, out[-3000:]
    assert f"loopback cluster ({base}) left running: this test suite did not start it" in out, out[-3000:]
    still = processes_using(base)
    assert {p.split(":")[0] for p in running} <= {p.split(":")[0] for p in still}, (running, still)
    assert not any(port_refuses(port) for port in ports)
