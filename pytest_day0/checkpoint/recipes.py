"""Recipes: ModelOpt qformat names (as hf_ptq.py spells them) -> mtq config, precision bucket, expected coverage.

ModelOpt PR #2182 renamed several qformats and removed the old names; users' scripts still say the old
ones, so both resolve here to one canonical recipe. The expected-coverage scope is what the PTQ gate
checks the exported checkpoint against ("all linear", "MLP only", ...), after ModelOpt's default
exclusions (lm_head, routers, embeddings, vision towers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pytest_day0.failures import Day0Error, FailureClass


class Precision(StrEnum):
    FP8 = "FP8"
    NVFP4 = "NVFP4"
    MXFP8 = "MXFP8"
    MXFP4 = "MXFP4"
    INT4 = "INT4"
    INT8 = "INT8"
    BF16 = "BF16"
    FP16 = "FP16"
    FP32 = "FP32"

    @property
    def quantized(self) -> bool:
        return self not in {Precision.BF16, Precision.FP16, Precision.FP32}


class Scope(StrEnum):
    ALL_LINEAR = "all_linear"
    MLP = "mlp"  # MLP linears, experts included
    EXPERTS = "experts"  # MoE expert linears only
    MLP_AND_O_PROJ = "mlp_and_o_proj"


@dataclass(frozen=True)
class Recipe:
    name: str  # canonical, as current hf_ptq.py spells it
    mtq_config: str  # attribute of modelopt.torch.quantization
    precision: Precision  # the bucket quantized layers must land in
    scope: Scope
    weight_bits: float  # for SIZE_NOT_REDUCED waivers: a source already this small cannot shrink
    quantizes_activations: bool
    engines: tuple[str, ...] = ("modelopt",)  # quantize engines that make it (``existing`` gates any recipe)
    scheme: str = ""  # llm-compressor preset scheme name, for recipes that engine makes
    # Calibration needs a CUDA device (ModelOpt 0.47: AWQ's search runs the NVFP4 fake-quant forward, whose
    # kernels are CUDA/triton only). A local executor without one refuses the recipe before any work.
    needs_cuda: bool = False


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp8", "FP8_DEFAULT_CFG", Precision.FP8, Scope.ALL_LINEAR, 8, True),
        Recipe(
            "fp8_per_channel_per_token", "FP8_PER_CHANNEL_PER_TOKEN_CFG", Precision.FP8, Scope.ALL_LINEAR, 8, True
        ),
        Recipe(
            "fp8_2d_blockwise_weight_only", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", Precision.FP8, Scope.ALL_LINEAR, 8,
            False,
        ),
        Recipe("mxfp8", "MXFP8_DEFAULT_CFG", Precision.MXFP8, Scope.ALL_LINEAR, 8, True),
        Recipe("nvfp4", "NVFP4_DEFAULT_CFG", Precision.NVFP4, Scope.ALL_LINEAR, 4, True),
        Recipe("nvfp4_mlp_only", "NVFP4_MLP_ONLY_CFG", Precision.NVFP4, Scope.MLP, 4, True),
        Recipe("nvfp4_experts_only", "NVFP4_EXPERTS_ONLY_CFG", Precision.NVFP4, Scope.EXPERTS, 4, True),
        Recipe("nvfp4_omlp_only", "NVFP4_OMLP_ONLY_CFG", Precision.NVFP4, Scope.MLP_AND_O_PROJ, 4, True),
        Recipe("nvfp4_awq_lite", "NVFP4_AWQ_LITE_CFG", Precision.NVFP4, Scope.ALL_LINEAR, 4, True, needs_cuda=True),
        Recipe("w4a16_nvfp4", "W4A16_NVFP4_CFG", Precision.NVFP4, Scope.ALL_LINEAR, 4, False),
        Recipe("int4_awq", "INT4_AWQ_CFG", Precision.INT4, Scope.ALL_LINEAR, 4, False),
        Recipe("w4a8_awq_beta", "W4A8_AWQ_BETA_CFG", Precision.INT4, Scope.ALL_LINEAR, 4, True),
        Recipe("int8_smoothquant", "INT8_SMOOTHQUANT_CFG", Precision.INT8, Scope.ALL_LINEAR, 8, True),
        Recipe("int8_wo", "INT8_WEIGHT_ONLY_CFG", Precision.INT8, Scope.ALL_LINEAR, 8, False),
        # llm-compressor presets, saved as compressed-tensors (lm_head left in 16 bits, as ModelOpt does).
        Recipe("w8a8", "", Precision.INT8, Scope.ALL_LINEAR, 8, True, ("llmcompressor",), "W8A8"),
        Recipe("w4a16", "", Precision.INT4, Scope.ALL_LINEAR, 4, False, ("llmcompressor",), "W4A16"),
        Recipe("w8a16", "", Precision.INT8, Scope.ALL_LINEAR, 8, False, ("llmcompressor",), "W8A16"),
        Recipe("fp8_dynamic", "", Precision.FP8, Scope.ALL_LINEAR, 8, True, ("llmcompressor",), "FP8_DYNAMIC"),
    )
}

# Old qformat names (removed upstream by ModelOpt PR #2182) -> canonical.
ALIASES: dict[str, str] = {
    "int8_sq": "int8_smoothquant",
    "w4a8_awq": "w4a8_awq_beta",
    "nvfp4_awq": "nvfp4_awq_lite",
    "fp8_pb_wo": "fp8_2d_blockwise_weight_only",
    "fp8_pc_pt": "fp8_per_channel_per_token",
}


def resolve_recipe(name: str) -> Recipe:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in RECIPES:
        known = ", ".join(sorted(RECIPES)) + "; aliases: " + ", ".join(sorted(ALIASES))
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"unknown recipe {name!r}; known: {known}")
    return RECIPES[key]


# Module-name shapes ModelOpt leaves unquantized by default (hf_ptq.py's disabled quantizers).
DEFAULT_EXCLUDED = re.compile(
    r"(^|\.)(lm_head|output_layer|embed_tokens|wte|router|gate|shared_expert_gate|mtp|vision_tower|visual|"
    r"vision_model|multi_modal_projector)(\.|$)"
)
_EXPERT = re.compile(r"(^|\.)(experts|block_sparse_moe\.experts)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|block_sparse_moe|ffn)\.")
_O_PROJ = re.compile(r"(^|\.)(o_proj|dense|out_proj)$")


def expected_in_scope(module: str, scope: Scope) -> bool:
    """Should a linear called ``module`` be quantized under ``scope``? Default exclusions come first."""
    if DEFAULT_EXCLUDED.search(module):
        return False
    if scope is Scope.ALL_LINEAR:
        return True
    if scope is Scope.EXPERTS:
        return bool(_EXPERT.search(module))
    if scope is Scope.MLP:
        return bool(_MLP.search(module) or _EXPERT.search(module))
    return bool(_MLP.search(module) or _EXPERT.search(module) or _O_PROJ.search(module))
