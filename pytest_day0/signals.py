"""Stop signals that end a command like Ctrl-C, and never cut its cleanup short.

A CI cancel, ``docker stop`` and systemd send SIGTERM (a closed terminal SIGHUP); Python's default for them kills
the process on the spot, so nothing it started is stopped. Shared by the CLI (``python -m pytest_day0``) and the
pytest plugin (for SIGTERM/SIGHUP; pytest itself handles SIGINT).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP all end the command like Ctrl-C: the first raises KeyboardInterrupt, so each
    command's cleanup (``finally``/``with``) stops its children. A second one does not cut that cleanup short
    (which would orphan a server or a PTQ child in its own session); a third quits at once."""

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.SIGNALS = signals
        self.received: list[str] = []

    def install(self) -> None:
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue  # nohup, or a background job of a non-interactive shell: the caller chose to ignore it
            if sig is signal.SIGINT or current is signal.SIG_DFL:
                signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        return self.received[0] if self.received else "SIGINT"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) == 1:
            raise KeyboardInterrupt(name)
        if len(self.received) == 2:
            print(f"{name}: still stopping what this command started; send it once more to quit at once "
                  "(which may leave it running)", file=sys.stderr, flush=True)
            return
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
