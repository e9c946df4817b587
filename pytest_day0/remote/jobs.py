"""Watching a job until it is done (batch) or ready (service), and what its end state means.

The decision is pure (:func:`decide_job`): SLURM's states map onto the failure taxonomy as the issue defines
it, so the same table serves SLURM jobs and SSH process jobs (which report the same state names). The
watcher streams the job's log into the session's progress while it waits and cancels the job on a timeout,
a failure or Ctrl-C; it never leaves a job behind that nobody will stop.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote.executor import WAIT_STATES, Executor, JobHandle, JobStatus, LineSink

# A job that ended for reasons outside the job itself: the chain retries INFRA_TRANSIENT once.
TRANSIENT_STATES = frozenset({"TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED",
                              "REVOKED", "UNKNOWN"})
STAGE_FAILURE_STATES = frozenset({"FAILED", "OUT_OF_MEMORY"})
RESULT_PREFIX = "DAY0_RESULT "


def tail_summary(tail: Sequence[str], lines: int = 3, chars: int = 400) -> str:
    """The last meaningful log lines, joined into one line (a Day0Error message is always one line)."""
    meaningful = [ln.strip() for ln in tail if ln.strip() and not ln.startswith(RESULT_PREFIX)]
    text = " | ".join(meaningful[-lines:]) or "(empty log)"
    return text if len(text) <= chars else "…" + text[-chars:]


def decide_job(status: JobStatus, stage_class: FailureClass, what: str, job_id: str, tail: Sequence[str],
               *, service: bool = False) -> Literal["wait", "ok"] | Day0Error:
    """One job state -> keep waiting, done, or the failure (class + one line with the log tail)."""
    state = status.state
    if state in WAIT_STATES:
        return "wait"
    code = "" if status.exit_code is None else f", exit {status.exit_code}"
    if state == "COMPLETED":
        if not service:
            return "ok"
        return Day0Error(stage_class, f"{what}: job {job_id} ended before it was ready{code}: {tail_summary(tail)}")
    if state in STAGE_FAILURE_STATES:
        return Day0Error(stage_class, f"{what}: job {job_id} {state}{code}: {tail_summary(tail)}")
    if state in TRANSIENT_STATES:
        why = f" ({status.reason})" if status.reason and status.reason != "None" else ""
        return Day0Error(FailureClass.INFRA_TRANSIENT, f"{what}: job {job_id} {state}{why}{code}: "
                         f"{tail_summary(tail, 1)}")
    return Day0Error(FailureClass.UNKNOWN, f"{what}: job {job_id} in unexpected state {state}{code}")


class LogFollower:
    """Reads what a job appended to its log since the last look; keeps the tail for failure messages."""

    def __init__(self, executor: Executor, path: str, on_line: LineSink | None, keep: int = 200) -> None:
        self.executor = executor
        self.path = path
        self.on_line = on_line
        self.offset = 0
        self.pending = b""
        self.tail: deque[str] = deque(maxlen=keep)

    def pump(self) -> None:
        data = self.executor.read_bytes(self.path, self.offset, 4 << 20)
        if not data:
            return
        self.offset += len(data)
        self.pending += data
        *complete, self.pending = self.pending.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").rstrip("\r")
            self.tail.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def finish(self) -> list[str]:
        self.pump()
        if self.pending:
            self.tail.append(self.pending.decode(errors="replace"))
            self.pending = b""
        return list(self.tail)


def watch_job(
    executor: Executor,
    job: JobHandle,
    *,
    what: str,
    stage_class: FailureClass,
    timeout_s: float,
    on_line: LineSink | None = None,
    ready: Callable[[JobStatus], bool] | None = None,
    tick_s: float = 0.5,
    max_poll_s: float = 2.0,
    on_state: Callable[[JobStatus], None] | None = None,
) -> tuple[JobStatus, list[str]]:
    """Wait for a batch job to finish (``ready`` None) or a service job to be ready; (status, log tail).

    Every tick the log is followed and, once the job runs, ``ready`` is asked (both are file reads or a
    health check, no load on the scheduler); the scheduler itself is asked at most every ``max_poll_s``.
    On a failure, a timeout or an interrupt (KeyboardInterrupt included) the job is cancelled before the
    exception leaves: a stage that gives up never leaves its job running.
    """
    follower = LogFollower(executor, job.log_path, on_line)
    started = time.monotonic()
    interval = tick_s
    next_poll = 0.0
    status = JobStatus("PENDING")
    last_state = ""
    finished = False
    try:
        while True:
            now = time.monotonic()
            if now >= next_poll:
                status = executor.status(job)
                next_poll = now + interval
                interval = min(interval * 1.5, max_poll_s)
            follower.pump()
            if status.state != last_state:
                last_state = status.state
                if on_state is not None:
                    on_state(status)
            if ready is not None and status.state == "RUNNING" and ready(status):
                finished = True
                return status, list(follower.tail)
            decision = decide_job(status, stage_class, what, job.job_id,
                                  follower.finish() if not status.waiting else list(follower.tail),
                                  service=ready is not None)
            if decision == "ok":
                finished = True
                return status, follower.finish()
            if isinstance(decision, Day0Error):
                raise decision
            if time.monotonic() - started > timeout_s:
                raise Day0Error(FailureClass.INFRA_TRANSIENT,
                                f"{what}: job {job.job_id} still {status.state} after {timeout_s:.0f}s "
                                f"(stage timeout; job cancelled)")
            time.sleep(tick_s)
    finally:
        if not finished:
            with contextlib.suppress(Exception):  # never mask why we are leaving (a dead link, Ctrl-C)
                executor.cancel([job])
