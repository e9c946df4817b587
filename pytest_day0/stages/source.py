"""Resolve ``--day0-model`` to a checkpoint directory on this machine, never downloading anything.

Day-0 runs must be reproducible and offline-capable: a hub id is looked up in the local Hugging Face
cache only, and its absence is the user's to fix (USER_CONFIG_ERROR), not a silent download.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.options import DEMO_MODEL_ID

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo" / "model"
CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "demo" / "calibration.txt"


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(model: str) -> Path:
    if model == DEMO_MODEL_ID:
        if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
            raise Day0Error(FailureClass.SYSTEMIC, f"the embedded demo model is missing from {DEMO_MODEL_DIR}; "
                            "reinstall pytest-day0 or run python -m pytest_day0.demo.make_demo")
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-model {model}: {path} has no config.json")
        return path.resolve()
    if model.count("/") == 1 and not model.startswith((".", "/")):
        org, name = model.split("/")
        repo = hf_cache_dir() / f"models--{org}--{name}"
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
            if found:
                return found[-1]
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-model {model}: not a local path and not in the "
                        f"Hugging Face cache ({hf_cache_dir()}); download it first (huggingface-cli download {model})")
    raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-model {model}: no such path, and not an org/name hub id")
