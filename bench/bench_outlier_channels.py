"""How many outlier channels, of what size, make the demo show a recipe regressing (issue 15 item 1)?

For each (count, scale): the trained demo weights (the shipped ones with make_demo's outlier channels removed,
exactly) get ``add_outlier_channels(count, scale)``; each recipe quantizes that model with real ModelOpt PTQ
(``python -m pytest_day0 quantize``), the reference server's loader emulates the export (float32), and every item
of the three demo tasks is scored without a server: arc_like by the log-likelihood of each choice, gsm_like and
tau_like by teacher-forced argmax over answer + newline (greedy exact match, the same items up to ties). Printed
per recipe and task: the score, its change against the unquantized model and the flips (lost / gained). A screen,
cheaper than a session; the shipped choice was confirmed by a real session (bench/RESULTS.md).

Run: python bench/bench_outlier_channels.py [--scales 32,64] [--counts 2] [--recipes fp8,nvfp4,int4_awq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_day0.demo import make_demo  # noqa: E402

TASKS = ("arc_like", "gsm_like", "tau_like")


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (make_demo.TASK_DIR / f"{name}.jsonl").read_text().splitlines()]


def write_model(state: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    shutil.copytree(make_demo.MODEL_DIR, out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def logits(model: Any, seqs: list[list[int]]) -> list[Any]:
    import torch

    out: list[Any] = []
    for i in range(0, len(seqs), 256):
        chunk = seqs[i:i + 256]
        width = max(map(len, chunk))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in chunk])  # right padding: causal, earlier positions
        with torch.no_grad():
            out.extend(torch.log_softmax(model(input_ids=ids).logits.float(), -1))
    return out


def correct(model: Any) -> dict[str, list[bool]]:
    """Per task, per item: right or wrong."""
    out: dict[str, list[bool]] = {}
    arc = rows("arc_like")
    seqs, spans = [], []
    for row in arc:
        prompt = [1, *make_demo.encode(row["prompt"])]
        for choice in row["choices"]:
            seqs.append(prompt + make_demo.encode(choice))
            spans.append((len(prompt), len(choice)))
    lls = [sum(lp[start - 1 + j, seq[start + j]].item() for j in range(n))
           for (start, n), seq, lp in zip(spans, seqs, logits(model, seqs), strict=True)]
    picked = [lls.index(max(lls[4 * i:4 * i + 4]), 4 * i) - 4 * i for i in range(len(arc))]
    out["arc_like"] = [pick == row["target"] for pick, row in zip(picked, arc, strict=True)]
    for name in ("gsm_like", "tau_like"):
        seqs, answers = [], []
        for row in rows(name):
            prompt, answer = [1, *make_demo.encode(row["prompt"])], make_demo.encode(row["target"] + "\n")
            seqs.append(prompt + answer)
            answers.append((len(prompt), answer))
        out[name] = [lp[start - 1:start - 1 + len(a)].argmax(-1).tolist() == a
                     for (start, a), lp in zip(answers, logits(model, seqs), strict=True)]
    return out


def quantize(model_dir: Path, recipe: str, out: Path) -> float:
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pytest_day0", "quantize", f"--model={model_dir}", f"--recipe={recipe}",
                    f"--out={out}"], check=True, capture_output=True, env=env)
    return time.time() - started


def line(base: dict[str, list[bool]], cand: dict[str, list[bool]]) -> str:
    parts = []
    for task in TASKS:
        b, c = base[task], cand[task]
        lost = sum(x and not y for x, y in zip(b, c, strict=True))
        won = sum(y and not x for x, y in zip(b, c, strict=True))
        parts.append(f"{task} {100 * sum(c) / len(c):.1f} ({100 * (sum(c) - sum(b)) / len(b):+.1f}, -{lost}/+{won})")
    return " | ".join(parts)


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from pytest_day0.serving.dequant import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="32,64")
    parser.add_argument("--counts", default=str(make_demo.OUTLIER_CHANNELS))
    parser.add_argument("--recipes", default="fp8,nvfp4,int4_awq")
    parser.add_argument("--seed", type=int, default=make_demo.DEFAULT_SEED)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped = load_file(str(make_demo.MODEL_DIR / "model.safetensors"))
    trained = make_demo.remove_outlier_channels(shipped, make_demo.DEFAULT_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(trained, work / "trained")
        base = correct(load_checkpoint(work / "trained").model)
        print("trained, no outliers:", {t: f"{100 * sum(v) / len(v):.1f}" for t, v in base.items()}, flush=True)
        for count in (int(c) for c in args.counts.split(",")):
            for scale in (float(s) for s in args.scales.split(",")):
                name = f"{count} channels x{scale:g}"
                model_dir = work / f"c{count}-s{scale:g}"
                write_model(make_demo.add_outlier_channels(trained, args.seed, scale, count), model_dir)
                same = correct(load_checkpoint(model_dir).model) == base
                print(f"{name}: unquantized scores {'identical' if same else 'DIFFER'}", flush=True)
                for recipe in args.recipes.split(","):
                    ptq_s = quantize(model_dir, recipe, work / f"{model_dir.name}-{recipe}")
                    cand = correct(load_checkpoint(work / f"{model_dir.name}-{recipe}").model)
                    print(f"{name} {recipe:14s} (PTQ {ptq_s:.0f} s) {line(base, cand)}", flush=True)


if __name__ == "__main__":
    main()
