"""The shipped demo is what make_demo.py says it is: its tasks and calibration text come from the seed, the held-out
items were never trained on, and its tokenizer declares the BOS it adds."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_day0.demo import make_demo

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
