"""Exported ModelOpt checkpoint -> a float32 torch model that computes what the quantized model computes.

The reference engine has no quantized kernels, so it reproduces the numerics instead: every quantized
weight is dequantized exactly as ModelOpt defines the format (``modelopt/torch/quantization/qtensor`` and
``modelopt/torch/export/quant_utils.py``, nvidia-modelopt 0.47), and where the format also quantizes
activations a forward pre-hook on the Linear quantize-dequantizes its input the way ModelOpt's fake-quant
forward does. Matmuls then run in float32, so the only difference from a real deployment is the
accumulation precision, which is the same for the baseline and the candidate.

Formats (tensor names as ``export_hf_checkpoint`` writes them, per Linear ``<m>``):

- FP8: ``<m>.weight`` F8_E4M3, ``weight_scale`` F32 (scalar, per output channel, or 2-D 128x128 blocks);
  ``input_scale`` F32 scalar = amax/448 -> static per-tensor FP8 activations. FP8_PER_CHANNEL_PER_TOKEN
  exports per-channel weight scales and no input_scale: its inputs are quantized per token, dynamically.
- NVFP4: ``weight`` U8 [out, in/2], two E2M1 codes per byte, element ``2j`` in the LOW nibble (ModelOpt
  ``NVFP4QTensor.quantize``: ``(q[..., 1::2] << 4) | q[..., 0::2]``); ``weight_scale`` F8_E4M3 [out, in/16];
  ``weight_scale_2`` F32 scalar; ``input_scale`` = amax/(6*448) is the global scale of the *dynamic*
  per-16-element activation quantization.
- INT4 AWQ (W4A16_AWQ): ``weight`` U8 [out/2, in], packed along the OUTPUT dim: row ``2i`` in the low
  nibble, row ``2i+1`` in the high nibble, signed two's-complement int4 in [-8, 7]
  (``quant_utils.pack_int4_in_uint8``); ``weight_scale`` F32 [out, in/group]; ``pre_quant_scale`` F32 [in]
  multiplies the input before the matmul (ModelOpt's ``TensorQuantizer.forward`` applies it to the input,
  so we do too). Modules whose pre_quant_scale was folded into a preceding norm have none.
- INT8 (smoothquant / weight-only): ``weight`` I8, ``weight_scale`` F32 [out]; SQ adds ``input_scale``
  (amax/127, static per-tensor, range [-128, 127] since ModelOpt's default is not narrow-range) and
  ``pre_quant_scale``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pytest_day0.failures import Day0Error, FailureClass

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
INT8_MAX = 127.0
NVFP4_BLOCK = 16

# E2M1 code -> value, code = sign << 3 | magnitude index (ModelOpt's ``e2m1_values``).
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
# Midpoints between neighbouring magnitudes; ties at the odd ones round up (to the even mantissa).
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_E2M1_ODD_BOUNDS = torch.tensor([0.75, 1.75, 3.5], dtype=torch.float32)


# ---------------------------------------------------------------- pure numerics (no I/O)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to E2M1 codes: nearest, ties to even, saturating at 6.

    Same decision boundaries as ModelOpt's ``NVFP4QTensor._cast_fp4`` and its triton
    ``fp4_round_magnitude``, so weights and activations round as ModelOpt rounds them.
    """
    x = x.float()
    sign = (x < 0).to(torch.uint8)
    mag = x.abs()
    ordinal = torch.searchsorted(_E2M1_BOUNDS, mag.contiguous(), right=False).to(torch.uint8)
    tie_up = (mag.unsqueeze(-1) == _E2M1_ODD_BOUNDS).any(dim=-1).to(torch.uint8)
    return (sign << 3) + ordinal + tie_up


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] uint8 -> [..., n] float32 E2M1 values; element 2j is the low nibble."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return E2M1_VALUES[codes.long()]


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] E2M1 codes -> [..., n/2] uint8, the inverse of :func:`unpack_nvfp4`."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 weight: value * (fp8 block scale * fp32 global scale), in ModelOpt's order of operations."""
    values = unpack_nvfp4(packed)
    per_block = block_scale.float() * global_scale.float()
    out = values.view(*values.shape[:-1], -1, NVFP4_BLOCK) * per_block.unsqueeze(-1)
    return out.reshape(values.shape)


def quantize_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our own NVFP4 weight quantizer (the dynamic export path): returns (packed uint8, fp8 block scales).

    Written from the format definition, not by calling ModelOpt, so the test can show that it reproduces
    an exported checkpoint byte for byte. ``global_scale`` is ``weight_scale_2`` (amax / (6 * 448)).
    """
    w = weight.float()
    blocks = w.view(*w.shape[:-1], -1, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    scale = block_amax / (E2M1_MAX * global_scale.float())
    scale[scale == 0] = 1.0
    scale_fp8 = scale.clamp(min=2**-9, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (scale_fp8.float() * global_scale.float()).unsqueeze(-1)
    return pack_nvfp4(e2m1_codes(scaled.view(w.shape))), scale_fp8


def fake_quant_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Dynamic per-16-block NVFP4 activation quantization (ModelOpt ``fp4_fake_quant_block``).

    Block scale = fp8(min(block_amax / (6 * global_scale), 448)) * global_scale, a block whose scale falls
    below 1e-5 uses scale 1.0 (as the kernel does), values round to E2M1 with ties to even.
    """
    shape = x.shape
    xf = x.float().reshape(-1, shape[-1])
    pad = (-shape[-1]) % NVFP4_BLOCK
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.view(xf.shape[0], -1, NVFP4_BLOCK)
    gs = global_scale.float()
    gs = torch.where(gs > 0, gs, torch.full_like(gs, 1e-12))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = (block_amax / (E2M1_MAX * gs)).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    magnitude = E2M1_VALUES[e2m1_codes(blocks.abs() / scale).long()]
    out = torch.where(blocks >= 0, magnitude, -magnitude) * scale
    out = out.view(xf.shape)[:, : shape[-1]]
    return out.reshape(shape).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 E4M3 (ModelOpt ``_fp8_eager``): saturate at +-448, round to nearest even."""
    q = (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale.float()).to(x.dtype)


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 (FP8_PER_CHANNEL_PER_TOKEN inputs): each row scaled by its own amax / 448."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(amax <= 2.0**-24, torch.ones_like(amax), amax)  # ModelOpt's zero-amax guard
    q = (xf * (FP8_E4M3_MAX / amax)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * (amax / FP8_E4M3_MAX)).to(x.dtype)


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor INT8 (ModelOpt ``_tensor_quant``, narrow_range=False): round, clamp [-128, 127]."""
    q = torch.clamp(torch.round(x.float() / scale.float()), -INT8_MAX - 1, INT8_MAX)
    return (q * scale.float()).to(x.dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out/2, in] uint8 -> [out, in] int values in [-8, 7]; row 2i is the low nibble (packed along out)."""
    low = (packed & 0x0F).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    rows = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT4 AWQ weight: int4 * per-(row, group) scale; the group size is in / scale.shape[-1]."""
    values = unpack_int4(packed).float()
    group = values.shape[-1] // scale.shape[-1]
    return values * scale.float().repeat_interleave(group, dim=-1)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight times its scale: scalar, per output channel ([out] or [out, 1]), or 2-D block grid."""
    w = weight.float()
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1 and s.shape[0] == w.shape[0]):
        return w * s.reshape(-1, 1)
    if s.dim() == 2:  # block-wise: [ceil(out/b0), ceil(in/b1)]
        b0 = -(-w.shape[0] // s.shape[0])
        b1 = -(-w.shape[1] // s.shape[1])
        full = s.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
        return w * full[: w.shape[0], : w.shape[1]]
    raise ValueError(f"unsupported FP8 weight_scale shape {tuple(s.shape)} for weight {tuple(w.shape)}")


# ---------------------------------------------------------------- layer decisions


@dataclass
class QuantizedLinear:
    """What one exported Linear needs at load time: its float weight and its activation emulation."""

    module: str
    fmt: str  # FP8 | NVFP4 | INT4 | INT8
    weight: torch.Tensor  # dequantized, float32
    pre_quant_scale: torch.Tensor | None = None
    activation: str | None = None  # fp8 | nvfp4 | int8 | None (weight-only)
    input_scale: torch.Tensor | None = None


def decode_linear(
    module: str, tensors: dict[str, torch.Tensor], expected_shape: tuple[int, int], quant_algo: str | None = None
) -> QuantizedLinear:
    """Decide a Linear's format from its tensors (dtypes and shapes) and dequantize it.

    The tensors, not the config, are authoritative: a config can be wrong about a layer, the bytes cannot.
    Raises ValueError on a layout we do not understand (the caller turns it into CHECKPOINT_NOT_SERVABLE).
    """
    weight = tensors["weight"]
    scale = tensors.get("weight_scale")
    scale_2 = tensors.get("weight_scale_2")
    input_scale = tensors.get("input_scale")
    pqs = tensors.get("pre_quant_scale")
    out_f, in_f = expected_shape
    if scale is None:
        raise ValueError(f"{module}: quantized weight ({weight.dtype}) without weight_scale")
    if weight.dtype == torch.float8_e4m3fn:
        if tuple(weight.shape) != expected_shape:
            raise ValueError(f"{module}: FP8 weight shape {tuple(weight.shape)} != {expected_shape}")
        if input_scale is not None:
            activation: str | None = "fp8"
        elif quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":  # dynamic inputs leave no input_scale behind
            activation = "fp8_per_token"
        else:
            activation = None
        return QuantizedLinear(module, "FP8", dequantize_fp8(weight, scale), pqs, activation, input_scale)
    if weight.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn:
        if tuple(weight.shape) != (out_f, in_f // 2) or tuple(scale.shape) != (out_f, in_f // NVFP4_BLOCK):
            raise ValueError(f"{module}: NVFP4 shapes weight {tuple(weight.shape)} scale {tuple(scale.shape)} "
                             f"do not fit a [{out_f}, {in_f}] linear")
        if scale_2 is None:
            raise ValueError(f"{module}: NVFP4 weight without weight_scale_2")
        w = dequantize_nvfp4(weight, scale, scale_2)
        return QuantizedLinear(module, "NVFP4", w, pqs, "nvfp4" if input_scale is not None else None, input_scale)
    if weight.dtype == torch.uint8:
        if tuple(weight.shape) != (out_f // 2, in_f) or scale.dim() != 2 or scale.shape[0] != out_f:
            raise ValueError(f"{module}: INT4 shapes weight {tuple(weight.shape)} scale {tuple(scale.shape)} "
                             f"do not fit a [{out_f}, {in_f}] linear")
        if in_f % scale.shape[1]:
            raise ValueError(f"{module}: INT4 group count {scale.shape[1]} does not divide in_features {in_f}")
        if scale_2 is not None or input_scale is not None:
            raise ValueError(f"{module}: INT4 with activation quantization (W4A8) is not emulated")
        return QuantizedLinear(module, "INT4", dequantize_int4(weight, scale), pqs)
    if weight.dtype == torch.int8:
        if tuple(weight.shape) != expected_shape:
            raise ValueError(f"{module}: INT8 weight shape {tuple(weight.shape)} != {expected_shape}")
        w = weight.float() * scale.float().reshape(-1, 1)
        return QuantizedLinear(module, "INT8", w, pqs, "int8" if input_scale is not None else None, input_scale)
    raise ValueError(f"{module}: unsupported quantized weight dtype {weight.dtype}")


def _activation_hook(layer: QuantizedLinear) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """The pre-hook: pre_quant_scale first, then activation quant, the order of TensorQuantizer.forward."""
    pqs = layer.pre_quant_scale.float() if layer.pre_quant_scale is not None else None
    scale = layer.input_scale.float() if layer.input_scale is not None else None
    kind = layer.activation

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if pqs is not None:
            x = x * pqs.to(x.dtype)
        if kind == "fp8" and scale is not None:
            x = fake_quant_fp8(x, scale)
        elif kind == "fp8_per_token":
            x = fake_quant_fp8_per_token(x)
        elif kind == "nvfp4" and scale is not None:
            x = fake_quant_nvfp4_activation(x, scale)
        elif kind == "int8" and scale is not None:
            x = fake_quant_int8(x, scale)
        return (x, *args[1:])

    return hook


# ---------------------------------------------------------------- I/O


_QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
_IGNORED_SUFFIXES = ("k_scale", "v_scale", "k_bias", "v_bias", "output_scale")  # KV-cache quant: not emulated


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    quant_algo: str | None
    layers: dict[str, str] = field(default_factory=dict)  # module -> FP8/NVFP4/INT4/INT8 (+ "/a:<activations>")
    ignored_tensors: list[str] = field(default_factory=list)  # present but not emulated (KV-cache scales)

    @property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def _read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not shards:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"no *.safetensors in {checkpoint}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(checkpoint / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors


def _quant_algo(checkpoint: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The checkpoint's quant_algo and, for MIXED_PRECISION exports, each layer's own."""
    hf_quant = checkpoint / "hf_quant_config.json"
    if hf_quant.is_file():
        section = json.loads(hf_quant.read_text()).get("quantization", {})
    else:
        qc = config.get("quantization_config")
        section = qc if isinstance(qc, dict) else {}
    algo = section.get("quant_algo")
    layers = section.get("quantized_layers") or {}
    per_layer = {str(k): str(v.get("quant_algo")) for k, v in layers.items() if isinstance(v, dict)}
    return (str(algo) if algo else None), per_layer


def load_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build the HF model from config.json (quantization_config dropped) and load dequantized tensors."""
    checkpoint = Path(checkpoint_dir)
    try:
        return _load(checkpoint, dtype)
    except Day0Error:
        raise
    except Exception as exc:  # transformers / safetensors raise many kinds; the stage needs one class
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"cannot load {checkpoint}: {msg}") from exc


def _load(checkpoint: Path, dtype: torch.dtype) -> LoadedModel:
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"{checkpoint} has no config.json")
    tensors = _read_tensors(checkpoint)  # before importing transformers: a bad directory fails in a second

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    raw_config = json.loads(config_path.read_text())
    quant_algo, layer_algos = _quant_algo(checkpoint, raw_config)

    config = AutoConfig.from_pretrained(str(checkpoint))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # we emulate it; transformers must not try to apply it
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.eval()

    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, str] = {}
    ignored: list[str] = []
    quantized: list[QuantizedLinear] = []
    consumed: set[str] = set()

    for key, value in tensors.items():
        if not key.endswith(".weight") or value.dtype not in (torch.float8_e4m3fn, torch.uint8, torch.int8):
            continue
        prefix = key[: -len(".weight")]
        module = modules.get(prefix)
        if not isinstance(module, nn.Linear):
            raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE,
                            f"quantized tensor {key} does not belong to a Linear of {type(model).__name__}")
        parts = {"weight": value}
        for suffix in _QUANT_SUFFIXES:
            if f"{prefix}.{suffix}" in tensors:
                parts[suffix] = tensors[f"{prefix}.{suffix}"]
        try:
            layer = decode_linear(prefix, parts, (module.out_features, module.in_features),
                                  layer_algos.get(prefix, quant_algo))
        except ValueError as exc:
            raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, str(exc)) from exc
        quantized.append(layer)
        state[key] = layer.weight.to(dtype)
        consumed.update(f"{prefix}.{s}" for s in parts)
        layers[prefix] = layer.fmt + (f"/a:{layer.activation}" if layer.activation else "")

    for key, value in tensors.items():
        if key in consumed:
            continue
        if key.endswith(_IGNORED_SUFFIXES):
            ignored.append(key)
            continue
        if key.endswith(_QUANT_SUFFIXES):
            prefix = key.rsplit(".", 1)[0]
            if key.endswith("pre_quant_scale") and isinstance(modules.get(prefix), nn.Linear):
                # an unquantized weight with a smoothing scale: still must scale the input
                quantized.append(QuantizedLinear(prefix, "NONE", torch.empty(0), pre_quant_scale=value))
                continue
            raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"scale tensor {key} has no quantized weight")
        if not value.is_floating_point():
            raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"unexpected {value.dtype} tensor {key}")
        state[key] = value.to(dtype)

    result = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE,
                        f"{len(missing)} model tensors missing from the checkpoint, e.g. {missing[0]}")
    if result.unexpected_keys:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE,
                        f"{len(result.unexpected_keys)} tensors the model does not have, "
                        f"e.g. {result.unexpected_keys[0]}")
    if tied:
        model.tie_weights()

    for layer in quantized:
        if layer.pre_quant_scale is not None or layer.activation is not None:
            modules[layer.module].register_forward_pre_hook(_activation_hook(layer))

    if (checkpoint / "generation_config.json").is_file():  # eos ids (often several) live there, not in config
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return LoadedModel(model=model, tokenizer=tokenizer, quant_algo=quant_algo, layers=layers,
                       ignored_tensors=sorted(ignored))


def _tied_keys(model: Any) -> set[str]:
    """Parameter names that alias another parameter (lm_head tied to embed_tokens): absent by design."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
    return keys or {"lm_head.weight"}


def load_model(checkpoint_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) with ModelOpt-quantized numerics emulated in float32."""
    loaded = load_checkpoint(checkpoint_dir)
    return loaded.model, loaded.tokenizer
