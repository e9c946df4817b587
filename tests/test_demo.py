"""The shipped demo is what make_demo.py says it is: its tasks and calibration text come from the seed, the held-out
items were never trained on, and its tokenizer declares the BOS it adds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_day0.demo import make_demo

if TYPE_CHECKING:
    import torch

DEMO = Path(make_demo.__file__).resolve().parent


def _rows(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in (DEMO / "tasks" / f"{name}.jsonl").read_text().splitlines()]


def test_tasks_and_calibration_are_the_seeds() -> None:
    core = make_demo.make_eval_sets(make_demo.DEFAULT_SEED)
    full = make_demo.extend_eval_sets(core, make_demo.DEFAULT_SEED)
    for name, rows in full.items():
        shipped = _rows(name)
        assert shipped == rows and len(shipped) == make_demo.TASK_SIZES[name]
        assert shipped[:make_demo.EVAL_SAMPLES] == core[name]  # the held-out items come first, as before
        assert len({r["prompt"] for r in shipped}) == len(shipped)
    calibration = "".join(p + a for p, a in make_demo.calibration_examples(make_demo.DEFAULT_SEED))
    assert (DEMO / "calibration.txt").read_text() == calibration
    assert max(make_demo.TASK_SIZES.values()) >= 1000  # sample counts matter on at least one task


def test_held_out_items_never_appear_in_training_or_calibration() -> None:
    seed = make_demo.DEFAULT_SEED
    trained = make_demo.training_prompts(seed, make_demo.DEFAULT_STEPS, make_demo.DEFAULT_BATCH)
    calibration = {p for p, _ in make_demo.calibration_examples(seed)}
    for name in ("arc_like", "gsm_like", "tau_like"):
        rows = _rows(name)
        held = rows[:make_demo.EVAL_SAMPLES] if name == "gsm_like" else rows  # gsm_like's rest is in-distribution
        assert not {r["prompt"] for r in held} & (trained | calibration), name
    # and the reason gsm_like cannot grow held-out: training saw every other 2-digit addition
    additions = {p for p in trained if "+" in p}
    assert len(additions) == 100 * 100 - make_demo.EVAL_SAMPLES


def test_declared_bos_is_the_bos_the_tokenizer_adds() -> None:
    """tokenizer_config.json's add_bos_token says what the tokenizer's post-processor does (lm-eval and vLLM read
    the declaration; the served model gets what the post-processor adds)."""
    import transformers

    for folder in (DEMO / "model", Path(__file__).parent / "data" / "tokenizer"):
        declared = json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"]
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        adds = tok("12+34=").input_ids[0] == tok.bos_token_id
        assert declared is adds is True, folder
        template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
        assert template.startswith("{{ bos_token }}")  # the chat text carries it; encoded without special tokens


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(key.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# The trained weights as make_demo's training wrote them (bf16, no outlier channels yet): the model shipped until
# the outlier channels were added, its tensors hashed by _tensor_digest.
TRAINED_DIGEST = "bcadcc9f2315d114ed52edc2e2309366a967c77f1fbf71ba033b9728a5565696"


def _shipped_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(DEMO / "model" / "model.safetensors")))


def test_shipped_weights_are_the_trained_ones_with_outlier_channels() -> None:
    """The shipped file is exactly add_outlier_channels(trained weights), and its outliers are where the seed says."""
    shipped = _shipped_state()
    trained = make_demo.remove_outlier_channels(shipped, make_demo.DEFAULT_SEED)
    assert _tensor_digest(trained) == TRAINED_DIGEST
    again = make_demo.add_outlier_channels(trained, make_demo.DEFAULT_SEED)
    assert _tensor_digest(again) == _tensor_digest(shipped)
    for layer in range(make_demo.LAYERS):
        for norm, consumers in make_demo.NORM_CONSUMERS.items():
            key = f"model.layers.{layer}.{norm}.weight"
            channels = make_demo.outlier_channels(make_demo.DEFAULT_SEED, key)
            others = [c for c in range(make_demo.HIDDEN) if c not in channels]
            for consumer in consumers:
                column_max = shipped[f"model.layers.{layer}.{consumer}.weight"].float().abs().amax(0)
                assert column_max[channels].min() > 2 * column_max[others].max(), (key, consumer)  # outliers, really


def test_outlier_channels_leave_the_bf16_model_bit_identical() -> None:
    """Power-of-two scaling commutes with rounding: the logits of the shipped model and of the trained one are the
    same bits on every task prompt, in bf16 through transformers and in float32 through the reference server's
    loader (the numbers the baseline side of every session is scored with)."""
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pytest_day0.serving.dequant import load_checkpoint

    shipped = _shipped_state()
    trained = make_demo.remove_outlier_channels(shipped, make_demo.DEFAULT_SEED)
    assert _tensor_digest(trained) != _tensor_digest(shipped)
    prompts = [str(r["prompt"]) for name in make_demo.TASK_SIZES for r in _rows(name)]
    assert len(prompts) == sum(make_demo.TASK_SIZES.values())
    width = max(len(p) for p in prompts) + 1
    ids = torch.tensor([[1, *make_demo.encode(p)] + [0] * (width - 1 - len(p)) for p in prompts])
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "trained"
        shutil.copytree(DEMO / "model", other)
        save_file({k: v.contiguous() for k, v in trained.items()}, str(other / "model.safetensors"),
                  metadata={"format": "pt"})
        for load in (lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16),
                     lambda d: load_checkpoint(d).model):
            a, b = load(DEMO / "model").eval(), load(other).eval()
            with torch.no_grad():
                la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
            assert la.dtype == lb.dtype and (la - lb).abs().max().item() == 0.0
            assert torch.equal(la, lb)


def test_outlier_scale_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="not a power of two"):
        make_demo.add_outlier_channels(_shipped_state(), make_demo.DEFAULT_SEED, scale=24)
