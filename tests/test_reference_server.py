"""The reference server as the scorer meets it: a real subprocess on 127.0.0.1, real HTTP, a real tiny model.

The server starts once per module on a random tiny Llama (bf16 on disk, like a release checkpoint) with the
char-level demo tokenizer. Every numeric claim is checked against transformers' own forward of the same
checkpoint, computed without the server's KV cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages.serve import (
    SERVE_ENGINES,
    ServerHandle,
    classify_server_exit,
    external_endpoint,
    serve,
    start_reference_server,
)

transformers = pytest.importorskip("transformers")

TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer"
MAX_LEN = 64
NAME = "tiny-ref"
EOS = 2


def _make_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=MAX_LEN, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=EOS, pad_token_id=0, initializer_range=0.1, architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_reference_server(checkpoint, NAME, tmp_path_factory.mktemp("serve"), timeout_s=120)
    yield handle
    handle.stop()
    assert not _alive(handle.pid)


@pytest.fixture(scope="module")
def direct(checkpoint: Path) -> Any:
    """transformers' own model and tokenizer of the checkpoint, float32 like the server."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: threads only add contention
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@torch.no_grad()
def _greedy(model: Any, ids: list[int], max_tokens: int) -> list[int]:
    """Full recompute each step: independent of the server's KV-cache path."""
    out: list[int] = []
    while len(out) < max_tokens and len(ids) + len(out) < MAX_LEN:
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
        if token == EOS:
            break
    return out


def _complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"model": NAME, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


# ---------------------------------------------------------------- endpoints


def test_health_and_models(client: httpx.Client, server: ServerHandle) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == MAX_LEN
    assert server.endpoint.url == server.url and server.endpoint.model == NAME


def test_binds_loopback_only(server: ServerHandle) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    assert server.url == f"http://127.0.0.1:{port}"
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp to read the listening address from")
    listening = [line.split()[1] for line in tcp.read_text().splitlines()[1:] if line.split()[3] == "0A"]
    ours = [addr for addr in listening if int(addr.split(":")[1], 16) == port]
    assert ours == [f"0100007F:{port:04X}"]  # 127.0.0.1, little-endian hex as the kernel writes it


def test_refuses_non_loopback_host(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_day0.serving.reference_server import main

    args = ["--checkpoint", str(checkpoint), "--served-model-name", "x", "--port", "0"]
    assert main([*args, "--host", "0.0.0.0"]) == 2  # refused before anything is loaded or bound
    assert "loopback only" in capsys.readouterr().err


def test_greedy_completion_equals_direct_loop(client: httpx.Client, direct: Any) -> None:
    model, tokenizer = direct
    ids = tokenizer("the cat").input_ids
    expected = _greedy(model, ids, 12)
    body = _complete(client, prompt="the cat", max_tokens=12, logprobs=1)
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected]
    assert choice["finish_reason"] == ("stop" if expected[-1] == EOS else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected)}
    # greedy: every chosen token is its step's top-1
    for chosen, top in zip(choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], strict=True):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)


def test_echo_logprobs_equal_forward_log_softmax(client: httpx.Client, direct: Any) -> None:
    model, tokenizer = direct
    prompt = "a quick brown fox"
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    body = _complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        assert lp["token_logprobs"][pos] == pytest.approx(logp[pos - 1, ids[pos]].item(), abs=1e-4)
        top_values, top_ids = torch.topk(logp[pos - 1], 3)
        expected: dict[str, float] = {}
        for tid, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            expected.setdefault(tokenizer.decode([tid]), value)  # ids past the tokenizer's 100 all decode to ""
        expected.setdefault(tokenizer.decode([ids[pos]]), logp[pos - 1, ids[pos]].item())  # plus the prompt token
        assert lp["top_logprobs"][pos].keys() == expected.keys()
        for token, value in expected.items():
            assert lp["top_logprobs"][pos][token] == pytest.approx(value, abs=1e-4)
    lengths = [len(t) for t in lp["tokens"]]
    assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(ids))]
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)


def test_echo_with_generation_covers_prompt_and_completion(client: httpx.Client) -> None:
    body = _complete(client, prompt="abc", max_tokens=4, echo=True, logprobs=0)
    (choice,) = body["choices"]
    n_prompt = body["usage"]["prompt_tokens"]
    assert choice["text"].startswith("abc")
    assert len(choice["logprobs"]["tokens"]) == n_prompt + body["usage"]["completion_tokens"]
    assert all(v is not None for v in choice["logprobs"]["token_logprobs"][1:])


def test_prompt_forms(client: httpx.Client, direct: Any) -> None:
    _, tokenizer = direct
    ids = tokenizer("hello").input_ids
    as_text = _complete(client, prompt="hello", max_tokens=5)["choices"][0]["text"]
    assert _complete(client, prompt=ids, max_tokens=5)["choices"][0]["text"] == as_text
    many = _complete(client, prompt=["hello", "world"], max_tokens=5)
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == as_text
    assert many["usage"]["prompt_tokens"] == len(ids) + len(tokenizer("world").input_ids)
    lists = _complete(client, prompt=[ids, tokenizer("world").input_ids], max_tokens=5)
    assert [c["text"] for c in lists["choices"]] == [c["text"] for c in many["choices"]]


def test_stop_strings_truncate_and_finish_with_stop(client: httpx.Client) -> None:
    full = _complete(client, prompt="once upon", max_tokens=16)["choices"][0]["text"]
    assert len(full) >= 8
    stop = full[4:6]
    cut = full.find(stop)
    body = _complete(client, prompt="once upon", max_tokens=16, stop=stop)
    (choice,) = body["choices"]
    assert choice["text"] == full[:cut]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert body["usage"]["completion_tokens"] < 16
    # a list: the earliest occurrence wins
    choice = _complete(client, prompt="once upon", max_tokens=16, stop=["\u2603never", full[6:8]])["choices"][0]
    assert choice["text"] == full[: full.find(full[6:8])] and choice["finish_reason"] == "stop"


def test_chat_completion_uses_chat_template(client: httpx.Client, direct: Any) -> None:
    model, tokenizer = direct
    messages = [{"role": "user", "content": "hi there"}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(templated, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 1  # one bos, from the template
    expected = _greedy(model, ids, 6)
    r = client.post("/v1/chat/completions",
                    json={"model": NAME, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(expected, skip_special_tokens=True)}
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected)}


def test_sampling_is_reproducible_with_seed(client: httpx.Client) -> None:
    a = _complete(client, prompt="xyz", max_tokens=10, temperature=1.0, seed=123)["choices"][0]["text"]
    b = _complete(client, prompt="xyz", max_tokens=10, temperature=1.0, seed=123)["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "x" * MAX_LEN}, 400, "maximum context length"),  # 64 chars + bos = 65 tokens
        ({"prompt": "x", "model": "someone-else"}, 404, "does not exist"),
        ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, 400, "echo"),
        ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": [1, 2, 999]}, 400, "vocabulary"),
        ({"prompt": "x", "stop": 3}, 400, "stop"),
        ({"prompt": "x", "stream": True}, 400, "stream"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "frequency_penalty": 0.5}, 400, "not supported"),
    ],
)
def test_bad_requests_get_openai_errors(client: httpx.Client, body: dict[str, Any], status: int,
                                        fragment: str) -> None:
    r = client.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and isinstance(error["type"], str)
    assert fragment in error["message"]


def test_invalid_json_and_bad_chat(client: httpx.Client) -> None:
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_generation_stops_at_context_end(client: httpx.Client) -> None:
    prompt = "y" * (MAX_LEN - 4)  # 61 tokens with bos: room for 3
    body = _complete(client, prompt=prompt, max_tokens=50, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == MAX_LEN - (len(prompt) + 1)
    assert body["choices"][0]["finish_reason"] == "length"


def test_survives_64_concurrent_clients(server: ServerHandle, client: httpx.Client) -> None:
    expected = _complete(client, prompt="same", max_tokens=2)["choices"][0]["text"]

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
        r = await c.post("/v1/completions", json={"model": NAME, "prompt": "same" if i % 2 else f"p{i}",
                                                  "max_tokens": 2, "temperature": 0})
        return r.status_code, r.json()["choices"][0]["text"]

    async def all_of_them() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return list(await asyncio.gather(*(one(c, i) for i in range(64))))

    results = asyncio.run(all_of_them())
    assert [status for status, _ in results] == [200] * 64
    assert {text for i, (_, text) in enumerate(results) if i % 2} == {expected}


def test_external_endpoint_discovers_model(server: ServerHandle) -> None:
    handle = external_endpoint(server.url + "/v1/")
    assert handle.url == server.url and handle.model == NAME and handle.engine == "external"
    handle.stop()  # nothing to stop: a no-op
    with pytest.raises(Day0Error) as err:
        external_endpoint(server.url, model="other")
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert set(SERVE_ENGINES) >= {"reference", "external"}
    assert serve("external", url=server.url).model == NAME


# ---------------------------------------------------------------- lifecycle


def test_two_servers_of_one_name_in_one_folder_each_report_their_own_port(checkpoint: Path, tmp_path: Path) -> None:
    """Two sessions sharing a workspace serve the same side ("fp8") at once: each start must return the URL of the
    server it launched (one shared ready file once gave the second session the first one's port, and it measured
    another checkpoint)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        handles = list(pool.map(lambda _: start_reference_server(checkpoint, "fp8", tmp_path, timeout_s=120), (0, 1)))
    try:
        assert handles[0].url != handles[1].url
        assert len(list(tmp_path.glob("server-fp8.*.ready.json"))) == 2
        for handle in handles:  # the port each URL names is held by that handle's own process
            port = handle.url.rsplit(":", 1)[1]
            holders = {p for p in _listening_pids(int(port))}
            assert handle.pid in holders, (handle.url, handle.pid, holders)
    finally:
        for handle in handles:
            handle.stop()


def _listening_pids(port: int) -> set[int]:
    """Processes with a listening TCP socket on ``port`` (from /proc: the socket inode, then each process's fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            targets = {os.readlink(fd) for fd in fd_dir.iterdir()}
        except OSError:
            continue
        if any(f"socket:[{i}]" in targets for i in inodes):
            pids.add(int(fd_dir.parent.name))
    return pids


def test_stop_leaves_no_process(checkpoint: Path, tmp_path: Path) -> None:
    with start_reference_server(checkpoint, "second/copy:1", tmp_path) as handle:
        pid = handle.pid
        assert pid is not None and _alive(pid)
        assert (tmp_path / "server-second_copy_1.log").is_file()
        assert httpx.get(f"{handle.url}/health", timeout=10).status_code == 200
    assert not _alive(pid)
    handle.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group is gone, not only the leader
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{handle.url}/health", timeout=2)


def test_unloadable_checkpoint_is_not_servable(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    t0 = time.monotonic()
    with pytest.raises(Day0Error) as err:
        start_reference_server(bad, "bad", tmp_path, timeout_s=120)
    assert err.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE
    assert "safetensors" in str(err.value)  # the server's own last words, not a generic timeout
    assert time.monotonic() - t0 < 100  # early exit is noticed, not waited out


def test_a_start_past_the_stage_timeout_is_transient(checkpoint: Path, tmp_path: Path) -> None:
    """Still starting at the stage timeout: INFRA_TRANSIENT (the chain retries it once per session), stopped."""
    with pytest.raises(Day0Error) as err:
        start_reference_server(checkpoint, "slow", tmp_path, timeout_s=0.3)
    assert err.value.failure_class is FailureClass.INFRA_TRANSIENT
    assert "not healthy within the stage timeout" in str(err.value)


def test_classify_server_exit() -> None:
    log = "booting\nday0-reference: load failed: [CHECKPOINT_NOT_SERVABLE] no *.safetensors in /x\n"
    assert classify_server_exit(3, log)[0] is FailureClass.CHECKPOINT_NOT_SERVABLE
    cls, reason = classify_server_exit(1, "Traceback\nMemoryError\n")
    assert cls is FailureClass.DEPLOYMENT_HEALTH_FAILED and "MemoryError" in reason and "code 1" in reason
    assert classify_server_exit(None, "")[0] is FailureClass.INFRA_TRANSIENT  # still starting at the deadline
