"""The reference engine computes what the ModelOpt-quantized model computes.

A tiny random Llama (hidden 128, intermediate 384, 2 layers, vocab 128, seeded, float32) is calibrated and
quantized with real ModelOpt on CPU, exported with ``export_hf_checkpoint``, and loaded back through
``dequant.load_checkpoint``. For FP8, INT4-AWQ and INT8-SmoothQuant the in-memory fake-quant model is the
reference: logits must agree to ``LOGIT_ATOL``. For NVFP4, whose fake-quant forward needs CUDA, the format is
proven instead: our own quantizer reproduces the exported bytes and block scales exactly, and the
dequantization error stays within what the E2M1 grid and the FP8 block scale allow.

Why float32 and not bf16: the test isolates the *format* from arithmetic precision. With a float32 model the
export stores the non-quantized tensors in float32 too, so the only residual is float32 reassociation
(x / input_scale vs x * (448 / amax), the pre_quant_scale applied in a hook, the weight dequantized once vs on
every forward): measured max |diff| 1.2e-6 (fp8), 2.7e-6 (fp8 per-channel/per-token), 4.2e-6 (int4_awq),
1.4e-6 (int8_smoothquant) on logits of magnitude about 5, i.e. under 1e-6 relative. LOGIT_ATOL = 1e-4 leaves
>20x headroom and is still about four orders of magnitude below the quantization effect itself (0.7 to 2.5,
asserted > 100x ATOL). With a bf16 model the reference's own bf16 activations differ from our float32 ones and
flip FP8 activation codes: 0.72 (fp8) / 0.25 (int4_awq) max |diff| measured, which is arithmetic noise of the
reference, not of the format.

Why the reference is taken *after* ``requantize_resmooth_fused_llm_layers``: export first resmooths layers that
share an input (q/k/v, gate/up get one averaged AWQ pre_quant_scale, folded into the preceding RMSNorm, and
are re-quantized), so the exported INT4-AWQ checkpoint is a slightly different quantization than the
calibrated in-memory model (measured max |diff| 1.6 on these logits, comparable to the quantization error
itself). That is ModelOpt's export, not our loader; we compare against the model the checkpoint describes.

NVFP4 on a GPU (one-off check on an H100, ModelOpt 0.47's CUDA/triton fake quant, same tiny model, float32):
our activation quantizer was bit-identical to ``fp4_fake_quant_block``, dequantized weights equal to the
weight fake quant (diff 0.0), and logits within 1.9e-6 (NVFP4) / 7.6e-6 (W4A16_NVFP4) of the fake-quant forward.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.serving import dequant

mtq = pytest.importorskip("modelopt.torch.quantization")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer"
LOGIT_ATOL = 1e-4
LINEARS_PER_LAYER = 7  # q k v o gate up down
N_LAYERS = 2


def tiny_llama(dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
        architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def copy_tokenizer(dst: Path) -> None:
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def base_model() -> Any:
    return tiny_llama()


@pytest.fixture(scope="module")
def eval_ids() -> torch.Tensor:
    return torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def _calibrate(model: Any, cfg_name: str) -> Any:
    calib = torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(2))

    def forward_loop(m: Any) -> None:
        for i in range(0, len(calib), 4):
            m(calib[i: i + 4])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtq.quantize(copy.deepcopy(model), getattr(mtq, cfg_name), forward_loop)


def _export(model: Any, out: Path) -> Path:
    from modelopt.torch.export import export_hf_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=out)
    copy_tokenizer(out)
    return out


@dataclass
class FakeQuantCase:
    ckpt: Path
    reference: torch.Tensor  # fake-quant logits of the model the checkpoint describes
    calibrated: torch.Tensor  # fake-quant logits before export's resmoothing
    unquantized: torch.Tensor


CASES = {  # recipe -> (mtq config, quant_algo in hf_quant_config.json, layer format as dequant reports it)
    "fp8": ("FP8_DEFAULT_CFG", "FP8", "FP8/a:fp8"),
    "fp8_per_channel_per_token": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", "FP8/a:fp8_per_token"),
    "int4_awq": ("INT4_AWQ_CFG", "W4A16_AWQ", "INT4"),
    "int8_smoothquant": ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", "INT8/a:int8"),
}


@pytest.fixture(scope="module")
def fake_quant_cases(base_model: Any, eval_ids: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, FakeQuantCase]:
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    cases: dict[str, FakeQuantCase] = {}
    with torch.no_grad():
        unquantized = base_model(eval_ids).logits.float()
    for recipe, (cfg_name, _, _) in CASES.items():
        quantized = _calibrate(base_model, cfg_name)
        with torch.no_grad():
            calibrated = quantized(eval_ids).logits.float()
            reference_model = copy.deepcopy(quantized)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                requantize_resmooth_fused_llm_layers(reference_model)  # what export does before packing
            reference = reference_model(eval_ids).logits.float()
        ckpt = _export(quantized, tmp_path_factory.mktemp(recipe))
        cases[recipe] = FakeQuantCase(ckpt, reference, calibrated, unquantized)
    return cases


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_emulated_logits_match_modelopt_fake_quant(
    recipe: str, fake_quant_cases: dict[str, FakeQuantCase], eval_ids: torch.Tensor, record_property: Any
) -> None:
    case = fake_quant_cases[recipe]
    _, algo, layer_format = CASES[recipe]
    loaded = dequant.load_checkpoint(case.ckpt)
    assert loaded.quant_algo == algo
    assert len(loaded.layers) == LINEARS_PER_LAYER * N_LAYERS
    assert set(loaded.layers.values()) == {layer_format}
    with torch.no_grad():
        ours = loaded.model(eval_ids).logits.float()

    max_abs = (ours - case.reference).abs().max().item()
    scale = case.reference.abs().max().item()
    quant_effect = (case.reference - case.unquantized).abs().max().item()
    record_property("max_abs_logit_diff", max_abs)
    record_property("logit_absmax", scale)
    record_property("quantization_effect", quant_effect)
    record_property("export_resmooth_effect", (case.reference - case.calibrated).abs().max().item())
    assert max_abs <= LOGIT_ATOL, f"{recipe}: max |logit diff| {max_abs:.3g} (logits up to {scale:.3g})"
    assert torch.equal(ours.argmax(-1), case.reference.argmax(-1))
    # the emulation must be of the *quantized* model: the quantization effect dwarfs our residual
    assert quant_effect > 100 * LOGIT_ATOL
    assert (ours - case.unquantized).abs().max().item() > 100 * LOGIT_ATOL


def test_unquantized_bf16_matches_transformers(tmp_path: Path) -> None:
    """A plain bf16 checkpoint: our loader must be transformers' own loader, upcast to float32."""
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path)
    copy_tokenizer(tmp_path)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    loaded = dequant.load_checkpoint(tmp_path)
    assert loaded.quant_algo is None and loaded.layers == {}
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = loaded.model(ids).logits
        theirs = reference(ids).logits
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() == 0.0


def test_int4_packing_matches_modelopt_packer() -> None:
    """Our unpacker inverts ModelOpt's own packer (row pairs along the output dim, signed nibbles)."""
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    ints = torch.randint(-8, 8, (6, 256), generator=torch.Generator().manual_seed(4)).float()
    scale = torch.rand(6, 2, generator=torch.Generator().manual_seed(5)) + 0.5
    weight = ints * scale.repeat_interleave(128, dim=1)
    packed = pack_int4_in_uint8(weight, scale, 128)
    assert packed.shape == (3, 256) and packed.dtype == torch.uint8
    assert torch.equal(dequant.unpack_int4(packed).float(), ints)
    assert torch.equal(dequant.dequantize_int4(packed, scale), weight)


# ---------------------------------------------------------------- NVFP4: prove the format


@dataclass
class Nvfp4Case:
    ckpt: Path
    originals: dict[str, torch.Tensor]  # module -> float32 weight before export
    tensors: dict[str, torch.Tensor]


FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                ("self_attn.o_proj",), ("mlp.down_proj",))


@pytest.fixture(scope="module")
def nvfp4(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Nvfp4Case:
    quantized = _calibrate(base_model, "NVFP4_DEFAULT_CFG")
    originals = {name: module.weight.detach().clone().float() for name, module in quantized.named_modules()
                 if ".layers." in name and hasattr(module, "weight_quantizer")}
    ckpt = _export(quantized, tmp_path_factory.mktemp("nvfp4"))
    return Nvfp4Case(ckpt, originals, dequant._read_tensors(ckpt))


def test_nvfp4_global_scale_is_group_amax(nvfp4: Nvfp4Case) -> None:
    """weight_scale_2 = amax / (6 * 448), the amax shared by the linears export fuses (q/k/v, gate/up)."""
    for layer in range(N_LAYERS):
        for group in FUSED_GROUPS:
            names = [f"model.layers.{layer}.{g}" for g in group]
            amax = max(nvfp4.originals[n].abs().max() for n in names)
            for n in names:
                assert torch.equal(nvfp4.tensors[f"{n}.weight_scale_2"], amax / (6.0 * 448.0)), n


def test_nvfp4_requantization_reproduces_exported_bytes(nvfp4: Nvfp4Case) -> None:
    assert len(nvfp4.originals) == LINEARS_PER_LAYER * N_LAYERS
    for name, weight in nvfp4.originals.items():
        packed, block_scale = dequant.quantize_nvfp4(weight, nvfp4.tensors[f"{name}.weight_scale_2"])
        exported = nvfp4.tensors[f"{name}.weight"]
        exported_scale = nvfp4.tensors[f"{name}.weight_scale"]
        assert exported.dtype == torch.uint8 and exported_scale.dtype == torch.float8_e4m3fn
        assert torch.equal(packed, exported), f"{name}: packed E2M1 bytes differ"
        assert torch.equal(block_scale.view(torch.uint8), exported_scale.view(torch.uint8)), f"{name}: block scales"


def test_nvfp4_dequantization_error_within_format_bound(nvfp4: Nvfp4Case, record_property: Any) -> None:
    """|w - dq(w)| <= half the largest E2M1 step (2 -> 1.0) times the block's scale; dq(w)/scale is on the grid."""
    grid = set(dequant.E2M1_VALUES.tolist())
    worst = 0.0
    for name, weight in nvfp4.originals.items():
        packed = nvfp4.tensors[f"{name}.weight"]
        block_scale = nvfp4.tensors[f"{name}.weight_scale"].float() * nvfp4.tensors[f"{name}.weight_scale_2"]
        restored = dequant.dequantize_nvfp4(packed, nvfp4.tensors[f"{name}.weight_scale"],
                                            nvfp4.tensors[f"{name}.weight_scale_2"])
        err = (weight - restored).abs().view(weight.shape[0], -1, 16).amax(-1)
        ratio = (err / block_scale).max().item()
        worst = max(worst, ratio)
        assert ratio <= 1.0 + 1e-6, f"{name}: error {ratio:.3f} block scales"
        on_grid = restored.view(weight.shape[0], -1, 16) / block_scale.unsqueeze(-1)  # float32 division: ~1 ulp
        snapped = dequant.E2M1_VALUES[dequant.e2m1_codes(on_grid).long()]
        assert torch.allclose(on_grid, snapped, rtol=1e-6, atol=0), f"{name}: dequantized values off the E2M1 grid"
        assert set(snapped.flatten().tolist()) <= grid
    record_property("nvfp4_worst_error_in_block_scales", worst)
    assert worst > 0.25  # a real quantization happened: errors are a sizeable part of a step


def test_nvfp4_checkpoint_loads_with_activation_emulation(nvfp4: Nvfp4Case, eval_ids: torch.Tensor) -> None:
    loaded = dequant.load_checkpoint(nvfp4.ckpt)
    assert loaded.quant_algo == "NVFP4"
    assert set(loaded.layers.values()) == {"NVFP4/a:nvfp4"}
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    t = nvfp4.tensors
    p = "model.layers.0.self_attn.q_proj"
    assert torch.equal(q_proj.weight, dequant.dequantize_nvfp4(t[f"{p}.weight"], t[f"{p}.weight_scale"],
                                                               t[f"{p}.weight_scale_2"]))
    # the pre-hook quantizes the input: the Linear's output is weight @ fake_quant(x), not weight @ x
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    expected = dequant.fake_quant_nvfp4_activation(x, t[f"{p}.input_scale"]) @ q_proj.weight.T
    with torch.no_grad():
        assert torch.equal(q_proj(x), expected)
        assert not torch.equal(q_proj(x), x @ q_proj.weight.T)
        logits = loaded.model(eval_ids).logits
    assert torch.isfinite(logits).all()


def _modelopt_fp4_round_magnitude(a: torch.Tensor) -> torch.Tensor:
    """ModelOpt's triton ``fp4_round_magnitude`` transcribed literally (an independent formulation)."""
    w = torch.where
    return w(a <= 0.25, 0.0, w(a < 0.75, 0.5, w(a <= 1.25, 1.0, w(a < 1.75, 1.5, w(a <= 2.5, 2.0, w(
        a < 3.5, 3.0, w(a <= 5.0, 4.0, 6.0)))))))


def test_nvfp4_activation_quantizer_matches_modelopt_kernel_math() -> None:
    """Our dynamic activation quantizer vs ModelOpt's ``fp4_fake_quant_block`` arithmetic, step by step."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 1, 64)  # blocks across many magnitudes
    x[0, :16] = 0.0  # an all-zero block
    x[1, 16:32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 2) / 6 * 7  # ties, saturation
    global_amax = x.abs().max() * 0.8  # calibrated on other data: some blocks exceed it
    gs = global_amax / (6.0 * 448.0)
    ours = dequant.fake_quant_nvfp4_activation(x, gs)

    blocks = x.view(8, -1, 16)
    block_max = blocks.abs().amax(-1, keepdim=True)
    scale = torch.clamp(block_max / (6.0 * gs), max=448.0).to(torch.float8_e4m3fn).float() * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    q = _modelopt_fp4_round_magnitude(blocks.abs() / scale) * scale
    theirs = torch.where(blocks >= 0, q, -q).view(8, 64)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[0, :16], torch.zeros(16))
    # and it is a quantizer: idempotent under the same global scale
    assert torch.equal(dequant.fake_quant_nvfp4_activation(ours, gs), ours)


def test_unservable_checkpoint_is_classified(nvfp4: Nvfp4Case, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(nvfp4.ckpt, broken)
    tensors = dict(nvfp4.tensors)
    del tensors["model.layers.1.mlp.up_proj.weight_scale_2"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(Day0Error) as err:
        dequant.load_checkpoint(broken)
    assert err.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE
    assert "up_proj" in str(err.value) and "\n" not in str(err.value)

    (broken / "config.json").unlink()
    with pytest.raises(Day0Error) as err:
        dequant.load_checkpoint(broken)
    assert err.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


# ---------------------------------------------------------------- MXFP8 and FP8 2-D blocks: the layouts


def test_e8m0_exponent_is_exact_ceil_log2() -> None:
    """ceil(log2(amax / 448)) from the float32 ratio's bits, as ModelOpt's CUDA kernel (``compute_scale_e8m0_NV``)
    computes it; ModelOpt's Python ``MXFP8QTensor`` (torch.log2 + ceil) agrees except just above a power of two,
    where the float32 log2 rounds down onto the integer (e.g. 2^-20 * (1 + 2^-23): exact answer -19, log2 -20)."""
    import math

    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    gen = torch.Generator().manual_seed(11)
    amax = torch.rand(4096, generator=gen) * torch.logspace(-8, 4, 4096)
    edges = torch.tensor([448.0 * 2.0**k for k in range(-20, 8)])
    amax = torch.cat([amax, edges, edges * (1 + 2**-23), edges * (1 - 2**-24), torch.zeros(1)])
    ours = dequant.e8m0_exponent(amax)
    ratio = (amax / dequant.FP8_E4M3_MAX).tolist()  # the float32 quotient, as the kernel divides
    exact = [0.0 if r == 0 else float(math.frexp(r)[1] - (1 if math.frexp(r)[0] == 0.5 else 0)) for r in ratio]
    assert ours.tolist() == exact
    theirs = MXFP8QTensor._compute_e8m0_exponent(amax)
    assert torch.equal(ours[:4096], theirs[:4096])  # generic values: ModelOpt's Python rule is the same rule
    just_above = slice(4096 + len(edges), 4096 + 2 * len(edges))
    assert (theirs[just_above] < ours[just_above]).any()  # ... and rounds down just above a power of two
    assert ours[-1] == 0.0  # an all-zero block keeps scale 1 (the kernel's)


def test_mxfp8_activation_quantizer_matches_modelopt_qtensor() -> None:
    """Our dynamic activation quantizer vs ModelOpt's own MXFP8 quantize-dequantize on CPU, with a zero block and
    a last dim that is not a multiple of 32 (both pad with zeros)."""
    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 72, generator=gen) * torch.logspace(-4, 3, 72)
    x[0, :32] = 0.0
    qtensor, scale = MXFP8QTensor.quantize(x)
    theirs = qtensor.dequantize(dtype=torch.float32, scale=scale)
    ours = dequant.fake_quant_mxfp8_activation(x)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[0, :32], torch.zeros(32))
    assert not torch.equal(ours, x)  # it quantized
    assert torch.equal(dequant.fake_quant_mxfp8_activation(ours), ours)  # and is idempotent
    values, exponents = dequant.quantize_mxfp8(x[:, :64])
    assert torch.equal(dequant.dequantize_mxfp8(values, exponents), theirs[:, :64])


@pytest.mark.parametrize("shape", [(256, 384), (200, 384), (128, 128)])
def test_fp8_blockwise_scale_layouts_match_modelopt_dequantize(shape: tuple[int, int]) -> None:
    """fp8_pb_wo exports the block amax / 448 in its blocked layout [out/128, 1, in/128, 1] (a scalar for one
    block); our reading of it equals ModelOpt's FP8QTensor.dequantize over 128x128 blocks, padding included."""
    from modelopt.torch.quantization.qtensor import FP8QTensor
    from modelopt.torch.quantization.utils import reduce_block_amax, reduce_block_padding

    blocks = {-1: 128, -2: 128}
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(13)) * 0.05
    amax = reduce_block_amax(reduce_block_padding(weight, blocks), blocks)
    scale = amax / 448.0
    qtensor, used = FP8QTensor.quantize(weight, scale, block_sizes=blocks)
    theirs = qtensor.dequantize(dtype=torch.float32, scale=used, block_sizes=blocks)
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    blocked = scale.reshape(rows, 1, cols, 1)
    exported = blocked.squeeze() if blocked.numel() == 1 else blocked
    assert torch.equal(dequant.dequantize_fp8(qtensor._quantized_data, exported), theirs)
    assert torch.equal(dequant.dequantize_fp8(qtensor._quantized_data, scale.reshape(rows, cols)), theirs)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="ModelOpt 0.47's NVFP4 fake-quant forward needs CUDA: runs where a GPU is present")
@pytest.mark.parametrize("cfg_name", ["NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG", "NVFP4_AWQ_LITE_CFG"])
def test_nvfp4_emulation_matches_modelopt_fake_quant_on_cuda(
    cfg_name: str, base_model: Any, eval_ids: torch.Tensor, tmp_path: Path, record_property: Any
) -> None:
    """On a GPU, the CPU emulation of an exported NVFP4 checkpoint equals ModelOpt's own CUDA fake-quant forward."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    calib = torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(2)).cuda()

    def forward_loop(m: Any) -> None:
        for i in range(0, len(calib), 4):
            m(calib[i: i + 4])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = mtq.quantize(copy.deepcopy(base_model).cuda(), getattr(mtq, cfg_name), forward_loop)
        with torch.no_grad():
            unquantized = base_model(eval_ids).logits.float()
            reference_model = copy.deepcopy(quantized)
            requantize_resmooth_fused_llm_layers(reference_model)
            reference = reference_model(eval_ids.cuda()).logits.float().cpu()
    ckpt = _export(quantized, tmp_path / "nvfp4")
    with torch.no_grad():
        ours = dequant.load_checkpoint(ckpt).model(eval_ids).logits.float()
    max_abs = (ours - reference).abs().max().item()
    record_property("max_abs_logit_diff", max_abs)
    print(f"{cfg_name}: max |logit diff| vs ModelOpt CUDA fake quant = {max_abs:.3g}")
    assert max_abs <= LOGIT_ATOL
    assert (reference - unquantized).abs().max().item() > 100 * LOGIT_ATOL
