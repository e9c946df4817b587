"""Quantize engine ``llmcompressor``: llm-compressor's ``oneshot``, saved compressed (compressed-tensors).

Like the ModelOpt engine it runs as a child process (``python -m pytest_day0.stages.quantize_llmcompressor``),
here in the engines' own environment (see :mod:`pytest_day0.stages.engines_env`): llm-compressor pins a
transformers that ModelOpt's environment must not get. The child's last line is ``DAY0_RESULT {json}``.

Algorithms per preset scheme, the ones llm-compressor's examples use and that run on a CPU:
W8A8 = SmoothQuant (0.8) + GPTQ, W4A16 / W8A16 = GPTQ, FP8_DYNAMIC = round-to-nearest (no calibration needed).
``lm_head`` stays in 16 bits, as ModelOpt leaves it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_day0.checkpoint.recipes import Recipe, resolve_recipe
from pytest_day0.engines import QuantizeEngine, QuantizeRequest
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages.engines_env import child_env, engines_python, installed_versions, require_module
from pytest_day0.stages.quantize import (
    QuantizeResult,
    child_parser,
    copy_tokenizer_files,
    is_finished,
    load_for_calibration,
    run_child,
    run_quantize_child,
)

ENGINE_NAME = "llmcompressor"
CHILD_MODULE = "pytest_day0.stages.quantize_llmcompressor"
IGNORE = ("lm_head",)
SMOOTHING_STRENGTH = 0.8


def modifiers_for(scheme: str) -> list[tuple[str, dict[str, Any]]]:
    """The oneshot recipe for a preset scheme, as (modifier class, kwargs): pure, so it is testable without torch."""
    quant = {"targets": "Linear", "scheme": scheme, "ignore": list(IGNORE)}
    if scheme == "FP8_DYNAMIC":
        return [("QuantizationModifier", quant)]
    if scheme == "W8A8":
        return [("SmoothQuantModifier", {"smoothing_strength": SMOOTHING_STRENGTH}), ("GPTQModifier", quant)]
    return [("GPTQModifier", quant)]


def _modifier(cls_name: str, kwargs: dict[str, Any]) -> Any:
    if cls_name == "SmoothQuantModifier":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return SmoothQuantModifier(**kwargs)
    if cls_name == "GPTQModifier":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(**kwargs)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(**kwargs)


def run_oneshot(source: Path, recipe: Recipe, export_dir: Path, calibration_text: str, calib_size: int,
                calib_seq: int) -> dict[str, Any]:
    """The child-process body: load in bf16, calibrate on the shipped text, oneshot, save compressed."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    started = time.time()
    model, batches = load_for_calibration(source, torch.bfloat16, calibration_text, calib_size, calib_seq)
    dataset = Dataset.from_dict({"input_ids": [ids[0].tolist() for ids in batches]})
    modifiers = [_modifier(cls, kwargs) for cls, kwargs in modifiers_for(recipe.scheme)]
    print(f"[day0] llm-compressor {recipe.scheme} on {source}: "
          f"{', '.join(cls for cls, _ in modifiers_for(recipe.scheme))}, {len(batches)} calibration samples",
          flush=True)
    oneshot(model=model, dataset=dataset, recipe=modifiers, max_seq_length=calib_seq,
            num_calibration_samples=len(batches))
    model.save_pretrained(export_dir, save_compressed=True)
    copy_tokenizer_files(source, export_dir)
    return {"seconds": round(time.time() - started, 3)}


def _classify(exc: BaseException) -> FailureClass:
    text = str(exc).lower()
    if "no modules" in text or "did not match" in text or "not supported" in text:
        return FailureClass.MODEL_UNSUPPORTED
    if isinstance(exc, MemoryError):
        return FailureClass.INFRA_TRANSIENT
    return FailureClass.UNKNOWN


def _child_main(argv: list[str] | None = None) -> int:
    args = child_parser("llm-compressor oneshot (pytest-day0's quantize job)").parse_args(argv)

    def body() -> dict[str, Any]:
        recipe = resolve_recipe(args.recipe)
        if ENGINE_NAME not in recipe.engines:
            raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"llm-compressor does not make recipe {recipe.name}")
        return run_oneshot(args.model, recipe, args.export_path, args.calibration.read_text(), args.calib_size,
                           args.calib_seq)

    return run_child(body, _classify)


def llmcompressor_version(python: str | None = None) -> str | None:
    """Goes into the checkpoint cache key: read from the engines' environment without importing the package."""
    return installed_versions(engines_python(python), ("llmcompressor", "compressed-tensors"))


def quantize_llmcompressor(
    source: Path,
    recipe: Recipe,
    out_dir: Path,
    calibration: Path,
    *,
    calib_size: int = 64,
    calib_seq: int = 64,
    timeout_s: float = 3600,
    python: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Run oneshot into ``out_dir`` (staged, then renamed: a half-written export is never taken for a finished one)."""
    if ENGINE_NAME not in recipe.engines:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"llm-compressor does not make recipe {recipe.name}; "
                        "it makes w8a8, w4a16, w8a16, fp8_dynamic")
    if is_finished(out_dir):
        return QuantizeResult(out_dir, ENGINE_NAME, recipe.name, 0.0, True, out_dir.parent / f"{out_dir.name}.log")
    python = engines_python(python)
    require_module(python, "llmcompressor", "llmcompressor quantize engine")
    cmd = [python, "-m", CHILD_MODULE, "--model", str(source), "--recipe", recipe.name,
           "--calibration", str(calibration), "--calib-size", str(calib_size), "--calib-seq", str(calib_seq)]
    return run_quantize_child(cmd, out_dir, what=f"llm-compressor {recipe.name}", timeout_s=timeout_s,
                              env=child_env(), on_line=on_line,
                              marker={"engine": ENGINE_NAME, "recipe": recipe.name, "scheme": recipe.scheme,
                                      "source": str(source), "llmcompressor_version": llmcompressor_version(python)})


def _run(request: QuantizeRequest) -> QuantizeResult:
    return quantize_llmcompressor(request.source, request.recipe, request.out_dir, request.calibration,
                                  calib_size=request.calib_size, timeout_s=request.timeout_s,
                                  python=getattr(request.config, "vllm_python", None), on_line=request.on_line)


def _supports(recipe: Recipe) -> bool:
    return ENGINE_NAME in recipe.engines


def _version(config: Any) -> str | None:
    return llmcompressor_version(getattr(config, "vllm_python", None))


ENGINE = QuantizeEngine(ENGINE_NAME, _run, _supports, _version,
                        "llm-compressor oneshot, saved as compressed-tensors (in the engines' environment)")


if __name__ == "__main__":
    sys.exit(_child_main())
