"""The pure PTQ gate on constructed inspections: one test per rule and failure class."""

from __future__ import annotations

import pytest

from pytest_day0.checkpoint.model import CheckpointInspection, CheckpointMetadata, LinearLayer
from pytest_day0.checkpoint.recipes import Precision, resolve_recipe
from pytest_day0.failures import FailureClass, GateFailure, Tier
from pytest_day0.gates.ptq import PtqCheck, assert_ptq_check, evaluate_ptq, metadata_diffs

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
META = CheckpointMetadata(
    architectures=("LlamaForCausalLM",), model_type="llama", max_position_embeddings=4096, vocab_size=32000,
    chat_template_sha256="a" * 64, tokenizer_sha256="b" * 64,
    special_tokens={"bos": "<s>", "eos": "</s>"}, generation_config={"temperature": 0.6, "top_p": 0.9},
)


def names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ATTN] + \
        [f"model.layers.{i}.mlp.{p}" for i in range(layers) for p in MLP]


def inspection(
    precision: dict[str, Precision] | Precision,
    total_bytes: int = 1000,
    metadata: CheckpointMetadata = META,
    mismatched: frozenset[str] = frozenset(),
    extra: dict[str, Precision] | None = None,
) -> CheckpointInspection:
    per_layer = precision if isinstance(precision, dict) else {n: precision for n in names()}
    per_layer = {**per_layer, "lm_head": Precision.BF16, **(extra or {})}
    layers = tuple(
        LinearLayer(module=m, precision=p, weight_dtype="BF16" if not p.quantized else "U8",
                    declaration_mismatch=m in mismatched)
        for m, p in per_layer.items()
    )
    return CheckpointInspection(
        path="/ckpt", total_bytes=total_bytes, file_bytes=total_bytes + 100, shards=("model.safetensors",),
        tensor_count=len(layers) * 2, quant_format="modelopt", quant_algo=None, linear_layers=layers,
        metadata=metadata,
    )


SOURCE = inspection(Precision.BF16, total_bytes=4000)


def by_name(checks: list[PtqCheck]) -> dict[str, PtqCheck]:
    assert [c.name for c in checks] == ["size", "coverage", "metadata"]
    return {c.name: c for c in checks}


def test_a_good_fp8_export_passes_every_check() -> None:
    checks = by_name(evaluate_ptq(SOURCE, inspection(Precision.FP8, total_bytes=2100), resolve_recipe("fp8")))
    assert all(c.passed and c.failure_class is None for c in checks.values())
    assert checks["size"].numbers["size_ratio"] == 0.525
    assert checks["coverage"].numbers["layers_in_scope"] == 14 == checks["coverage"].numbers["layers_quantized"]
    for check in checks.values():
        assert_ptq_check(check)  # passing checks do not raise


def test_size_not_reduced() -> None:
    output = inspection(Precision.NVFP4, total_bytes=4000)
    check = by_name(evaluate_ptq(SOURCE, output, resolve_recipe("nvfp4")))["size"]
    assert not check.passed and check.failure_class is FailureClass.SIZE_NOT_REDUCED
    assert check.numbers["source_bytes"] == 4000 and check.numbers["output_bytes"] == 4000
    assert check.numbers["size_ratio"] == 1.0 and "1.000x" in check.message


@pytest.mark.parametrize(
    ("source_precision", "ratio", "passed"),
    [(Precision.FP8, 1.05, True), (Precision.FP8, 1.10, True), (Precision.FP8, 1.2, False),
     (Precision.BF16, 1.05, False), (Precision.NVFP4, 1.02, True)],
)
def test_size_waiver_for_a_source_already_at_the_recipe_width(
    source_precision: Precision, ratio: float, passed: bool
) -> None:
    source = inspection(source_precision, total_bytes=10000)
    output = inspection(Precision.FP8, total_bytes=int(10000 * ratio))
    check = by_name(evaluate_ptq(source, output, resolve_recipe("fp8")))["size"]
    assert check.passed is passed
    assert check.numbers.get("waived") == (1 if passed else None)
    assert check.failure_class is (None if passed else FailureClass.SIZE_NOT_REDUCED)


def test_empty_source_is_a_user_error() -> None:
    check = by_name(evaluate_ptq(inspection(Precision.BF16, total_bytes=0), SOURCE, resolve_recipe("fp8")))["size"]
    assert not check.passed and check.failure_class is FailureClass.USER_CONFIG_ERROR


def test_nothing_in_the_recipe_bucket_is_model_unsupported() -> None:
    check = by_name(evaluate_ptq(SOURCE, SOURCE, resolve_recipe("nvfp4_experts_only")))["coverage"]
    assert not check.passed and check.failure_class is FailureClass.MODEL_UNSUPPORTED
    assert check.numbers["layers_in_scope"] == 0 and check.numbers["layers_quantized"] == 0
    bf16 = by_name(evaluate_ptq(SOURCE, SOURCE, resolve_recipe("fp8")))["coverage"]
    assert bf16.failure_class is FailureClass.MODEL_UNSUPPORTED and bf16.numbers["layers_in_scope"] == 14


def test_in_scope_layers_left_unquantized() -> None:
    per_layer = {n: Precision.FP8 for n in names()}
    left = [n for n in names() if n.endswith(("k_proj", "v_proj", "down_proj"))]  # 6 layers
    per_layer.update({n: Precision.BF16 for n in left})
    check = by_name(evaluate_ptq(SOURCE, inspection(per_layer), resolve_recipe("fp8")))["coverage"]
    assert not check.passed and check.failure_class is FailureClass.QUANT_COVERAGE_FAILURE
    assert check.numbers["unexpected_unquantized"] == 6 and check.numbers["layers_quantized"] == 8
    assert check.message.startswith("6 in-scope layers left unquantized: ")
    assert sum(n in check.message for n in left) == 5 and "(+1 more)" in check.message


def test_layers_in_the_wrong_precision() -> None:
    per_layer = {n: Precision.NVFP4 for n in names()}
    per_layer["model.layers.1.mlp.down_proj"] = Precision.FP8
    check = by_name(evaluate_ptq(SOURCE, inspection(per_layer), resolve_recipe("nvfp4")))["coverage"]
    assert check.failure_class is FailureClass.QUANT_COVERAGE_FAILURE and check.numbers["wrong_precision"] == 1
    assert "model.layers.1.mlp.down_proj=FP8" in check.message


def test_declaration_mismatch() -> None:
    output = inspection(Precision.INT4, mismatched=frozenset({"lm_head"}))
    check = by_name(evaluate_ptq(SOURCE, output, resolve_recipe("int4_awq")))["coverage"]
    assert check.failure_class is FailureClass.QUANT_COVERAGE_FAILURE
    assert check.numbers["declaration_mismatch"] == 1 and "lm_head (declared unquantized" in check.message


def test_scope_limits_what_must_be_quantized() -> None:
    per_layer = {n: (Precision.NVFP4 if ".mlp." in n else Precision.BF16) for n in names()}
    mlp_only = by_name(evaluate_ptq(SOURCE, inspection(per_layer), resolve_recipe("nvfp4_mlp_only")))["coverage"]
    assert mlp_only.passed and mlp_only.numbers["layers_in_scope"] == 6
    everything = by_name(evaluate_ptq(SOURCE, inspection(per_layer), resolve_recipe("nvfp4")))["coverage"]
    assert everything.failure_class is FailureClass.QUANT_COVERAGE_FAILURE
    assert everything.numbers["unexpected_unquantized"] == 8


def test_quantized_out_of_scope_layers_are_counted_and_vision_towers_fail() -> None:
    lm_head = inspection(Precision.FP8, extra={"lm_head": Precision.FP8})
    check = by_name(evaluate_ptq(SOURCE, lm_head, resolve_recipe("fp8")))["coverage"]
    assert check.passed and check.numbers["unexpected_quantized"] == 1
    vision = inspection(Precision.FP8, extra={"model.vision_tower.blocks.0.attn.qkv": Precision.FP8})
    check = by_name(evaluate_ptq(SOURCE, vision, resolve_recipe("fp8")))["coverage"]
    assert check.failure_class is FailureClass.QUANT_COVERAGE_FAILURE and "vision-tower" in check.message


def test_metadata_mismatch() -> None:
    changed = META.model_copy(update={"max_position_embeddings": 2048, "special_tokens": {"bos": "<s>"}})
    check = by_name(evaluate_ptq(SOURCE, inspection(Precision.FP8, metadata=changed), resolve_recipe("fp8")))[
        "metadata"]
    assert not check.passed and check.failure_class is FailureClass.METADATA_MISMATCH
    assert check.numbers["metadata_diffs"] == 2
    assert "max_position_embeddings: 4096 -> 2048" in check.message and "special token eos removed" in check.message


def test_metadata_diffs_one_line_per_change() -> None:
    out = CheckpointMetadata(
        architectures=("LlamaForCausalLMv2",), model_type="llama", max_position_embeddings=4096, vocab_size=32001,
        chat_template_sha256=None, tokenizer_sha256="c" * 64,
        special_tokens={"bos": "<s>", "eos": "<|eot|>", "pad": "<pad>"},
        generation_config={"temperature": 1.0, "top_k": 20},
    )
    assert metadata_diffs(META, META) == []
    assert metadata_diffs(META, out) == [
        "architectures: ('LlamaForCausalLM',) -> ('LlamaForCausalLMv2',)",
        "vocab_size: 32000 -> 32001",
        "chat template changed (sha256 aaaaaaaaaaaa -> absent)",
        "tokenizer changed (sha256 bbbbbbbbbbbb -> cccccccccccc)",
        "special token eos: '</s>' -> '<|eot|>'",
        "special token pad added ('<pad>')",
        "generation_config.temperature: 0.6 -> 1.0",
        "generation_config.top_k added (20)",
        "generation_config.top_p removed (was 0.9)",
    ]


def test_assert_ptq_check_raises_gate_failure_with_class_and_numbers() -> None:
    check = by_name(evaluate_ptq(SOURCE, SOURCE, resolve_recipe("fp8")))["size"]
    with pytest.raises(GateFailure) as info:
        assert_ptq_check(check)
    err = info.value
    assert isinstance(err, AssertionError) and err.failure_class is FailureClass.SIZE_NOT_REDUCED
    assert err.tier is Tier.HARD and str(err).startswith("[SIZE_NOT_REDUCED] ") and "\n" not in str(err)
    assert err.detail["check"] == "size" and err.detail["size_ratio"] == 1.0


def test_an_export_may_name_the_architecture_the_source_left_implicit() -> None:
    implicit = META.model_copy(update={"architectures": ()})
    assert metadata_diffs(implicit, META) == []
    assert metadata_diffs(META, implicit) == ["architectures: ('LlamaForCausalLM',) -> ()"]
