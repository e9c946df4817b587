"""Stage keys: the identity of every artifact the chain makes, from the inputs that change it.

Pure: plain values in, a short hex key out. A key names a directory or file in the workspace (a checkpoint, a
side's records), so two runs share an artifact exactly when every input that could change it is equal, and a
changed input never reuses a stale one. What goes in, per stage:

============  ==============================================================================================
checkpoint    source content, recipe, quantize engine and its version, calibration text (content) and size,
              placement (where it ran) and the user's PTQ command template
side          the served checkpoint (its key: content or PTQ key), serve engine and its version, the engine's
              arguments (``--day0-vllm-args``), the user's serve command template, placement; an external
              endpoint: its URL and model name
records       the side, the task spec (prompts and scoring), the eval engine and its version
============  ==============================================================================================

"Content" of a local checkpoint is ``workspace.checkpoint_fingerprint``: every file's bytes (sha256), cached by
the file's (size, mtime_ns, ctime_ns, inode) so a finished session re-reads nothing; see docs/architecture.md.
"""

from __future__ import annotations

from pytest_day0.workspace import digest

BASELINE = "baseline"


def checkpoint_key(*, recipe: str, source: str, engine: str, engine_version: str | None, calibration: str,
                   calib_size: int, placement: str = "", ptq_command: str | None = None) -> str:
    """A quantized checkpoint: ``<recipe>-<digest>`` (the recipe first, so a person can read the workspace)."""
    key = f"{recipe}-" + digest(source, recipe, engine, engine_version, calibration, calib_size)
    return key if not placement else f"{key}-{digest(placement, ptq_command)[:8]}"


def existing_key(checkpoint: str, placement: str = "") -> str:
    """A checkpoint someone else made: its content (or, remote, its path on that host)."""
    return "existing-" + digest(placement, checkpoint) if placement else "existing-" + checkpoint


def side_key(side: str, *, checkpoint: str, engine: str, engine_version: str | None, engine_args: str | None = None,
             serve_command: str | None = None, placement: str = "") -> str:
    """A served side: what is served, by which engine with which arguments, where."""
    return f"{side}-" + digest(checkpoint, engine, engine_version, engine_args, serve_command, placement)


def external_side_key(side: str, *, url: str, model: str | None) -> str:
    """Someone else's endpoint: all we know of what it serves is its URL and model name."""
    return f"{side}-external-" + digest(url, model)


def records_key(*, task: str, spec: object, engine: str, engine_version: str | None) -> str:
    """One side's records of one task: ``<task>-<digest>``."""
    return f"{task}-" + digest(spec, engine, engine_version)
