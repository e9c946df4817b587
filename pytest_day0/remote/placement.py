"""The placement ``ssh://`` and ``slurm://``: PTQ as a job, serving as jobs behind SSH tunnels.

Artifacts stay where they were made: the source is uploaded once (content-keyed) unless the user names its
cluster path, the quantized checkpoint is left in the remote workspace and gated from its safetensors headers
over SFTP, and servers run as jobs that the pytest host reaches through a local port forward. Evaluation runs
on the pytest host, through the tunnel. Every job is named ``day0-<session>-<stage>`` and recorded in the
local workspace (``jobs/<session>/``) *before* it is submitted, so the process that ends the session can
cancel all of them, after a failure or Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from pytest_day0.checkpoint.recipes import Recipe
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.placement import QuantizeJob, ServeJob, ServerRecord
from pytest_day0.remote import VLLM_SERVE_TEMPLATE, ExecutorSpec, parse_executor, render_template, split_sbatch_args
from pytest_day0.remote.executor import Executor, JobHandle, JobSpec, JobStatus, LineSink, Tunnel, job_script
from pytest_day0.remote.jobs import RESULT_PREFIX, watch_job
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages.quantize import QuantizeResult
from pytest_day0.workspace import Workspace, atomic_write_json, digest, file_digest, read_json

Progress = Callable[[str], None]
DONE_MARKER = "day0_ptq.json"  # the same marker the local quantize stage writes last
UPLOADED_MARKER = ".day0_uploaded"
REFERENCE_MODULE = "pytest_day0.serving.reference_server"


def job_name(session_id: str, stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"day0-{session_id}-{stage}")[:120]


def make_executor(config: Any, spec: ExecutorSpec | None = None) -> Executor:
    """The executor ``config`` names (a RunConfig, or anything with its executor fields)."""
    from pytest_day0.remote.executor import LocalExecutor
    from pytest_day0.remote.slurm import SlurmExecutor
    from pytest_day0.remote.ssh import SSHExecutor, SSHTarget

    spec = spec or parse_executor(config.executor)
    if not spec.remote:
        return LocalExecutor()
    assert spec.host is not None
    target = SSHTarget(host=spec.host, user=spec.user, port=spec.port, key_file=config.ssh_key,
                       passphrase=config.ssh_key_passphrase, known_hosts=config.known_hosts,
                       trust_new_host=config.trust_new_host)
    if spec.kind == "slurm":
        return SlurmExecutor(target, (*spec.sbatch_args, *split_sbatch_args(config.sbatch_args)))
    return SSHExecutor(target)


def parse_result(lines: list[str]) -> dict[str, Any] | None:
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            try:
                parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
                return parsed
            except ValueError:
                return None
    return None


class RemotePlacement:
    """One per process when ``--day0-executor`` is ssh:// or slurm:// (implements ``placement.Placement``)."""

    def __init__(self, config: Any, session_id: str, ws: Workspace, progress: Progress | None = None,
                 owner_pid: int | None = None) -> None:
        self.config = config
        self.session_id = session_id
        self.ws = ws
        self.owner_pid = owner_pid or os.getpid()
        self.progress: Progress = progress or (lambda _line: None)
        self.spec = parse_executor(config.executor)
        self._executor: Executor | None = None
        self._tunnels: dict[str, Tunnel] = {}

    # ------------------------------------------------------------------ basics

    @property
    def key(self) -> str:
        """Part of every remote stage key: remote artifacts are not the local ones."""
        return digest(self.spec.identity, self.config.remote_workdir)

    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor(self.config, self.spec)
        return self._executor

    def workdir(self) -> str:
        wd = self.config.remote_workdir or ".day0-remote"
        return wd if wd.startswith("/") else f"{self.executor().home().rstrip('/')}/{wd}"

    def python(self) -> str:
        return str(self.config.remote_python or sys.executable)

    def check(self) -> str:
        """Setup gate: the host answers, the workspace is writable, the scheduler (if any) is there."""
        ex = self.executor()
        probe = ["sbatch", "--version"] if self.spec.kind == "slurm" else ["true"]
        result = ex.run(probe, timeout_s=60)
        if not result.ok:
            raise Day0Error(FailureClass.SYSTEMIC, f"{ex.describe()}: {' '.join(probe)} failed: {result.last_line()}")
        ex.makedirs(self.workdir())
        return f"{ex.describe()} {result.last_line() if self.spec.kind == 'slurm' else ''}".strip()

    def open_source(self, path: str) -> Any:
        return self.executor().open_source(path)

    # ------------------------------------------------------------------ job bookkeeping

    def _jobs_dir(self) -> Path:
        return self.ws.path("jobs", self.session_id, "x").parent

    def _submit(self, stage: str, command: str, kind: str) -> JobHandle:
        ex = self.executor()
        wd = self.workdir()
        name = job_name(self.session_id, stage)
        token = uuid.uuid4().hex[:6]
        spec = JobSpec(name=name, script=job_script(command), workdir=wd,
                       log_path=f"{wd}/logs/{name}-{token}.log", script_path=f"{wd}/jobs/{name}-{token}.sh")
        ex.makedirs(f"{wd}/logs")
        record = self._jobs_dir() / f"{name}-{token}.json"
        # Written before sbatch answers: an interrupt in between still leaves a trace to cancel by name.
        atomic_write_json(record, {"name": name, "job_id": None, "executor": ex.kind, "kind": kind,
                                   "log": spec.log_path, "session": self.session_id})
        handle = ex.submit(spec)
        atomic_write_json(record, {"name": name, "job_id": handle.job_id, "executor": ex.kind, "kind": kind,
                                   "log": spec.log_path, "session": self.session_id})
        self.ws.event("remote_job", name=name, job_id=handle.job_id, executor=ex.kind, session=self.session_id)
        self.progress(f"[day0]   {ex.describe()}: job {handle.job_id} ({name}) submitted")
        return handle

    def _log_sink(self, every_s: float = 5.0) -> LineSink:
        """A job's log into the progress output: our ``[day0]`` lines all, any other engine's (hf_ptq.py,
        vllm) as a heartbeat of at most one line per ``every_s``, so a long wait shows what the job is doing."""
        last = [0.0]

        def sink(line: str) -> None:
            now = time.monotonic()
            if line.startswith("[day0]"):
                self.progress("    " + line)
            elif line.strip() and now - last[0] >= every_s:
                last[0] = now
                self.progress("    | " + line.strip()[:200])

        return sink

    def _state_line(self, what: str) -> Callable[[JobStatus], None]:
        def show(status: JobStatus) -> None:
            where = f" on {status.node}" if status.node else ""
            self.progress(f"[day0]   {what}: {status.state}{where}")
        return show

    def stop_session(self) -> list[str]:
        """Cancel every job this session started and close its tunnels; idempotent, safe after Ctrl-C."""
        for tunnel in self._tunnels.values():
            tunnel.close()
        self._tunnels.clear()
        records = [r for p in sorted(self._jobs_dir().glob("*.json"))
                   if (r := read_json(p)) and r.get("session") == self.session_id]
        if not records:
            return []
        ids = [str(r["job_id"]) for r in records if r.get("job_id")]
        try:
            ex = self.executor()
            handles = [JobHandle(str(r["job_id"]), r["name"], r.get("log", ""), r.get("executor", ex.kind))
                       for r in records if r.get("job_id")]
            from pytest_day0.remote.slurm import SlurmExecutor

            if isinstance(ex, SlurmExecutor):  # also jobs whose id never reached us (interrupted submission)
                known = {h.job_id for h in handles}
                handles += [h for h in ex.jobs_named(job_name(self.session_id, "")) if h.job_id not in known]
            ex.cancel(handles)
        except (Day0Error, OSError) as exc:  # the end of a session must still report; say what is left
            self.progress(f"[day0] could NOT cancel this session's jobs ({exc}); cancel them by hand: "
                          f"scancel {' '.join(ids)} (or scancel --name day0-{self.session_id}-...)")
            return []
        for p in self._jobs_dir().glob("*.json"):
            p.unlink(missing_ok=True)
        return [r["name"] for r in records]

    def close(self) -> None:
        for tunnel in self._tunnels.values():
            tunnel.close()
        self._tunnels.clear()
        if self._executor is not None:
            self._executor.close()

    # ------------------------------------------------------------------ inputs on the remote side

    def stage_source(self, local_source: Path, source_key: str) -> str:
        """The source checkpoint's path on the remote side: the user's, or uploaded once per content."""
        ex = self.executor()
        if self.config.remote_model:
            path = str(self.config.remote_model)
            if not ex.exists(f"{path}/config.json"):
                raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                                f"--day0-remote-model {path}: no config.json there on {ex.describe()}")
            return path
        remote = f"{self.workdir()}/sources/{source_key}"
        if ex.exists(f"{remote}/{UPLOADED_MARKER}"):
            return remote
        with self.ws.lock(f"upload-{self.key}-{source_key}"):
            if ex.exists(f"{remote}/{UPLOADED_MARKER}"):
                return remote
            started = time.time()
            staging = f"{remote}.staging-{uuid.uuid4().hex[:6]}"
            sent = ex.put_tree(local_source, staging)
            ex.write_bytes(f"{staging}/{UPLOADED_MARKER}", json.dumps({"from": str(local_source)}).encode())
            ex.remove_tree(remote)
            ex.rename(staging, remote)
            self.progress(f"[day0]   uploaded the source ({sent / 1e6:.1f} MB) to {remote} in "
                          f"{time.time() - started:.1f}s")
        return remote

    def stage_file(self, local: Path, kind: str) -> str:
        ex = self.executor()
        remote = f"{self.workdir()}/inputs/{kind}-{file_digest(local)}{local.suffix}"
        if not ex.exists(remote):
            ex.makedirs(f"{self.workdir()}/inputs")
            ex.write_bytes(remote, local.read_bytes())
        return remote

    # ------------------------------------------------------------------ quantize

    def source_checkpoint(self, source: Path, source_key: str) -> str:
        return self.stage_source(source, source_key)

    def opener(self) -> Callable[[str], Any]:
        return self.open_source

    def checkpoint_path(self, checkpoint_key: str) -> str:
        return f"{self.workdir()}/checkpoints/{checkpoint_key}"

    def discard_checkpoint(self, checkpoint_key: str) -> None:
        self.executor().remove_tree(self.checkpoint_path(checkpoint_key))

    def quantize(self, job: QuantizeJob) -> QuantizeResult:
        """PTQ as a job; the finished checkpoint stays remote. Returns a QuantizeResult with its remote path."""
        ex = self.executor()
        recipe, key = job.recipe, job.checkpoint_key
        out = self.checkpoint_path(key)
        if ex.exists(f"{out}/{DONE_MARKER}"):
            return QuantizeResult(Path(out), f"modelopt@{ex.kind}", recipe.name, 0.0, True, None)
        source = self.stage_source(job.source, job.source_key)
        calib = self.stage_file(job.calibration, "calibration")
        staging = f"{self.workdir()}/checkpoints/.{key}.staging-{self.session_id}"
        ex.remove_tree(staging)
        values = {"python": self.python(), "model": source, "qformat": recipe.name, "recipe": recipe.name,
                  "export_path": staging, "calibration": calib, "calib_size": job.calib_size}
        if self.config.ptq_command:
            command = render_template(self.config.ptq_command, values)
        else:
            command = render_template("{python} -m pytest_day0.stages.quantize --model {model} --recipe {recipe} "
                                      "--export-path {export_path} --calibration {calibration} "
                                      "--calib-size {calib_size}", values)
        what = f"PTQ {recipe.name}"
        started = time.time()
        handle = self._submit(f"ptq-{recipe.name}", command, "batch")
        on_line = job.on_line or self._log_sink()
        try:
            _, tail = watch_job(ex, handle, what=what, stage_class=FailureClass.UNKNOWN, timeout_s=job.timeout_s,
                                on_line=on_line, on_state=self._state_line(f"{what} job {handle.job_id}"))
        except Day0Error as exc:
            lines = (ex.read_bytes(handle.log_path) or b"").decode(errors="replace").splitlines()
            result = parse_result(lines)
            self._fetch_log(handle, f"ptq-{recipe.name}")
            if result and not result.get("ok") and exc.failure_class is not FailureClass.INFRA_TRANSIENT:
                # Our entry point classified its own failure (MODEL_UNSUPPORTED, USER_CONFIG_ERROR, ...)
                raise Day0Error(FailureClass(result["failure_class"]),
                                f"{what} (job {handle.job_id}): {result['message']}") from None
            raise
        wall = time.time() - started
        result = parse_result(tail)
        if not self.config.ptq_command and (not result or not result.get("ok")):
            raise Day0Error(FailureClass.UNKNOWN, f"{what}: job {handle.job_id} completed without a result line")
        if not ex.exists(f"{staging}/config.json"):
            raise Day0Error(FailureClass.UNKNOWN, f"{what}: job {handle.job_id} completed but {staging} has no "
                            "config.json (does the PTQ command write to {export_path}?)")
        ex.write_bytes(f"{staging}/{DONE_MARKER}", (json.dumps(
            {"engine": "modelopt", "executor": ex.describe(), "recipe": recipe.name, "source": source,
             "job_id": handle.job_id, "seconds": round(wall, 3)}, indent=2) + "\n").encode())
        ex.remove_tree(out)
        ex.rename(staging, out)
        log = self._fetch_log(handle, f"ptq-{recipe.name}")
        return QuantizeResult(Path(out), f"modelopt@{ex.kind}", recipe.name, wall, False, log)

    def existing(self, checkpoint: str, recipe: Recipe) -> QuantizeResult:
        ex = self.executor()
        if not ex.exists(f"{checkpoint}/config.json"):
            raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                            f"--day0-checkpoint {checkpoint} has no config.json on {ex.describe()}")
        return QuantizeResult(Path(checkpoint), f"existing@{ex.kind}", recipe.name, 0.0, True, None)

    def _fetch_log(self, handle: JobHandle, stem: str) -> Path | None:
        local = self.ws.path("logs", f"{stem}-job{handle.job_id}.log")
        try:
            self.executor().get(handle.log_path, local)
        except OSError:
            return None
        return local

    # ------------------------------------------------------------------ serve

    def _serve_command(self, checkpoint: str, name: str, ready_file: str) -> tuple[str, int | None]:
        values: dict[str, object] = {"python": self.python(), "checkpoint": checkpoint, "name": name,
                                     "ready_file": ready_file}
        template = self.config.serve_command
        if not template and self.config.serve == "vllm":
            template = VLLM_SERVE_TEMPLATE
        if not template:
            return render_template("{python} -m " + REFERENCE_MODULE + " --checkpoint {checkpoint} "
                                   "--served-model-name {name} --host 127.0.0.1 --port 0 --ready-file {ready_file}",
                                   values), None
        port = random.randint(20000, 59999)  # the job's node picks nothing for us; a clash fails the job
        return render_template(template, {**values, "port": port}), (None if "{ready_file}" in template else port)

    def _ready_target(self, status: JobStatus, ready_file: str, port: int | None) -> tuple[str, int] | None:
        if port is not None:
            return status.node or "localhost", port
        raw = self.executor().read_bytes(ready_file)
        if not raw:
            return None
        try:
            ready = json.loads(raw)
            host, ready_port = str(ready.get("host") or "127.0.0.1"), int(ready["port"])
        except (ValueError, KeyError, TypeError):
            return None  # written atomically; a foreign half file is waited out
        if host in ("0.0.0.0", "::"):
            host = status.node or "localhost"
        return host, ready_port

    def _tunnel_to(self, side: str, host: str, port: int) -> Tunnel | None:
        """A tunnel to host:port whose /health answers 200, else None (closed)."""
        old = self._tunnels.pop(side, None)
        if old is not None:
            old.close()
        tunnel = self.executor().forward(host, port)
        try:
            healthy = httpx.get(f"{tunnel.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if not healthy:
            tunnel.close()
            return None
        self._tunnels[side] = tunnel
        return tunnel

    def serve(self, job: ServeJob) -> ServerRecord:
        """Serve ``job.side`` as a job and reach it through this process's tunnel."""
        from pytest_day0.stages.serve import classify_server_exit

        ex = self.executor()
        side = job.side
        ready_file = f"{self.workdir()}/servers/{job_name(self.session_id, side)}.ready.json"
        ex.makedirs(f"{self.workdir()}/servers")
        ex.remove_tree(ready_file)  # a retry's stale one would point at a dead server
        command, port = self._serve_command(job.checkpoint, side, ready_file)
        handle = self._submit(f"serve-{side}", command, "service")
        target: list[tuple[str, int]] = []

        def ready(status: JobStatus) -> bool:
            where = self._ready_target(status, ready_file, port)
            if where is None or self._tunnel_to(side, *where) is None:
                return False
            target.append(where)
            return True

        what = f"serve {side}"
        try:  # the timeout includes the queue wait, which can be long on a cluster
            watch_job(ex, handle, what=what, stage_class=FailureClass.DEPLOYMENT_HEALTH_FAILED,
                      timeout_s=job.timeout_s, ready=ready, on_line=self._log_sink(),
                      on_state=self._state_line(f"{what} job {handle.job_id}"))
        except Day0Error as exc:
            log_text = (ex.read_bytes(handle.log_path) or b"").decode(errors="replace")
            if exc.failure_class is FailureClass.DEPLOYMENT_HEALTH_FAILED:
                cls, reason = classify_server_exit(1, log_text)
                exc = Day0Error(cls, f"{what} (job {handle.job_id}): {reason}")
            self._fetch_log(handle, f"serve-{side}")
            raise exc from None
        host, ready_port = target[-1]
        tunnel = self._tunnels[side]
        self.progress(f"[day0]   {side}: {host}:{ready_port} on {ex.describe()} -> {tunnel.url} (SSH tunnel)")
        return ServerRecord(side=side, session=self.session_id, owner=self.owner_pid, url=tunnel.url, model=side,
                            remote=True, executor=ex.describe(), job_id=handle.job_id, name=handle.name, host=host,
                            port=ready_port, log=handle.log_path)

    def reach(self, record: ServerRecord) -> Endpoint | None:
        """This process's own tunnel to a serving job (opened now if another process started the job)."""
        if not record.remote or record.host is None or record.port is None:
            return None
        tunnel = self._tunnel_to(record.side, record.host, int(record.port))
        return Endpoint(url=tunnel.url, model=record.model) if tunnel is not None else None

    def stop(self, records: Sequence[ServerRecord]) -> None:
        """Cancel these serving jobs (a session's, or one a killed session left behind)."""
        handles = [JobHandle(str(r.job_id), str(r.name), r.log or "", self.executor().kind)
                   for r in records if r.remote and r.job_id]
        for r in records:
            tunnel = self._tunnels.pop(r.side, None)
            if tunnel is not None and r.session == self.session_id:
                tunnel.close()
        if handles:
            self.executor().cancel(handles)
