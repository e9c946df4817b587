"""Quantize stage: produce the candidate checkpoint (engines ``modelopt`` and ``existing``).

ModelOpt PTQ runs in a child process (``python -m pytest_day0.stages.quantize``): it mutates torch
modules and global state, prints a great deal, can crash hard, and the very same entry point is what a
remote executor runs as a job. The child's last line is a JSON result so the parent can classify a
failure without parsing tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_day0.checkpoint.recipes import Recipe, resolve_recipe
from pytest_day0.failures import Day0Error, FailureClass

RESULT_PREFIX = "DAY0_RESULT "
DONE_MARKER = "day0_ptq.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json")
# Advice upstream tools print that never applies to a PTQ run here (one process, no pipeline parallelism, and a
# check we must not switch off): shown to the user it would only send them the wrong way.
NOT_OUR_ADVICE = ("MODELOPT_SKIP_WEIGHT_QUANT_CHECK", "pipeline parallel", "collective hang", "on every rank",
                  "a rank whose local stage", "targeted modules (e.g. a pure-attention stage")
# ModelOpt refuses a recipe whose patterns match no module; that is the model's shape, not a crash.
_UNSUPPORTED_SIGNS = ("no weight quantizer is enabled", "patterns do not match")


@dataclass(frozen=True)
class QuantizeResult:
    checkpoint: Path
    engine: str
    recipe: str
    wall_s: float
    reused: bool
    log_path: Path | None


def _classify(exc: BaseException) -> FailureClass:
    text = str(exc)
    if any(sign in text for sign in _UNSUPPORTED_SIGNS):
        return FailureClass.MODEL_UNSUPPORTED
    if isinstance(exc, (OSError, ValueError)) and ("config.json" in text or "does not appear to have" in text):
        return FailureClass.USER_CONFIG_ERROR
    if isinstance(exc, MemoryError):
        return FailureClass.INFRA_TRANSIENT
    return FailureClass.UNKNOWN


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int) -> list[Any]:
    """Line-aligned chunks of the shipped calibration text, so every batch looks like task text."""
    import torch

    lines = [ln for ln in text.splitlines() if ln.strip()]
    chunks: list[str] = []
    current = ""
    for line in lines:
        if current and len(current) + len(line) + 1 > seq_len:
            chunks.append(current)
            current = ""
        current += line + "\n"
        if len(chunks) >= samples:
            break
    if current and len(chunks) < samples:
        chunks.append(current)
    batches = []
    for chunk in chunks:
        ids = tokenizer(chunk, return_tensors="pt").input_ids[:, :seq_len]
        batches.append(ids.to(torch.long))
    return batches


def load_for_calibration(source: Path, dtype: Any, calibration_text: str, calib_size: int,
                         calib_seq: int) -> tuple[Any, list[Any]]:
    """The model and its calibration batches, seeded: every engine's child starts from the same inputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    batches = calibration_batches(tokenizer, calibration_text, calib_size, calib_seq)
    if not batches:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, "calibration text is empty")
    return model, batches


def copy_tokenizer_files(source: Path, export_dir: Path) -> None:
    """Tokenizer files travel with the checkpoint byte for byte: re-saving them through transformers rewrites
    them (runtime truncation state, a moved chat template), which users would get as a different tokenizer."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, export_dir / name)


def child_parser(description: str) -> argparse.ArgumentParser:
    """The command line every quantize engine's child takes, so the parent builds one argv for all of them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--export-path", required=True, type=Path)
    parser.add_argument("--calibration", required=True, type=Path)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--calib-seq", type=int, default=64)
    return parser


def modelopt_quantize(model: Any, recipe: Recipe, batches: list[Any]) -> Any:
    """Calibrate and fake-quantize ``model`` in place with the recipe's mtq config (the numerics tests call this
    too, so the model they check the exported checkpoint against is the one this stage builds)."""
    import modelopt.torch.quantization as mtq
    import torch

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    return mtq.quantize(model, getattr(mtq, recipe.mtq_config), forward_loop)


def run_modelopt_ptq(source: Path, recipe: Recipe, export_dir: Path, calibration_text: str, calib_size: int,
                     calib_seq: int) -> dict[str, Any]:
    """The child-process body: load, calibrate, quantize, export. Heavy imports stay in here."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    started = time.time()
    model, batches = load_for_calibration(source, torch.float32, calibration_text, calib_size, calib_seq)
    model.eval()  # type: ignore[no-untyped-call]
    if "OMP_NUM_THREADS" not in os.environ and sum(p.numel() for p in model.parameters()) < 50_000_000:
        # A tiny model gains nothing from threads and loses a lot to contention (measured 190 s vs 50 s for
        # int4_awq on a loaded 2-core machine).
        torch.set_num_threads(1)
    if not getattr(model.config, "architectures", None):  # ModelOpt's export iterates it
        model.config.architectures = [type(model).__name__]

    print(f"[day0] quantizing {source} with {recipe.name} ({recipe.mtq_config}), {len(batches)} calibration batches",
          flush=True)
    model = modelopt_quantize(model, recipe, batches)
    mtq.print_quant_summary(model) if hasattr(mtq, "print_quant_summary") else None
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(export_dir))
    copy_tokenizer_files(source, export_dir)
    return {"seconds": round(time.time() - started, 3)}


def _child_main(argv: list[str] | None = None) -> int:
    args = child_parser("ModelOpt PTQ + HF export (pytest-day0's quantize job)").parse_args(argv)
    return run_child(lambda: run_modelopt_ptq(args.model, resolve_recipe(args.recipe), args.export_path,
                                              args.calibration.read_text(), args.calib_size, args.calib_seq),
                     _classify)


def run_child(body: Callable[[], dict[str, Any]], classify: Callable[[BaseException], FailureClass]) -> int:
    """Run a quantize child's body and end with its one DAY0_RESULT line, the failure classified for the parent.

    Shared by every quantize engine's child process, so the parent reads one format whatever the engine.
    """
    try:
        info = body()
        print(RESULT_PREFIX + json.dumps({"ok": True, **info}), flush=True)
        return 0
    except Day0Error as exc:
        print(RESULT_PREFIX + json.dumps({"ok": False, "failure_class": exc.failure_class, "message": exc.message}),
              flush=True)
        return 3
    except Exception as exc:  # classified for the parent; the traceback stays in the log for humans
        import traceback

        traceback.print_exc()
        failure_class = classify(exc)
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        if failure_class is FailureClass.MODEL_UNSUPPORTED:
            # ModelOpt's explanation runs to several sentences; its first says what happened.
            message = message.split(". ")[0].rstrip(".") + " (the recipe's patterns match no module of this model)"
        print(RESULT_PREFIX + json.dumps({"ok": False, "failure_class": failure_class, "message": message}),
              flush=True)
        return 3


def relevant_log_lines(lines: list[str]) -> list[str]:
    """An engine's log lines worth showing a user: advice that cannot apply to this run filtered out."""
    return [ln for ln in lines if not any(sign.lower() in ln.lower() for sign in NOT_OUR_ADVICE)]


def _last_result(log_path: Path) -> dict[str, Any] | None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return parsed
    return None


def log_tail(log_path: Path, lines: int = 20) -> list[str]:
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in text if ln.strip() and not ln.startswith(RESULT_PREFIX)][-lines:]


def is_finished(checkpoint: Path) -> bool:
    return (checkpoint / DONE_MARKER).is_file()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """The child and everything it started (torch workers, compilers): its own process group, all of it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()  # no-op when the group kill already took it; covers a child that left its group
    proc.wait()


def run_quantize_child(
    cmd: list[str],
    out_dir: Path,
    *,
    what: str,
    timeout_s: float,
    marker: dict[str, Any],
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Run a quantize child that exports into ``--export-path <staging>``; the staging dir becomes ``out_dir``.

    Shared by every local quantize engine. The child's output is pumped on its own thread, so a child that hangs
    silently still meets ``timeout_s``: then (and on Ctrl-C/SIGTERM in the parent) its whole process group is
    killed and the staging dir removed. A half-written export is never taken for a finished one: ``DONE_MARKER``
    is written last and the directory renamed into place.
    """
    engine = str(marker.get("engine", "quantize"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    log_path = out_dir.parent / f"{out_dir.name}.log"
    cmd = [*cmd, "--export-path", str(staging)]
    started = time.time()
    timed_out = False
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None and not line.startswith(RESULT_PREFIX):
                    on_line(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:
            _kill_group(proc)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        else:
            _kill_group(proc)  # the child is gone; anything it left running in its group goes with it
        reader.join(timeout=10)
    wall = time.time() - started
    result = _last_result(log_path)
    if timed_out or proc.returncode != 0 or not result or not result.get("ok"):
        shutil.rmtree(staging, ignore_errors=True)
        if timed_out:
            raise Day0Error(FailureClass.INFRA_TRANSIENT, f"{what} reached the stage timeout ({timeout_s:g}s) and "
                            "was stopped with its process group", log=str(log_path))
        if result and not result.get("ok"):
            raise Day0Error(FailureClass(result["failure_class"]), f"{what}: {result['message']}", log=str(log_path))
        tail = log_tail(log_path, 1)
        raise Day0Error(FailureClass.UNKNOWN, f"{what} exited {proc.returncode}: {tail[-1] if tail else 'no output'}",
                        log=str(log_path))
    (staging / DONE_MARKER).write_text(json.dumps({**marker, "seconds": round(wall, 3)}, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return QuantizeResult(out_dir, engine, str(marker.get("recipe", "")), wall, False, log_path)


def quantize_modelopt(
    source: Path,
    recipe: Recipe,
    out_dir: Path,
    calibration: Path,
    *,
    calib_size: int = 64,
    calib_seq: int = 64,
    timeout_s: float = 3600,
    on_line: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Run ModelOpt PTQ into ``out_dir`` (atomically: a half-written export is never taken for a finished one)."""
    if is_finished(out_dir):
        return QuantizeResult(out_dir, "modelopt", recipe.name, 0.0, True, out_dir.parent / f"{out_dir.name}.log")
    cmd = [sys.executable, "-m", "pytest_day0.stages.quantize", "--model", str(source), "--recipe", recipe.name,
           "--calibration", str(calibration), "--calib-size", str(calib_size), "--calib-seq", str(calib_seq)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return run_quantize_child(cmd, out_dir, what=f"PTQ {recipe.name}", timeout_s=timeout_s, env=env, on_line=on_line,
                              marker={"engine": "modelopt", "recipe": recipe.name, "source": str(source),
                                      "modelopt_version": _modelopt_version()})


def use_existing(checkpoint: Path, recipe: Recipe) -> QuantizeResult:
    """Engine ``existing``: somebody already quantized it; we only gate it."""
    if not (checkpoint / "config.json").is_file():
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-checkpoint {checkpoint} has no config.json")
    return QuantizeResult(checkpoint, "existing", recipe.name, 0.0, True, None)


def _modelopt_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(_child_main())
