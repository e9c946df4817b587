"""The scorer's numbers equal the model's own: scorer -> real reference server -> tiny Llama vs a direct forward pass.

This is the end-to-end proof that the offset arithmetic, BOS handling and generated-token exclusion in the
scorer give lm-eval's loglikelihood, not merely something self-consistent with our toy server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_day0.scoring.metrics import extract_answer, truncate_at_stop  # noqa: E402
from pytest_day0.scoring.tasks import Task, load_task  # noqa: E402
from pytest_day0.serving.endpoint import Endpoint  # noqa: E402
from pytest_day0.stages.evaluate import evaluate_task, read_records  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = Path(__file__).resolve().parent / "data" / "tokenizer"
MC: list[dict[str, Any]] = [
    {"id": "m0", "prompt": "max(98,64,78,85)=", "choices": ["98", "64", "78", "85"], "target": 0},
    {"id": "m1", "prompt": "max(10,71,33,42)=", "choices": ["10", "71", "33", "42"], "target": 1},
    {"id": "m2", "prompt": "Q: a, b or c?\nA:", "choices": [" a", " bb", " ccc"], "target": 2},
]
GEN_PROMPTS = ["25+54=", "99+65=", "rev(380)=", "7+7="]
STOP = ("\n",)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        # vocab = exactly the tokenizer's 100 tokens, so every greedy id has a text
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random logits so greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def reference_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ready = tmp_path_factory.mktemp("ref") / "ready.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_day0.serving.reference_server", "--checkpoint", str(tiny_checkpoint),
         "--served-model-name", "tiny", "--port", "0", "--ready-file", str(ready), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    try:
        deadline = time.time() + 180
        while not ready.exists():
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"reference server exited {proc.returncode}: {out[-2000:]}")
            if time.time() > deadline:
                pytest.fail("reference server did not become ready in 180 s")
            time.sleep(0.2)
        yield str(json.loads(ready.read_text())["url"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    return model, tok


def write_task(tmp_path: Path, name: str, samples: list[dict[str, Any]], **spec: Any) -> Task:
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / f"{name}.task.json").write_text(json.dumps({"name": name, "samples": f"{name}.jsonl", **spec}))
    return load_task(str(tmp_path / f"{name}.task.json"))


def direct_continuation_logprob(model: Any, tok: Any, context: str, continuation: str) -> float:
    ids = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    assert ids[:n_ctx] == tok(context)["input_ids"]  # char-level: the context tokenizes the same inside the prompt
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return float(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))


def direct_greedy_ids(model: Any, tok: Any, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax().item()))
    return out


def direct_greedy(model: Any, tok: Any, prompt: str) -> str:
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax().item())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            if any(s in tok.decode(out, skip_special_tokens=True) for s in STOP):
                break
    return truncate_at_stop(tok.decode(out, skip_special_tokens=True), STOP)


def test_mc_score_equals_a_direct_forward_pass(reference_server: str, hf: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = hf
    greedy2 = direct_greedy_ids(model, tok, "25+54=", 2)  # the model's own next two tokens: is_greedy must say so
    assert all(i >= 4 for i in greedy2), "a special token is the argmax; pick another prompt"
    cont = tok.decode(greedy2)
    samples: list[dict[str, Any]] = [*MC, {"id": "mg", "prompt": "25+54=", "choices": [cont, "\n\n"], "target": 0}]
    task = write_task(tmp_path, "mc", samples, kind="multiple_choice", metric="acc", scale=[0, 100])
    endpoint = Endpoint(url=reference_server, model="tiny")
    result = asyncio.run(evaluate_task(task, endpoint, tmp_path / "mc.jsonl", "baseline", concurrency=4))
    assert result.status == "SUCCESS", result.first_error
    records, _ = read_records(tmp_path / "mc.jsonl")
    assert records["mg"].choice_greedy == [True, False]
    hits = 0
    for s in samples:
        want = [direct_continuation_logprob(model, tok, s["prompt"], c) for c in s["choices"]]
        got = records[s["id"]].choice_logprobs
        assert got is not None
        assert got == pytest.approx(want, abs=1e-3)
        pred = max(range(len(want)), key=lambda i: (want[i], -i))
        assert records[s["id"]].correct == float(pred == s["target"])
        hits += int(pred == s["target"])
    assert result.score == pytest.approx(100 * hits / len(samples))


def test_generate_matches_a_direct_greedy_loop(reference_server: str, hf: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = hf
    greedy = [direct_greedy(model, tok, p) for p in GEN_PROMPTS]
    # targets: the model's own answer for even samples, a certainly different string for odd ones
    samples = [
        {"id": f"g{i}", "prompt": p, "target": greedy[i].strip() if i % 2 == 0 else greedy[i].strip() + "#"}
        for i, p in enumerate(GEN_PROMPTS)
    ]
    task = write_task(tmp_path, "gen", samples, kind="generate", metric="exact_match", scale=[0, 1],
                      stop=list(STOP), max_tokens=MAX_TOKENS)
    endpoint = Endpoint(url=reference_server, model="tiny")
    result = asyncio.run(evaluate_task(task, endpoint, tmp_path / "gen.jsonl", "baseline", concurrency=2))
    assert result.status == "SUCCESS", result.first_error
    records, _ = read_records(tmp_path / "gen.jsonl")
    for i, s in enumerate(samples):
        rec = records[s["id"]]
        assert rec.response == greedy[i]
        assert rec.correct == float(extract_answer(greedy[i], None) == s["target"])
    assert result.score == pytest.approx(0.5)
