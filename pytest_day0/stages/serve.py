"""The serve stage: bring up an OpenAI-compatible endpoint for a checkpoint and hand back a handle to it.

Engines: ``reference`` (the embedded CPU server, :mod:`pytest_day0.serving.reference_server`, run as a
subprocess in its own process group so that stopping it takes every child with it) and ``external`` (a URL
someone else runs). ``vllm`` slots into :data:`SERVE_ENGINES` later with the same handle.

The stage never decides whether a model is good; it produces an endpoint or raises a Day0Error whose class
says what went wrong: CHECKPOINT_NOT_SERVABLE when the server could not load the checkpoint (the model+recipe
is infeasible, re-running will not help), DEPLOYMENT_HEALTH_FAILED for anything else (it did not come up).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
from pydantic import SecretStr

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.serving import LOOPBACK_HOSTS
from pytest_day0.serving.endpoint import Endpoint

REFERENCE_MODULE = "pytest_day0.serving.reference_server"
LOAD_FAILED_MARKER = "load failed:"  # what reference_server prints before exiting on a checkpoint it cannot load
STOP_GRACE_S = 10.0


class ServerHandle:
    """A running (or external) endpoint. ``stop()`` is idempotent; ``with`` stops it on exit."""

    def __init__(
        self,
        url: str,
        model: str,
        engine: str,
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
        api_key: SecretStr | None = None,
        log_file: IO[bytes] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.engine = engine
        self.process = process
        self.log_path = log_path
        self.api_key = api_key
        self._log_file = log_file
        self._stopped = process is None
        if process is not None:
            atexit.register(self.stop)  # a crashed session must not leave a server holding a port

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(url=self.url, model=self.model, api_key=self.api_key)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; safe to call any number of times."""
        if self._stopped:
            return
        self._stopped = True
        if self.process is not None:
            _terminate_group(self.process, grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        atexit.unregister(self.stop)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle(engine={self.engine!r}, url={self.url!r}, model={self.model!r}, pid={self.pid})"


def _terminate_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    pgid = process.pid  # started with start_new_session=True: its pid is its group id
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing it spawned may outlive it
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- pure decisions


def classify_server_exit(returncode: int | None, log_text: str) -> tuple[FailureClass, str]:
    """Why a server never became healthy, from its exit code and log: (class, one-line reason).

    A load failure (the checkpoint itself) is CHECKPOINT_NOT_SERVABLE; a crash or a bind error is
    DEPLOYMENT_HEALTH_FAILED, which another host may fix; still starting at the stage timeout (``returncode``
    None) is INFRA_TRANSIENT, retried once per session.
    """
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    load_lines = [ln for ln in lines if LOAD_FAILED_MARKER in ln]
    if load_lines:
        reason = load_lines[-1].split(LOAD_FAILED_MARKER, 1)[1].strip()
        return FailureClass.CHECKPOINT_NOT_SERVABLE, f"server could not load the checkpoint: {reason}"
    last = lines[-1] if lines else "(empty log)"
    if returncode is None:
        return FailureClass.INFRA_TRANSIENT, f"server not healthy within the stage timeout; last log line: {last}"
    return FailureClass.DEPLOYMENT_HEALTH_FAILED, f"server exited with code {returncode}; last log line: {last}"


def safe_name(name: str) -> str:
    """A served model name as a file-name part (names like ``org/model:fp8`` are common)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def normalize_base_url(url: str) -> str:
    """Endpoint URLs are stored without ``/v1`` (Endpoint's contract); users paste them with it."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_bind_host(host: str, allow_remote_bind: bool) -> None:
    """The reference server has no authentication and runs any prompt: loopback unless the user says otherwise."""
    if host not in LOOPBACK_HOSTS and not allow_remote_bind:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"refusing to bind {host!r}: the reference server has no authentication, so it binds "
                        f"loopback only ({', '.join(sorted(LOOPBACK_HOSTS))}) unless --allow-remote-bind is given")


def port_in_use(log_text: str) -> bool:
    """uvicorn's bind failure for a port someone else holds (errno 98 / EADDRINUSE)."""
    return "address already in use" in log_text.lower()


def pick_model(served: Sequence[str], wanted: str | None, flag: str = "the model name") -> str:
    """The model to ask for: the named one (which must be served), or the only one; never a silent first pick."""
    if wanted:
        if served and wanted not in served:
            raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                            f"endpoint does not serve model {wanted!r}; it serves {', '.join(served)}")
        return wanted
    if len(served) == 1:
        return served[0]
    if not served:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, "endpoint's /v1/models lists no model")
    raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                    f"endpoint serves several models ({', '.join(served)}): name the one to evaluate with {flag}")


# ---------------------------------------------------------------- engines


def _tail(path: Path, max_bytes: int = 20_000, start: int = 0) -> str:
    """The end of a log, from ``start`` on: the log is appended to by every start of the same server name, and an
    earlier start's "load failed" or "address already in use" must not explain this one's failure."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def start_reference_server(
    checkpoint: Path,
    name: str,
    workdir: Path,
    timeout_s: float = 120,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
    max_batch: int | None = None,
    allow_remote_bind: bool = False,
    extra_args: Sequence[str] = (),
) -> ServerHandle:
    """Launch the reference server on ``checkpoint`` as ``name``; returns once GET /health answers 200.

    ``port`` 0 lets the server pick a free one (reported through its ready file), so parallel sessions never race
    for a port; a non-loopback ``host`` needs ``allow_remote_bind``.
    """
    check_bind_host(host, allow_remote_bind)
    checkpoint = Path(checkpoint)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(name)
    log_path = workdir / f"server-{stem}.log"
    # One ready file per launch: two sessions sharing a workspace serve the same side name at once, and a shared
    # file let one session read the other's port and measure the other's checkpoint.
    ready_file = workdir / f"server-{stem}.{os.getpid()}-{secrets.token_hex(4)}.ready.json"

    cmd = [sys.executable, "-m", REFERENCE_MODULE, "--checkpoint", str(checkpoint), "--served-model-name", name,
           "--host", host, "--port", str(port), "--ready-file", str(ready_file)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    if allow_remote_bind:
        cmd += ["--allow-remote-bind"]
    cmd += list(extra_args)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # so `-m pytest_day0...` imports this very tree
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"

    log_file = log_path.open("ab")
    this_start = log_file.tell()  # where this start's lines begin
    log_file.write(f"$ {' '.join(cmd)}\n".encode())
    log_file.flush()
    try:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    except OSError as exc:
        log_file.close()
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"cannot start the reference server: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if ready_file.is_file():
                try:
                    ready = json.loads(ready_file.read_text())
                except ValueError:
                    ready = None  # written atomically, so only a foreign file can be half-read; wait on
                if ready and _healthy(str(ready["url"])):
                    return ServerHandle(str(ready["url"]), name, "reference", process, log_path, None, log_file)
            time.sleep(0.1)
    except BaseException:  # Ctrl-C / SIGTERM while it starts: nobody holds a handle yet, so stop it here
        _terminate_group(process, 2.0)
        log_file.close()
        raise

    returncode = process.poll()
    _terminate_group(process, 2.0)
    log_file.close()
    log_text = _tail(log_path, start=this_start)
    if port and returncode is not None and port_in_use(log_text):
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"{name}: port {port} on {host} is already in use "
                        f"(another server holds it; pick another --port, or 0 for a free one)",
                        log_path=str(log_path))
    failure_class, reason = classify_server_exit(returncode, log_text)
    raise Day0Error(failure_class, f"{name}: {reason} (log: {log_path})", log_path=str(log_path),
                    returncode=returncode)


def external_endpoint(
    url: str,
    model: str | None = None,
    api_key: str | SecretStr | None = None,
    timeout_s: float = 10.0,
    *,
    model_flag: str = "the model name",
) -> ServerHandle:
    """An endpoint run by someone else; the model is the one named, or the only one GET /v1/models lists.

    Unreachable is SYSTEMIC (nothing later can work: the session stops), a refused key or an ambiguous or unknown
    model is USER_CONFIG_ERROR, an answer that is no model list is DEPLOYMENT_HEALTH_FAILED."""
    base = normalize_base_url(url)
    if not re.match(r"^https?://", base):
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"endpoint URL must start with http:// or https://: {url!r}")
    key = SecretStr(api_key) if isinstance(api_key, str) else api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise Day0Error(FailureClass.SYSTEMIC, f"endpoint {base} is unreachable: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"endpoint {base} refused the API key (HTTP {response.status_code})")
    if response.status_code != 200:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED,
                        f"endpoint {base} GET /v1/models answered {response.status_code}")
    try:
        data: Any = response.json().get("data", [])
        served = [str(card["id"]) for card in data]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED,
                        f"endpoint {base} /v1/models is not an OpenAI model list") from None
    try:
        chosen = pick_model(served, model, model_flag)
    except Day0Error as exc:
        raise Day0Error(exc.failure_class, f"{base}: {exc.message}") from None
    return ServerHandle(base, chosen, "external", api_key=key)


ServeEngine = Callable[..., ServerHandle]

# The seam for more engines (vllm): each takes its own keyword arguments and returns a ServerHandle.
SERVE_ENGINES: dict[str, ServeEngine] = {
    "reference": start_reference_server,
    "external": external_endpoint,
}


def serve(engine: str, **kwargs: Any) -> ServerHandle:
    try:
        start = SERVE_ENGINES[engine]
    except KeyError:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"unknown serve engine {engine!r}; known: {', '.join(sorted(SERVE_ENGINES))}") from None
    return start(**kwargs)
