"""Scorer vs lm-eval-harness ``local-completions``: same server, same samples, same concurrency.

Both tools run as the command a user would type, in a subprocess each, so process startup, imports and task
loading are paid the same way:

  ours      python -m pytest_day0 evaluate --url URL --model NAME --task T --records F --concurrency C
  lm-eval   python -m lm_eval run --model local-completions --model_args base_url=URL/v1/completions,
            num_concurrent=C,tokenizer=<demo model>,add_bos_token=True,... --tasks bench_T --include_path DIR
            (a task YAML written here that reads the same samples from a local JSONL, datasets offline)

Two servers, each measured in turn:

  reference  the real reference server (pytest_day0.serving.reference_server on the demo model), wrapped in an
             ASGI middleware that counts requests, times the request phase and records every answer;
  replay     a stand-in, NOT a model: it answers each request with the bytes the reference server gave to the
             identical request body earlier in this run (a dict lookup), so the client's own cost is isolated;
  replay-xK  the same, with every task's samples repeated K times: the difference to the x1 run is the
             marginal wall and CPU per request, with each tool's fixed startup cost cancelled out.

Measured per tool and task: wall time of the process (startup included), the request phase (first request
received to last answer sent, seen at the server), requests counted at the server, requests/s, and client CPU
seconds (user+sys of the tool's process tree, from getrusage(RUSAGE_CHILDREN) around it) per request. Agreement:
the per-sample decision (chosen choice / extracted answer) and correctness of both tools, on the reference run.

Run: python bench/bench_scorer_vs_lm_eval.py [--concurrency 16 --repeats 2 --replay-scale 10 --limit N
     --tasks arc_like,gsm_like]
(lm-eval must be installed in the same python: bash bench/install-lm-eval.sh PYTHON). Prints a table and the
ratios, writes bench/results/scorer_vs_lm_eval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_MODEL = ROOT / "pytest_day0" / "demo" / "model"
SERVED_NAME = "demo-bf16"
LOOPBACK = "127.0.0.1"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------- server side (runs in the server processes)


def canonical(body: bytes) -> str:
    """The replay key: the request's JSON with sorted keys, so key order and spacing do not matter."""
    return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: object) -> None:
    raw = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


class Meter:
    """Counts /v1/ requests and times the request phase; GET /bench/stats reads it, POST /bench/reset zeroes it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.non_200 = 0
        self.first: float | None = None
        self.last: float | None = None

    def start(self) -> None:
        self.requests += 1
        if self.first is None:
            self.first = time.time()

    def stats(self) -> dict[str, Any]:
        phase = (self.last - self.first) if self.first is not None and self.last is not None else None
        return {"requests": self.requests, "non_200": self.non_200, "phase_s": phase}

    async def control(self, scope: Scope, send: Send) -> bool:
        if scope["path"] == "/bench/stats":
            await _send_json(send, 200, self.stats())
            return True
        if scope["path"] == "/bench/reset":
            self.reset()
            await _send_json(send, 200, {"ok": True})
            return True
        return False


class Recording:
    """Wraps the reference server's app: meters it and keeps request -> answer bytes for the replay server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.meter = Meter()
        self.cache: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if await self.meter.control(scope, send):
            return
        if scope["path"] == "/bench/cache":
            await _send_json(send, 200, self.cache)
            return
        if not scope["path"].startswith("/v1/") or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.meter.start()
        body = await _read_body(receive)
        sent = False

        async def replay_receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 0
        out: list[bytes] = []

        async def capture(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            elif msg["type"] == "http.response.body":
                out.append(msg.get("body", b""))
            await send(msg)

        await self.app(scope, replay_receive, capture)
        self.meter.last = time.time()
        if status == 200:
            self.cache[scope["path"] + " " + canonical(body)] = b"".join(out).decode()
        else:
            self.meter.non_200 += 1


class Replay:
    """The stand-in server: answers from the recorded cache; a request never seen is a 404 and counted."""

    def __init__(self, cache: dict[str, str]) -> None:
        self.cache = {k: v.encode() for k, v in cache.items()}
        self.meter = Meter()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if path == "/bench/stats":
            return 200, json.dumps(self.meter.stats()).encode()
        if path == "/bench/reset":
            self.meter.reset()
            return 200, b'{"ok": true}'
        if path == "/health":
            return 200, b"{}"
        self.meter.start()
        try:
            answer = self.cache.get(path + " " + canonical(body)) if method == "POST" else None
        except ValueError:
            answer = None
        self.meter.last = time.time()
        if answer is None:
            self.meter.non_200 += 1
            return 404, b'{"error": {"message": "request not in the replay cache"}}'
        return 200, answer


class ReplayProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive server (Content-Length bodies only, which both clients send): a few
    microseconds per request, so that neither client is measured against a slow stand-in."""

    def __init__(self, app: Replay) -> None:
        self.app = app
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            status, payload = self.app.handle(method, target.split("?")[0], body)
            reason = b"OK" if status == 200 else b"Not Found"
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                                 % (status, reason, len(payload)) + payload)


def serve_reference(argv: list[str]) -> int:
    """The real reference server's own main(), with its app wrapped by Recording."""
    from pytest_day0.serving import reference_server

    original = reference_server.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        return Recording(original(*args, **kwargs))

    reference_server.create_app = create_app
    return reference_server.main(argv)


def serve_replay(cache_path: str, ready_path: str) -> int:
    app = Replay(json.loads(Path(cache_path).read_text()))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ReplayProtocol(app), LOOPBACK, 0, backlog=256)
        port = server.sockets[0].getsockname()[1]
        tmp = Path(ready_path + ".tmp")
        tmp.write_text(json.dumps({"url": f"http://{LOOPBACK}:{port}", "pid": os.getpid()}))
        os.replace(tmp, ready_path)
        await server.serve_forever()

    asyncio.run(run())
    return 0


def transport_floor(cache_path: str, url: str, conc: int, n: int, repeats: int = 3) -> int:
    """The HTTP clients alone, POSTing recorded scoring requests at the same concurrency, before any scoring logic:
    ours (``OpenAIClient.post``: aiohttp directly, the retry bookkeeping, the JSON body parsed), httpx's
    ``AsyncClient`` (httpcore + anyio), and aiohttp as lm-eval uses it. One warm-up round, then ``repeats`` rounds
    in turn (so load drifts hit all alike); the median of each. Prints one JSON line."""
    import aiohttp
    import httpx

    from pytest_day0.scoring.client import OpenAIClient
    from pytest_day0.serving.endpoint import Endpoint

    keys = [k for k in json.loads(Path(cache_path).read_text()) if k.startswith("/v1/completions ")]
    bodies = [json.loads(k.split(" ", 1)[1]) for k in keys]
    bodies = (bodies * (n // max(len(bodies), 1) + 1))[:n]

    async def httpx_default() -> None:
        sem = asyncio.Semaphore(conc)
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            async def one(body: dict[str, Any]) -> None:
                async with sem:
                    (await client.post("/v1/completions", json=body)).json()
            await asyncio.gather(*(one(b) for b in bodies))

    async def with_aiohttp() -> None:
        sem = asyncio.Semaphore(conc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
            async def one(body: dict[str, Any]) -> None:
                async with sem, session.post(url + "/v1/completions", json=body) as resp:
                    await resp.json()
            await asyncio.gather(*(one(b) for b in bodies))

    payloads = [{k: v for k, v in b.items() if k != "model"} for b in bodies]

    async def ours() -> None:
        async with OpenAIClient(Endpoint(url=url, model=SERVED_NAME), concurrency=conc) as client:
            async def one(payload: dict[str, Any]) -> None:
                await client.post("/v1/completions", payload)  # the reply dropped, as the others drop theirs

            await asyncio.gather(*(one(p) for p in payloads))

    runs: tuple[tuple[str, Callable[[], Coroutine[Any, Any, None]]], ...] = (
        ("ours", ours), ("httpx_default", httpx_default), ("aiohttp", with_aiohttp))
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
    for round_ in range(repeats + 1):
        # each round starts with a different client and each run with the garbage of the one before collected, so
        # that no client always runs in the same place (a fairness measure; no order effect was seen above noise)
        for name, fn in runs[round_ % len(runs):] + runs[:round_ % len(runs)]:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            asyncio.run(fn())
            if round_:  # round 0 warms imports, caches and the server
                seen[name].append((time.process_time() - c0, time.perf_counter() - t0))
    result: dict[str, Any] = {"requests": len(bodies), "concurrency": conc, "repeats": repeats}
    for name, got in seen.items():
        cpu, wall = statistics.median(c for c, _ in got), statistics.median(w for _, w in got)
        result[name] = {"req_per_s": round(len(bodies) / wall, 1), "cpu_ms_per_req": round(1000 * cpu / len(bodies), 3),
                        "cpu_ms_per_req_runs": [round(1000 * c / len(bodies), 3) for c, _ in got]}
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- driver side


class Server:
    def __init__(self, cmd: list[str], ready: Path, log: Path, env: dict[str, str]) -> None:
        self.log_fh = log.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (see {log})")
            time.sleep(0.1)
        self.url = str(json.loads(ready.read_text())["url"]).rstrip("/")

    def get(self, path: str) -> Any:
        import httpx

        return httpx.get(self.url + path, timeout=60).json()

    def post(self, path: str, payload: object) -> Any:
        import httpx

        return httpx.post(self.url + path, json=payload, timeout=60).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_fh.close()


def bench_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(work / "hf-datasets"), "HF_HOME": str(work / "hf-home"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def write_lm_eval_task(task: Any, work: Path, name: str | None = None) -> str:
    """A task YAML for lm-eval that asks exactly what our scorer asks: same prompt, same continuations with no
    delimiter, same stop and token budget, same answer regex."""
    name = name or f"bench_{task.name}"
    data = work / "lm_eval_tasks" / f"{name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with data.open("w") as fh:
        for s in task.samples:
            fh.write(json.dumps(s.model_dump(exclude_none=True)) + "\n")
    spec = task.spec
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data))}", "test_split: test", "doc_to_text: prompt",
             "doc_to_target: target"]
    if spec.kind == "multiple_choice":
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", 'target_delimiter: ""',
                  "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]
    else:
        lines += ["output_type: generate_until", "generation_kwargs:", f"  until: {json.dumps(list(spec.stop))}",
                  f"  max_gen_toks: {spec.max_tokens}", "  do_sample: false", "  temperature: 0.0",
                  "filter_list:", "  - name: extract", "    filter:", "      - function: regex",
                  f"        regex_pattern: {json.dumps(spec.answer_pattern)}", "      - function: take_first",
                  "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true"]
    (data.parent / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user+sys of the whole process tree) and exit code of one tool run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rc


def run_ours(py: str, url: str, task: Any, conc: int, limit: int | None, out: Path,
             env: dict[str, str]) -> dict[str, Any]:
    records = out / "records.jsonl"
    cmd = [py, "-m", "pytest_day0", "evaluate", "--url", url, "--model", SERVED_NAME, "--task", task.source,
           "--records", str(records), "--concurrency", str(conc), "--side", "baseline",
           "--limit", str(limit if limit is not None else len(task.samples))]  # the spec file holds them all
    wall, cpu, rc = timed(cmd, env, out / "ours.log")
    text = (out / "ours.log").read_text()
    result = json.loads(text[text.index("{"):]) if rc == 0 else {}
    decisions: dict[str, Any] = {}
    if records.is_file():
        for line in records.read_text().splitlines():
            rec = json.loads(line)
            decisions[rec["id"]] = {"pred": rec.get("response"), "correct": rec.get("correct"),
                                    "logprobs": rec.get("choice_logprobs")}
    return {"wall_s": wall, "cpu_s": cpu, "rc": rc, "own_s": result.get("wall_s"), "score": result.get("score"),
            "decisions": decisions, "cmd": cmd}


def run_lm_eval(py: str, url: str, task: Any, lm_task: str, conc: int, out: Path,
                env: dict[str, str], limit: int | None = None) -> dict[str, Any]:
    model_args = ",".join([
        f"base_url={url}/v1/completions", f"model={SERVED_NAME}", f"num_concurrent={conc}",
        f"tokenizer={DEMO_MODEL}", "tokenizer_backend=huggingface", "add_bos_token=True", "max_retries=3",
        "tokenized_requests=True"])
    cmd = [py, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", lm_task, "--include_path", str(Path(env["HF_DATASETS_CACHE"]).parent / "lm_eval_tasks"),
           "--batch_size", "1", "--output_path", str(out / "lm_eval_out"), "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    wall, cpu, rc = timed(cmd, env, out / "lm_eval.log")
    own = score = None
    decisions: dict[str, Any] = {}
    results = sorted(glob.glob(str(out / "lm_eval_out" / "**" / "results_*.json"), recursive=True))
    if rc == 0 and results:
        data = json.loads(Path(results[-1]).read_text())
        own = float(data.get("total_evaluation_time_seconds", "nan"))
        metrics = data["results"][lm_task]
        key = "acc,none" if task.spec.kind == "multiple_choice" else "exact_match,extract"
        score = 100.0 * float(metrics[key])
        for path in glob.glob(str(out / "lm_eval_out" / "**" / f"samples_{lm_task}_*.jsonl"), recursive=True):
            for line in Path(path).read_text().splitlines():
                s = json.loads(line)
                doc = s["doc"]
                if task.spec.kind == "multiple_choice":
                    lps = [float(r[0]) for r in s["filtered_resps"]]
                    pred = doc["choices"][max(range(len(lps)), key=lambda i: lps[i])]
                    decisions[doc["id"]] = {"pred": pred, "correct": float(s["acc"]), "logprobs": lps}
                else:
                    resp = s["filtered_resps"]
                    decisions[doc["id"]] = {"pred": resp[0] if isinstance(resp, list) else resp,
                                            "correct": float(s["exact_match"]), "logprobs": None}
    return {"wall_s": wall, "cpu_s": cpu, "rc": rc, "own_s": own, "score": score, "decisions": decisions,
            "cmd": cmd}


def agreement(task: Any, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    ids = [s.id for s in task.samples]
    both = [i for i in ids if i in ours and i in theirs]
    same_pred = sum(1 for i in both if str(ours[i]["pred"]).strip() == str(theirs[i]["pred"]).strip())
    same_correct = sum(1 for i in both if ours[i]["correct"] == theirs[i]["correct"])
    diffs = [abs(a - b) for i in both if ours[i]["logprobs"] and theirs[i]["logprobs"]
             for a, b in zip(ours[i]["logprobs"], theirs[i]["logprobs"], strict=True)]
    return {"samples": len(ids), "scored_by_both": len(both), "same_decision": same_pred,
            "same_correct": same_correct, "max_abs_logprob_diff": max(diffs) if diffs else None}


def scaled_task(task: Any, k: int, work: Path) -> Any:
    """The task with every sample repeated ``k`` times (new ids, same prompts): k x the requests, so the marginal
    cost per request stands out of the fixed startup cost. Identical prompts make identical request bodies,
    which the replay cache already holds."""
    from pytest_day0.scoring.tasks import load_task

    d = work / f"x{k}"
    d.mkdir(parents=True, exist_ok=True)
    with (d / f"{task.name}.jsonl").open("w") as fh:
        for j in range(k):
            for smp in task.samples:
                fh.write(json.dumps({**smp.model_dump(exclude_none=True), "id": f"{smp.id}~{j}"}) + "\n")
    spec = {**task.spec.model_dump(mode="json", exclude_none=True), "samples": f"{task.name}.jsonl"}
    (d / f"{task.name}.task.json").write_text(json.dumps(spec))
    return load_task(str(d / f"{task.name}.task.json"))


def measure(server: Server, label: str, py: str, jobs: list[tuple[Any, str]], args: argparse.Namespace,
            work: Path, env: dict[str, str], startup_probe: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan: list[tuple[int | str, Any, str, str, int | None]] = []
    if startup_probe:  # one sample, per tool: the fixed cost (interpreter, imports, task and tokenizer loading)
        plan += [("startup", jobs[0][0], jobs[0][1], t, 1) for t in ("ours", "lm-eval")]
    for i in range(args.repeats):
        for task, lm_task in jobs:
            order = ["ours", "lm-eval"] if i % 2 == 0 else ["lm-eval", "ours"]  # alternate: no order bias
            plan += [(i, task, lm_task, tool, None) for tool in order]
    for rep, task, lm_task, tool, limit in plan:
        out = work / f"{label}-{lm_task}-{tool}-{rep}"
        out.mkdir(parents=True)
        server.post("/bench/reset", {})
        if tool == "ours":
            r = run_ours(py, server.url, task, args.concurrency, limit, out, env)
        else:
            r = run_lm_eval(py, server.url, task, lm_task, args.concurrency, out, env, limit)
        st = server.get("/bench/stats")
        n = int(st["requests"])
        row = {"server": label, "task": task.name, "samples": limit or len(task.samples), "tool": tool, "rep": rep,
               "rc": r["rc"], "wall_s": round(r["wall_s"], 3), "phase_s": st["phase_s"] and round(st["phase_s"], 3),
               "own_timer_s": r["own_s"], "requests": n, "non_200": st["non_200"],
               "req_per_s_wall": round(n / r["wall_s"], 2) if r["wall_s"] else None,
               "req_per_s_phase": round(n / st["phase_s"], 2) if st["phase_s"] else None,
               "cpu_s": round(r["cpu_s"], 3), "cpu_ms_per_req": round(1000 * r["cpu_s"] / n, 3) if n else None,
               "score": r["score"], "cmd": r["cmd"], "_decisions": r["decisions"]}
        rows.append(row)
        print(f"  {label:10} {lm_task:18} {tool:7} rep {rep}: rc={r['rc']} wall={row['wall_s']:.2f}s "
              f"phase={row['phase_s']}s requests={n} cpu={row['cpu_s']:.2f}s score={r['score']}", flush=True)
        if r["rc"] != 0 or st["non_200"]:
            print(f"    FAILED: see {out}", flush=True)
    return rows


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and r["rc"] == 0]
    return round(statistics.median(vals), 3) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b is not None and a > 0 and b > 0 else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys: list[tuple[str, str]] = []
    for r in rows:
        if r["rep"] != "startup" and (r["server"], r["task"]) not in keys:
            keys.append((r["server"], r["task"]))
    for server, task in keys:
        per: dict[str, dict[str, Any]] = {}
        for tool in ("ours", "lm-eval"):
            sel = [r for r in rows if (r["server"], r["task"], r["tool"]) == (server, task, tool)
                   and r["rep"] != "startup"]
            m: dict[str, Any] = {k: median(sel, k) for k in (
                "samples", "wall_s", "phase_s", "own_timer_s", "requests", "req_per_s_wall", "req_per_s_phase",
                "cpu_s", "cpu_ms_per_req")}
            m["runs"], m["failed_runs"] = len(sel), sum(1 for r in sel if r["rc"] != 0 or r["non_200"])
            per[tool] = m
        o, t = per["ours"], per["lm-eval"]
        out.append({"server": server, "task": task, "ours": o, "lm_eval": t,
                    "throughput_ratio_wall": ratio(o["req_per_s_wall"], t["req_per_s_wall"]),
                    "throughput_ratio_phase": ratio(o["req_per_s_phase"], t["req_per_s_phase"]),
                    "cpu_per_req_ratio_lm_eval_over_ours": ratio(t["cpu_ms_per_req"], o["cpu_ms_per_req"])})
    return out


def marginals(summary: list[dict[str, Any]], rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Per extra request, from the replay runs at 1x and kx the samples: wall and client CPU with the fixed
    startup cost cancelled out (the difference of two medians)."""
    out = []
    for big in (s for s in summary if s["server"] == f"replay-x{k}"):
        small = next((s for s in summary if s["server"] == "replay" and s["task"] == big["task"]), None)
        if small is None:
            continue
        entry: dict[str, Any] = {"task": big["task"], "scale": k}
        for key in ("ours", "lm_eval"):
            a, b = small[key], big[key]
            if None in (a["requests"], b["requests"], a["wall_s"], b["wall_s"], a["cpu_s"], b["cpu_s"]):
                entry[key] = None
                continue
            extra = b["requests"] - a["requests"]
            dwall, dcpu = b["wall_s"] - a["wall_s"], b["cpu_s"] - a["cpu_s"]
            entry[key] = {"extra_requests": extra, "wall_s": round(dwall, 3), "cpu_s": round(dcpu, 3),
                          "req_per_s": round(extra / dwall, 1) if dwall > 0 else None,
                          "cpu_ms_per_req": round(1000 * dcpu / extra, 3) if extra else None}
        if entry["ours"] and entry["lm_eval"]:
            entry["throughput_ratio"] = ratio(entry["ours"]["req_per_s"], entry["lm_eval"]["req_per_s"])
            entry["cpu_per_req_ratio_lm_eval_over_ours"] = ratio(entry["lm_eval"]["cpu_ms_per_req"],
                                                                 entry["ours"]["cpu_ms_per_req"])
        out.append(entry)
    return out


def startup(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {r["tool"]: {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "requests": r["requests"]}
            for r in rows if r["rep"] == "startup" and r["rc"] == 0}


def _f(v: float | None, w: int, p: int = 2) -> str:
    return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"


def print_table(summary: list[dict[str, Any]], marg: list[dict[str, Any]], boot: dict[str, Any],
                agree: dict[str, Any]) -> None:
    head = (f"{'server':10} {'task':9} {'tool':7} {'samples':>7} {'wall s':>7} {'phase s':>7} {'reqs':>6} "
            f"{'req/s wall':>10} {'req/s phase':>11} {'cpu s':>6} {'cpu ms/req':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for s in summary:
        for tool, key in (("ours", "ours"), ("lm-eval", "lm_eval")):
            m = s[key]
            print(f"{s['server']:10} {s['task']:9} {tool:7} {_f(m['samples'], 7, 0)} {_f(m['wall_s'], 7)} "
                  f"{_f(m['phase_s'], 7)} {_f(m['requests'], 6, 0)} {_f(m['req_per_s_wall'], 10, 1)} "
                  f"{_f(m['req_per_s_phase'], 11, 1)} {_f(m['cpu_s'], 6)} {_f(m['cpu_ms_per_req'], 10, 3)}")
    if boot:
        print("\nstartup (one sample, replay server): " + "; ".join(
            f"{tool} {v['wall_s']:.2f} s wall, {v['cpu_s']:.2f} s cpu" for tool, v in boot.items()))
    print("\nratios, medians of the repeats (throughput: ours / lm-eval; client CPU per request: lm-eval / ours):")
    for s in summary:
        print(f"  {s['server']:10} {s['task']:9} throughput x{s['throughput_ratio_wall']} wall (startup incl.), "
              f"x{s['throughput_ratio_phase']} request phase; cpu/request x{s['cpu_per_req_ratio_lm_eval_over_ours']}")
    for e in marg:
        o, t = e["ours"] or {}, e["lm_eval"] or {}
        print(f"  marginal   {e['task']:9} (replay x{e['scale']} minus x1) req/s ours {o.get('req_per_s')} "
              f"lm-eval {t.get('req_per_s')} -> x{e.get('throughput_ratio')}; cpu ms/req ours "
              f"{o.get('cpu_ms_per_req')} lm-eval {t.get('cpu_ms_per_req')} -> "
              f"lm-eval/ours x{e.get('cpu_per_req_ratio_lm_eval_over_ours')}")
    print("\nagreement on the reference server (first repeat):")
    for task, a in agree.items():
        print(f"  {task:9} samples={a['samples']} scored_by_both={a['scored_by_both']} "
              f"same_decision={a['same_decision']} same_correct={a['same_correct']} "
              f"max|dlogprob|={a['max_abs_logprob_diff']} score ours={a['score_ours']} lm-eval={a['score_lm_eval']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each task (default: all)")
    ap.add_argument("--tasks", default="arc_like,gsm_like")
    ap.add_argument("--no-replay", action="store_true", help="skip the replay-server measurements")
    ap.add_argument("--replay-scale", type=int, default=10,
                    help="also run each task with its samples repeated K times on the replay server (marginal cost)")
    ap.add_argument("--python", default=sys.executable, help="the python that runs both tools")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scorer_vs_lm_eval.json")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, records, lm-eval output)")
    args = ap.parse_args()

    from pytest_day0.scoring.tasks import load_task

    py = args.python
    probe = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('lm_eval'), "
                            "m.version('torch'), m.version('transformers'), m.version('datasets'), "
                            "m.version('httpx'), m.version('aiohttp'))"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"lm-eval is not installed in {py}: run bash bench/install-lm-eval.sh {py}", file=sys.stderr)
        return 2
    lm_v, torch_v, tf_v, ds_v, httpx_v, aiohttp_v = probe.stdout.split()
    versions = {"lm_eval": lm_v, "torch": torch_v, "transformers": tf_v, "datasets": ds_v, "httpx": httpx_v,
                "aiohttp": aiohttp_v, "python": platform.python_version()}
    # httpcore imports sniffio on every request when it is absent (a failed import is not cached): a large share
    # of our client's CPU per request depends on whether it is installed, so the result records it
    sniff = subprocess.run([py, "-c", "import sniffio; print(sniffio.__version__)"], capture_output=True, text=True)
    versions["sniffio"] = sniff.stdout.strip() if sniff.returncode == 0 else "absent"

    work = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    env = bench_env(work)
    tasks = [load_task(name, args.limit) for name in args.tasks.split(",")]
    lm_tasks = {t.name: write_lm_eval_task(t, work) for t in tasks}
    print(f"scorer vs lm-eval {lm_v} local-completions; concurrency {args.concurrency}, {args.repeats} repeats, "
          f"tasks {', '.join(f'{t.name}({len(t.samples)})' for t in tasks)}; work dir {work}", flush=True)

    rows: list[dict[str, Any]] = []
    ref = Server([py, __file__, "_serve", "--checkpoint", str(DEMO_MODEL), "--served-model-name", SERVED_NAME,
                  "--host", LOOPBACK, "--port", "0", "--ready-file", str(work / "ref.ready.json")],
                 work / "ref.ready.json", work / "ref.log", env)
    jobs = [(t, lm_tasks[t.name]) for t in tasks]
    try:
        for task in tasks:  # warm the server (first forward passes are slow); not measured
            smp = task.samples[0]
            prompt = smp.prompt + (smp.choices[0] if smp.choices else "")
            ref.post("/v1/completions", {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "echo": True,
                                         "logprobs": 1, "temperature": 0.0})
        rows += measure(ref, "reference", py, jobs, args, work, env)
        cache = ref.get("/bench/cache")
    finally:
        ref.stop()
    (work / "cache.json").write_text(json.dumps(cache))

    k = args.replay_scale
    transport: dict[str, Any] | None = None
    if not args.no_replay:
        rep = Server([py, __file__, "_replay", str(work / "cache.json"), str(work / "replay.ready.json")],
                     work / "replay.ready.json", work / "replay.log", env)
        try:
            rows += measure(rep, "replay", py, jobs, args, work, env, startup_probe=True)
            if k > 1:
                big = [scaled_task(t, k, work) for t in tasks]
                big_jobs = [(t, write_lm_eval_task(t, work, f"bench_{t.name}_x{k}")) for t in big]
                rows += measure(rep, f"replay-x{k}", py, big_jobs, args, work, env)
            floor = subprocess.run([py, __file__, "_transport", str(work / "cache.json"), rep.url,
                                    str(args.concurrency), "2400"], capture_output=True, text=True, env=env, cwd=ROOT)
            transport = json.loads(floor.stdout.strip().splitlines()[-1]) if floor.returncode == 0 else None
        finally:
            rep.stop()

    agree: dict[str, Any] = {}
    for task in tasks:
        pick = {r["tool"]: r for r in rows if r["server"] == "reference" and r["task"] == task.name and r["rep"] == 0}
        a = agreement(task, pick["ours"]["_decisions"], pick["lm-eval"]["_decisions"])
        a["score_ours"], a["score_lm_eval"] = pick["ours"]["score"], pick["lm-eval"]["score"]
        agree[task.name] = a
    summary = summarize(rows)
    marg = marginals(summary, rows, k)
    boot = startup(rows)
    print_table(summary, marg, boot, agree)
    if transport:
        print(f"\nHTTP client floor on the replay server ({transport['requests']} scoring POSTs, concurrency "
              f"{transport['concurrency']}, no scoring logic; median of {transport['repeats']}):")
        for key, what in (("ours", "ours: OpenAIClient.post on aiohttp"),
                          ("httpx_default", "httpx.AsyncClient, default transport (httpcore + anyio)"),
                          ("aiohttp", "aiohttp (lm-eval's client)")):
            v = transport[key]
            print(f"  {what:72} {v['req_per_s']:>8} req/s {v['cpu_ms_per_req']:>7} ms cpu/req")

    result = {
        "benchmark": "scorer_vs_lm_eval",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "versions": versions,
        "concurrency": args.concurrency, "repeats": args.repeats, "limit": args.limit,
        "goal": "ours >= 2x lm-eval throughput",
        "summary": summary, "marginal": marg, "startup": boot, "agreement": agree, "http_client_floor": transport,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rows if r["rc"] != 0 or r["non_200"]]
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        sys.exit(serve_reference(sys.argv[2:]))
    if sys.argv[1:2] == ["_replay"]:
        sys.exit(serve_replay(sys.argv[2], sys.argv[3]))
    if sys.argv[1:2] == ["_transport"]:
        sys.exit(transport_floor(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    sys.exit(main())
