"""Where the real engines (vLLM, llm-compressor) live: a Python environment of their own.

They pin transformers and compressed-tensors versions that the plugin's own environment (ModelOpt) must not be
moved to, so ``scripts/install-engines.sh`` installs them into ``.venv-engines`` and our stages launch that
environment's python as a child process. Which python: ``--day0-vllm-python`` / ``DAY0_VLLM_PYTHON``, else
``$DAY0_ENGINES_VENV/bin/python``, else ``.venv-engines/bin/python`` next to the project, else this interpreter.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from pytest_day0.failures import Day0Error, FailureClass

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding pytest_day0/
DEFAULT_VENV = ".venv-engines"
INSTALL_HINT = "run scripts/install-engines.sh or point --day0-vllm-python at a python that has it"


def engines_python(explicit: str | os.PathLike[str] | None = None) -> str:
    """The interpreter that runs vLLM and llm-compressor."""
    if explicit:
        return str(explicit)
    for candidate in (os.environ.get("DAY0_VLLM_PYTHON"),
                      os.environ.get("DAY0_ENGINES_VENV") and str(Path(os.environ["DAY0_ENGINES_VENV"]) / "bin/python"),
                      str(PROJECT_ROOT / DEFAULT_VENV / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    return sys.executable


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an engine child: offline (no hub, no usage stats), unbuffered, and able to import this
    very pytest_day0 tree (prepended only when it is a source checkout, never a whole site-packages)."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})
    if PROJECT_ROOT.name not in {"site-packages", "dist-packages"}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def require_module(python: str, module: str, engine: str, timeout_s: float = 30.0) -> None:
    """Fail fast, in one line, when the engine is not installed where we are about to launch it."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"
    try:
        done = subprocess.run([python, "-c", probe, module], capture_output=True, timeout=timeout_s,
                              env=child_env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"{engine}: cannot run {python}: {type(exc).__name__}: {exc}; {INSTALL_HINT}") from None
    if done.returncode != 0:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"{engine}: {module} is not installed for {python}; {INSTALL_HINT}")


@functools.cache  # asked for many times a session (cache keys); the answer cannot change within one
def installed_versions(python: str, packages: tuple[str, ...]) -> str | None:
    """``pkg==v`` of each package installed for ``python``, read from its metadata (nothing is imported)."""
    probe = ("import importlib.metadata as m, sys\n"
             "print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))")
    try:
        done = subprocess.run([python, "-c", probe, *packages], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
