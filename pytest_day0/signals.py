"""Stop signals that end a command like Ctrl-C, and never cut its cleanup short.

A CI cancel, ``docker stop`` and systemd send SIGTERM (a closed terminal SIGHUP); Python's default for them kills
the process on the spot, so nothing it started is stopped. Shared by the CLI (``python -m pytest_day0``) and the
pytest plugin (for SIGTERM/SIGHUP; pytest itself handles SIGINT).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


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


def run_stoppable(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, but a stop signal cancels the coroutine instead of raising KeyboardInterrupt inside
    whichever loop callback happens to run (an HTTP client's half-read response, a connector's bookkeeping): the
    coroutine's own cleanup runs, the loop ends cleanly, and the interruption is raised here, after it. The signal
    still goes to the handler that was installed (StopSignals counts it; a third one still quits at once)."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)  # signals reach the main thread only
    interrupted: list[BaseException] = []
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        main = loop.create_task(coro)
        previous: dict[signal.Signals, Callable[[int, FrameType | None], Any]] = {}

        def on_signal(sig: signal.Signals) -> None:
            try:
                previous[sig](sig.value, None)
            except KeyboardInterrupt as exc:
                interrupted.append(exc)
                main.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            handler = signal.getsignal(sig)
            if callable(handler):
                previous[sig] = handler
                loop.add_signal_handler(sig, on_signal, sig)
        try:
            result = loop.run_until_complete(main)
        except asyncio.CancelledError:
            if interrupted:
                raise interrupted[0] from None
            raise
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)  # remove_signal_handler leaves SIG_DFL / default_int_handler
    if interrupted:
        raise interrupted[0]
    return result
