"""The bad-input corpus (issue 7, part 1): every malformed thing a user, a server or a cluster can hand us
ends in a named failure class with one line of message, never a traceback from our code.

One table, one row per bad input: ``pytest.param(action, CLASS, fragment, id=...)``. ``action(ctx)`` builds the
bad input for real (files in tmp_path, a real HTTP server on 127.0.0.1, the loopback sshd and SLURM cluster of
tests/cluster) and calls the code that reads it; the row passes only if that raises Day0Error or GateFailure
with exactly ``CLASS``, a message that is one line starting with ``[CLASS]``, and ``fragment`` in it (the file,
key, layer or state the user must look at). A second table drives some file cases through the CLI
(``python -m pytest_day0 inspect``) in a subprocess: exit status, one stderr line, no "Traceback".

Rows that need the cluster skip without it (fail under DAY0_REQUIRE_CLUSTER=1, as the other cluster tests).
How the SLURM "times out" and "preempted" rows are made is said at each: a real wall-clock TIMEOUT needs
SLURM's minimum --time of one minute plus its ~30 s limit sweep (~90 s measured), so the timeout row is the
stage time limit our code sets (``--day0-stage-timeout`` -> ``watch_job(timeout_s)``), and preemption is an
administrator's ``scancel`` of the running job (no preemption plugin on the loopback cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.openai_server import ToyOpenAIServer

from pytest_day0.checkpoint.inspect import inspect_checkpoint
from pytest_day0.checkpoint.recipes import resolve_recipe
from pytest_day0.checkpoint.safetensors_header import FIRST_READ, LocalFileSource
from pytest_day0.failures import Day0Error, FailureClass, GateFailure
from pytest_day0.gates.ptq import assert_ptq_check, check_coverage, check_metadata
from pytest_day0.gates.run import align_records, assert_run, check_run, check_task_sets
from pytest_day0.scoring import lm_eval
from pytest_day0.scoring.published import load_published
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Task, load_task
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages.evaluate import evaluate_task

C = FailureClass
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ctx:
    """What a row's action gets: its own tmp dir, and fixtures on demand (only cluster rows need the cluster)."""

    tmp: Path
    request: pytest.FixtureRequest
    notes: dict[str, Any] = field(default_factory=dict)  # what a row measured, checked after the raise

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)


Action = Callable[[Ctx], object]


# ============================================================================ safetensors files


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def f32(shape: list[int], begin: int) -> dict[str, Any]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


GOOD = {"a.weight": f32([2, 2], 0)}  # 16 data bytes


def inspect_file(content: bytes, name: str = "model.safetensors") -> Action:
    def action(ctx: Ctx) -> object:
        (ctx.tmp / name).write_bytes(content)
        return inspect_checkpoint(ctx.tmp)
    return action


def absurd_header_length(ctx: Ctx) -> object:
    """Declared header length 2**60 in an 8 GiB sparse file: refused after one read of at most FIRST_READ bytes."""
    path = ctx.tmp / "model.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", 2**60) + b"{")
        fh.truncate(8 << 30)  # sparse: the size is real, no block is written
    sources: list[LocalFileSource] = []

    def opener(p: str) -> LocalFileSource:
        src = LocalFileSource(p)
        sources.append(src)
        return src

    ctx.notes["sources"] = sources
    tracemalloc.start()
    try:
        return inspect_checkpoint(ctx.tmp, open_source=opener)
    finally:
        ctx.notes["peak_alloc"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# ============================================================================ checkpoints: index and configs


def write_shard(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid shard of zero bytes per tensor's data: names, dtypes, shapes are all the inspector reads."""
    bits = {"F32": 32, "BF16": 16, "F8_E4M3": 8, "U8": 8, "I8": 8}
    header: dict[str, Any] = {}
    cursor = 0
    for name, (dtype, shape) in tensors.items():
        n = bits[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + n // 8]}
        cursor += n // 8
    path.write_bytes(st_bytes(header, bytes(cursor)))


def linears(kind: str, layers: int = 2, quantized: set[str] | None = None) -> dict[str, tuple[str, list[int]]]:
    """q_proj/down_proj of ``layers`` decoder layers, all stored as ``kind`` unless ``quantized`` picks modules."""
    out: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": ("BF16", [16, 8])}
    for i in range(layers):
        for mod in (f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"):
            k = kind if quantized is None or mod in quantized else "bf16"
            if k == "bf16":
                out[f"{mod}.weight"] = ("BF16", [8, 8])
            elif k == "fp8":
                out |= {f"{mod}.weight": ("F8_E4M3", [8, 8]), f"{mod}.weight_scale": ("F32", []),
                        f"{mod}.input_scale": ("F32", [])}
            elif k == "nvfp4":  # ModelOpt 0.47: U8 [out, in/2], F8 scale [out, in/16], F32 weight_scale_2
                out |= {f"{mod}.weight": ("U8", [8, 16]), f"{mod}.weight_scale": ("F8_E4M3", [8, 2]),
                        f"{mod}.weight_scale_2": ("F32", []), f"{mod}.input_scale": ("F32", [])}
    out["lm_head.weight"] = ("BF16", [16, 8])
    return out


CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
          "max_position_embeddings": 64}


def hf_quant(algo: str, **extra: Any) -> dict[str, Any]:
    return {"producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": algo, "exclude_modules": ["lm_head"], **extra}}


def checkpoint(ctx: Ctx, name: str, tensors: dict[str, tuple[str, list[int]]], config: Any = CONFIG,
               quant: dict[str, Any] | None = None) -> Path:
    d = ctx.tmp / name
    d.mkdir()
    write_shard(d / "model.safetensors", tensors)
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if quant is not None:
        (d / "hf_quant_config.json").write_text(json.dumps(quant))
    return d


def sharded(weight_map: dict[str, str], shards: dict[str, dict[str, tuple[str, list[int]]]] | None = None,
            index_text: str | None = None) -> Action:
    def action(ctx: Ctx) -> object:
        for shard, tensors in (shards or {}).items():
            write_shard(ctx.tmp / shard, tensors)
        text = index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
        (ctx.tmp / "model.safetensors.index.json").write_text(text)
        (ctx.tmp / "config.json").write_text(json.dumps(CONFIG))
        return inspect_checkpoint(ctx.tmp)
    return action


def coverage(recipe: str, tensors: dict[str, tuple[str, list[int]]], *, quant: dict[str, Any] | None = None,
             config: Any = CONFIG) -> Action:
    """Inspect a quantized checkpoint (headers only), then run the PTQ gate's coverage check on it."""
    def action(ctx: Ctx) -> object:
        out = inspect_checkpoint(checkpoint(ctx, "out", tensors, config, quant))
        assert_ptq_check(check_coverage(out, resolve_recipe(recipe)))
        return out
    return action


def served_demo(*, quant_algo: str | None = None, quantization_config: dict[str, Any] | None = None,
                fp8_scale: Callable[[Any], Any] | None = None, input_scale: bool = True) -> Action:
    """The demo checkpoint as the reference server's loader gets it, altered: a quant declaration, and with
    ``fp8_scale`` every decoder linear stored as FP8 E4M3 with the weight_scale that function makes (a float
    per-tensor scale, or a malformed one), with or without its input_scale."""
    def action(ctx: Ctx) -> object:
        import shutil

        import torch
        from safetensors.torch import load_file, save_file

        from pytest_day0.serving import dequant
        from pytest_day0.stages.source import DEMO_MODEL_DIR

        path = ctx.tmp / "served"
        shutil.copytree(DEMO_MODEL_DIR, path)
        if quant_algo is not None:
            (path / "hf_quant_config.json").write_text(json.dumps(hf_quant(quant_algo)))
        if quantization_config is not None:
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
        if fp8_scale is not None:
            tensors = load_file(str(path / "model.safetensors"))
            for name in [n for n in tensors if n.startswith("model.layers.") and n.endswith("proj.weight")]:
                weight = tensors[name].float()
                scale = weight.abs().max() / 448.0
                tensors[name] = (weight / scale).to(torch.float8_e4m3fn)
                tensors[name.replace(".weight", ".weight_scale")] = fp8_scale(weight)
                if input_scale:
                    tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.01)
            save_file(tensors, str(path / "model.safetensors"))
        return dequant.load_checkpoint(path)
    return action


def _per_tensor_scale(weight: Any) -> Any:
    return weight.abs().max() / 448.0


def _e8m0_per_16(weight: Any) -> Any:
    """E8M0 bytes in blocks of 16 (MXFP8 is 32): the layout of another format under MXFP8's dtypes."""
    import torch

    return torch.full((weight.shape[0], weight.shape[1] // 16), 120, dtype=torch.uint8)


def _needs_cuda_config(ctx: Ctx) -> object:
    from pytest_day0.config import build_config

    return build_config({"model": "demo", "recipe": "nvfp4_awq", "workdir": str(ctx.tmp)}, lambda _k: None,
                        environ={})


def _llmcompressor_on_reference(ctx: Ctx) -> object:
    from pytest_day0.config import build_config

    return build_config({"model": "demo", "recipe": "w8a8", "quantize": "llmcompressor"}, lambda _k: None,
                        environ={})


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


CT_W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
           "config_groups": {"group_0": {"targets": ["Linear"],
                                         "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                                         "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                                               "dynamic": True}}},
           "ignore": ["lm_head"]}


def config_file_missing(ctx: Ctx) -> object:
    """The export dropped config.json: the PTQ metadata gate sees every engine-facing field vanish."""
    source = inspect_checkpoint(checkpoint(ctx, "src", linears("bf16")))
    output = inspect_checkpoint(checkpoint(ctx, "out", linears("fp8"), config=None, quant=hf_quant("FP8")))
    assert_ptq_check(check_metadata(source, output))
    return output


# ============================================================================ task files


def task_files(spec: dict[str, Any] | str, lines: list[str] | bytes | None, spec_name: str = "t.task.json",
               limit: int | None = None) -> Action:
    def action(ctx: Ctx) -> object:
        spec_path = ctx.tmp / spec_name
        spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        if isinstance(lines, bytes):
            (ctx.tmp / "t.jsonl").write_bytes(lines)
        elif lines is not None:
            (ctx.tmp / "t.jsonl").write_text("\n".join(lines) + "\n")
        return load_task(str(spec_path), limit)
    return action


MC = {"name": "t", "kind": "multiple_choice", "metric": "acc", "scale": [0, 100], "samples": "t.jsonl"}
GEN = {"name": "g", "kind": "generate", "metric": "exact_match", "scale": [0, 1], "samples": "t.jsonl",
       "stop": ["\n"]}
S1 = json.dumps({"id": "1", "prompt": "1+1=", "choices": [" 2", " 3"], "target": 0})
S2 = json.dumps({"id": "2", "prompt": "2+2=", "choices": [" 4", " 5"], "target": 0})


# ============================================================================ scores


def published(text: str, suffix: str = ".json") -> Action:
    def action(ctx: Ctx) -> object:
        path = ctx.tmp / f"published{suffix}"
        path.write_text(text)
        return load_published(path)
    return action


def run_gate(score: object, scale: tuple[float, float] = (0.0, 100.0)) -> Action:
    """A side's TaskResult whose score is unusable (built as a deserialised result would arrive)."""
    def action(ctx: Ctx) -> object:
        result = TaskResult.model_construct(
            task="arc_like", side="candidate", status="SUCCESS", expected_samples=4, scored_samples=4,
            errored_samples=0, score=score, scale=scale, metric="acc", records_path=str(ctx.tmp / "r.jsonl"),
            first_error=None)
        assert_run(check_run(result))
        return result
    return action


STAMP = "2026-01-01T00-00-00.000000"


def lm_eval_folder(root: Path, reported: Any, per_doc: list[Any], tasks: tuple[str, ...] = ("arc",)) -> Path:
    """An lm-eval ``--output_path`` folder as lm-eval 0.4 writes it (results + samples files, one model)."""
    folder = root / "model__x"
    folder.mkdir(parents=True)
    results = {
        "results": {t: {"alias": t, "acc,none": reported, "acc_stderr,none": 0.1} for t in tasks},
        "configs": {t: {"output_type": "multiple_choice"} for t in tasks},
        "higher_is_better": {t: {"acc": True} for t in tasks},
        "n-samples": {t: {"original": len(per_doc), "effective": len(per_doc)} for t in tasks},
        "model_name": "x",
    }
    # allow_nan: lm-eval writes NaN as a bare token, which json.loads reads back as float('nan')
    (folder / f"results_{STAMP}.json").write_text(json.dumps(results, allow_nan=True))
    for t in tasks:
        lines = [json.dumps({"doc_id": i, "filter": "none", "acc": v, "arguments": [[f"q{i}", " a"]],
                             "target": "0"}) for i, v in enumerate(per_doc)]
        (folder / f"samples_{t}_{STAMP}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def lm_eval_side(reported: Any, per_doc: list[Any]) -> Action:
    """Read one side's lm-eval folder and gate it, as ``--day0-eval lm-eval`` does."""
    def action(ctx: Ctx) -> object:
        folder = lm_eval_folder(ctx.tmp / "base", reported, per_doc)
        result = lm_eval.task_result(folder, "arc", "baseline", ctx.tmp / "recs.jsonl")
        assert_run(check_run(result))
        return result
    return action


def lm_eval_candidate_lacks_task(ctx: Ctx) -> object:
    lm_eval_folder(ctx.tmp / "base", 0.5, [1.0, 0.0], tasks=("arc", "hella"))
    cand = lm_eval_folder(ctx.tmp / "cand", 0.5, [1.0, 0.0], tasks=("arc",))
    names = lm_eval.task_names(ctx.tmp / "base")
    return [lm_eval.task_result(cand, n, "candidate", ctx.tmp / f"{n}.jsonl") for n in names]


def task_sets_differ(ctx: Ctx) -> object:
    check = check_task_sets({"arc_like", "gsm_like", "tau_like"}, {"arc_like", "mmlu_like"})
    assert_run(check)
    return check


def records_do_not_align(ctx: Ctx) -> object:
    def rec(i: str) -> SampleRecord:
        return SampleRecord(id=i, task="arc_like", prompt_hash="h" + i, target=0, correct=1.0)

    return align_records([rec("1"), rec("2"), rec("3")], [rec("1"), rec("2"), rec("9")])


# ============================================================================ servers


MC_TASK = {**MC, "name": "mc"}
SERVER_SAMPLES = [S1, S2]


def served(mode: dict[str, Any], *, kind: str = "mc", timeout_s: float = 5.0, retries: int = 1,
           api_key: str | None = None) -> Action:
    """Evaluate a 2-sample task against a real server in fault mode ``mode``, then run the run gate on it.

    Small retry/timeout settings keep each row under ~1.5 s; the records' own error lines are kept in notes."""
    def action(ctx: Ctx) -> object:
        spec = MC_TASK if kind == "mc" else {**GEN, "name": "gen"}
        lines = SERVER_SAMPLES if kind == "mc" else [json.dumps({"id": "1", "prompt": "1+2=", "target": "3"})]
        task = task_files(spec, lines)(ctx)
        assert isinstance(task, Task)
        with ToyOpenAIServer() as srv:
            for key, value in mode.items():
                setattr(srv.faults, key, value)
            from pydantic import SecretStr

            endpoint = Endpoint(url=srv.url, model="toy", api_key=SecretStr(api_key) if api_key else None)
            t0 = time.monotonic()
            result = asyncio.run(evaluate_task(task, endpoint, ctx.tmp / "records.jsonl", "candidate",
                                               concurrency=4, max_retries=retries, timeout_s=timeout_s,
                                               backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.5))
            ctx.notes.update(wall=time.monotonic() - t0, requests=srv.request_count(), result=result)
        assert_run(check_run(result))
        return result
    return action


# ============================================================================ SSH (real sshd on 127.0.0.1:2222)


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True)
    return path


def ssh_connect(**target: Any) -> Callable[[Ctx], Any]:
    """Connect to the loopback sshd with ``target`` overrides (values may be callables of ctx)."""
    def action(ctx: Ctx) -> object:
        from pytest_day0.remote.ssh import connect

        cluster = ctx.fixture("cluster")
        resolved = {k: v(ctx, cluster) if callable(v) else v for k, v in target.items()}
        client = connect(cluster.target(**resolved))
        client.close()
        return client
    return action


def wrong_host_key(ctx: Ctx, cluster: Any) -> Path:
    other = _keygen(ctx.tmp / "other_host_key")
    path = ctx.tmp / "known_hosts"
    path.write_text(f"[{cluster.host}]:{cluster.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    return path


def empty_known_hosts(ctx: Ctx, cluster: Any) -> Path:
    path = ctx.tmp / "known_hosts"
    path.write_text("")
    return path


def refused_port(ctx: Ctx, cluster: Any) -> int:
    with socket.socket() as s:  # bound then closed: nobody listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def garbage_key(ctx: Ctx, cluster: Any) -> Path:
    path = ctx.tmp / "id_garbage"
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nthis is not a key\n-----END OPENSSH PRIVATE KEY-----\n")
    return path


SECRET = "canary-passphrase-5e1f"


def encrypted_key(ctx: Ctx, cluster: Any) -> Path:
    return _keygen(ctx.tmp / "id_locked", passphrase=SECRET)


def stranger_key(ctx: Ctx, cluster: Any) -> Path:
    return _keygen(ctx.tmp / "id_stranger")


# ============================================================================ SLURM (real loopback cluster)


@dataclass
class Slurm:
    executor: Any
    wd: str


def slurm_env(ctx: Ctx, sbatch_args: tuple[str, ...] = ("--partition=debug", "--time=00:05:00")) -> Slurm:
    from pytest_day0.remote.slurm import SlurmExecutor

    cluster = ctx.fixture("cluster")
    ex = SlurmExecutor(cluster.target(), list(sbatch_args))
    ctx.request.addfinalizer(ex.close)
    wd = cluster.workdir()
    ex.makedirs(f"{wd}/logs")
    ctx.request.addfinalizer(lambda: ex.remove_tree(wd))
    return Slurm(ex, wd)


def _job(s: Slurm, name: str, command: str) -> Any:
    from pytest_day0.remote.executor import JobSpec, job_script

    return JobSpec(f"day0-test-bad-{name}", job_script(command), s.wd, f"{s.wd}/logs/{name}.log", f"{s.wd}/{name}.sh")


def sbatch_rejected(*args: str) -> Action:
    def action(ctx: Ctx) -> object:
        s = slurm_env(ctx, args)
        return s.executor.submit(_job(s, "rejected", "true"))
    return action


def slurm_job(command: str, *, stage_timeout_s: float = 60, admin: tuple[str, ...] = (),
              service: bool = False) -> Action:
    """Submit ``command`` as a job and watch it as the serve stage does (class DEPLOYMENT_HEALTH_FAILED).

    ``admin``: a SLURM command the cluster's administrator (root here, not the job's user) runs once the job is
    RUNNING, ``{id}`` standing for its id: how the TIMEOUT and preemption rows make the scheduler end the job."""
    def action(ctx: Ctx) -> object:
        from pytest_day0.remote.jobs import watch_job

        s = slurm_env(ctx)
        handle = s.executor.submit(_job(s, "job", command))
        ctx.notes["job"] = handle
        ctx.notes["executor"] = s.executor
        seen_running = [False]

        def on_state(status: Any) -> None:
            if status.state == "RUNNING" and admin and not seen_running[0]:
                seen_running[0] = True
                time.sleep(0.5)
                ctx.fixture("cluster").slurm(*(a.replace("{id}", handle.job_id) for a in admin))

        return watch_job(s.executor, handle, what="serve candidate", stage_class=C.DEPLOYMENT_HEALTH_FAILED,
                         timeout_s=stage_timeout_s, on_state=on_state,
                         ready=(lambda _s: False) if service else None, tick_s=0.2, max_poll_s=0.5)
    return action


# ============================================================================ the table


def P(action: Action, cls: FailureClass, fragment: str, id: str, *marks: Any) -> Any:
    return pytest.param(action, cls, fragment, id=id, marks=marks)


NS = C.CHECKPOINT_NOT_SERVABLE
UC = C.USER_CONFIG_ERROR

CASES = [
    # --- safetensors headers (read header-only; a file safetensors itself refuses is not servable)
    P(inspect_file(b""), NS, "file is 0 bytes", "header-empty-file"),
    P(inspect_file(b"\x10\x00\x00"), NS, "shorter than the 8-byte header length", "header-truncated-under-8-bytes"),
    P(inspect_file(st_bytes(GOOD, bytes(16), declared=5000)), NS, "header length 5000 is larger than the file",
      "header-length-longer-than-file"),
    P(absurd_header_length, NS, f"header length {2**60} exceeds", "header-length-2pow60-bounded-read"),
    P(inspect_file(st_bytes(b"{not json", b"")), NS, "header is not JSON", "header-not-json"),
    P(inspect_file(st_bytes(b"\xff\xfe{}", b"")), NS, "header is not JSON", "header-not-utf8"),
    P(inspect_file(st_bytes(b"[1, 2, 3]", b"")), NS, "header is a JSON list, not an object", "header-json-array"),
    P(inspect_file(st_bytes(b'{"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            b'"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8))),
      NS, "duplicate key 'a.weight'", "header-duplicate-tensor-name"),
    P(inspect_file(st_bytes({"a.weight": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, bytes(32))),
      NS, "unknown dtype 'F128'", "header-unknown-dtype"),
    P(inspect_file(st_bytes({"a.weight": "F32"}, b"")), NS, "entry is not an object", "header-entry-not-object"),
    P(inspect_file(st_bytes({"a.weight": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, bytes(16))),
      NS, "is not a list of non-negative ints", "header-negative-shape"),
    P(inspect_file(st_bytes({"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, bytes(16))),
      NS, "is not [begin, end]", "header-offsets-reversed"),
    P(inspect_file(st_bytes(GOOD, bytes(8))), NS, "past the end of the data (8 bytes)", "header-offsets-past-end"),
    P(inspect_file(st_bytes({"a.weight": f32([2, 2], 0), "b.weight": f32([2, 2], 8)}, bytes(24))), NS,
      "overlaps 'a.weight'", "header-offsets-overlap"),
    P(inspect_file(st_bytes({"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(12))),
      NS, "spans 12 bytes but F32[2, 2] needs 16", "header-offsets-vs-shape-dtype-size"),
    P(inspect_file(st_bytes({"a.weight": f32([2, 2], 0), "b.weight": f32([2, 2], 20)}, bytes(36))), NS,
      "gap of 4 bytes before tensor 'b.weight'", "header-gap-between-tensors"),
    P(inspect_file(st_bytes(GOOD, bytes(20))), NS, "tensors cover 16 bytes of a 20-byte data buffer",
      "header-trailing-bytes"),
    P(inspect_file(st_bytes({"__metadata__": {"format": 1}, **GOOD}, bytes(16))), NS, "__metadata__",
      "header-metadata-not-strings"),
    # --- sharded index
    P(sharded({"a.weight": "model-00002-of-00002.safetensors"}), NS,
      "shard model-00002-of-00002.safetensors is missing", "index-names-missing-shard"),
    P(sharded({"a.weight": "../x.safetensors"}), NS, "'../x.safetensors' escapes the checkpoint directory",
      "index-path-dotdot"),
    P(sharded({"a.weight": "/etc/passwd"}), NS, "'/etc/passwd' escapes the checkpoint directory",
      "index-path-absolute"),
    P(sharded({"a.weight": "sub/../../x.safetensors"}), NS, "escapes the checkpoint directory",
      "index-path-dotdot-hidden-in-middle"),
    P(sharded({}, index_text="{\"weight_map\": {"), NS, "model.safetensors.index.json is not valid JSON",
      "index-not-json"),
    P(sharded({}, index_text=json.dumps({"metadata": {"total_size": 1}})), NS, "weight_map must be a non-empty",
      "index-weight-map-missing"),
    P(sharded({"a.weight": "s1.safetensors"}, {"s1.safetensors": {"b.weight": ("F32", [2])}}), NS,
      "tensor 'a.weight' is mapped to s1.safetensors but that shard does not hold it", "index-maps-wrong-shard"),
    P(sharded({"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"},
              {"s1.safetensors": {"a.weight": ("F32", [2])},
               "s2.safetensors": {"b.weight": ("F32", [2]), "a.weight": ("F32", [2])}}), NS,
      "tensor 'a.weight' is stored in both s1.safetensors and s2.safetensors", "index-tensor-in-two-shards"),
    P(lambda ctx: inspect_checkpoint(ctx.tmp), NS, "no model.safetensors or model.safetensors.index.json",
      "checkpoint-dir-without-weights"),
    # --- config / quant config contradicting the tensors
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("bf16"), config="{\"model_type\": ")), NS,
      "config.json is not valid JSON", "config-json-not-json"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("bf16"), config="[1]")), NS,
      "config.json must hold a JSON object", "config-json-not-object"),
    P(config_file_missing, C.METADATA_MISMATCH, "architectures: ('LlamaForCausalLM',) -> ()", "config-json-missing"),
    P(coverage("fp8", linears("bf16"), quant=hf_quant("FP8")), C.MODEL_UNSUPPORTED,
      "the quantization config contradicts the tensors for 4, e.g. model.layers.0.mlp.down_proj (declared FP8, "
      "stored BF16)", "hfquant-says-fp8-all-tensors-bf16"),
    P(coverage("fp8", linears("fp8", quantized={"model.layers.0.self_attn.q_proj",
                                                "model.layers.1.self_attn.q_proj"}), quant=hf_quant("FP8")),
      C.QUANT_COVERAGE_FAILURE, "model.layers.0.mlp.down_proj (declared FP8, stored BF16)",
      "hfquant-says-fp8-some-tensors-bf16"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("nvfp4"),
                                                quant=hf_quant("NVFP4", group_size=32))), NS,
      "declares group_size 32 (NVFP4) which needs 1", "hfquant-nvfp4-wrong-group-size"),
    P(coverage("fp8", linears("fp8"), config={**CONFIG, "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "model.layers.1.mlp.down_proj"]}}),
      C.QUANT_COVERAGE_FAILURE, "model.layers.1.mlp.down_proj (declared unquantized, stored FP8)",
      "quantization-config-ignores-a-quantized-layer"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("fp8"), config={
        **CONFIG, "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}},
        quant=hf_quant("NVFP4"))), NS, "quantization_config declares FP8 but hf_quant_config.json declares NVFP4",
      "config-and-hfquant-disagree"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("fp8"), quant={"quantization": "FP8"})), NS,
      "quantization must be an object, got str", "hfquant-quantization-not-object"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", linears("fp8"), quant=hf_quant(8))), NS,  # type: ignore
      "quant_algo must be a string, got 8", "hfquant-algo-not-string"),
    P(lambda ctx: inspect_checkpoint(checkpoint(ctx, "c", {"model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [8, 8])},
                                                quant=hf_quant("FP8"))), NS,
      "model.layers.0.mlp.down_proj: weight is F8_E4M3 but no scale tensor", "fp8-weight-without-scale"),
    # --- recipes and formats (issue 11): refused up front by name, never served or calibrated into a false verdict
    P(_needs_cuda_config, UC, "--recipe nvfp4_awq_lite: ModelOpt calibrates it with CUDA kernels and this machine "
      "has no CUDA device", "config-recipe-needs-cuda",
      pytest.mark.skipif(not _no_cuda(), reason="a CUDA device is present: the recipe is runnable here")),
    P(_llmcompressor_on_reference, UC, "compressed-tensors checkpoints, which the reference server does not emulate",
      "config-llmcompressor-on-reference-server"),
    P(served_demo(quantization_config=CT_W8A8), NS, "compressed-tensors (int-quantized) checkpoint: the reference "
      "server emulates ModelOpt exports only", "serve-compressed-tensors-w8a8"),
    P(served_demo(quant_algo="W4A8_NVFP4_FP8"), NS, "ModelOpt quant_algo W4A8_NVFP4_FP8 is not emulated",
      "serve-modelopt-algo-not-emulated"),
    P(served_demo(quant_algo="FP8", fp8_scale=_per_tensor_scale, input_scale=False), NS,
      "FP8 weight without the input_scale of its FP8 activations", "serve-fp8-without-input-scale"),
    P(served_demo(quant_algo="MXFP8", fp8_scale=_e8m0_per_16, input_scale=False), NS,
      "down_proj: MXFP8 weight_scale (128, 24) does not fit a [128, 384] linear in blocks of 32",
      "serve-mxfp8-scale-blocks-of-16"),
    # --- task files
    P(task_files(MC, [S1, "{\"id\": \"2\", \"prompt\": "]), UC, "t.jsonl line 2", "task-bad-jsonl-line"),
    P(task_files(MC, [S1, S1.replace("1+1", "9+9")]), UC, "line 2: duplicate sample id '1'", "task-duplicate-ids"),
    P(task_files({**MC, "scale": "percent"}, [S1]), UC, "scale", "task-unknown-scale"),
    P(task_files({**MC, "few_shot": 5}, [S1]), UC, "few_shot is not applied by the built-in scorer",
      "task-few-shot-declared-but-never-applied"),
    P(task_files({**MC, "scale": [100, 0]}, [S1]), UC, "lo < hi", "task-scale-reversed"),
    P(task_files({k: v for k, v in MC.items() if k != "metric"}, [S1]), UC, "metric: Field required",
      "task-spec-missing-metric"),
    P(task_files(MC, [json.dumps({"id": "1", "prompt": "x", "choices": ["a"]})]), UC, "line 1: target",
      "task-sample-missing-target"),
    P(task_files(MC, []), UC, "t.jsonl has no samples", "task-empty"),
    P(task_files(MC, [json.dumps({"id": "1", "prompt": "x", "target": "a"})]), UC,
      "multiple_choice sample has no choices", "task-mc-sample-without-choices"),
    P(task_files(MC, [S1.replace('"target": 0', '"target": 5')]), UC, "target must index choices",
      "task-target-out-of-range"),
    P(task_files("{\"name\": ", None), UC, "t.task.json", "task-spec-not-json"),
    P(task_files("name: t\nkind: [unclosed\n", None, spec_name="t.task.yaml"), UC, "not valid YAML",
      "task-spec-yaml-broken"),
    P(task_files({**MC, "max_token": 4}, [S1]), UC, "max_token: Extra inputs are not permitted",
      "task-spec-unknown-field"),
    P(task_files({**GEN, "answer_pattern": "([0-9]+"}, [S1]), UC, "answer_pattern '([0-9]+' is not a valid regex",
      "task-bad-answer-regex"),
    P(task_files(MC, None), UC, "does not exist", "task-samples-file-missing"),
    P(task_files(MC, S1.encode() + b"\n\xff\xfe\n"), UC, "t.jsonl: not UTF-8", "task-samples-not-utf8"),
    P(lambda ctx: load_task("no_such_builtin_task"), UC, "unknown task 'no_such_builtin_task'",
      "task-unknown-builtin-name"),
    # --- published scores (--day0-published)
    P(published('{"arc_like": {"score": NaN, "scale": 100}}'), UC, "score must be a finite number, got nan",
      "published-score-nan"),
    P(published('{"arc_like": {"score": true, "scale": 100}}'), UC, "score must be a finite number, got True",
      "published-score-bool"),
    P(published('{"arc_like": {"score": "84.2", "scale": 100}}'), UC, "got '84.2'", "published-score-string"),
    P(published('{"arc_like": {"score": 140, "scale": [0, 100]}}'), UC, "score 140 is outside its scale [0, 100]",
      "published-score-140-on-0-100"),
    P(published('{"arc_like": {"score": -3, "scale": 100}}'), UC, "score -3 is outside its scale",
      "published-score-negative"),
    P(published('{"arc_like": {"score": 50, "scale": [100, 0]}}'), UC, "scale must have lo < hi",
      "published-scale-reversed"),
    P(published('{"arc_like": 84.2}'), UC, "arc_like: expected {score, scale}, got float", "published-entry-bare"),
    P(published("{arc_like: "), UC, "not valid JSON", "published-not-json"),
    P(published("arc_like: [unclosed\n", suffix=".yaml"), UC, "not valid YAML", "published-yaml-broken"),
    # --- scores our run gate receives (a TaskResult as read back) and lm-eval results folders
    P(run_gate(float("nan")), C.SAMPLE_ACCOUNTING_FAILED, "score nan is not finite", "run-score-nan"),
    P(run_gate(True), C.SAMPLE_ACCOUNTING_FAILED, "score True is not a number", "run-score-bool"),
    P(run_gate("84"), C.SAMPLE_ACCOUNTING_FAILED, "score '84' is not a number", "run-score-string"),
    P(run_gate(140.0), C.SAMPLE_ACCOUNTING_FAILED, "score 140 is outside the task's declared scale [0, 100]",
      "run-score-140-on-0-100"),
    P(run_gate(-0.5, (0.0, 1.0)), C.SAMPLE_ACCOUNTING_FAILED, "score -0.5 is outside", "run-score-negative"),
    P(lm_eval_side(float("nan"), [1.0, 0.0]), UC, "reports acc,none = nan, which is not a finite",
      "lmeval-reported-nan"),
    P(lm_eval_side(True, [1.0, 0.0]), UC, "reports acc,none = True", "lmeval-reported-bool"),
    P(lm_eval_side("0.5", [1.0, 0.0]), UC, "reports acc,none = '0.5'", "lmeval-reported-string"),
    P(lm_eval_side(1.4, [1.0, 0.0]), UC, "reports acc,none = 1.4, which is outside [0, 1]", "lmeval-reported-1.4"),
    P(lm_eval_side(0.5, [1.0, 3.0]), UC, "per-doc 'acc' values outside [0, 1] (doc 1)", "lmeval-per-doc-out-of-range"),
    P(lm_eval_side(0.5, [1.0, "yes"]), C.SAMPLE_ACCOUNTING_FAILED, "doc 1 has no numeric 'acc'",
      "lmeval-per-doc-string"),
    P(lm_eval_side(0.9, [1.0, 0.0]), C.SAMPLE_ACCOUNTING_FAILED, "does not reproduce", "lmeval-mean-not-reproduced"),
    # --- baseline and candidate with different task sets / samples
    P(task_sets_differ, C.ANOMALOUS, "candidate lacks gsm_like, tau_like; candidate has extra mmlu_like",
      "task-sets-differ"),
    P(records_do_not_align, C.SAMPLE_ACCOUNTING_FAILED, "candidate lacks 1 ids: 3; candidate has 1 extra ids: 9",
      "sample-ids-differ"),
    P(lm_eval_candidate_lacks_task, C.SAMPLE_ACCOUNTING_FAILED, "have no task 'hella'",
      "lmeval-candidate-lacks-a-task"),
    # --- servers (real HTTP on 127.0.0.1): stage writes per-sample errors, the run gate names the class
    P(served({"status_always": 500}), C.INFRA_TRANSIENT, "HTTP 500", "server-500-always"),
    P(served({"rate_limit_first": 10**6, "retry_after": "0.2"}, retries=2), C.EVAL_JUDGE_FAILED, "HTTP 429",
      "server-429-always-retry-after"),
    P(served({"slow_s": 1.0}, timeout_s=0.2), C.INFRA_TRANSIENT, "timed out", "server-slower-than-timeout"),
    P(served({"invalid_json": True}), C.EVAL_JUDGE_FAILED, "not JSON", "server-invalid-json"),
    P(served({"logprobs_mode": "missing"}), C.EVAL_JUDGE_FAILED, "no prompt logprobs", "server-missing-logprobs"),
    P(served({"logprobs_mode": "null"}), C.EVAL_JUDGE_FAILED, "no prompt logprobs", "server-null-logprobs"),
    P(served({"logprobs_mode": "truncated"}), C.EVAL_JUDGE_FAILED, "got 2 prompt tokens back",
      "server-wrong-length-logprobs"),
    P(served({"close_first": 10**6}), C.INFRA_TRANSIENT, "connection error", "server-closes-connection"),
    P(served({"status_always": 401}, api_key="sk-canary-0000"), C.EVAL_JUDGE_FAILED, "HTTP 401",
      "server-401-bad-key"),
    P(served({"close_first": 10**6}, kind="gen"), C.INFRA_TRANSIENT, "connection error",
      "server-closes-connection-generate"),
    # --- SSH to the loopback sshd: connection problems are SYSTEMIC (the session cannot work without it)
    P(ssh_connect(known_hosts=wrong_host_key), C.SYSTEMIC, "does NOT match", "ssh-wrong-host-key"),
    P(ssh_connect(known_hosts=empty_known_hosts), C.SYSTEMIC, "host key unknown", "ssh-unknown-host-key"),
    P(ssh_connect(port=refused_port), C.SYSTEMIC, "cannot connect", "ssh-refused-port"),
    P(ssh_connect(key_file=garbage_key), C.SYSTEMIC, "not a readable private key (ValueError)", "ssh-garbage-key-file"),
    P(ssh_connect(key_file=encrypted_key, passphrase=lambda ctx, c: __import__("pydantic").SecretStr("wrong-one")),
      C.SYSTEMIC, "wrong passphrase or unreadable key", "ssh-key-wrong-passphrase"),
    P(ssh_connect(key_file=encrypted_key), C.SYSTEMIC, "is encrypted", "ssh-key-passphrase-missing"),
    P(ssh_connect(key_file=lambda ctx, c: ctx.tmp / "nope"), UC, "does not exist", "ssh-key-file-missing"),
    P(ssh_connect(key_file=stranger_key), C.SYSTEMIC, "authentication failed", "ssh-key-not-authorized"),
    # --- SLURM on the loopback cluster
    P(sbatch_rejected("--partition=no_such_partition"), UC, "Invalid partition name specified", "sbatch-bad-partition"),
    P(sbatch_rejected("--no-such-sbatch-option"), UC, "sbatch rejected job", "sbatch-invalid-option"),
    P(sbatch_rejected("--time=banana"), UC, "sbatch rejected job", "sbatch-invalid-time"),
    P(slurm_job("echo loading; echo 'ValueError: bad checkpoint' >&2; exit 3"), C.DEPLOYMENT_HEALTH_FAILED,
      "FAILED, exit 3: loading | ValueError: bad checkpoint", "slurm-job-fails-exit-3"),
    P(slurm_job("echo started; sleep 120", stage_timeout_s=3, service=True), C.INFRA_TRANSIENT,
      "after 3s (stage timeout; job cancelled)", "slurm-job-times-out-stage-limit"),
    # SLURM's own TIMEOUT state: --time has a 1-minute floor (~90 s measured to TIMEOUT), so the administrator
    # lowers the running job's limit to 0 and slurmctld's next time-limit sweep (<= 30 s) ends it as TIMEOUT
    P(slurm_job("echo started; sleep 120", admin=("scontrol", "update", "JobId={id}", "TimeLimit=0")),
      C.INFRA_TRANSIENT, "TIMEOUT (TimeLimit)", "slurm-job-times-out-wall-limit"),
    # preemption: the loopback cluster has no preemption plugin, so the administrator cancels the running job
    # (what PreemptMode=CANCEL does; SLURM reports it CANCELLED rather than PREEMPTED)
    P(slurm_job("echo started; sleep 120", admin=("scancel", "{id}")), C.INFRA_TRANSIENT, "CANCELLED",
      "slurm-job-preempted-admin-scancel"),
]


@pytest.fixture(scope="module")
def cluster() -> Any:
    from cluster.loopback import cluster_or_skip

    return cluster_or_skip()


def assert_named(exc: BaseException, cls: FailureClass, fragment: str) -> str:
    """The corpus's contract for one bad input."""
    assert isinstance(exc, (Day0Error, GateFailure)), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert exc.failure_class is cls, text
    assert "\n" not in text and text.startswith(f"[{cls}] "), repr(text)
    assert fragment in text, f"{fragment!r} not in {text!r}"
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(("action", "cls", "fragment"), CASES)
def test_bad_input_is_one_named_line(action: Action, cls: FailureClass, fragment: str, tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    ctx = Ctx(tmp_path, request)
    with pytest.raises((Day0Error, GateFailure)) as info:
        action(ctx)
    text = assert_named(info.value, cls, fragment)
    node = request.node.callspec.id
    # row-specific evidence that the failure was reached the right way
    if node == "header-length-2pow60-bounded-read":
        sources = ctx.notes["sources"]
        reads, read = sum(s.reads for s in sources), sum(s.bytes_read for s in sources)
        assert reads == 1 and read <= FIRST_READ, (reads, read)  # one bounded read of an 8 GiB file
        assert ctx.notes["peak_alloc"] < 4 * FIRST_READ, ctx.notes["peak_alloc"]  # nothing sized by 2**60
    elif node == "server-429-always-retry-after":
        assert ctx.notes["requests"] == 2 * 2 * 3  # 2 samples x 2 choices x (1 try + 2 retries)
        assert ctx.notes["wall"] >= 2 * 0.2 * 0.9  # Retry-After 0.2 s honoured before each retry
        assert "[INFRA_TRANSIENT]" in (ctx.notes["result"].first_error or "")  # stage: transient; gate: judge
    elif node in {"server-500-always", "server-closes-connection"}:
        assert ctx.notes["requests"] == 2 * 2 * 2  # 2 samples x 2 choices x (1 try + 1 retry)
    elif node == "server-401-bad-key":
        assert ctx.notes["requests"] == 2 * 2 and "sk-canary-0000" not in text  # not retried, key not echoed
    elif node == "ssh-key-wrong-passphrase":
        assert "wrong-one" not in text and SECRET not in text
    elif node.startswith("slurm-job-") and node != "slurm-job-fails-exit-3":
        ex, job = ctx.notes["executor"], ctx.notes["job"]
        final = "TIMEOUT" if node == "slurm-job-times-out-wall-limit" else "CANCELLED"
        deadline = time.monotonic() + 15
        while (state := ex.status(job).state) != final and time.monotonic() < deadline:
            time.sleep(0.3)
        assert state == final, state  # ended as the scheduler says, and nothing left running on the cluster


def test_a_bad_task_line_loses_no_records(tmp_path: Path) -> None:
    """A task file broken after a run must not cost the records that run wrote: the next fixed run reuses them."""
    spec = {**GEN, "name": "gen"}
    good = [json.dumps({"id": str(i), "prompt": f"{i}+1=", "target": str(i + 1)}) for i in range(4)]
    task = task_files(spec, good)(Ctx(tmp_path, None))  # type: ignore[arg-type]
    assert isinstance(task, Task)
    records = tmp_path / "records.jsonl"
    with ToyOpenAIServer() as srv:
        first = asyncio.run(evaluate_task(task, Endpoint(url=srv.url, model="toy"), records, "candidate"))
        assert first.scored_samples == 4 and srv.request_count() == 4
        before = records.read_bytes()
        (tmp_path / "t.jsonl").write_text("\n".join([*good, "{broken"]) + "\n")
        with pytest.raises(Day0Error) as info:
            load_task(str(tmp_path / "t.task.json"))
        assert_named(info.value, UC, "t.jsonl line 5")
        assert records.read_bytes() == before  # nothing touched the records file
        (tmp_path / "t.jsonl").write_text("\n".join(good) + "\n")
        again = asyncio.run(evaluate_task(load_task(str(tmp_path / "t.task.json")),
                                          Endpoint(url=srv.url, model="toy"), records, "candidate"))
        assert again.scored_samples == 4 and srv.request_count() == 4  # zero samples re-scored


def test_a_failing_server_loses_no_records(tmp_path: Path) -> None:
    """Samples scored before the server went bad stay on disk through a run that only gets 500s."""
    spec = {**GEN, "name": "gen"}
    lines = [json.dumps({"id": str(i), "prompt": f"{i}+1=", "target": str(i + 1)}) for i in range(3)]
    task = task_files(spec, lines[:2])(Ctx(tmp_path, None))  # type: ignore[arg-type]
    records = tmp_path / "records.jsonl"
    with ToyOpenAIServer() as srv:
        asyncio.run(evaluate_task(task, Endpoint(url=srv.url, model="toy"), records, "candidate"))  # type: ignore
        (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
        srv.faults.status_always = 500
        result = asyncio.run(evaluate_task(load_task(str(tmp_path / "t.task.json")),
                                           Endpoint(url=srv.url, model="toy"), records, "candidate",
                                           max_retries=1, backoff_base_s=0.01))
    with pytest.raises(GateFailure) as info:
        assert_run(check_run(result))
    assert_named(info.value, C.INFRA_TRANSIENT, "2/3 scored, 1 errored")
    kept = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["id"] for r in kept if r["correct"] is not None) == ["0", "1"]


# ============================================================================ the same files through the CLI


CLI_CASES = [
    pytest.param(st_bytes(b"{not json", b""), "CHECKPOINT_NOT_SERVABLE", 1, id="cli-header-not-json"),
    pytest.param(b"\x01\x02", "CHECKPOINT_NOT_SERVABLE", 1, id="cli-header-truncated"),
    pytest.param(st_bytes(GOOD, bytes(16), declared=2**60), "CHECKPOINT_NOT_SERVABLE", 1, id="cli-header-2pow60"),
    pytest.param(st_bytes({"a.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
                 "CHECKPOINT_NOT_SERVABLE", 1, id="cli-unknown-dtype"),
    pytest.param(st_bytes({"a.weight": f32([2, 2], 0), "b.weight": f32([2, 2], 8)}, bytes(24)),
                 "CHECKPOINT_NOT_SERVABLE", 1, id="cli-overlapping-offsets"),
    pytest.param({"a.weight": "../outside.safetensors"}, "CHECKPOINT_NOT_SERVABLE", 1, id="cli-index-dotdot"),
    pytest.param("task:{\"name\": ", "USER_CONFIG_ERROR", 2, id="cli-evaluate-task-spec-not-json"),
]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pytest_day0", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize(("content", "cls", "code"), CLI_CASES)
def test_cli_reports_one_line_and_no_traceback(content: Any, cls: str, code: int, tmp_path: Path) -> None:
    if isinstance(content, bytes):
        (tmp_path / "model.safetensors").write_bytes(content)
        args = ["inspect", str(tmp_path)]
    elif isinstance(content, dict):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": content}))
        args = ["inspect", str(tmp_path)]
    else:
        (tmp_path / "t.task.json").write_text(content.removeprefix("task:"))
        args = ["evaluate", "--url", "http://127.0.0.1:9", "--model", "m", "--task", str(tmp_path / "t.task.json"),
                "--side", "candidate", "--records", str(tmp_path / "r.jsonl")]
    proc = _cli(args, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"[{cls}] "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""  # nothing half-printed before the failure


def test_corpus_covers_every_area() -> None:
    """The corpus keeps its breadth: >= 45 rows, each area of the issue represented."""
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45
    for prefix in ("header-", "index-", "config", "hfquant-", "serve-", "task-", "published-", "run-score",
                   "lmeval-", "server-", "ssh-", "sbatch-", "slurm-job-"):
        assert any(i.startswith(prefix) for i in ids), prefix
