"""Every recipe the README lists is made, inspected, served and proven (issue 11, part 1): one row per recipe.

The rows come from the README's "Recipes" table, and that table must name exactly the recipes of
``checkpoint/recipes.py``, so a recipe added to either without a proof here fails a row. Each row runs the proof
named in the table's "proof" column (:data:`PROOFS`):

- ``fake-quant logits``: real ModelOpt PTQ of the demo on CPU through the quantize stage's own
  ``load_for_calibration`` + ``modelopt_quantize``, ``export_hf_checkpoint`` twice (bf16 as the stage exports it:
  inspected, PTQ gate, size; float32: the numerics), the float32 export loaded by the reference server's loader,
  and its logits compared with ModelOpt's in-memory fake-quant model (after export's resmoothing, see
  ``test_dequant_numerics.py``): max |diff| <= 1e-4, same argmax, and the quantization effect > 100x that.
  Where the two quantize a weight or an activation to different grid points, that value must sit on the
  rounding boundary between them (ModelOpt's export and fake quant round exact ties of the bf16 demo
  differently; float32 noise decides boundary cases between two forwards), and only there the reference takes
  the served side (:func:`_tie_aligned_reference`).
- ``round trip``: where ModelOpt's fake-quant forward needs CUDA (NVFP4), our own quantizer, written from the
  format, re-quantizes the in-memory weights into exactly the exported bytes and scales, and the dequantized
  weights stay within the format's error bound.
- ``round trip + ModelOpt MXFP8QTensor logits``: MXFP8's fake quant is a CUDA kernel too; besides the round trip,
  the logits are compared with ModelOpt's in-memory model whose MX quantizers run ModelOpt's own CPU
  implementation of the same rule (``MXFP8QTensor``, registered as a quant backend).
- ``MODEL_UNSUPPORTED``: the recipe matches no module of the dense demo (nvfp4_experts_only: it has no experts).
- ``USER_CONFIG_ERROR without CUDA``: the calibration needs CUDA (nvfp4_awq_lite); without a CUDA device the
  configuration refuses it before any work, a remote executor is let through, and on a GPU machine
  ``test_nvfp4_emulation_matches_modelopt_fake_quant_on_cuda`` proves the numerics.
- ``CHECKPOINT_NOT_SERVABLE on reference``: llm-compressor's compressed-tensors schemes; the reference server
  refuses them by name and the configuration asks for ``--day0-serve vllm`` (vLLM's CPU build serving them is
  ``tests/test_real_engines.py``).

Measurements go to the JUnit properties of each row (size ratio, max |logit diff|, round-trip error).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.checkpoint.inspect import inspect_checkpoint
from pytest_day0.checkpoint.recipes import ALIASES, RECIPES, Recipe, expected_in_scope, resolve_recipe
from pytest_day0.config import build_config
from pytest_day0.failures import Day0Error, FailureClass

torch = pytest.importorskip("torch")
mtq = pytest.importorskip("modelopt.torch.quantization")

pytestmark = pytest.mark.filterwarnings("ignore")
pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LOGIT_ATOL = 1e-4  # as test_dequant_numerics.py (float32 reassociation is ~1e-6; quantization effects ~0.1-3)
CALIB_SIZE = 16  # calibration batches: the stage's default is 64; 16 keeps each PTQ to a second or two
CALIB_SEQ = 64
DEMO_LINEARS = 4 * 7  # 4 decoder layers x (q, k, v, o, gate, up, down)


# ---------------------------------------------------------------- the README's table


def readme_recipe_table(text: str) -> dict[str, dict[str, str]]:
    """recipe -> {column: cell} from the README's "## Recipes" section (empty if the section is gone)."""
    if "\n## Recipes\n" not in text:
        return {}
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    header = next((ln for ln in lines if ln.startswith("| recipe |")), None)
    if header is None:
        return {}
    columns = [c.strip() for c in header.strip().strip("|").split("|")]
    table: dict[str, dict[str, str]] = {}
    for line in lines:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            table[cells[0].strip("`")] = dict(zip(columns, cells, strict=True))
    return table


README_TABLE = readme_recipe_table(README.read_text())


def test_readme_recipe_table_is_the_recipe_table() -> None:
    """The README lists every recipe and alias the code resolves, and nothing else."""
    assert README_TABLE, "README.md has no '## Recipes' table"
    assert set(README_TABLE) == set(RECIPES), (set(README_TABLE) ^ set(RECIPES))
    for name, row in README_TABLE.items():
        made_by = set(re.findall(r"`([a-z_]+)`", row["made by"]))
        assert made_by == set(RECIPES[name].engines), (name, row["made by"])
    section = " ".join(README.read_text().split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0].split())
    for alias, canonical in ALIASES.items():
        assert f"`{alias}` → `{canonical}`" in section, f"README's alias list lacks {alias} -> {canonical}"


# ---------------------------------------------------------------- PTQ of the demo, once per recipe per session


@dataclass
class DemoPtq:
    recipe: Recipe
    ckpt16: Path  # exported in bf16, as the quantize stage exports
    ckpt32: Path  # exported in float32: isolates the format from arithmetic precision
    originals: dict[str, Any]  # quantized linear -> its float32 weight in the model the checkpoint describes
    reference_model: Any  # ModelOpt's in-memory fake-quant model, after export's resmoothing
    unquantized: Any  # logits of the demo before PTQ


@dataclass
class DemoPtqCache:
    root: Path
    base: Any
    batches: list[Any]
    eval_ids: Any
    done: dict[str, DemoPtq] = field(default_factory=dict)

    def get(self, name: str) -> DemoPtq:
        if name not in self.done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the stage does for small models: threads only contend on 2 cores
            try:
                self.done[name] = self._run(resolve_recipe(name))
            finally:
                torch.set_num_threads(threads)
        return self.done[name]

    def _run(self, recipe: Recipe) -> DemoPtq:
        from modelopt.torch.export import export_hf_checkpoint
        from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

        from pytest_day0.stages.quantize import copy_tokenizer_files, modelopt_quantize
        from pytest_day0.stages.source import DEMO_MODEL_DIR

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = modelopt_quantize(copy.deepcopy(self.base), recipe, self.batches)
            reference = copy.deepcopy(quantized)
            requantize_resmooth_fused_llm_layers(reference)  # what export does before packing
            originals = {name: m.weight.detach().clone().float() for name, m in reference.named_modules()
                         if _quantized_linear(m)}
            out: dict[Any, Path] = {}
            for dtype in (torch.bfloat16, torch.float32):
                path = self.root / f"{recipe.name}-{str(dtype).removeprefix('torch.')}"
                export_hf_checkpoint(copy.deepcopy(quantized), dtype=dtype, export_dir=str(path))
                copy_tokenizer_files(DEMO_MODEL_DIR, path)
                out[dtype] = path
        with torch.no_grad():
            unquantized = self.base(self.eval_ids).logits.float()
        return DemoPtq(recipe, out[torch.bfloat16], out[torch.float32], originals, reference, unquantized)


def _quantized_linear(module: Any) -> bool:
    quantizer = getattr(module, "weight_quantizer", None)
    return isinstance(module, torch.nn.Linear) and quantizer is not None and bool(quantizer.is_enabled)


@pytest.fixture(scope="session")
def demo_ptq(tmp_path_factory: pytest.TempPathFactory) -> DemoPtqCache:
    from pytest_day0.stages.quantize import load_for_calibration
    from pytest_day0.stages.source import CALIBRATION_TEXT, DEMO_MODEL_DIR

    base, batches = load_for_calibration(DEMO_MODEL_DIR, torch.float32, CALIBRATION_TEXT.read_text(), CALIB_SIZE,
                                         CALIB_SEQ)
    base.eval()
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    prompts = [json.loads(line)["prompt"] for name in ("arc_like", "gsm_like", "tau_like")
               for line in (DEMO_MODEL_DIR.parent / "tasks" / f"{name}.jsonl").read_text().splitlines()[:8]]
    ids = tokenizer("".join(prompts), return_tensors="pt").input_ids[0]
    eval_ids = ids[: 2 * 48].view(2, 48)  # task text, not random tokens: activations as serving sees them
    return DemoPtqCache(tmp_path_factory.mktemp("recipe-matrix"), base, batches, eval_ids)


# ---------------------------------------------------------------- what every made checkpoint must show


def _inspect_and_gate(ptq: DemoPtq, record: Callable[[str, object], None]) -> set[str]:
    """Header inspection + the PTQ gate on the bf16 export; returns the modules it quantized."""
    from pytest_day0.gates.ptq import evaluate_ptq
    from pytest_day0.stages.source import DEMO_MODEL_DIR

    source = inspect_checkpoint(DEMO_MODEL_DIR)
    output = inspect_checkpoint(ptq.ckpt16)
    checks = {c.name: c for c in evaluate_ptq(source, output, ptq.recipe)}
    assert all(c.passed for c in checks.values()), {n: c.message for n, c in checks.items() if not c.passed}
    quantized = {layer.module for layer in output.linear_layers if layer.precision is ptq.recipe.precision}
    in_scope = {layer.module for layer in output.linear_layers if expected_in_scope(layer.module, ptq.recipe.scope)}
    assert quantized == in_scope and quantized, (sorted(quantized ^ in_scope), output.precision_counts())
    assert quantized == set(ptq.originals)
    ratio = output.total_bytes / source.total_bytes
    record("size_ratio", round(ratio, 4))
    record("checkpoint_bytes", output.total_bytes)
    record("bf16_source_bytes", source.total_bytes)
    assert ratio < 1.0
    return quantized


LAYER_FORMATS = {  # recipe -> what the reference server's loader reports for each quantized linear
    "fp8": "FP8/a:fp8",
    "fp8_per_channel_per_token": "FP8/a:fp8_per_token",
    "fp8_2d_blockwise_weight_only": "FP8_BLOCK",
    "mxfp8": "MXFP8/a:mxfp8",
    "nvfp4": "NVFP4/a:nvfp4",
    "nvfp4_mlp_only": "NVFP4/a:nvfp4",
    "nvfp4_omlp_only": "NVFP4/a:nvfp4",
    "w4a16_nvfp4": "NVFP4",
    "int4_awq": "INT4",
    "w4a8_awq_beta": "W4A8/a:fp8",
    "int8_smoothquant": "INT8/a:int8",
    "int8_wo": "INT8",
}


def _check_exports_load(ptq: DemoPtq, quantized: set[str]) -> Any:
    """Both exports load as the reference server loads them (the bf16 one is what gets served), every quantized
    linear in the recipe's format; returns the float32 one's model."""
    from pytest_day0.serving import dequant

    for ckpt in (ptq.ckpt16, ptq.ckpt32):
        loaded = dequant.load_checkpoint(ckpt)
        assert set(loaded.layers) == quantized
        assert set(loaded.layers.values()) == {LAYER_FORMATS[ptq.recipe.name]}, loaded.layers
    return loaded.model


def _apart(a: Any, b: Any, value: Any) -> Any:
    """Elements two quantizers put on different grid points (float32 reassociation alone moves them ~1e-7)."""
    return (a - b).abs() > 1e-5 * value.abs() + 1e-30


def _assert_on_boundary(off: Any, bound: Any, where: str) -> None:
    """Where two correct roundings of a value differ, the value must sit on the boundary between them (``off``:
    its distance from their midpoint) to within float32 noise (``bound``); a wrong scale, grid, block layout or
    rounding mode leaves values up to half a step off."""
    worst = (off / bound).max().item()
    assert worst <= 1.0, f"{where}: quantized differently {worst:.3g}x the float32 noise off a rounding boundary"


# The same source weight on both sides: export and fake quant differ by float32 reassociation, ~1e-7 of the value.
WEIGHT_NOISE = 1e-6
# The two forwards' inputs differ by float32 noise, measured <= 2e-6 of the largest |x| of the row (the token):
# noise is a fraction of the vector's scale, so it is a large part of a step for values far below it (FP8
# subnormals are 1/2^9 of the scale), which is why it is not measured in steps or relative to the value.
ACTIVATION_NOISE = 1e-5


def _tie_aligned_reference(ptq: DemoPtq, served_model: Any, eval_ids: Any, record: Callable[[str, object], None],
                           prepare: Callable[[Any], None] | None = None) -> Any:
    """ModelOpt's fake-quant model, taking the served side only where a value sits on a rounding boundary.

    The demo's weights and their amax are bf16 values, so ``w / scale`` often lands exactly on a rounding tie
    (measured: -10.5, 84.0, -2.625 FP8 steps). ModelOpt's export computes ``w / (amax / 448)`` and rounds the tie
    to even; its fake quant computes ``w * (448 / amax)``, one float32 ulp off the tie, and rounds it the other
    way. Both are correct roundings of that weight; the checkpoint holds the export's. Activations meet the same
    thing, and more often: the two forwards differ by float32 noise (~1e-6 relative, different but equally valid
    orders of operations), and an activation within that distance of a rounding boundary is quantized to one
    side in one model and to the other side in the other, after which the difference grows through the layers
    (on the demo: every layer agreed to 6e-6 given the same input, the logits of a dynamic per-token FP8 model by
    only 1.5e-4). So: every weight and every quantized activation where the two differ must lie on the boundary
    between the two results (:func:`_assert_on_boundary`), those take the served side, everything else stays ModelOpt's,
    and no more than 1% of either may differ at all. The counts are recorded.
    """
    served_modules = dict(served_model.named_modules())
    served_inputs: dict[str, Any] = {}  # the served model's quantized input of each linear, from its own forward

    def capture(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            served_inputs[name] = args[0].detach().clone()

        return hook

    handles = [served_modules[n].register_forward_pre_hook(capture(n)) for n in ptq.originals]  # after emulation
    with torch.no_grad():
        served_model(eval_ids)
    for handle in handles:
        handle.remove()

    reference = copy.deepcopy(ptq.reference_model)
    if prepare is not None:
        prepare(reference)
    weight_ties = 0
    activation_ties = 0

    def align_inputs(name: str) -> Callable[..., Any]:
        def hook(quantizer: Any, args: tuple[Any, ...], fake: Any) -> Any:
            nonlocal activation_ties
            ours = served_inputs[name]
            pqs = getattr(quantizer, "_pre_quant_scale", None)
            value = args[0] * pqs if pqs is not None else args[0]
            apart = _apart(fake, ours, value)
            if apart.any():
                row_scale = value.abs().amax(dim=-1, keepdim=True).expand_as(value)
                off = (value - (fake + ours) / 2).abs()
                _assert_on_boundary(off[apart], ACTIVATION_NOISE * row_scale[apart], f"{name} input")
                activation_ties += int(apart.sum())
            return torch.where(apart, ours, fake)

        return hook

    with torch.no_grad():
        for name, module in reference.named_modules():
            if name not in ptq.originals:
                continue
            original = ptq.originals[name]
            fake = module.weight_quantizer(module.weight)
            ours = served_modules[name].weight
            apart = _apart(fake, ours, original)
            if apart.any():
                off = (original - (fake + ours) / 2).abs()
                _assert_on_boundary(off[apart], WEIGHT_NOISE * original.abs()[apart], f"{name} weight")
                weight_ties += int(apart.sum())
            module.weight.copy_(torch.where(apart, ours, fake))
            module.weight_quantizer.disable()
            if module.input_quantizer.is_enabled:
                module.input_quantizer.register_forward_hook(align_inputs(name))
        logits = reference(eval_ids).logits.float()
    record("weight_tie_roundings", weight_ties)
    record("activation_boundary_roundings", activation_ties)
    assert weight_ties <= 0.01 * sum(w.numel() for w in ptq.originals.values())
    assert activation_ties <= 0.01 * sum(x.numel() for x in served_inputs.values())
    return logits


def _compare_with_modelopt(ptq: DemoPtq, cache: DemoPtqCache, record: Callable[[str, object], None],
                           prepare: Callable[[Any], None] | None = None) -> None:
    from pytest_day0.serving import dequant

    served = dequant.load_checkpoint(ptq.ckpt32).model
    with torch.no_grad():
        ours = served(cache.eval_ids).logits.float()
    reference = _tie_aligned_reference(ptq, served, cache.eval_ids, record, prepare)
    max_abs = (ours - reference).abs().max().item()
    effect = (reference - ptq.unquantized).abs().max().item()
    record("max_abs_logit_diff", max_abs)
    record("quantization_effect", effect)
    assert max_abs <= LOGIT_ATOL, f"{ptq.recipe.name}: max |logit diff| {max_abs:.3g} vs ModelOpt"
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    assert effect > 100 * LOGIT_ATOL  # the reference is a quantized model, not the source


# ---------------------------------------------------------------- the proofs


def prove_fake_quant_logits(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    ptq = cache.get(name)
    _check_exports_load(ptq, _inspect_and_gate(ptq, record))
    _compare_with_modelopt(ptq, cache, record)


def prove_nvfp4_round_trip(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    from pytest_day0.serving import dequant

    ptq = cache.get(name)
    served = _check_exports_load(ptq, _inspect_and_gate(ptq, record))
    with torch.no_grad():
        assert torch.isfinite(served(cache.eval_ids).logits).all()
    tensors = dequant._read_tensors(ptq.ckpt32)
    worst = 0.0
    for module, weight in ptq.originals.items():
        scale, scale_2 = tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"]
        packed, block_scale = dequant.quantize_nvfp4(weight, scale_2)
        assert torch.equal(packed, tensors[f"{module}.weight"]), f"{module}: E2M1 bytes differ"
        assert torch.equal(block_scale.view(torch.uint8), scale.view(torch.uint8)), f"{module}: block scales differ"
        restored = dequant.dequantize_nvfp4(tensors[f"{module}.weight"], scale, scale_2)
        step = (scale.float() * scale_2).unsqueeze(-1)  # one unit of E2M1 magnitude per block
        err = ((weight - restored).abs().view(weight.shape[0], -1, dequant.NVFP4_BLOCK) / step).max().item()
        worst = max(worst, err)
        assert err <= 1.0 + 1e-6, f"{module}: error {err:.3f} block units (E2M1's largest half-step is 1.0)"
    record("round_trip_worst_error_in_block_units", round(worst, 4))
    assert worst > 0.25  # a real quantization happened


def _mxfp8_cpu_backend(inputs: Any, _quantizer: Any) -> Any:
    """ModelOpt's own MXFP8 quantize-dequantize on CPU (``MXFP8QTensor``), for the CUDA-only fused kernel."""
    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    qtensor, scale = MXFP8QTensor.quantize(inputs)
    return qtensor.dequantize(dtype=inputs.dtype, scale=scale)


def prove_mxfp8(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend

    from pytest_day0.serving import dequant

    ptq = cache.get(name)
    quantized = _inspect_and_gate(ptq, record)
    _check_exports_load(ptq, quantized)
    tensors = dequant._read_tensors(ptq.ckpt32)
    worst = 0.0
    for module, weight in ptq.originals.items():
        stored, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
        assert stored.dtype == torch.float8_e4m3fn and scale.dtype == torch.uint8
        assert tuple(scale.shape) == (weight.shape[0], weight.shape[1] // dequant.MXFP8_BLOCK)
        values, exponents = dequant.quantize_mxfp8(weight)
        assert torch.equal(values.view(torch.uint8), stored.view(torch.uint8)), f"{module}: E4M3 bytes differ"
        assert torch.equal(exponents, scale), f"{module}: E8M0 scales differ"
        restored = dequant.dequantize_mxfp8(stored, scale)
        block_scale = torch.exp2(scale.float() - dequant.E8M0_BIAS).repeat_interleave(dequant.MXFP8_BLOCK, dim=1)
        # E4M3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal by 2^-10 * scale
        bound = torch.maximum(weight.abs() * 2**-4, block_scale * 2**-10)
        assert ((weight - restored).abs() <= bound).all(), f"{module}: error beyond E4M3's half step"
        worst = max(worst, ((weight - restored).abs() / bound).max().item())
        # the scale is the smallest power of two that fits the block's amax under 448
        amax = weight.abs().view(weight.shape[0], -1, dequant.MXFP8_BLOCK).amax(-1)
        unit = torch.exp2(scale.float() - dequant.E8M0_BIAS)
        assert (amax / unit <= dequant.FP8_E4M3_MAX).all() and (amax / (unit / 2) > dequant.FP8_E4M3_MAX).all()
    record("round_trip_worst_error_in_bounds", round(worst, 4))
    assert worst > 0.25  # a real quantization happened

    register_quant_backend("day0_mxfp8_cpu", _mxfp8_cpu_backend)
    switched: list[str] = []

    def modelopt_on_cpu(model: Any) -> None:
        for qname, module in model.named_modules():
            if isinstance(module, TensorQuantizer) and module.is_enabled and module.is_mx_format:
                module.backend = "day0_mxfp8_cpu"
                switched.append(qname)

    _compare_with_modelopt(ptq, cache, record, modelopt_on_cpu)
    assert len(switched) == 2 * len(quantized)  # every weight and every input quantizer


def prove_model_unsupported(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    from pytest_day0.stages.quantize import _classify

    with pytest.raises(Exception) as info:
        cache.get(name)
    assert _classify(info.value) is FailureClass.MODEL_UNSUPPORTED, f"{type(info.value).__name__}: {info.value}"
    record("failure_class", "MODEL_UNSUPPORTED")


def prove_needs_cuda(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    assert resolve_recipe(name).needs_cuda
    remote = build_config({"model": "demo", "recipe": name, "executor": "slurm://u@gpu-login?partition=gpu"},
                          lambda _k: None, environ={})
    assert remote.recipes == (name,)  # a GPU node is the way to run it: never refused there
    if torch.cuda.is_available():
        assert build_config({"model": "demo", "recipe": name}, lambda _k: None, environ={}).recipes == (name,)
        record("proof", "CUDA present: not refused; numerics in test_dequant_numerics' CUDA test")
        return
    with pytest.raises(Day0Error) as info:
        build_config({"model": "demo", "recipe": name}, lambda _k: None, environ={})
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "no CUDA device" in str(info.value) and "--day0-executor slurm://" in str(info.value)
    record("failure_class", "USER_CONFIG_ERROR")


# compressed-tensors quantization_config as llm-compressor 0.14 writes it for each preset scheme
_INT8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
_CT_SCHEMES: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "W8A8": ("int-quantized", _INT8_CHANNEL,
             {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}),
    "W4A16": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 128, "dynamic": False}, None),
    "W8A16": ("pack-quantized", _INT8_CHANNEL, None),
    "FP8_DYNAMIC": ("float-quantized", {**_INT8_CHANNEL, "type": "float"},
                    {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}),
}


def compressed_tensors_checkpoint(root: Path, scheme: str) -> Path:
    """The demo with llm-compressor's quantization_config for ``scheme`` (the loader refuses on the config alone;
    real llm-compressor output is tests/test_real_engines.py, which needs .venv-engines)."""
    from pytest_day0.stages.source import DEMO_MODEL_DIR

    fmt, weights, inputs = _CT_SCHEMES[scheme]
    path = root / f"ct-{scheme.lower()}"
    shutil.copytree(DEMO_MODEL_DIR, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def prove_not_emulated(name: str, cache: DemoPtqCache, record: Callable[[str, object], None]) -> None:
    from pytest_day0.serving import dequant

    recipe = resolve_recipe(name)
    ckpt = compressed_tensors_checkpoint(cache.root, recipe.scheme)
    with pytest.raises(Day0Error) as info:
        dequant.load_checkpoint(ckpt)
    fmt = _CT_SCHEMES[recipe.scheme][0]
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE
    assert f"compressed-tensors ({fmt}) checkpoint" in str(info.value) and "--day0-serve vllm" in str(info.value)
    with pytest.raises(Day0Error) as info:  # and the configuration says so before any PTQ
        build_config({"model": "demo", "recipe": name, "quantize": "llmcompressor"}, lambda _k: None, environ={})
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and "--day0-serve vllm" in str(info.value)
    assert build_config({"model": "demo", "recipe": name, "quantize": "llmcompressor", "serve": "vllm"},
                        lambda _k: None, environ={}).serve == "vllm"
    record("failure_class", "CHECKPOINT_NOT_SERVABLE")


@dataclass(frozen=True)
class Proof:
    label: str  # what the README's "proof" column says
    run: Callable[[str, DemoPtqCache, Callable[[str, object], None]], None]


FAKE_QUANT = Proof("fake-quant logits", prove_fake_quant_logits)
ROUND_TRIP = Proof("round trip", prove_nvfp4_round_trip)
MX = Proof("round trip + ModelOpt MXFP8QTensor logits", prove_mxfp8)
UNSUPPORTED = Proof("MODEL_UNSUPPORTED", prove_model_unsupported)
NEEDS_CUDA = Proof("USER_CONFIG_ERROR without CUDA", prove_needs_cuda)
NOT_EMULATED = Proof("CHECKPOINT_NOT_SERVABLE on reference", prove_not_emulated)

PROOFS: dict[str, Proof] = {
    "fp8": FAKE_QUANT,
    "fp8_per_channel_per_token": FAKE_QUANT,
    "fp8_2d_blockwise_weight_only": FAKE_QUANT,
    "mxfp8": MX,
    "nvfp4": ROUND_TRIP,
    "nvfp4_mlp_only": ROUND_TRIP,
    "nvfp4_experts_only": UNSUPPORTED,
    "nvfp4_omlp_only": ROUND_TRIP,
    "nvfp4_awq_lite": NEEDS_CUDA,
    "w4a16_nvfp4": ROUND_TRIP,
    "int4_awq": FAKE_QUANT,
    "w4a8_awq_beta": FAKE_QUANT,
    "int8_smoothquant": FAKE_QUANT,
    "int8_wo": FAKE_QUANT,
    "w8a8": NOT_EMULATED,
    "w4a16": NOT_EMULATED,
    "w8a16": NOT_EMULATED,
    "fp8_dynamic": NOT_EMULATED,
}


@pytest.mark.parametrize("name", sorted(README_TABLE) or ["<README has no recipe table>"])
def test_recipe_is_proven(name: str, demo_ptq: DemoPtqCache, record_property: Any) -> None:
    proof = PROOFS.get(name)
    if proof is None:
        pytest.fail(f"README lists recipe {name!r} but no proof in tests/test_recipe_matrix.py covers it")
    cell = README_TABLE.get(name, {}).get("proof", "")
    assert cell.startswith(proof.label), f"README says the proof of {name} is {cell!r}, the test runs {proof.label!r}"
    proof.run(name, demo_ptq, record_property)


# ---------------------------------------------------------------- the refusal, end to end


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the recipe is not refused")
def test_cuda_only_recipe_is_refused_at_configuration_in_seconds(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The user's command: exit 4, one USER_CONFIG_ERROR line, nothing run (was [UNKNOWN] after minutes)."""
    import time

    ws = tmp_path / "ws"
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--day0-model=demo", "--recipe=nvfp4_awq_lite",
                                           f"--day0-workdir={ws}", timeout=120)
    wall = time.monotonic() - started
    lines = [line for line in result.errlines if line.strip()]
    assert result.ret == 4, result.outlines[-20:] + result.errlines[-20:]
    assert len(lines) == 1 and lines[0].startswith("ERROR: [USER_CONFIG_ERROR] --recipe nvfp4_awq_lite: "), lines
    assert "no CUDA device" in lines[0] and "--day0-executor slurm://" in lines[0]
    assert "Traceback" not in "\n".join(result.outlines + result.errlines)
    assert not (ws / "events.jsonl").exists() and not (ws / "checkpoints").exists()  # no PTQ started
    assert wall < 60, wall  # plugin start-up plus one torch import; PTQ took minutes before failing


def test_config_of_other_recipes_does_not_import_torch(tmp_path: Path) -> None:
    """The CUDA check imports torch only for a recipe that needs it: validating any other config stays cheap."""
    import subprocess
    import sys

    code = ("import sys; from pytest_day0.config import build_config; "
            "build_config({'model': 'demo', 'recipe': 'fp8,nvfp4,mxfp8'}, lambda k: None, environ={}); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
