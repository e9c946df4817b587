"""Run-once across processes: every stage of a session runs at most once, whichever xdist worker asks first.

Three layers, from fast to shared:

1. a memo in this process (the value, or the Day0Error it ended in);
2. a file lock per artifact (the stage's content key), so two processes never build the same artifact at once
   and the second finds the first's finished artifact on disk (a PTQ marker, a complete records file);
3. a per-session stage record in the workspace (``runs/<session>/stages/<stage>.json``) saying what happened to
   the stage in this session, read and written under that lock:

   - ``reset``: under ``--day0-fresh`` the stage's old artifact was discarded once, by whichever process came
     first; the others must not discard what it then built (the bug of a per-process "already fresh" flag);
   - ``transient``: INFRA_TRANSIENT failures so far; the stage is retried once per session, not once per worker,
     then it is SYSTEMIC;
   - ``failure``: the class and message it ended in; siblings re-raise it without trying again.

The session's own record (``runs/<session>/session.json``) holds what the controller decided once for all
processes (whether this session is fresh). A later session starts with no records and tries everything again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.workspace import Workspace, atomic_write_json, read_json

T = TypeVar("T")
Progress = Callable[[str], None]
TRANSIENT_ATTEMPTS = 2  # the first try and one retry, per session


class StageRecord(BaseModel):
    """What one stage did in this session (any process)."""

    model_config = ConfigDict(extra="ignore")

    stage: str
    reset: bool = False
    transient: int = 0
    attempts: int = 0
    succeeded: bool = False
    failure_class: FailureClass | None = None
    message: str | None = None
    pid: int | None = None


def _file_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stage)[:150] + ".json"


def session_dir(ws: Workspace, session_id: str) -> Path:
    return ws.root / "runs" / session_id


def start_session(ws: Workspace, session_id: str, *, fresh: bool) -> None:
    """The controller's once-per-session decisions, written before any worker runs a stage."""
    path = session_dir(ws, session_id) / "session.json"
    with ws.lock(f"session-{session_id}"):
        if read_json(path) is None:
            atomic_write_json(path, {"session": session_id, "fresh": fresh, "started": round(time.time(), 3),
                                     "owner": os.getpid()})


class StageRunner:
    """One per process; every process of a session shares its records through the workspace."""

    def __init__(self, ws: Workspace, session_id: str, *, fresh: bool = False,
                 progress: Progress | None = None) -> None:
        self.ws = ws
        self.session_id = session_id
        self.progress: Progress = progress or (lambda _line: None)
        self._memo: dict[str, Any] = {}
        self._fresh_default = fresh
        self._fresh: bool | None = None

    @property
    def fresh(self) -> bool:
        """The session's decision, as the controller recorded it (this process's config when nobody did)."""
        if self._fresh is None:
            recorded = read_json(session_dir(self.ws, self.session_id) / "session.json")
            self._fresh = bool(recorded["fresh"]) if isinstance(recorded, dict) and "fresh" in recorded \
                else self._fresh_default
        return self._fresh

    # ------------------------------------------------------------------ records

    def _record_path(self, stage: str) -> Path:
        return session_dir(self.ws, self.session_id) / "stages" / _file_name(stage)

    def record(self, stage: str) -> StageRecord:
        data = read_json(self._record_path(stage))
        return StageRecord.model_validate(data) if isinstance(data, dict) else StageRecord(stage=stage)

    def _save(self, record: StageRecord) -> None:
        atomic_write_json(self._record_path(record.stage), record.model_dump(mode="json"))

    def records(self) -> list[StageRecord]:
        """Every stage record of this session (for reports and tests)."""
        out = []
        for path in sorted((session_dir(self.ws, self.session_id) / "stages").glob("*.json")):
            data = read_json(path)
            if isinstance(data, dict):
                out.append(StageRecord.model_validate(data))
        return out

    # ------------------------------------------------------------------ running

    def local(self, key: str, build: Callable[[], T]) -> T:
        """Memoize a computation that touches no shared artifact (source resolution, header inspection)."""
        if key in self._memo:
            return self._recall(key)  # type: ignore[no-any-return]
        try:
            value = build()
        except Day0Error as exc:
            self._memo[key] = exc
            raise
        self._memo[key] = value
        return value

    def forget(self, key: str) -> None:
        """Drop a memoized value (an endpoint whose server died) so the next call builds it again."""
        self._memo.pop(key, None)

    def _recall(self, key: str) -> Any:
        value = self._memo[key]
        if isinstance(value, Day0Error):
            raise value
        return value

    def run(self, stage: str, build: Callable[[], T], *, lock: str | None = None,
            reset: Callable[[], None] | None = None) -> T:
        """Run ``stage`` at most once per session across processes; see the module docstring.

        ``lock`` names the artifact (its content key; default the stage name); ``reset`` discards the artifact
        once per session under ``--day0-fresh``. INFRA_TRANSIENT is retried once per session, then SYSTEMIC.
        """
        if stage in self._memo:
            return self._recall(stage)  # type: ignore[no-any-return]
        with self.ws.lock(lock or stage):
            record = self.record(stage)
            if record.failure_class is not None:
                exc = Day0Error(record.failure_class, record.message or f"{stage} failed")
                self._memo[stage] = exc
                raise exc
            if self.fresh and reset is not None and not record.reset:
                reset()
                record = record.model_copy(update={"reset": True})
                self._save(record)
            while True:
                record = record.model_copy(update={"attempts": record.attempts + 1, "pid": os.getpid()})
                try:
                    value = build()
                except Day0Error as exc:
                    failure = exc
                    if exc.failure_class is FailureClass.INFRA_TRANSIENT:
                        record = record.model_copy(update={"transient": record.transient + 1})
                        if record.transient < TRANSIENT_ATTEMPTS:
                            self._save(record)
                            self.progress(f"[day0] {stage}: {exc} — retrying once")
                            continue
                        failure = Day0Error(FailureClass.SYSTEMIC,
                                            f"{stage} failed twice with INFRA_TRANSIENT: {exc.message}")
                    self._save(record.model_copy(update={"failure_class": failure.failure_class,
                                                         "message": failure.message}))
                    self._memo[stage] = failure
                    raise failure from None
                self._save(record.model_copy(update={"succeeded": True}))
                self._memo[stage] = value
                return value
