"""Train and write the embedded demo model and its three held-out tasks.

The demo must exist without a model hub, so the project makes it: a ~1M-parameter
character-level Llama trained on three synthetic tasks whose answers are exact, so that
quantization damage shows up as a measurable score change rather than noise in prose.
Run ``python -m pytest_day0.demo.make_demo`` to reproduce it from the seed.

A model this small, trained this briefly, has none of the outlier channels of real LLMs (Dettmers et al. 2022,
LLM.int8(), arXiv 2208.07339; Sun et al. 2024, "Massive activations", arXiv 2402.17762), so every recipe kept its
scores and the demo could not show a recipe regressing. ``add_outlier_channels`` gives it some after training, by an
exact reparametrization (see there): the bf16 model computes the same bits, and only a quantizer sees the change.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
TASK_DIR = HERE / "tasks"
CALIB_PATH = HERE / "calibration.txt"

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list(string.printable[:95])  # digits, letters, punctuation, space
CHARS.append("\n")
VOCAB = SPECIALS + CHARS
VOCAB_SIZE = 128  # padded; rows past len(VOCAB) are never produced by the tokenizer
HIDDEN = 128
INTERMEDIATE = 384
LAYERS = 4
HEADS = 4
MAX_POSITIONS = 64
EVAL_SAMPLES = 300  # per task, held out of training: make_eval_sets(seed) decides them and train() excludes them
# Each task's full size. 300 items, all agreeing, cannot show a drop under 1 point with an exact interval (347 is the
# least that can), so the tasks grow past the held-out 300 (extend_eval_sets): arc_like and tau_like with prompts the
# training stream never produced (replayed, not assumed), gsm_like with in-distribution prompts (2-digit addition
# has 10,000; training saw all but the held-out 300). A quantization check measures whether the model still does
# what it learned, so trained-on items are fair for the comparison; they are not a generalization test.
TASK_SIZES = {"arc_like": 500, "gsm_like": 1000, "tau_like": 500}
DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_BATCH = 1234, 3500, 128
# Outlier channels (add_outlier_channels): how many input channels of each decoder RMSNorm, and the power of two
# their weight columns grow by. Measured (bench/RESULTS.md, "A demo where quantization shows"): at 2**5 nvfp4 loses
# 11 items (INCONCLUSIVE at full n); at 2**6 it is a REGRESSION while fp8 and int4_awq keep every item.
OUTLIER_CHANNELS, OUTLIER_SCALE = 2, 64
NORM_CONSUMERS = {  # each decoder RMSNorm and the linears that read its output (a Llama layer)
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
)


# ---------------------------------------------------------------- tasks


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def _max(rng: random.Random) -> tuple[str, list[str], int]:
    values = rng.sample(range(10, 100), 4)
    prompt = "max(" + ",".join(str(v) for v in values) + ")="
    return prompt, [str(v) for v in values], values.index(max(values))


def _rev(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))
    return f"rev({digits})=", digits[::-1]


def make_eval_sets(seed: int) -> dict[str, list[dict[str, Any]]]:
    """Held-out samples: training never sees these prompts."""
    rng = random.Random(seed + 1)
    sets: dict[str, list[dict[str, Any]]] = {"arc_like": [], "gsm_like": [], "tau_like": []}
    seen: set[str] = set()

    def fresh(prompt: str) -> bool:
        if prompt in seen:
            return False
        seen.add(prompt)
        return True

    while len(sets["arc_like"]) < EVAL_SAMPLES:
        prompt, choices, target = _max(rng)
        if fresh(prompt):
            n = len(sets["arc_like"])
            sets["arc_like"].append({"id": f"arc_like-{n:04d}", "prompt": prompt, "choices": choices, "target": target})
    while len(sets["gsm_like"]) < EVAL_SAMPLES:
        prompt, answer = _add(rng)
        if fresh(prompt):
            n = len(sets["gsm_like"])
            sets["gsm_like"].append({"id": f"gsm_like-{n:04d}", "prompt": prompt, "target": answer})
    while len(sets["tau_like"]) < EVAL_SAMPLES:
        prompt, answer = _rev(rng)
        if fresh(prompt):
            n = len(sets["tau_like"])
            sets["tau_like"].append({"id": f"tau_like-{n:04d}", "prompt": prompt, "target": answer})
    return sets


def training_prompts(seed: int, steps: int, batch: int) -> set[str]:
    """Every prompt ``train`` draws (its python RNG stream, replayed without torch)."""
    held_out = {s["prompt"] for rows in make_eval_sets(seed).values() for s in rows}
    rng = random.Random(seed)
    return {training_example(rng, held_out)[0] for _ in range(steps * batch)}


def calibration_examples(seed: int) -> list[tuple[str, str]]:
    """The calibration text's examples: training-distribution, never a held-out prompt."""
    held = {s["prompt"] for rows in make_eval_sets(seed).values() for s in rows}
    rng = random.Random(seed + 2)
    return [training_example(rng, held) for _ in range(512)]


def extend_eval_sets(sets: dict[str, list[dict[str, Any]]], seed: int, steps: int = DEFAULT_STEPS,
                     batch: int = DEFAULT_BATCH) -> dict[str, list[dict[str, Any]]]:
    """The tasks past their held-out 300 items, up to TASK_SIZES (see there for which prompts and why)."""
    trained = training_prompts(seed, steps, batch) | {p for p, _ in calibration_examples(seed)}
    rng = random.Random(seed + 3)
    seen = {s["prompt"] for rows in sets.values() for s in rows}
    out = {name: list(rows) for name, rows in sets.items()}
    makers = {"arc_like": _max, "gsm_like": _add, "tau_like": _rev}
    for name, make in makers.items():
        rows = out[name]
        while len(rows) < TASK_SIZES[name]:
            made = make(rng)
            prompt = made[0]
            if prompt in seen or (name != "gsm_like" and prompt in trained):
                continue
            seen.add(prompt)
            row: dict[str, Any] = {"id": f"{name}-{len(rows):04d}", "prompt": prompt}
            if name == "arc_like":
                row.update(choices=made[1], target=made[2])
            else:
                row["target"] = made[1]
            rows.append(row)
    return out


TASK_SPECS: dict[str, dict[str, Any]] = {
    "arc_like": {
        "name": "arc_like",
        "description": "max of four 2-digit numbers, multiple choice scored by log-likelihood (like ARC)",
        "kind": "multiple_choice",
        "metric": "acc",
        "scale": [0, 100],
        "higher_is_better": True,
        "samples": "arc_like.jsonl",
    },
    "gsm_like": {
        "name": "gsm_like",
        "description": "2-digit addition, greedy generation scored by exact match (like GSM8K)",
        "kind": "generate",
        "metric": "exact_match",
        "scale": [0, 100],
        "higher_is_better": True,
        "stop": ["\n"],
        "max_tokens": 6,
        "answer_pattern": "^\\s*(-?\\d+)",
        "samples": "gsm_like.jsonl",
    },
    "tau_like": {
        "name": "tau_like",
        "description": "digit-string reversal, pass@1 reported on a 0-1 scale (like tau2)",
        "kind": "generate",
        "metric": "pass@1",
        "scale": [0, 1],
        "higher_is_better": True,
        "stop": ["\n"],
        "max_tokens": 8,
        "answer_pattern": "^\\s*(\\d+)",
        "samples": "tau_like.jsonl",
    },
}


def training_example(rng: random.Random, held_out: set[str]) -> tuple[str, str]:
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            prompt, answer = _add(rng)
        elif kind == 1:
            prompt, choices, target = _max(rng)
            answer = choices[target]
        else:
            prompt, answer = _rev(rng)
        if prompt not in held_out:
            return prompt, answer + "\n"


# ---------------------------------------------------------------- tokenizer


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    # Like Llama: the tokenizer itself prepends <bos>, so a text prompt sent to any server matches training.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,  # what the post-processor above does: declared = actual
        "add_eos_token": False,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2)
        + "\n"
    )


def encode(text: str) -> list[int]:
    index = {tok: i for i, tok in enumerate(VOCAB)}
    return [index.get(ch, index["<unk>"]) for ch in text]


# ---------------------------------------------------------------- training


def train(seed: int, steps: int, batch: int, lr: float, log_every: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    held_out = {s["prompt"] for rows in make_eval_sets(seed).values() for s in rows}
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    started = time.time()
    for step in range(steps):
        ids_batch, labels_batch = [], []
        for _ in range(batch):
            prompt, answer = training_example(rng, held_out)
            p, a = [1, *encode(prompt)], encode(answer)
            ids_batch.append(p + a)
            labels_batch.append([-100] * len(p) + a)
        width = max(len(x) for x in ids_batch)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in ids_batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for y in labels_batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.time() - started
            print(f"step {step:5d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {elapsed:.0f}s", flush=True)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def outlier_channels(seed: int, norm: str, count: int = OUTLIER_CHANNELS) -> list[int]:
    """Which input channels of ``norm`` (a state-dict key) become outliers: a seeded draw, the same on every run."""
    return sorted(random.Random(f"{seed}:outliers:{norm}").sample(range(HIDDEN), count))


def add_outlier_channels(state: dict[str, torch.Tensor], seed: int, scale: float = OUTLIER_SCALE,
                         count: int = OUTLIER_CHANNELS) -> dict[str, torch.Tensor]:
    """Weight outlier channels, with the bf16 function unchanged: ``gamma[i] /= scale`` and ``W[:, i] *= scale``.

    For each decoder RMSNorm and a few seeded channels ``i``, the norm's output channel shrinks by ``scale`` and every
    linear that reads it (q/k/v after input_layernorm, gate/up after post_attention_layernorm) grows its input column
    ``i`` by the same factor. ``scale`` is a power of two, so both products are exact in bf16 and float32 (only the
    exponent moves; nothing here comes near overflow or subnormals) and ``x_i * W[r, i]`` is the same number: the
    model's outputs are bit-identical (tests/test_demo.py checks the logits). What changes is what a quantizer sees:
    columns ``scale`` times the others (64 as shipped), as in real LLMs. A per-block weight format scaled by its
    block's largest value (NVFP4's 16, INT4's 128) then rounds the block's other weights towards zero; FP8 keeps
    relative precision; AWQ's and SmoothQuant's per-channel scales (activation^a / weight^(1-a)) divide the factor
    back out, about or up to rounding, whatever a.
    Returns a new dict; ``remove_outlier_channels`` is its exact inverse.
    """
    if scale <= 0 or math.frexp(scale)[0] != 0.5:
        raise ValueError(f"outlier scale {scale} is not a power of two: the reparametrization would not be exact")
    out = dict(state)
    for layer in range(LAYERS):
        for norm, consumers in NORM_CONSUMERS.items():
            key = f"model.layers.{layer}.{norm}.weight"
            channels = outlier_channels(seed, key, count)
            gamma = out[key].clone()
            gamma[channels] = gamma[channels] / scale
            out[key] = gamma
            for consumer in consumers:
                weight_key = f"model.layers.{layer}.{consumer}.weight"
                weight = out[weight_key].clone()
                weight[:, channels] = weight[:, channels] * scale
                out[weight_key] = weight
    return out


def remove_outlier_channels(state: dict[str, torch.Tensor], seed: int, scale: float = OUTLIER_SCALE,
                            count: int = OUTLIER_CHANNELS) -> dict[str, torch.Tensor]:
    """The trained weights back from the shipped ones (exact, for the same reason)."""
    return add_outlier_channels(state, seed, 1 / scale, count)


def teacher_forced_accuracy(model: Any, sets: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Greedy exact match equals argmax at every answer position; cheap to check in one batch."""
    import torch

    out = {}
    for name, rows in sets.items():
        good = 0
        for row in rows:
            answer = (row["choices"][row["target"]] if "choices" in row else row["target"]) + "\n"
            p, a = [1, *encode(row["prompt"])], encode(answer)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + a])).logits[0]
            pred = logits[len(p) - 1 : len(p) + len(a) - 1].argmax(-1).tolist()
            good += pred == a
        out[name] = 100.0 * good / len(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--tasks-only", action="store_true", help="write the tasks and calibration text, no training")
    parser.add_argument("--from-trained", type=Path, default=None, metavar="SAFETENSORS",
                        help="skip training: add the outlier channels to these trained weights (no outliers yet)")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    sets = extend_eval_sets(make_eval_sets(args.seed), args.seed, args.steps, args.batch)
    TASK_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        (TASK_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (TASK_DIR / f"{name}.task.json").write_text(json.dumps(TASK_SPECS[name], indent=2) + "\n")
    CALIB_PATH.write_text("".join(p + a for p, a in calibration_examples(args.seed)))
    if args.tasks_only:
        return

    model: Any
    if args.from_trained is not None:
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig.from_pretrained(MODEL_DIR))  # float32 holds bf16 exactly
        model.load_state_dict(load_file(str(args.from_trained)))
        model.eval()  # type: ignore[no-untyped-call]
    else:
        model = train(args.seed, args.steps, args.batch, args.lr, args.log_every)
    model = model.to(torch.bfloat16)
    model.load_state_dict(add_outlier_channels(model.state_dict(), args.seed))
    print("teacher-forced accuracy (bf16):", teacher_forced_accuracy(model, sets), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "bfloat16"
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(args.out)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.generation_config.save_pretrained(args.out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(args.out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
