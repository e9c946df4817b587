"""Checkpoint inspection on real files: hand-built sharded and compressed-tensors checkpoints, and real
ModelOpt exports of a tiny random Llama (fp8, nvfp4, int4_awq) quantized on CPU in this session."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import save_file

from pytest_day0.checkpoint.formats import modelopt_precision, parse_quant_declaration
from pytest_day0.checkpoint.inspect import inspect_checkpoint, tokenizer_digest
from pytest_day0.checkpoint.model import CheckpointInspection
from pytest_day0.checkpoint.recipes import Precision, resolve_recipe
from pytest_day0.checkpoint.safetensors_header import FIRST_READ, LocalFileSource
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.ptq import evaluate_ptq, metadata_diffs

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
HIDDEN, INTER, LAYERS, VOCAB = 128, 384, 2, 128
PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
DECODER_LINEARS = {f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJ}


def llama_config(**extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 64, **extra,
    }


def plain_tensors() -> dict[str, torch.Tensor]:
    """A bf16 Llama state dict's names and shapes (values are irrelevant to a header-only inspection)."""
    out = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16),
           "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
           "lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for proj, shape in PROJ.items():
            out[f"model.layers.{i}.{proj}.weight"] = torch.zeros(shape, dtype=torch.bfloat16)
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def layers_by_name(inspection: CheckpointInspection) -> dict[str, Any]:
    return {layer.module: layer for layer in inspection.linear_layers}


# ---------------------------------------------------------------------------------------------- sharded


def write_sharded(path: Path, extra_index: dict[str, str] | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = plain_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(HIDDEN, INTER * 16, dtype=torch.bfloat16)  # 1.5 MiB
    names = sorted(tensors)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k in range(3):
        shard = f"model-{k + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[k::3]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    weight_map.update(extra_index or {})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(llama_config()))
    return path, tensors


def test_sharded_checkpoint_reads_only_headers(tmp_path: Path) -> None:
    path, tensors = write_sharded(tmp_path / "ckpt")
    opened: dict[str, LocalFileSource] = {}

    def open_source(p: str) -> LocalFileSource:
        opened[Path(p).name] = LocalFileSource(p)
        return opened[Path(p).name]

    result = inspect_checkpoint(path, open_source)
    shards = [n for n in opened if n.endswith(".safetensors")]
    assert result.shards == tuple(sorted(shards)) and len(shards) == 3
    assert result.header_reads == sum(opened[s].reads for s in shards) == 3  # <= 2 per shard
    for shard in shards:
        assert opened[shard].bytes_read <= FIRST_READ
    assert result.file_bytes > 8 * sum(opened[s].bytes_read for s in shards)  # the data stayed unread
    assert result.tensor_count == len(tensors)
    assert result.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert result.file_bytes == sum((path / s).stat().st_size for s in shards)
    layers = layers_by_name(result)
    assert set(layers) == DECODER_LINEARS | {"lm_head"}  # embeddings and 1-D norms are not linear layers
    assert {layer.precision for layer in layers.values()} == {Precision.BF16}
    assert not any(layer.declaration_mismatch for layer in layers.values())
    assert result.quant_format is None and result.metadata.architectures == ("LlamaForCausalLM",)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_shard_path_escaping_the_directory_is_refused(tmp_path: Path, shard: str) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))  # exists: the refusal must be about the path, not absence
    shard = str(outside) if shard == "ABS" else shard
    path, _ = write_sharded(tmp_path / "ckpt", {"x": shard})
    with pytest.raises(Day0Error, match="escapes the checkpoint directory") as info:
        inspect_checkpoint(path)
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


def test_missing_shard_is_not_servable(tmp_path: Path) -> None:
    path, _ = write_sharded(tmp_path / "ckpt")
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(Day0Error, match=r"model-00002-of-00003\.safetensors is missing") as info:
        inspect_checkpoint(path)
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


def test_index_naming_the_wrong_shard_is_not_servable(tmp_path: Path) -> None:
    path, _ = write_sharded(tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    actual = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(s for s in sorted(set(index["weight_map"].values())) if s != actual)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Day0Error, match=r"'model\.norm\.weight' is mapped to .* does not hold it"):
        inspect_checkpoint(path)


def test_tensor_stored_in_two_shards_is_not_servable(tmp_path: Path) -> None:
    path, _ = write_sharded(tmp_path / "ckpt")
    save_file({"lm_head.weight": torch.zeros(VOCAB, HIDDEN)}, str(path / "extra.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.only"] = "extra.safetensors"  # brings the extra shard into the plan
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Day0Error, match=r"'lm_head\.weight' is stored in both"):
        inspect_checkpoint(path)


def test_directory_without_weights_is_not_servable(tmp_path: Path) -> None:
    with pytest.raises(Day0Error, match=r"no model\.safetensors") as info:
        inspect_checkpoint(tmp_path)
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


def test_corrupt_shard_surfaces_as_one_line_day0_error(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "c", plain_tensors(), llama_config())
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:-100])
    with pytest.raises(Day0Error, match=r"model.safetensors: not a valid safetensors file"):
        inspect_checkpoint(path)


# ---------------------------------------------------------------------------------- compressed-tensors


def ct_config(fmt: str, weights: dict[str, Any], inputs: dict[str, Any] | None, ignore: list[str]) -> dict[str, Any]:
    return llama_config(quantization_config={
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None}},
        "ignore": ignore, "kv_cache_scheme": None, "version": "0.10.0",
    })


def ct_w4a16(group: int = 32, bits: int = 4) -> dict[str, torch.Tensor]:
    """pack-quantized as compressed-tensors writes it: int32 words of 32/bits values, group scales, true shape."""
    out = {k: v for k, v in plain_tensors().items() if not k.startswith("model.layers.") or "norm" in k}
    for i in range(LAYERS):
        for proj, (o, n) in PROJ.items():
            m = f"model.layers.{i}.{proj}"
            out[f"{m}.weight_packed"] = torch.zeros(o, n * bits // 32, dtype=torch.int32)
            out[f"{m}.weight_scale"] = torch.ones(o, n // group, dtype=torch.bfloat16)
            out[f"{m}.weight_shape"] = torch.tensor([o, n], dtype=torch.int64)
    return out


def test_compressed_tensors_w4a16_pack_quantized(tmp_path: Path) -> None:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    path = write_checkpoint(tmp_path / "w4a16", ct_w4a16(), ct_config("pack-quantized", weights, None, ["lm_head"]))
    result = inspect_checkpoint(path)
    layers = layers_by_name(result)
    assert result.quant_format == "compressed-tensors" and result.quant_algo == "pack-quantized"
    assert set(layers) == DECODER_LINEARS | {"lm_head"}
    for name in DECODER_LINEARS:
        assert layers[name].precision is Precision.INT4 and layers[name].weight_dtype == "I32"
        assert layers[name].declared_precision is Precision.INT4 and not layers[name].declaration_mismatch
        assert layers[name].scale_tensors == ("weight_scale", "weight_shape")
    assert layers["lm_head"].precision is Precision.BF16 and not layers["lm_head"].declaration_mismatch
    gate = {c.name: c for c in evaluate_ptq(result, result, resolve_recipe("int4_awq"))}
    assert gate["coverage"].passed, gate["coverage"].message


def test_compressed_tensors_eight_bit_pack_quantized_uses_declared_bits(tmp_path: Path) -> None:
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    path = write_checkpoint(tmp_path / "w8a16", ct_w4a16(group=HIDDEN, bits=8),
                            ct_config("pack-quantized", weights, None, ["lm_head"]))
    counts = inspect_checkpoint(path).precision_counts()
    assert counts == {"INT8": len(DECODER_LINEARS), "BF16": 1}


def test_compressed_tensors_fp8_float_quantized(tmp_path: Path) -> None:
    tensors = plain_tensors()
    for name in DECODER_LINEARS:
        o, n = tensors[f"{name}.weight"].shape
        tensors[f"{name}.weight"] = torch.zeros(o, n, dtype=torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale"] = torch.ones(o, 1, dtype=torch.bfloat16)
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    path = write_checkpoint(tmp_path / "fp8", tensors,
                            ct_config("float-quantized", weights, inputs, ["re:.*lm_head"]))
    result = inspect_checkpoint(path)
    assert result.precision_counts() == {"FP8": len(DECODER_LINEARS), "BF16": 1}
    assert not any(layer.declaration_mismatch for layer in result.linear_layers)


def test_compressed_tensors_nvfp4_and_int8(tmp_path: Path) -> None:
    tensors = plain_tensors()
    for name in DECODER_LINEARS:
        o, n = tensors.pop(f"{name}.weight").shape
        tensors[f"{name}.weight_packed"] = torch.zeros(o, n // 2, dtype=torch.uint8)
        tensors[f"{name}.weight_scale"] = torch.zeros(o, n // 16, dtype=torch.float8_e4m3fn)
        tensors[f"{name}.weight_global_scale"] = torch.ones(1, dtype=torch.float32)
        tensors[f"{name}.input_global_scale"] = torch.ones(1, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    path = write_checkpoint(tmp_path / "nvfp4", tensors,
                            ct_config("nvfp4-pack-quantized", weights, dict(weights), ["lm_head"]))
    assert inspect_checkpoint(path).precision_counts() == {"NVFP4": len(DECODER_LINEARS), "BF16": 1}

    tensors = plain_tensors()
    for name in DECODER_LINEARS:
        o, n = tensors[f"{name}.weight"].shape
        tensors[f"{name}.weight"] = torch.zeros(o, n, dtype=torch.int8)
        tensors[f"{name}.weight_scale"] = torch.ones(o, 1, dtype=torch.float32)
    weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
    path = write_checkpoint(tmp_path / "int8", tensors, ct_config("naive-quantized", weights, None, ["lm_head"]))
    assert inspect_checkpoint(path).precision_counts() == {"INT8": len(DECODER_LINEARS), "BF16": 1}


def test_declaration_and_tensors_disagreeing_is_flagged_both_ways(tmp_path: Path) -> None:
    tensors = ct_w4a16()
    down = "model.layers.1.mlp.down_proj"
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        del tensors[f"{down}.{suffix}"]
    tensors[f"{down}.weight"] = torch.zeros(HIDDEN, INTER, dtype=torch.bfloat16)  # targeted, but stored plain
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
    ignored = "model.layers.0.self_attn.q_proj"  # ignored, but stored quantized
    path = write_checkpoint(tmp_path / "mix", tensors,
                            ct_config("pack-quantized", weights, None, ["lm_head", f"re:{ignored}$"]))
    layers = layers_by_name(inspect_checkpoint(path))
    assert layers[down].declaration_mismatch and layers[down].declared_precision is Precision.INT4
    assert layers[ignored].declaration_mismatch and layers[ignored].declared_precision is None
    assert sum(layer.declaration_mismatch for layer in layers.values()) == 2


def test_quantized_dtype_without_scales_is_not_servable(tmp_path: Path) -> None:
    tensors = plain_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(INTER, HIDDEN // 2, dtype=torch.uint8)
    path = write_checkpoint(tmp_path / "noscale", tensors, llama_config())
    with pytest.raises(Day0Error, match=r"model\.layers\.0\.mlp\.up_proj: weight is U8 but no scale") as info:
        inspect_checkpoint(path)
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


# ------------------------------------------------------------------------------------------ metadata


def test_metadata_reads_side_files_and_diffs_name_each_change(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", plain_tensors(), llama_config())
    (a / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 8,
                                                          "transformers_version": "4.40.0"}))
    b = write_checkpoint(tmp_path / "b", plain_tensors(), llama_config(max_position_embeddings=32))
    (b / "generation_config.json").write_text(json.dumps({"do_sample": True, "max_new_tokens": 8,
                                                          "transformers_version": "5.23.0"}))
    tok_cfg = json.loads((b / "tokenizer_config.json").read_text())
    template = tok_cfg.pop("chat_template")
    tok_cfg["eos_token"] = {"content": "</s>", "special": True}
    (b / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (b / "chat_template.jinja").write_text(template)  # moved, not changed: same template

    src, out = inspect_checkpoint(a).metadata, inspect_checkpoint(b).metadata
    assert src.special_tokens == {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}
    assert src.tokenizer_sha256 and src.chat_template_sha256 == out.chat_template_sha256
    assert "transformers_version" not in src.generation_config
    diffs = metadata_diffs(src, out)
    assert diffs == [
        "max_position_embeddings: 64 -> 32",
        "special token eos: '<eos>' -> '</s>'",
        "generation_config.do_sample: False -> True",
    ]
    (b / "chat_template.jinja").write_text(template + "{{ eos_token }}")
    (b / "tokenizer.json").unlink()
    diffs = metadata_diffs(src, inspect_checkpoint(b).metadata)
    assert any(d.startswith("chat template changed") for d in diffs)
    assert any(d.startswith("tokenizer changed") and d.endswith("-> absent)") for d in diffs)


def test_tokenizer_digest_ignores_reserialisation() -> None:
    doc = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}
    resaved = {"model": {"merges": [["a", "b"]], "vocab": {"a": 0, "b": 1, "ab": 2}, "type": "BPE"}, "version": "1.0"}
    changed = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 2, "ab": 1}, "merges": ["a b"]}}
    digest = tokenizer_digest(json.dumps(doc).encode())
    assert digest == tokenizer_digest(json.dumps(resaved, indent=2).encode())
    assert digest != tokenizer_digest(json.dumps(changed).encode())


# ------------------------------------------------------------------------------- real ModelOpt exports


def _calibrate(batches: list[torch.Tensor]) -> Callable[[Any], None]:
    def loop(model: Any) -> None:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)

    return loop


class Exports(NamedTuple):
    dirs: dict[str, Path]  # "source" and one per recipe
    experts_only_error: str | None  # what mtq said when asked for NVFP4_EXPERTS_ONLY_CFG on a dense model


@pytest.fixture(scope="session")
def modelopt_exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """A tiny random bf16 Llama and its real ModelOpt exports, made the way hf_ptq.py makes them."""
    warnings.filterwarnings("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("modelopt")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    source = root / "source"
    model: Any = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=8
    )
    model.save_pretrained(source)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, source / f.name)
    batches = [torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    exports = {"source": source}
    error = None
    for name in ("fp8", "nvfp4", "int4_awq", "nvfp4_mlp_only"):
        recipe = resolve_recipe(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        model.eval()
        mtq.quantize(model, getattr(mtq, recipe.mtq_config), _calibrate(batches))
        export_hf_checkpoint(model, export_dir=str(root / name))
        AutoTokenizer.from_pretrained(source).save_pretrained(root / name)  # as hf_ptq.py does
        exports[name] = root / name
    # A tiny Qwen3-MoE: the experts_only recipe's home ground. ModelOpt fuses the experts in memory but
    # exports them per expert (model.layers.0.mlp.experts.3.up_proj.weight), router (mlp.gate) left bf16.
    moe_cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=VOCAB, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, architectures=["Qwen3MoeForCausalLM"])
    moe: Any = AutoModelForCausalLM.from_config(moe_cfg)  # type: ignore[no-untyped-call]
    moe = moe.to(torch.bfloat16)
    moe.save_pretrained(root / "moe_source")
    moe = AutoModelForCausalLM.from_pretrained(root / "moe_source", dtype=torch.bfloat16)  # export needs a loaded
    moe.eval()  # model: on a from_config one config.dtype is a string and the NVFP4 export trips over it
    mtq.quantize(moe, mtq.NVFP4_EXPERTS_ONLY_CFG, _calibrate(batches))
    export_hf_checkpoint(moe, export_dir=str(root / "moe_nvfp4_experts_only"))
    exports["moe_source"] = root / "moe_source"
    exports["moe_nvfp4_experts_only"] = root / "moe_nvfp4_experts_only"

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.eval()
    try:
        mtq.quantize(model, mtq.NVFP4_EXPERTS_ONLY_CFG, _calibrate(batches))
    except RuntimeError as exc:  # the recipe's patterns match nothing in a dense model
        error = str(exc)
    return Exports(exports, error)


EXPECTED = {
    "fp8": (Precision.FP8, "FP8", "F8_E4M3", ("input_scale", "weight_scale")),
    "nvfp4": (Precision.NVFP4, "NVFP4", "U8", ("input_scale", "weight_scale", "weight_scale_2")),
    "int4_awq": (Precision.INT4, "W4A16_AWQ", "U8", ("weight_scale",)),
}


@pytest.mark.parametrize("recipe_name", sorted(EXPECTED))
def test_real_modelopt_export(modelopt_exports: Exports, recipe_name: str) -> None:
    precision, algo, dtype, scales = EXPECTED[recipe_name]
    source = inspect_checkpoint(modelopt_exports.dirs["source"])
    result = inspect_checkpoint(modelopt_exports.dirs[recipe_name])
    assert result.quant_format == "modelopt" and result.quant_algo == algo
    assert result.header_reads == 1 and result.shards == ("model.safetensors",)
    layers = layers_by_name(result)
    assert set(layers) == DECODER_LINEARS | {"lm_head"}
    for name in DECODER_LINEARS:
        assert layers[name].precision is precision, name
        assert layers[name].weight_dtype == dtype
        assert set(scales) <= set(layers[name].scale_tensors)
        assert layers[name].declared_precision is precision and not layers[name].declaration_mismatch
    assert layers["lm_head"].precision is Precision.BF16 and not layers["lm_head"].declaration_mismatch
    assert {layer.precision for layer in layers_by_name(source).values()} == {Precision.BF16}
    # Linears shrink to ~8 or ~4.5 bits; bf16 embeddings and lm_head stay, so the whole is not 1/2 or 1/4.
    assert result.total_bytes < source.total_bytes * (0.6 if precision is Precision.FP8 else 0.4)
    checks = {c.name: c for c in evaluate_ptq(source, result, resolve_recipe(recipe_name))}
    assert all(c.passed for c in checks.values()), [c.message for c in checks.values() if not c.passed]
    assert checks["coverage"].numbers["layers_quantized"] == len(DECODER_LINEARS)
    # The export keeps what serving reads: generation settings and the chat template (moved to its own file).
    assert result.metadata.generation_config["max_new_tokens"] == 8
    assert (modelopt_exports.dirs[recipe_name] / "chat_template.jinja").exists()
    assert result.metadata == source.metadata


def test_experts_only_recipe_on_a_dense_model_is_model_unsupported(modelopt_exports: Exports) -> None:
    assert modelopt_exports.experts_only_error is not None, "mtq accepted NVFP4_EXPERTS_ONLY_CFG on a dense Llama"
    assert "no weight quantizer is enabled" in modelopt_exports.experts_only_error
    untouched = inspect_checkpoint(modelopt_exports.dirs["source"])
    checks = {c.name: c for c in evaluate_ptq(untouched, untouched, resolve_recipe("nvfp4_experts_only"))}
    coverage = checks["coverage"]
    assert not coverage.passed and coverage.failure_class is FailureClass.MODEL_UNSUPPORTED
    assert coverage.numbers["layers_in_scope"] == 0
    assert checks["size"].failure_class is FailureClass.SIZE_NOT_REDUCED


def test_real_mlp_only_export_declares_attention_excluded(modelopt_exports: Exports) -> None:
    """ModelOpt summarises the unquantized attention as prefix wildcards ("model.layers.0.self_attn*")."""
    result = inspect_checkpoint(modelopt_exports.dirs["nvfp4_mlp_only"])
    excluded = result.quant_config["ignore"]
    assert isinstance(excluded, list) and "model.layers.0.self_attn*" in excluded
    layers = layers_by_name(result)
    for name in DECODER_LINEARS:
        want = Precision.NVFP4 if ".mlp." in name else Precision.BF16
        assert layers[name].precision is want and not layers[name].declaration_mismatch, name
    source = inspect_checkpoint(modelopt_exports.dirs["source"])
    assert all(c.passed for c in evaluate_ptq(source, result, resolve_recipe("nvfp4_mlp_only")))
    coverage = evaluate_ptq(source, result, resolve_recipe("nvfp4"))[1]  # the same output judged as full nvfp4
    assert coverage.failure_class is FailureClass.QUANT_COVERAGE_FAILURE
    assert coverage.numbers["unexpected_unquantized"] == 4 * LAYERS


def test_real_moe_experts_only_export(modelopt_exports: Exports) -> None:
    source = inspect_checkpoint(modelopt_exports.dirs["moe_source"])
    result = inspect_checkpoint(modelopt_exports.dirs["moe_nvfp4_experts_only"])
    layers = layers_by_name(result)
    experts = {m for m in layers if ".mlp.experts." in m}
    assert len(experts) == 4 * 3 and {layers[m].precision for m in experts} == {Precision.NVFP4}
    assert layers["model.layers.0.mlp.gate"].precision is Precision.BF16  # the router stays unquantized
    assert not any(layer.declaration_mismatch for layer in layers.values())
    checks = evaluate_ptq(source, result, resolve_recipe("nvfp4_experts_only"))
    assert all(c.passed for c in checks), [c.message for c in checks if not c.passed]
    assert checks[1].numbers["layers_in_scope"] == 12 == checks[1].numbers["layers_quantized"]


# ------------------------------------------------------------------------------ declarations (formats.py)


def test_hf_quant_config_alone_declares_per_module() -> None:
    decl = parse_quant_declaration(
        {"producer": {"name": "modelopt"}, "quantization": {
            "quant_algo": "W4A16_AWQ", "group_size": 128, "exclude_modules": ["lm_head", "model.layers.0.self_attn*"]}},
        llama_config(),
    )
    assert decl is not None and decl.quant_format == "modelopt" and decl.source == "hf_quant_config.json"
    group = decl.lookup("model.layers.1.self_attn.q_proj")
    assert group is not None and group.precision is Precision.INT4
    assert decl.lookup("model.layers.0.self_attn.q_proj") is None and decl.lookup("lm_head") is None


def test_mixed_precision_declares_each_layer() -> None:
    decl = parse_quant_declaration({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "model.layers.0.mlp.down_proj": {"quant_algo": "FP8"},
        "model.layers.0.mlp.up_proj": {"quant_algo": "NVFP4", "group_size": 16}}}}, None)
    assert decl is not None
    assert [decl.lookup(f"model.layers.0.mlp.{p}") for p in ("down_proj", "up_proj", "gate_proj")] == [
        decl.groups[0], decl.groups[1], None]
    assert [g.precision for g in decl.groups] == [Precision.FP8, Precision.NVFP4]


@pytest.mark.parametrize(("algo", "precision"), [
    ("FP8", Precision.FP8), ("FP8_PER_CHANNEL_PER_TOKEN", Precision.FP8), ("NVFP4_AWQ", Precision.NVFP4),
    ("W4A8_AWQ", Precision.INT4), ("W8A8_SQ_PER_CHANNEL", Precision.INT8), ("W8A16", Precision.INT8),
    ("MXFP8", Precision.MXFP8), ("W4A8_MXFP4_FP8", Precision.MXFP4), ("W4A16_NVFP4", Precision.NVFP4),
    ("SOMETHING_NEW", None),
])
def test_modelopt_algo_names(algo: str, precision: Precision | None) -> None:
    assert modelopt_precision(algo) is precision


def test_config_and_hf_quant_config_must_agree() -> None:
    with pytest.raises(Day0Error, match=r"declares NVFP4 but hf_quant_config\.json declares FP8") as info:
        parse_quant_declaration({"quantization": {"quant_algo": "FP8"}},
                                llama_config(quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4"}))
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


def test_malformed_declaration_is_not_servable() -> None:
    with pytest.raises(Day0Error, match="exclude_modules must be a list of strings"):
        parse_quant_declaration({"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}}, None)


def test_an_unknown_quant_method_is_not_judged(tmp_path: Path) -> None:
    tensors = plain_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(INTER, HIDDEN, dtype=torch.int8)
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(INTER)
    path = write_checkpoint(tmp_path / "gptq", tensors,
                            llama_config(quantization_config={"quant_method": "gptq", "bits": 8}))
    result = inspect_checkpoint(path)
    assert result.quant_format == "gptq"
    assert not any(layer.declaration_mismatch for layer in result.linear_layers)
    assert result.precision_counts() == {"BF16": len(DECODER_LINEARS), "INT8": 1}
