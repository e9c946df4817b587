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


STOPPABLE = r"""
import asyncio, signal, sys
from pytest_day0.signals import StopSignals, run_stoppable

stop = StopSignals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
stop.install()

async def work():
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # a loop busy with real sockets
    try:
        print("under way", flush=True)
        while True:  # busy in Python code: a signal lands in this frame unless it is turned into a cancellation
            sum(range(20000))
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        print("cancelled", flush=True)
        raise
    except KeyboardInterrupt:
        print("KeyboardInterrupt inside the loop", flush=True)
        raise
    finally:
        server.close()
        await server.wait_closed()
        print("cleanup ran", flush=True)

try:
    run_stoppable(work())
except KeyboardInterrupt as exc:
    print("interrupted by", exc, "handler restored:", signal.getsignal(signal.SIGTERM) == stop._handle, flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_cancels_the_event_loops_work_and_is_raised_after_it(sig: signal.Signals) -> None:
    """The scorer's loop: a stop signal used to raise KeyboardInterrupt inside whatever callback ran (an HTTP
    client's read), which could leave a task to print its traceback; now the work is cancelled, its cleanup runs,
    and the interruption is raised once the loop has ended."""
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "under way"
        time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:  # whatever the outcome, the child does not outlive the test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "cancelled" in out and "KeyboardInterrupt inside the loop" not in out, out
    assert "cleanup ran" in out and f"interrupted by {sig.name} handler restored: True" in out, out
    assert "Traceback" not in out and "exception was never retrieved" not in out, out
