"""Where PTQ runs and servers live: one protocol that ``local``, ``ssh://`` and ``slurm://`` implement.

The chain decides *what* to make and *when* (run-once, keys, the server registry); a placement only knows *where*.
It takes plain requests and returns plain results and never sees the chain, so a new place (Kubernetes, Ray) is one
class. ``LocalPlacement`` is here; the SSH/SLURM one is ``remote.placement.RemotePlacement``.

The server registry record (``ServerRecord``) is what any process of the session needs to reach or stop a server
another process started: a local process group, or a remote job and its ``host:port`` behind an SSH tunnel.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict

from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.workspace import Workspace

if TYPE_CHECKING:
    from pytest_day0.checkpoint.recipes import Recipe
    from pytest_day0.checkpoint.safetensors_header import ByteSource
    from pytest_day0.stages.quantize import QuantizeResult

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeJob:
    """Make ``recipe`` from the source into the artifact named ``checkpoint_key`` (atomically, resumable)."""

    recipe: Recipe
    source: Path  # the local source directory (a remote placement uploads or uses --day0-remote-model)
    source_key: str
    checkpoint_key: str
    calibration: Path
    calib_size: int
    timeout_s: float
    engine: str  # the quantize engine's registered name
    config: Any = None  # the RunConfig: engine-specific options
    on_line: Progress | None = None


@dataclass(frozen=True)
class ServeJob:
    """Serve ``checkpoint`` (a path where the placement sees it) as model ``side``, healthy within ``timeout_s``."""

    side: str
    checkpoint: str
    side_key: str
    timeout_s: float
    engine: str
    config: Any = None
    progress: Progress | None = None


class ServerRecord(BaseModel):
    """A running server as the workspace registry holds it (``servers/<side key>.<session>.json``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    side: str
    session: str
    owner: int  # the process that lives as long as the session: while it lives, the server is in use
    url: str  # as the starting process reaches it (a remote one: that process's tunnel)
    model: str
    pid: int | None = None  # a local server's process group
    log: str | None = None
    remote: bool = False
    executor: str | None = None
    job_id: str | None = None
    name: str | None = None
    host: str | None = None  # a remote server's host:port, as seen from the login node
    port: int | None = None


class Placement(Protocol):
    """What the chain asks of the place where stages run; every method raises Day0Error with a class."""

    @property
    def key(self) -> str:
        """Part of every stage key of artifacts made here ("" for this machine)."""
        ...

    def check(self) -> str | None:
        """Setup gate: the place answers (host key, auth, scheduler). None: nothing to check."""
        ...

    def source_checkpoint(self, source: Path, source_key: str) -> str:
        """Where this placement sees the source checkpoint (uploaded once per content if it must be)."""
        ...

    def quantize(self, job: QuantizeJob) -> QuantizeResult:
        ...

    def discard_checkpoint(self, checkpoint_key: str) -> None:
        """Forget a finished checkpoint so the next ``quantize`` makes it again (``--day0-fresh``)."""
        ...

    def existing(self, checkpoint: str, recipe: Recipe) -> QuantizeResult:
        ...

    def serve(self, job: ServeJob) -> ServerRecord:
        ...

    def reach(self, record: ServerRecord) -> Endpoint | None:
        """An endpoint to a registered server from this process when it answers /health, else None."""
        ...

    def stop(self, records: Sequence[ServerRecord]) -> None:
        """Stop these servers (all together: each may take a grace period)."""
        ...

    def stop_session(self) -> list[str]:
        """Everything else this session left at this place (jobs, tunnels); idempotent, safe after Ctrl-C."""
        ...

    def opener(self) -> Callable[[str], ByteSource] | None:
        """How to read a checkpoint's headers here (None: local files)."""
        ...

    def close(self) -> None:
        ...


# ---------------------------------------------------------------------- this machine


def healthy(url: str, timeout_s: float = 3.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process_groups(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM every group first, then wait once for all of them: stopping N servers costs one grace period."""
    alive = set()
    for pid in pids:
        if pid <= 0:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
            alive.add(pid)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.time() + grace_s
    while alive and time.time() < deadline:
        for pid in list(alive):
            with contextlib.suppress(ChildProcessError):  # started by this process: reap it, a zombie looks alive
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


class LocalPlacement:
    """PTQ in a child process of this machine, servers as detached process groups on 127.0.0.1."""

    key = ""

    def __init__(self, ws: Workspace, session_id: str, owner_pid: int) -> None:
        self.ws = ws
        self.session_id = session_id
        self.owner_pid = owner_pid

    def check(self) -> str | None:
        return None

    def source_checkpoint(self, source: Path, source_key: str) -> str:
        return str(source)

    def _checkpoint_dir(self, checkpoint_key: str) -> Path:
        return self.ws.path("checkpoints", checkpoint_key)

    def quantize(self, job: QuantizeJob) -> QuantizeResult:
        from pytest_day0.engines import QuantizeRequest, quantize_engine

        return quantize_engine(job.engine).run(QuantizeRequest(
            job.source, job.recipe, self._checkpoint_dir(job.checkpoint_key), job.calibration,
            calib_size=job.calib_size, timeout_s=job.timeout_s, config=job.config, on_line=job.on_line))

    def discard_checkpoint(self, checkpoint_key: str) -> None:
        from pytest_day0.stages.quantize import DONE_MARKER

        (self._checkpoint_dir(checkpoint_key) / DONE_MARKER).unlink(missing_ok=True)

    def existing(self, checkpoint: str, recipe: Recipe) -> QuantizeResult:
        from pytest_day0.stages.quantize import use_existing

        return use_existing(Path(checkpoint), recipe)

    def serve(self, job: ServeJob) -> ServerRecord:
        from pytest_day0.engines import ServeRequest, serve_engine

        handle = serve_engine(job.engine).start(ServeRequest(
            Path(job.checkpoint), job.side, self.ws.root / "logs", timeout_s=job.timeout_s, config=job.config,
            progress=job.progress))
        # Detached: the server outlives this process (an xdist worker may finish before a sibling that still
        # evaluates); the session's owner stops it through the registry at the end.
        atexit.unregister(handle.stop)
        return ServerRecord(side=job.side, session=self.session_id, owner=self.owner_pid, url=handle.url,
                            model=handle.model, pid=handle.pid,
                            log=str(handle.log_path) if handle.log_path else None)

    def reach(self, record: ServerRecord) -> Endpoint | None:
        return Endpoint(url=record.url, model=record.model) if healthy(record.url) else None

    def stop(self, records: Sequence[ServerRecord]) -> None:
        stop_process_groups([r.pid for r in records if r.pid])

    def stop_session(self) -> list[str]:
        return []

    def opener(self) -> Callable[[str], ByteSource] | None:
        return None

    def close(self) -> None:
        return None
