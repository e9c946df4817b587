"""What a test sees from outside the code under test: /proc, sockets, a workspace's event log.

Fault tests assert what is left behind after a kill or an interrupt, so they must not ask the plugin (which may
be dead); they read the machine directly.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

from cluster.loopback import processes_mentioning  # re-exported: one /proc scan for every test

from pytest_day0.workspace import read_events as events  # noqa: F401 - re-exported for the fault tests

T = TypeVar("T")


def pids_mentioning(*texts: str) -> list[int]:
    """Pids of live processes whose command line contains every one of ``texts``."""
    pids = []
    for line in processes_mentioning(texts[0]):
        pid, cmdline = line.split(": ", 1)
        if all(t in cmdline for t in texts[1:]):
            pids.append(int(pid))
    return pids


def port_refuses(url_or_port: str | int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens there any more (connection refused), the proof a server left no port behind."""
    port = int(str(url_or_port).rstrip("/").rsplit(":", 1)[-1])
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def wait_for(probe: Callable[[], T], timeout_s: float, every_s: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy (returned) or the time is up (its last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)
