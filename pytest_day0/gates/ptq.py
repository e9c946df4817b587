"""The PTQ gate: did quantization shrink the model, cover the layers the recipe promises, and keep metadata?

Pure: two ``CheckpointInspection`` objects and a recipe in, one ``PtqCheck`` per aspect out, so each aspect
is its own test with its own failure class. Rules follow the ModelOpt day0-release skill's gate_ptq, reading
the real checkpoint instead of a hand-written summary:

- size: output/source >= 1 is SIZE_NOT_REDUCED, waived when the source is already no wider than the recipe's
  weights (a FP8 source under an FP8 recipe) and the growth is at most 10 % (scales).
- coverage: no in-scope layer in the recipe's precision is MODEL_UNSUPPORTED (the recipe's patterns match
  nothing here); in-scope layers left unquantized or in another precision, declaration/tensor disagreements,
  or a quantized vision tower are QUANT_COVERAGE_FAILURE.
- metadata: any change a serving engine would act on is METADATA_MISMATCH.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pytest_day0.checkpoint.model import CheckpointInspection, CheckpointMetadata
from pytest_day0.checkpoint.recipes import Precision, Recipe, expected_in_scope
from pytest_day0.failures import FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome

SIZE_WAIVER_RATIO = 1.10
SHOWN = 5  # layers named in a message; the count covers the rest

PRECISION_BITS: dict[Precision, float] = {
    Precision.FP8: 8,
    Precision.MXFP8: 8,
    Precision.INT8: 8,
    Precision.NVFP4: 4,
    Precision.MXFP4: 4,
    Precision.INT4: 4,
    Precision.BF16: 16,
    Precision.FP16: 16,
    Precision.FP32: 32,
}
# The skill stops a release whose vision tower was quantized: VLM towers are precision-sensitive and engines
# expect them unquantized.
_VISION = re.compile(r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector)(\.|$)")

Number = float | int | str
CheckName = Literal["size", "coverage", "metadata"]


@dataclass(frozen=True)
class PtqCheck:
    name: CheckName
    passed: bool
    failure_class: FailureClass | None
    message: str
    numbers: dict[str, Number] = field(default_factory=dict)


def assert_ptq_check(check: PtqCheck) -> None:
    """Turn a failed check into the assertion pytest reports; every PTQ check is hard (the skill stops on all)."""
    if not check.passed:
        raise GateFailure(
            check.failure_class or FailureClass.UNKNOWN, check.message, Tier.HARD, check=check.name, **check.numbers
        )


def ptq_outcome(check: PtqCheck, recipe: str) -> GateOutcome:
    """The typed record of one PTQ check (hard tier: the skill stops on every one)."""
    return GateOutcome(gate=f"ptq.{check.name}", recipe=recipe, status="passed" if check.passed else "failed",
                       tier=Tier.HARD, failure_class=None if check.passed else check.failure_class or
                       FailureClass.UNKNOWN, message=check.message, numbers=dict(check.numbers))


def evaluate_ptq(source: CheckpointInspection, output: CheckpointInspection, recipe: Recipe) -> list[PtqCheck]:
    return [check_size(source, output, recipe), check_coverage(output, recipe), check_metadata(source, output)]


def _names(modules: list[str]) -> str:
    shown = ", ".join(modules[:SHOWN])
    return shown + (f" (+{len(modules) - SHOWN} more)" if len(modules) > SHOWN else "")


def source_bits(source: CheckpointInspection, recipe: Recipe) -> float:
    """Widest weight precision among the source's in-scope linears (all linears if none is in scope)."""
    layers = [layer for layer in source.linear_layers if expected_in_scope(layer.module, recipe.scope)]
    layers = layers or list(source.linear_layers)
    return max((PRECISION_BITS[layer.precision] for layer in layers), default=16)


def check_size(source: CheckpointInspection, output: CheckpointInspection, recipe: Recipe) -> PtqCheck:
    numbers: dict[str, Number] = {
        "recipe": recipe.name,
        "source_bytes": source.total_bytes,
        "output_bytes": output.total_bytes,
    }
    if source.total_bytes <= 0:
        return PtqCheck("size", False, FailureClass.USER_CONFIG_ERROR, "source checkpoint holds no tensor data",
                        numbers)
    ratio = output.total_bytes / source.total_bytes
    bits = source_bits(source, recipe)
    numbers.update(size_ratio=round(ratio, 4), source_bits=bits, recipe_bits=recipe.weight_bits)
    if ratio < 1:
        return PtqCheck("size", True, None, f"output is {ratio:.3f}x the source", numbers)
    if bits <= recipe.weight_bits and ratio <= SIZE_WAIVER_RATIO:
        numbers["waived"] = 1
        return PtqCheck(
            "size", True, None,
            f"output is {ratio:.3f}x the source, waived: source weights are already {bits:g}-bit "
            f"(recipe {recipe.weight_bits:g}-bit) and growth is within {SIZE_WAIVER_RATIO:g}x",
            numbers,
        )
    return PtqCheck(
        "size", False, FailureClass.SIZE_NOT_REDUCED,
        f"{recipe.name} output is {output.total_bytes} bytes, {ratio:.3f}x the {source.total_bytes}-byte source "
        f"({bits:g}-bit weights): quantization did not shrink the model",
        numbers,
    )


def check_coverage(output: CheckpointInspection, recipe: Recipe) -> PtqCheck:
    in_scope = [layer for layer in output.linear_layers if expected_in_scope(layer.module, recipe.scope)]
    covered = [layer.module for layer in in_scope if layer.precision is recipe.precision]
    unquantized = [layer.module for layer in in_scope if not layer.precision.quantized]
    wrong = [f"{layer.module}={layer.precision}" for layer in in_scope
             if layer.precision.quantized and layer.precision is not recipe.precision]
    mismatch = [
        f"{layer.module} (declared {layer.declared_precision or 'unquantized'}, stored {layer.precision})"
        for layer in output.linear_layers if layer.declaration_mismatch
    ]
    out_of_scope = [layer for layer in output.linear_layers
                    if layer.precision.quantized and not expected_in_scope(layer.module, recipe.scope)]
    vision = [layer.module for layer in out_of_scope if _VISION.search(layer.module)]
    numbers: dict[str, Number] = {
        "recipe": recipe.name,
        "precision": recipe.precision.value,
        "linear_layers": len(output.linear_layers),
        "layers_in_scope": len(in_scope),
        "layers_quantized": len(covered),
        "unexpected_unquantized": len(unquantized),
        "wrong_precision": len(wrong),
        "declaration_mismatch": len(mismatch),
        "unexpected_quantized": len(out_of_scope),
        "vision_quantized": len(vision),
    }
    if not covered:
        return PtqCheck(
            "coverage", False, FailureClass.MODEL_UNSUPPORTED,
            f"{recipe.name} quantized none of the {len(in_scope)} in-scope linear layers to {recipe.precision} "
            f"(scope {recipe.scope}, {len(output.linear_layers)} linear layers in the checkpoint)"
            + (f"; the quantization config contradicts the tensors for {len(mismatch)}, e.g. {mismatch[0]}"
               if mismatch else ""),
            numbers,
        )
    problems = []
    if unquantized:
        problems.append(f"{len(unquantized)} in-scope layers left unquantized: {_names(unquantized)}")
    if wrong:
        problems.append(f"{len(wrong)} in-scope layers not {recipe.precision}: {_names(wrong)}")
    if mismatch:
        problems.append(f"{len(mismatch)} layers disagree with the quantization config: {_names(mismatch)}")
    if vision:
        problems.append(f"{len(vision)} vision-tower layers quantized: {_names(vision)}")
    if problems:
        return PtqCheck("coverage", False, FailureClass.QUANT_COVERAGE_FAILURE, "; ".join(problems), numbers)
    return PtqCheck(
        "coverage", True, None,
        f"{len(covered)}/{len(in_scope)} in-scope linear layers are {recipe.precision}",
        numbers,
    )


def check_metadata(source: CheckpointInspection, output: CheckpointInspection) -> PtqCheck:
    diffs = metadata_diffs(source.metadata, output.metadata)
    numbers: dict[str, Number] = {"metadata_diffs": len(diffs)}
    if diffs:
        return PtqCheck(
            "metadata", False, FailureClass.METADATA_MISMATCH,
            f"{len(diffs)} metadata changes between source and output: " + "; ".join(diffs[:SHOWN])
            + (f" (+{len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else ""),
            numbers,
        )
    return PtqCheck("metadata", True, None, "metadata unchanged", numbers)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _hash(value: str | None) -> str:
    return value[:12] if value else "absent"


def _dict_diffs(prefix: str, src: Mapping[str, object], out: Mapping[str, object]) -> Iterable[str]:
    for key in sorted(set(src) | set(out)):
        if key not in out:
            yield f"{prefix}{key} removed (was {_short(src[key])})"
        elif key not in src:
            yield f"{prefix}{key} added ({_short(out[key])})"
        elif src[key] != out[key]:
            yield f"{prefix}{key}: {_short(src[key])} -> {_short(out[key])}"


def metadata_diffs(source: CheckpointMetadata, output: CheckpointMetadata) -> list[str]:
    """One line per change a serving engine or a prompt would notice; empty when nothing changed."""
    diffs: list[str] = []
    for name in ("architectures", "model_type", "max_position_embeddings", "vocab_size"):
        before, after = getattr(source, name), getattr(output, name)
        if name == "architectures" and not before and after:
            continue  # the source left the class to model_type; an export naming it (ModelOpt must) changes nothing
        if before != after:
            diffs.append(f"{name}: {_short(before)} -> {_short(after)}")
    if source.chat_template_sha256 != output.chat_template_sha256:
        diffs.append(
            f"chat template changed (sha256 {_hash(source.chat_template_sha256)} -> "
            f"{_hash(output.chat_template_sha256)})"
        )
    if source.tokenizer_sha256 != output.tokenizer_sha256:
        diffs.append(
            f"tokenizer changed (sha256 {_hash(source.tokenizer_sha256)} -> {_hash(output.tokenizer_sha256)})"
        )
    diffs.extend(_dict_diffs("special token ", source.special_tokens, output.special_tokens))
    diffs.extend(_dict_diffs("generation_config.", source.generation_config, output.generation_config))
    return diffs
