"""A release killed with SIGTERM (a cancelled CI job) stops the servers it started, like Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _servers_using(workdir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "pytest_day0.serving.reference_server" in cmd and str(workdir) in cmd:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("signals", [1, 2], ids=["one SIGTERM", "two SIGTERMs"])
def test_sigterm_stops_every_server_the_session_started(tmp_path: Path, signals: int) -> None:
    """A second SIGTERM (an impatient CI runner) must not cut the session's cleanup short: it orphaned servers."""
    workdir = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--day0-model=demo", "--recipe=fp8",
         "--day0-limit=300", "--day0-stat=point", f"--day0-workdir={workdir}", "-q"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not _servers_using(workdir) and proc.poll() is None:
        time.sleep(0.5)
    assert _servers_using(workdir), "no server came up to be interrupted"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    if signals == 2:
        time.sleep(0.3)  # the cleanup is under way: stopping servers takes a grace period
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    deadline = time.time() + 15
    while time.time() < deadline and _servers_using(workdir):
        time.sleep(0.2)
    assert _servers_using(workdir) == [], out[-2000:]
