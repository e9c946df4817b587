"""The lm-eval engine vs the lm-eval CLI run by hand: the same tasks, the same two servers, the same settings.

  by hand   per side, one command for all tasks (lm-eval's own start-up amortised across them):
            python -m lm_eval run --model local-completions --model_args <the model arguments the engine uses>
                --tasks arc_like,gsm_like,tau_like --include_path pytest_day0/lm_eval_tasks
                --log_samples --output_path DIR --batch_size 1
  engine    one process doing what a pytest session's chain does: resolve the tasks (the plan child), then every
            (side, task) through ``--day0-eval lm-eval``'s engine (its worker child, one per process), into a
            fresh workspace (nothing cached)

Servers: the real reference server on the demo model, twice (served as ``baseline`` and ``candidate``, as a
release serves two sides), started once and warmed; their own CPU is not counted. Per run: wall time of the
tool's process and CPU of its whole process tree (``getrusage(RUSAGE_CHILDREN)`` around it), and lm-eval's
evaluation time (the CLI's ``total_evaluation_time_seconds``; the engine's per-job time in the worker).
Repeats alternate the order; medians. Agreement: the per-task metrics of both must be equal.

Goal (issue 14): the engine's wall and CPU at most 1.10 x the by-hand runs'.

Run: python bench/bench_lm_eval_engine.py [--repeats 3 --limit N --tasks arc_like,gsm_like,tau_like]
Writes bench/results/lm_eval_engine.json.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "pytest_day0" / "demo" / "model"
TASKS_DIR = ROOT / "pytest_day0" / "lm_eval_tasks"
SIDES = ("baseline", "candidate")
LOOPBACK = "127.0.0.1"


def model_args(url: str, name: str, concurrency: int) -> str:
    """What the engine's worker passes lm-eval for the demo (stages/lm_eval_worker.py model_args): the same here."""
    return ",".join([f"base_url={url}/v1/completions", f"model={name}", f"tokenizer={DEMO}",
                     "tokenizer_backend=huggingface", "tokenized_requests=True", "add_bos_token=True",
                     "max_length=64", f"num_concurrent={concurrency}", "max_retries=3", "timeout=600"])


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), rc


def by_hand(py: str, servers: dict[str, str], tasks: list[str], args: argparse.Namespace, out: Path,
            env: dict[str, str]) -> dict[str, Any]:
    wall = cpu = evaluation = 0.0
    metrics: dict[str, dict[str, float]] = {}
    for side in SIDES:
        cmd = [py, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
               model_args(servers[side], side, args.concurrency), "--tasks", ",".join(tasks), "--include_path",
               str(TASKS_DIR), "--batch_size", "1", "--output_path", str(out / side), "--log_samples"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        w, c, rc = timed(cmd, env, out / f"{side}.log")
        if rc != 0:
            raise SystemExit(f"lm_eval failed (rc {rc}): see {out / f'{side}.log'}")
        wall, cpu = wall + w, cpu + c
        result = json.loads(Path(sorted(glob.glob(str(out / side / "**" / "results_*.json"), recursive=True))[-1])
                            .read_text())
        evaluation += float(result["total_evaluation_time_seconds"])
        for task in tasks:
            metrics[f"{side}/{task}"] = {k: v for k, v in result["results"][task].items()
                                         if isinstance(v, float) and "stderr" not in k}
    return {"wall_s": wall, "cpu_s": cpu, "evaluation_s": evaluation, "metrics": metrics}


def engine_driver(argv: list[str]) -> int:
    """The engine, as the chain drives it, in this (child) process. Prints one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", type=Path, required=True)
    ap.add_argument("--servers", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--limit", type=int)
    a = ap.parse_args(argv)
    from pytest_day0.config import RunConfig
    from pytest_day0.engines import EvalRequest, eval_engine
    from pytest_day0.serving.endpoint import Endpoint

    servers = json.loads(a.servers)
    config = RunConfig(model="demo", eval="lm-eval", workdir=a.ws, tasks=tuple(a.tasks.split(",")),
                       concurrency=a.concurrency, limit=a.limit)
    engine = eval_engine("lm-eval")
    t0 = time.perf_counter()
    assert engine.tasks is not None
    tasks = engine.tasks(config, None)
    plan_s = time.perf_counter() - t0
    jobs: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    for side in SIDES:
        for task in tasks:
            records = a.ws / "evals" / side / f"{task.name}.jsonl"
            t1 = time.perf_counter()
            result = engine.evaluate(EvalRequest(task, Endpoint(url=servers[side], model=side), records, side,
                                                 concurrency=a.concurrency, config=config, tokenizer=str(DEMO)))
            jobs[f"{side}/{task.name}"] = time.perf_counter() - t1
            assert result.status == "SUCCESS", result.first_error
            lines = [json.loads(line) for line in
                     records.with_name(records.stem + ".lm-eval-samples.jsonl").read_text().splitlines()]
            metrics[f"{side}/{task.name}"] = {}
            for key in ("acc", "acc_norm", "exact_match"):
                values = [float(line[key]) for line in lines if key in line]
                if values:
                    flt = str(lines[0].get("filter", "none"))
                    metrics[f"{side}/{task.name}"][f"{key},{flt}"] = sum(values) / len(values)
    print(json.dumps({"plan_s": plan_s, "jobs_s": jobs, "metrics": metrics}))
    return 0


def engine(py: str, servers: dict[str, str], tasks: list[str], args: argparse.Namespace, out: Path,
           env: dict[str, str]) -> dict[str, Any]:
    cmd = [py, __file__, "_engine", "--ws", str(out / "ws"), "--servers", json.dumps(servers), "--tasks",
           ",".join(tasks), "--concurrency", str(args.concurrency)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    wall, cpu, rc = timed(cmd, env, out / "engine.log")
    text = (out / "engine.log").read_text()
    if rc != 0:
        raise SystemExit(f"engine failed (rc {rc}): see {out / 'engine.log'}")
    data = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    return {"wall_s": wall, "cpu_s": cpu, "plan_s": data["plan_s"], "jobs_s": data["jobs_s"],
            "metrics": data["metrics"]}


class Server:
    def __init__(self, py: str, name: str, work: Path, env: dict[str, str]) -> None:
        ready = work / f"{name}.ready.json"
        self.log = (work / f"{name}.server.log").open("wb")
        self.proc = subprocess.Popen(
            [py, "-m", "pytest_day0.serving.reference_server", "--checkpoint", str(DEMO), "--served-model-name",
             name, "--host", LOOPBACK, "--port", "0", "--ready-file", str(ready)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
            start_new_session=True)
        deadline = time.monotonic() + 180
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server {name} did not start")
            time.sleep(0.1)
        self.url = str(json.loads(ready.read_text())["url"]).rstrip("/")
        import httpx

        for prompt in ("max(1,2,3,4)=4", "12+7="):  # first forward passes are slow: not measured
            httpx.post(self.url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 1,
                                                            "echo": True, "logprobs": 1}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def main() -> int:
    if sys.argv[1:2] == ["_engine"]:
        return engine_driver(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--tasks", default="arc_like,gsm_like,tau_like")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--full-index", action="store_true",
                    help="the engine resolves with lm-eval's whole task index (DAY0_LM_EVAL_FULL_INDEX=1), as it "
                         "must for lm-eval's own tasks; by hand, the lm-eval CLI always builds it")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lm_eval_engine.json")
    args = ap.parse_args()
    py = args.python
    probe = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"lm-eval is not installed for {py}: pip install 'pytest-day0[lm-eval]'", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-lm-eval-engine-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               TOKENIZERS_PARALLELISM="false")
    if args.full_index:
        env["DAY0_LM_EVAL_FULL_INDEX"] = "1"
    tasks = args.tasks.split(",")
    load = os.getloadavg()
    print(f"lm-eval engine vs lm-eval {probe.stdout.strip()} CLI by hand; tasks {', '.join(tasks)}, limit "
          f"{args.limit or 'none'}, concurrency {args.concurrency}, {args.repeats} repeats, engine index "
          f"{'full' if args.full_index else 'included folders'}; load {load[0]:.1f}; work dir {work}", flush=True)
    servers: dict[str, Server] = {}
    rows: list[dict[str, Any]] = []
    try:
        for side in SIDES:
            servers[side] = Server(py, side, work, env)
        urls = {side: s.url for side, s in servers.items()}
        for rep in range(args.repeats):
            order = ("hand", "engine") if rep % 2 == 0 else ("engine", "hand")
            for tool in order:
                out = work / f"{tool}-{rep}"
                out.mkdir()
                r = by_hand(py, urls, tasks, args, out, env) if tool == "hand" else engine(py, urls, tasks, args, out,
                                                                                          env)
                rows.append({"tool": tool, "rep": rep, **r})
                print(f"  rep {rep} {tool:6}: wall {r['wall_s']:6.2f} s, cpu {r['cpu_s']:6.2f} s"
                      + (f", plan {r['plan_s']:.2f} s" if tool == "engine" else
                         f", lm-eval evaluation {r['evaluation_s']:.2f} s"), flush=True)
                shutil.rmtree(out / "ws" / "evals", ignore_errors=True)
    finally:
        for s in servers.values():
            s.stop()

    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["tool"] == tool)

    hand_metrics = next(r["metrics"] for r in rows if r["tool"] == "hand")
    engine_metrics = next(r["metrics"] for r in rows if r["tool"] == "engine")
    agree = all(engine_metrics[job][k] == v for job, m in hand_metrics.items() for k, v in m.items()
                if k in engine_metrics.get(job, {}))
    summary = {
        "hand": {"wall_s": med("hand", "wall_s"), "cpu_s": med("hand", "cpu_s"),
                 "evaluation_s": med("hand", "evaluation_s")},
        "engine": {"wall_s": med("engine", "wall_s"), "cpu_s": med("engine", "cpu_s"),
                   "plan_s": med("engine", "plan_s"),
                   "jobs_s": statistics.median(sum(r["jobs_s"].values()) for r in rows if r["tool"] == "engine")},
        "metrics_equal": agree,
    }
    summary["ratio_wall"] = round(summary["engine"]["wall_s"] / summary["hand"]["wall_s"], 3)
    summary["ratio_cpu"] = round(summary["engine"]["cpu_s"] / summary["hand"]["cpu_s"], 3)
    summary["goal_met"] = summary["ratio_wall"] <= 1.10 and summary["ratio_cpu"] <= 1.10
    print(f"\nmedians: by hand wall {summary['hand']['wall_s']:.2f} s, cpu {summary['hand']['cpu_s']:.2f} s "
          f"(lm-eval's own evaluation {summary['hand']['evaluation_s']:.2f} s); engine wall "
          f"{summary['engine']['wall_s']:.2f} s, cpu {summary['engine']['cpu_s']:.2f} s (plan "
          f"{summary['engine']['plan_s']:.2f} s, jobs {summary['engine']['jobs_s']:.2f} s)")
    print(f"engine / by hand: wall x{summary['ratio_wall']}, cpu x{summary['ratio_cpu']} (goal <= 1.10: "
          f"{'met' if summary['goal_met'] else 'NOT met'}); per-task metrics equal: {agree}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                "load_at_start": load}, "lm_eval": probe.stdout.strip(),
                                    "tasks": tasks, "limit": args.limit, "full_index": args.full_index,
                                    "rows": rows, "summary": summary},
                                   indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
