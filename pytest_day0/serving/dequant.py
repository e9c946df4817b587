"""Exported ModelOpt checkpoint -> a float32 torch model that computes what the quantized model computes.

The reference engine has no quantized kernels, so it reproduces the numerics instead: every quantized
weight is dequantized exactly as ModelOpt defines the format (``modelopt/torch/quantization/qtensor`` and
``modelopt/torch/export/quant_utils.py``, nvidia-modelopt 0.47), and where the format also quantizes
activations a forward pre-hook on the Linear quantize-dequantizes its input the way ModelOpt's fake-quant
forward does. Matmuls then run in float32, so the only difference from a real deployment is the
accumulation precision, which is the same for the baseline and the candidate.

Formats (tensor names as ``export_hf_checkpoint`` writes them, per Linear ``<m>``):

- FP8: ``<m>.weight`` F8_E4M3, ``weight_scale`` F32 (scalar or per output channel);
  ``input_scale`` F32 scalar = amax/448 -> static per-tensor FP8 activations. FP8_PER_CHANNEL_PER_TOKEN
  exports per-channel weight scales and no input_scale: its inputs are quantized per token, dynamically.
- FP8 2-D blockwise, weight only (quant_algo ``fp8_pb_wo``): ``weight_scale`` F32 is the weight quantizer's
  block amax / 448 kept in its *blocked* layout ``[out/128, 1, in/128, 1]`` (``reduce_block_amax`` views the
  weight as ``[out/128, 128, in/128, 128]`` and keeps those dims), squeezed to a scalar when the weight is one
  128x128 block; ModelOpt's own packer squeezes it back to ``[out/128, in/128]``. No activation quantization.
- MXFP8: ``weight`` F8_E4M3, ``weight_scale`` U8 [out, in/32]: E8M0 biased exponents, one per block of 32
  along the input dim, value = fp8 * 2^(byte - 127) (``MXFP8QTensor``). Activations are quantized dynamically
  the same way (per 32-block E8M0 scale 2^ceil(log2(amax/448)), ModelOpt's ``tensor_quant_mx.cu``), so no
  input_scale is exported.
- NVFP4: ``weight`` U8 [out, in/2], two E2M1 codes per byte, element ``2j`` in the LOW nibble (ModelOpt
  ``NVFP4QTensor.quantize``: ``(q[..., 1::2] << 4) | q[..., 0::2]``); ``weight_scale`` F8_E4M3 [out, in/16];
  ``weight_scale_2`` F32 scalar; ``input_scale`` = amax/(6*448) is the global scale of the *dynamic*
  per-16-element activation quantization.
- INT4 AWQ (W4A16_AWQ): ``weight`` U8 [out/2, in], packed along the OUTPUT dim: row ``2i`` in the low
  nibble, row ``2i+1`` in the high nibble, signed two's-complement int4 in [-8, 7]
  (``quant_utils.pack_int4_in_uint8``); ``weight_scale`` F32 [out, in/group]; ``pre_quant_scale`` F32 [in]
  multiplies the input before the matmul (ModelOpt's ``TensorQuantizer.forward`` applies it to the input,
  so we do too). Modules whose pre_quant_scale was folded into a preceding norm have none.
- W4A8 AWQ: the INT4 AWQ tensors plus ``weight_scale_2`` F32 scalar and ``input_scale`` F32 scalar. The weight
  quantizer is ModelOpt's SequentialQuantizer (INT4 per group, then FP8 per tensor), so the weight is
  ``fp8(int4 * weight_scale / weight_scale_2) * weight_scale_2``; inputs are static per-tensor FP8.
- INT8 (smoothquant / weight-only): ``weight`` I8, ``weight_scale`` F32 [out]; SQ adds ``input_scale``
  (amax/127, static per-tensor, range [-128, 127] since ModelOpt's default is not narrow-range) and
  ``pre_quant_scale``.

Anything else is refused as CHECKPOINT_NOT_SERVABLE naming its format, never served with numbers that are
not the format's: a ModelOpt quant_algo outside :data:`EMULATED_ALGOS`, and every non-ModelOpt
``quantization_config`` (compressed-tensors from llm-compressor, GPTQ, AWQ, ...), which vLLM serves.
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
MXFP8_BLOCK = 32
E8M0_BIAS = 127
FP8_2D_BLOCK = 128  # FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG's block edge (and DeepSeek's weight_block_size)

# ModelOpt quant_algo values (hf_quant_config.json) whose numerics this module reproduces; anything else is refused.
EMULATED_ALGOS = frozenset({
    "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pb_wo", "MXFP8", "NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "W4A16_AWQ",
    "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "W8A16",
})

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


def _block_edge(size: int, blocks: int) -> int:
    """Edge of the square blocks that cut ``size`` into ``blocks`` (the last one padded): 128 when that fits."""
    if -(-size // FP8_2D_BLOCK) == blocks:
        return FP8_2D_BLOCK
    if blocks > 0 and size % blocks == 0:
        return size // blocks
    raise ValueError(f"{blocks} scale blocks do not tile a dimension of {size}")


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight times its scale: scalar, per output channel ([out] or [out, 1]), or a 2-D block grid, given
    as ``[out/b, in/b]`` or in ModelOpt's blocked-amax layout ``[out/b, 1, in/b, 1]`` (fp8_pb_wo export)."""
    w = weight.float()
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.dim() in (1, 2) and s.shape[0] == w.shape[0] and s.numel() == w.shape[0]:  # [out] or [out, 1]
        return w * s.reshape(-1, 1)
    if s.dim() == 4 and s.shape[1] == 1 and s.shape[3] == 1:
        s = s.reshape(s.shape[0], s.shape[2])
    if s.dim() == 2:  # block-wise: [ceil(out/b0), ceil(in/b1)]
        b0 = _block_edge(w.shape[0], s.shape[0])
        b1 = _block_edge(w.shape[1], s.shape[1])
        full = s.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
        return w * full[: w.shape[0], : w.shape[1]]
    raise ValueError(f"unsupported FP8 weight_scale shape {tuple(scale.shape)} for weight {tuple(w.shape)}")


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(amax / 448)) exactly, from the float32 bits (ModelOpt's ``compute_scale_e8m0_NV``), clamped to
    the E8M0 range; 0 where amax is 0, inf or nan (the kernel's scale 1). ``torch.log2`` would round near a
    binade edge; frexp does not: ratio = m * 2^e with m in [0.5, 1), so ceil(log2) is e, or e - 1 when m = 0.5."""
    ratio = amax.float() / FP8_E4M3_MAX
    mantissa, exponent = torch.frexp(ratio)
    exp = torch.where(mantissa == 0.5, exponent - 1, exponent).float()
    exp = exp.clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.where((amax > 0) & torch.isfinite(amax), exp, torch.zeros_like(exp))


def quantize_mxfp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our own MXFP8 quantizer: (float8_e4m3fn values, uint8 E8M0 biased exponents [..., in/32]).

    Written from the format definition (not by calling ModelOpt) so the test can show it reproduces an
    exported checkpoint byte for byte: per block of 32 along the last dim, scale 2^ceil(log2(amax/448)).
    """
    w = weight.float()
    blocks = w.view(*w.shape[:-1], -1, MXFP8_BLOCK)
    exp = e8m0_exponent(blocks.abs().amax(dim=-1))
    scaled = (blocks * torch.exp2(-exp).unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn).view(w.shape), (exp + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MXFP8 weight: fp8 value * 2^(byte - 127), one byte per block of 32 along the input dim."""
    w = weight.float()
    factor = torch.exp2(scale.float() - E8M0_BIAS)
    return (w.view(*w.shape[:-1], -1, MXFP8_BLOCK) * factor.unsqueeze(-1)).view(w.shape)


def fake_quant_mxfp8_activation(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP8 activation quantization (ModelOpt ``fused_amax_convert`` with E4M3 / E8M0): per block of 32
    along the last dim (zero-padded), scale 2^ceil(log2(amax/448)), values rounded to E4M3 (nearest, ties to
    even, saturating), a block of zeros left as it is."""
    shape = x.shape
    xf = x.float().reshape(-1, shape[-1])
    pad = (-shape[-1]) % MXFP8_BLOCK
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.view(xf.shape[0], -1, MXFP8_BLOCK)
    exp = e8m0_exponent(blocks.abs().amax(dim=-1, keepdim=True))
    q = (blocks * torch.exp2(-exp)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    out = (q.float() * torch.exp2(exp)).view(xf.shape)[:, : shape[-1]]
    return out.reshape(shape).to(x.dtype)


def dequantize_w4a8(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """W4A8 AWQ weight: INT4 per group (as INT4 AWQ), then the FP8 per-tensor step of ModelOpt's sequential
    weight quantizer: fp8(int4 * scale / scale_2) * scale_2, saturating at +-448."""
    return fake_quant_fp8(dequantize_int4(packed, scale), scale_2)


# ---------------------------------------------------------------- layer decisions


@dataclass
class QuantizedLinear:
    """What one exported Linear needs at load time: its float weight and its activation emulation."""

    module: str
    fmt: str  # FP8 | FP8_BLOCK | MXFP8 | NVFP4 | INT4 | W4A8 | INT8
    weight: torch.Tensor  # dequantized, float32
    pre_quant_scale: torch.Tensor | None = None
    activation: str | None = None  # fp8 | fp8_per_token | mxfp8 | nvfp4 | int8 | None (weight-only)
    input_scale: torch.Tensor | None = None


def _decode_fp8(module: str, weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None,
                pqs: torch.Tensor | None, expected_shape: tuple[int, int], quant_algo: str | None) -> QuantizedLinear:
    out_f, in_f = expected_shape
    if tuple(weight.shape) != expected_shape:
        raise ValueError(f"{module}: FP8 weight shape {tuple(weight.shape)} != {expected_shape}")
    if scale.dtype == torch.uint8:  # E8M0 exponents: MXFP8, whose activations are always MXFP8 too
        if quant_algo not in (None, "MXFP8"):
            raise ValueError(f"{module}: MXFP8 tensors (E8M0 byte scales) but quant_algo {quant_algo}")
        if tuple(scale.shape) != (out_f, in_f // MXFP8_BLOCK) or in_f % MXFP8_BLOCK:
            raise ValueError(f"{module}: MXFP8 weight_scale {tuple(scale.shape)} does not fit a [{out_f}, {in_f}] "
                             f"linear in blocks of {MXFP8_BLOCK}")
        if input_scale is not None:
            raise ValueError(f"{module}: MXFP8 with a static input_scale is not a ModelOpt format")
        return QuantizedLinear(module, "MXFP8", dequantize_mxfp8(weight, scale), pqs, "mxfp8")
    if not scale.is_floating_point():
        raise ValueError(f"{module}: FP8 weight with a {scale.dtype} weight_scale")
    per_channel = scale.numel() == 1 or (scale.shape[0] == out_f and scale.numel() == out_f)
    fmt = "FP8_BLOCK" if quant_algo == "fp8_pb_wo" or not per_channel else "FP8"
    if input_scale is not None:
        activation: str | None = "fp8"
    elif quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":  # dynamic inputs leave no input_scale behind
        activation = "fp8_per_token"
    elif quant_algo in (None, "fp8_pb_wo", "MIXED_PRECISION"):
        activation = None
    else:  # FP8 declares static activations: an export without their scale would be served as weight-only
        raise ValueError(f"{module}: {quant_algo} weight without the input_scale of its FP8 activations")
    return QuantizedLinear(module, fmt, dequantize_fp8(weight, scale), pqs, activation, input_scale)


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
        return _decode_fp8(module, weight, scale, input_scale, pqs, expected_shape, quant_algo)
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
        if scale_2 is None and input_scale is None:
            return QuantizedLinear(module, "INT4", dequantize_int4(weight, scale), pqs)
        if scale_2 is None or input_scale is None or scale_2.numel() != 1 or input_scale.numel() != 1:
            raise ValueError(f"{module}: INT4 weight with activation quantization needs a scalar weight_scale_2 and "
                             "input_scale (W4A8 AWQ)")
        return QuantizedLinear(module, "W4A8", dequantize_w4a8(weight, scale, scale_2), pqs, "fp8", input_scale)
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
        elif kind == "mxfp8":
            x = fake_quant_mxfp8_activation(x)
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
    layers: dict[str, str] = field(default_factory=dict)  # module -> QuantizedLinear.fmt (+ "/a:<activations>")
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


def check_emulated(config: dict[str, Any], quant_algo: str | None, layer_algos: dict[str, str]) -> None:
    """Refuse, naming it, a format whose numerics this module does not reproduce (pure: parsed JSON in).

    Serving it anyway would score a model that is not the one the checkpoint describes: a compressed-tensors
    W8A8 loaded as weights alone skips its per-token activation quantization, and W4A8_NVFP4_FP8 has NVFP4's
    tensors but FP8 activations. vLLM serves those (``--day0-serve vllm``).
    """
    qc = config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if isinstance(qc, dict) and method != "modelopt":
        fmt = qc.get("format")
        name = f"{method or 'unknown'}" + (f" ({fmt})" if isinstance(fmt, str) and fmt else "")
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE,
                        f"{name} checkpoint: the reference server emulates ModelOpt exports only; serve it with "
                        "--day0-serve vllm")
    algos = set(layer_algos.values()) if quant_algo == "MIXED_PRECISION" else {quant_algo} - {None}
    unknown = sorted(str(a) for a in algos if a not in EMULATED_ALGOS)
    if unknown:
        raise Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE,
                        f"ModelOpt quant_algo {', '.join(unknown)} is not emulated by the reference server (it "
                        f"emulates {', '.join(sorted(EMULATED_ALGOS))}); serve it with --day0-serve vllm")


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
    raw_config = json.loads(config_path.read_text())
    quant_algo, layer_algos = _quant_algo(checkpoint, raw_config)
    check_emulated(raw_config, quant_algo, layer_algos)  # before reading any tensor
    tensors = _read_tensors(checkpoint)  # before importing transformers: a bad directory fails in a second

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
