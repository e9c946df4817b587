"""Where stages run: one interface for this machine, an SSH host and a SLURM cluster.

Stages never care where they run: they hand an :class:`Executor` a command (an argv list, quoted here, or a
shell line a template already quoted), files to move, a checkpoint to read headers from, a job to start and
watch, and a host:port to reach. Local and SSH jobs are plain background process groups (a pid and an exit
code file); SLURM jobs are the cluster's own (``remote/slurm.py``): the plugin never schedules anything itself.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_day0.checkpoint.safetensors_header import ByteSource, LocalFileSource

LineSink = Callable[[str], None]
Command = str | Sequence[str]

# SLURM's vocabulary is the common one: background process jobs report the same state names.
WAIT_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                         "RESV_DEL_HOLD", "POWER_UP_NODE"})


def shell_line(command: Command) -> str:
    """An argv list becomes one safely quoted shell line; a string is taken as an already-quoted line."""
    return command if isinstance(command, str) else shlex.join(str(part) for part in command)


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    output: str  # stdout and stderr interleaved, as a person watching would see them (capped)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class JobSpec:
    """A batch or service job: ``script`` is a bash script body (already quoted), run with cwd ``workdir``."""

    name: str
    script: str
    workdir: str
    log_path: str  # stdout + stderr of the job, on the executing side
    script_path: str


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    name: str
    log_path: str
    executor: str  # executor kind that owns it: "local", "ssh", "slurm"


@dataclass(frozen=True)
class JobStatus:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (SLURM's names)
    exit_code: int | None = None
    node: str | None = None
    reason: str = ""

    @property
    def waiting(self) -> bool:
        return self.state in WAIT_STATES


class Tunnel(ABC):
    """A local port that reaches ``remote_host:remote_port`` on the executor's side."""

    local_port: int
    remote_host: str
    remote_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @abstractmethod
    def close(self) -> None: ...


class DirectTunnel(Tunnel):
    """Local executor: the service already listens here, nothing to forward."""

    def __init__(self, host: str, port: int) -> None:
        self.local_port = port
        self.remote_host = host
        self.remote_port = port

    @property
    def url(self) -> str:
        return f"http://{self.remote_host}:{self.remote_port}"

    def close(self) -> None:
        return None


class Executor(ABC):
    """Commands, files, header reads, jobs and ports on one side (this machine, a host, a cluster)."""

    kind: str = "local"

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def run(self, command: Command, *, on_line: LineSink | None = None, timeout_s: float | None = None,
            ) -> CommandResult: ...

    # files (paths are the executing side's POSIX paths)
    @abstractmethod
    def home(self) -> str: ...

    @abstractmethod
    def put(self, local: Path, remote: str) -> None: ...

    @abstractmethod
    def get(self, remote: str, local: Path) -> None: ...

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, path: str, offset: int = 0, max_bytes: int | None = None) -> bytes | None: ...

    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic (write beside, rename over): a reader never sees half a file."""

    @abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abstractmethod
    def rename(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def remove_tree(self, path: str) -> None: ...

    @abstractmethod
    def open_source(self, path: str) -> ByteSource:
        """Random access to one file for ``inspect_checkpoint``; FileNotFoundError when absent."""

    def put_tree(self, local_dir: Path, remote_dir: str) -> int:
        """Copy a directory's regular files (one level: checkpoints are flat); returns bytes sent."""
        self.makedirs(remote_dir)
        sent = 0
        for path in sorted(local_dir.iterdir()):
            if path.is_file():
                self.put(path, f"{remote_dir}/{path.name}")
                sent += path.stat().st_size
        return sent

    # jobs
    @abstractmethod
    def submit(self, job: JobSpec) -> JobHandle: ...

    @abstractmethod
    def status(self, job: JobHandle) -> JobStatus: ...

    @abstractmethod
    def cancel(self, jobs: Sequence[JobHandle]) -> None: ...

    # network
    @abstractmethod
    def forward(self, host: str, port: int) -> Tunnel: ...

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------- background process jobs

# Run by bash on the executing side: start the job script in its own session (so one signal to the group
# stops everything it spawned), record its exit code beside the log, print the pid. Only the backgrounded
# command itself may run in the background: it holds no descriptor of ours, so the command returns at once.
_LAUNCH = ('cd {workdir} || exit 1; setsid bash -c {inner} > {log} 2>&1 < /dev/null & echo $!')
_INNER = 'bash {script}; echo $? > {rc}'


def launch_line(job: JobSpec) -> str:
    q = shlex.quote
    inner = _INNER.format(script=q(job.script_path), rc=q(job.log_path + ".rc"))
    return _LAUNCH.format(workdir=q(job.workdir), inner=q(inner), log=q(job.log_path))


def process_job_status(alive: bool, rc_text: str | None) -> JobStatus:
    """A process job's state from whether its group leader lives and its exit code file (pure)."""
    if alive:
        return JobStatus("RUNNING")
    if rc_text is None or not rc_text.strip().lstrip("-").isdigit():
        return JobStatus("CANCELLED", None, reason="ended without an exit code (killed)")
    code = int(rc_text.strip())
    return JobStatus("COMPLETED" if code == 0 else "FAILED", code)


def job_script(command: str, env: dict[str, str] | None = None) -> str:
    """The body of every job: unbuffered output (the log is streamed while it runs), then the command."""
    exports = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    lines = ["#!/bin/bash", *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()), command, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- local


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except (OSError, IndexError):
        return False


class LocalExecutor(Executor):
    """This machine: subprocesses, file copies, direct ports. The reference for what the others must do."""

    kind = "local"

    def describe(self) -> str:
        return "local"

    def run(self, command: Command, *, on_line: LineSink | None = None, timeout_s: float | None = None,
            ) -> CommandResult:
        argv = ["bash", "-c", command] if isinstance(command, str) else [str(c) for c in command]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        out: list[str] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            for line in proc.stdout:
                out.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"command ran past {timeout_s}s")
            code = proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return CommandResult(code, "".join(out)[-100_000:])

    def home(self) -> str:
        return str(Path.home())

    def put(self, local: Path, remote: str) -> None:
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, remote)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote, local)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_bytes(self, path: str, offset: int = 0, max_bytes: int | None = None) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read() if max_bytes is None else fh.read(max_bytes)
        except FileNotFoundError:
            return None

    def write_bytes(self, path: str, data: bytes) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def makedirs(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def open_source(self, path: str) -> ByteSource:
        return LocalFileSource(path)

    def submit(self, job: JobSpec) -> JobHandle:
        self.write_bytes(job.script_path, job.script.encode())
        result = self.run(launch_line(job))
        pid = result.output.strip().splitlines()[-1] if result.ok and result.output.strip() else ""
        if not pid.isdigit():
            raise OSError(f"could not start job {job.name}: {result.last_line()}")
        return JobHandle(pid, job.name, job.log_path, self.kind)

    def status(self, job: JobHandle) -> JobStatus:
        rc = self.read_bytes(job.log_path + ".rc")
        return process_job_status(_alive(int(job.job_id)), None if rc is None else rc.decode(errors="replace"))

    def cancel(self, jobs: Sequence[JobHandle]) -> None:
        for job in jobs:
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(job.job_id), signal.SIGTERM)
        deadline = time.monotonic() + 10
        for job in jobs:
            while _alive(int(job.job_id)) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(job.job_id), signal.SIGKILL)

    def forward(self, host: str, port: int) -> Tunnel:
        return DirectTunnel(host, port)
