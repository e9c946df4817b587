"""The ``lm-eval`` eval engine: lm-eval-harness runs each (side, task) against that side's served endpoint.

Shape (docs/architecture.md, "The lm-eval engine"): lm-eval runs in a child process of its own, the *worker*
(``stages/lm_eval_worker.py``), one per pytest process, reused for every job of that process; lm-eval is never
imported into pytest. Each job is one leaf task on one side: ``local-completions`` (log-likelihood and multiple
choice; generation too unless a chat template is asked for) or ``local-chat-completions`` (generation with
``--apply_chat_template`` or a task that asks for chat), ``--log_samples`` always, lm-eval's request cache
(``CachingLM``, SQLite) per (side, task) in the workspace. The job's samples become records here
(``scoring/lm_eval_plan.py``); everything after ``evaluate`` is the same as for the scorer.

Run-once, resume: the chain runs each (side, task) once per session under its lock; a finished task's records are
reused by later sessions without starting lm-eval (``cached``); an interrupted one resumes per request: the
cache answers every request that came back before the interruption, only the rest is sent again.
Deadlines and signals: past ``timeout_s`` (and on Ctrl-C / SIGTERM) the worker's whole process group is killed;
the next job starts a new worker.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_day0.engines import EvalEngine, EvalRequest, code_version
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.lm_eval_tasks import TASKS_DIR
from pytest_day0.scoring.lm_eval_plan import (
    LmEvalPlan,
    build_tasks,
    metric_key,
    not_compared,
    records_from_lines,
    task_result,
)
from pytest_day0.scoring.lm_eval_settings import LmEvalArgs, parse_lm_eval_args, parse_task_request
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Task
from pytest_day0.stages.engines_env import PROJECT_ROOT, installed_versions
from pytest_day0.workspace import Workspace, atomic_write_json, atomic_write_text, digest, file_digest, read_json

PROVEN_VERSION = "0.4.13"  # the lm-eval release this engine is proven against (pyproject: pytest-day0[lm-eval])
INSTALL_HINT = "pip install 'pytest-day0[lm-eval]' (lm-eval 0.4.13), or point --day0-lm-eval-python at a python " \
               "that has it"
PROTO = "DAY0_LMEVAL "
_PROGRESS = re.compile(r"^(?P<desc>[^:|]+):\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
_CACHED = re.compile(r"Cached requests: (\d+), Requests remaining: (\d+)")
_NOISE = ("it/s]", "s/it]", "Requesting API", "Checking cached requests", "Building contexts",
          "Custom kwargs can be passed", "For example --metadata")  # progress bars; a warning every custom dataset gets


def lm_eval_python(config: Any) -> str:
    return str(getattr(config, "lm_eval_python", None) or sys.executable)


def lm_eval_version(python: str) -> str | None:
    found = installed_versions(python, ("lm_eval",))
    return found.split("==", 1)[1] if found else None


def require_lm_eval(python: str) -> str:
    version = lm_eval_version(python)
    if version is None:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"--day0-eval lm-eval: lm-eval is not installed for {python}; "
                        f"{INSTALL_HINT}")
    return version


def child_env(config: Any) -> dict[str, str]:
    """The worker's environment: the user's, untouched (lm-eval reaches its hub and cache as it always does;
    nothing is switched offline here), able to import this pytest_day0 tree, the API key for the endpoints."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    if PROJECT_ROOT.name not in {"site-packages", "dist-packages"}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    key = getattr(config, "api_key", None)
    if key is not None:
        env["OPENAI_API_KEY"] = key.get_secret_value()  # lm-eval's local-* models read it; never on a command line
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


# ---------------------------------------------------------------------- the plan (configure time)


def _folder_digest(folder: Path) -> str:
    """The task files under ``folder`` by content; hashed again only when one changed (size, mtime, inode)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and (p.suffix in {".yaml", ".yml", ".py", ".json", ".jsonl", ".txt"} or p.name.endswith("_yaml")))
    stats = []
    for path in files:
        st = path.stat()
        stats.append((str(path), str(path.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ino))
    return _files_digest(tuple(stats))


@functools.lru_cache(maxsize=64)
def _files_digest(stats: tuple[tuple[str, str, int, int, int], ...]) -> str:
    return digest([(rel, file_digest(Path(path))) for path, rel, *_ in stats])


def plan_request(config: Any) -> dict[str, Any]:
    """``DAY0_LM_EVAL_FULL_INDEX=1`` resolves with lm-eval's whole task index even when the included folders
    suffice (what resolving lm-eval's own tasks costs: bench/bench_lm_eval_engine.py measures it this way)."""
    requests = [parse_task_request(t) for t in config.tasks]
    return {"ours": str(TASKS_DIR), "user_include": [str(p) for p in config.lm_eval_include],
            "requests": [{"name": r.name, "num_fewshot": r.num_fewshot} for r in requests],
            "full_index": os.environ.get("DAY0_LM_EVAL_FULL_INDEX", "") not in ("", "0")}


def plan_path(config: Any, python: str, version: str) -> Path:
    """A plan is reused while lm-eval's version, the names, and every included task file (ours and the user's,
    the demo's data too) are the same."""
    request = plan_request(config)
    demo_tasks = TASKS_DIR.parent / "demo" / "tasks"
    key = digest(version, python, request["requests"], request["full_index"], _folder_digest(TASKS_DIR),
                 _folder_digest(demo_tasks), [(p, _folder_digest(Path(p))) for p in request["user_include"]])
    return Path(config.workdir) / "lm-eval" / "plans" / f"{key}.json"


def resolve_plan(config: Any, progress: Callable[[str], None] | None = None) -> LmEvalPlan:
    """The plan for this configuration: from the workspace when an earlier session made it, else from a worker
    that resolves the names with lm-eval's task manager and loads every dataset (so a dataset that is neither
    cached nor reachable stops the session here, before any server starts). One USER_CONFIG_ERROR line on error."""
    python = lm_eval_python(config)
    version = require_lm_eval(python)
    path = plan_path(config, python, version)
    cached = read_json(path)
    if isinstance(cached, dict):
        return LmEvalPlan.model_validate(cached)
    ws = Workspace(Path(config.workdir))
    with ws.lock(f"lm-eval-plan-{path.stem}"):
        cached = read_json(path)
        if isinstance(cached, dict):
            return LmEvalPlan.model_validate(cached)
        if progress is not None:
            progress(f"[day0] lm-eval {version}: resolving {', '.join(config.tasks)} and loading their datasets ...")
        started = time.time()
        reply, tail = _run_plan_child(python, child_env(config), plan_request(config), config.stage_timeout,
                                      ws.path("logs", f"lm-eval-plan-{path.stem}.log"))
        if not reply.get("ok"):
            failure = FailureClass(reply.get("failure_class", "USER_CONFIG_ERROR"))
            message = str(reply.get("message", "lm-eval could not resolve the tasks"))
            # a precise configuration error says it all; anything else carries lm-eval's last words
            precise = failure is FailureClass.USER_CONFIG_ERROR and not reply.get("crashed")
            raise Day0Error(failure, message if precise else message + _tail_text(tail))
        plan = LmEvalPlan.model_validate(reply)
        build_tasks(plan)  # a task that cannot be gated (no per-document metric) is refused here, once
        atomic_write_json(path, plan.model_dump(mode="json"))
        if progress is not None:
            progress(f"[day0] lm-eval tasks resolved in {time.time() - started:.1f}s: {len(plan.tasks)} tasks, "
                     f"{sum(t.n_docs for t in plan.tasks.values())} documents")
        return plan


def _tail_text(tail: list[str]) -> str:
    shown = [line for line in tail if line.strip() and not any(n in line for n in _NOISE)][-2:]
    return f" | log: {' / '.join(' '.join(s.split())[:200] for s in shown)}" if shown else ""


def _run_plan_child(python: str, env: dict[str, str], request: dict[str, Any], timeout_s: float,
                    log_path: Path) -> tuple[dict[str, Any], list[str]]:
    cmd = [python, "-m", "pytest_day0.stages.lm_eval_worker", "plan"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise Day0Error(FailureClass.INFRA_TRANSIENT, f"resolving lm-eval tasks took longer than the stage "
                            f"timeout ({timeout_s:g}s); see {log_path}") from None
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)
    tail = log_path.read_text(errors="replace").splitlines()[-20:]
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(PROTO):
            parsed: dict[str, Any] = json.loads(line[len(PROTO):])
            return parsed, tail
    return {"ok": False, "failure_class": "USER_CONFIG_ERROR", "crashed": True,
            "message": f"the lm-eval worker ({python}) exited {proc.returncode} without an answer"}, tail


def load_plan(config: Any) -> LmEvalPlan:
    return resolve_plan(config)


def chain_tasks(config: Any, progress: Callable[[str], None] | None = None) -> list[Task]:
    """The run's tasks in lm-eval engine mode: every leaf, and every group compared as a whole
    (``--day0-limit`` keeps each task's first N documents)."""
    plan = resolve_plan(config, progress)
    tasks = build_tasks(plan, config.limit)
    if progress is not None:
        for group, why in not_compared(plan).items():
            progress(f"[day0] lm-eval group {group} is compared through its subtasks only: {why}")
    return tasks


# ---------------------------------------------------------------------- the worker (one per pytest process)


class Worker:
    """One lm-eval worker process: jobs in on stdin, answers out on stdout, lm-eval's log read from stderr."""

    def __init__(self, python: str, env: dict[str, str], log_path: Path) -> None:
        self.python, self.env, self.log_path = python, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=40)
        self.on_line: Callable[[str], None] | None = None
        self.lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _pump_out(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(PROTO):
                self.answers.put(json.loads(line[len(PROTO):]))
        self.answers.put(None)  # EOF: the worker is gone

    def _pump_err(self, proc: subprocess.Popen[bytes]) -> None:
        """tqdm redraws its bar with carriage returns: every \\r or \\n ends a line worth reading."""
        assert proc.stderr is not None
        with self.log_path.open("ab") as log:
            pending = b""
            while True:
                chunk = proc.stderr.read1(65536) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                pending += chunk
                parts = re.split(rb"[\r\n]", pending)
                pending = parts.pop()
                for part in parts:
                    text = part.decode(errors="replace").rstrip()
                    if text:
                        self.tail.append(text)
                        handler = self.on_line
                        if handler is not None:
                            handler(text)

    def start(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.answers = queue.Queue()
        proc = subprocess.Popen([self.python, "-m", "pytest_day0.stages.lm_eval_worker", "serve"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                start_new_session=True)
        self.proc = proc
        threading.Thread(target=self._pump_out, args=(proc,), name="day0-lm-eval-out", daemon=True).start()
        threading.Thread(target=self._pump_err, args=(proc,), name="day0-lm-eval-err", daemon=True).start()
        ready = self._answer(time.monotonic() + timeout_s, "starting lm-eval")
        if not ready.get("ok"):
            self.kill()
            raise Day0Error(FailureClass(ready.get("failure_class", "USER_CONFIG_ERROR")), str(ready.get("message")))

    def _answer(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(what)
            try:
                answer = self.answers.get(timeout=min(left, 0.5))  # short waits: Ctrl-C is delivered between them
            except queue.Empty:
                continue
            if answer is None:
                code = self.proc.wait() if self.proc is not None else None
                raise Day0Error(FailureClass.INFRA_TRANSIENT, f"the lm-eval worker died while {what} (exit {code})"
                                + _tail_text(list(self.tail)))
            return answer

    def run(self, job: dict[str, Any], timeout_s: float | None, on_line: Callable[[str], None] | None,
            what: str) -> dict[str, Any]:
        """One job; past ``timeout_s`` (or on any interruption) the worker's process group is killed."""
        with self.lock:
            deadline = time.monotonic() + (timeout_s if timeout_s is not None else 10 * 365 * 86400)
            try:
                if not self.alive:
                    self.start(max(deadline - time.monotonic(), 1.0))
                assert self.proc is not None and self.proc.stdin is not None
                self.tail.clear()
                self.on_line = on_line
                self.proc.stdin.write((json.dumps(job) + "\n").encode())
                self.proc.stdin.flush()
                return self._answer(deadline, what)
            except TimeoutError:
                raise Day0Error(FailureClass.INFRA_TRANSIENT, f"{what} reached the stage timeout ({timeout_s:g}s); "
                                "the lm-eval worker was stopped with its process group, every answer received is "
                                "in lm-eval's request cache: the retry sends only the rest") from None
            except (BrokenPipeError, OSError) as exc:
                self.kill()
                raise Day0Error(FailureClass.INFRA_TRANSIENT, f"the lm-eval worker is gone ({exc}) while {what}"
                                + _tail_text(list(self.tail))) from None
            except BaseException:
                self.kill()
                raise
            finally:
                self.on_line = None

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


class WorkerPool:
    """The worker of this process, per interpreter and environment; stopped when the process exits."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        atexit.register(self.close)

    def get(self, config: Any) -> Worker:
        python, env = lm_eval_python(config), child_env(config)
        key = digest(python, env.get("OPENAI_API_KEY"), env.get("PYTHONPATH"))
        if key not in self.workers:
            log = Path(config.workdir) / "logs" / f"lm-eval-worker-{os.getpid()}-{key[:8]}.log"
            self.workers[key] = Worker(python, env, log)
        return self.workers[key]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.kill()


POOL = WorkerPool()


# ---------------------------------------------------------------------- the engine


def settings(config: Any) -> LmEvalArgs:
    return parse_lm_eval_args(getattr(config, "lm_eval_args", None))


def engine_version(config: Any) -> str:
    """lm-eval's version, this engine's code, and every lm-eval setting: any change re-evaluates."""
    version = lm_eval_version(lm_eval_python(config)) or "missing"
    code = code_version("pytest_day0.stages.evaluate_lm_eval", "pytest_day0.stages.lm_eval_worker",
                        "pytest_day0.scoring.lm_eval_plan", "pytest_day0.lm_eval_tasks.day0_demo")
    return f"lm_eval=={version}+{code}+{digest(settings(config).normalized())}"


def _paths(records_path: Path) -> tuple[Path, Path]:
    """lm-eval's own sample lines (kept for people) and its request cache, beside the records."""
    return (records_path.with_name(records_path.stem + ".lm-eval-samples.jsonl"),
            records_path.with_name(records_path.stem + ".lm-eval-cache.sqlite"))


def job_for(req: EvalRequest, plan: LmEvalPlan) -> dict[str, Any]:
    config = req.config
    leaf = req.task.name
    pt = plan.tasks[leaf]
    args = settings(config)
    request = next(r for r in plan.requests if leaf in r.leaves)
    chat = pt.output_type == "generate_until" and bool(args.apply_chat_template or pt.day0.get("chat"))
    ids = list(req.doc_ids) if req.doc_ids is not None else [s.id for s in req.task.samples]
    samples_path, cache_path = _paths(req.records_path)
    num_fewshot = args.num_fewshot if args.num_fewshot is not None else request.num_fewshot
    return {
        "leaf": leaf, "request_name": request.name, "num_fewshot": num_fewshot,
        "gen_kwargs": dict(args.gen_kwargs) or None,
        "include": [str(TASKS_DIR), *(str(p) for p in config.lm_eval_include)], "defaults": plan.defaults,
        "url": req.endpoint.url, "served_model": req.endpoint.model, "tokenizer": req.tokenizer,
        "concurrency": req.concurrency, "chat": chat,
        "apply_chat_template": True if chat and not args.apply_chat_template else args.apply_chat_template,
        "fewshot_as_multiturn": args.multiturn, "system_instruction": args.system_instruction,
        "fewshot_seed": args.fewshot_seed, "confirm_run_unsafe_code": args.confirm_run_unsafe_code,
        "user_model_args": dict(args.model_args), "docs": [int(i) for i in ids], "n_docs": pt.n_docs,
        "samples_path": str(samples_path), "cache_path": str(cache_path),
    }


def _read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"lm-eval wrote no samples ({exc.strerror})") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_records(path: Path, records: list[SampleRecord]) -> None:
    atomic_write_text(path, "".join(r.model_dump_json() + "\n" for r in records))


def read_records(path: Path) -> list[SampleRecord]:
    from pytest_day0.stages.evaluate import read_records as read

    by_id, _ = read(path)
    return list(by_id.values())


def evaluate(req: EvalRequest) -> TaskResult:
    """Run lm-eval for one (side, task) and turn its samples into records (see the module docstring)."""
    config = req.config
    plan = load_plan(config)
    leaf = req.task.name
    if leaf not in plan.tasks:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"{leaf} is not an lm-eval task of this run")
    pt = plan.tasks[leaf]
    key = metric_key(leaf, pt)
    job = job_for(req, plan)
    started = time.time()
    last_time = [0.0]  # when progress was last reported
    counts = [-1, 0]  # the count last reported (tqdm redraws a finished bar), requests the cache answered

    def on_line(text: str) -> None:
        """lm-eval's "Cached requests: X, Requests remaining: Y" comes first, then its "Requesting API" bar over
        the Y it sends: progress counts all X + Y, starting at X (what the chain records as reused)."""
        match = _PROGRESS.match(text)
        if match and match.group("desc").strip() == "Requesting API" and req.progress is not None:
            done, total = counts[1] + int(match.group("n")), counts[1] + int(match.group("total"))
            now = time.time()
            if done != counts[0] and (now - last_time[0] >= 0.5 or done == total):
                last_time[0], counts[0] = now, done
                req.progress(done, total)
            return
        cached = _CACHED.search(text)
        if cached:
            hits, rest = int(cached.group(1)), int(cached.group(2))
            counts[1] = hits
            if req.log is not None:
                req.log(f"[day0]   {req.side}/{leaf}: lm-eval request cache answers {hits}, {rest} to send")
            if req.progress is not None:
                counts[0] = hits
                req.progress(hits, hits + rest)

    worker = POOL.get(config)
    what = f"eval {req.side}/{leaf} (lm-eval)"
    Workspace(Path(config.workdir)).event("lm_eval_job", side=req.side, task=leaf, docs=len(job["docs"]),
                                          model=req.endpoint.model)
    answer = worker.run(job, req.timeout_s, on_line, what)
    if not answer.get("ok"):
        failure = FailureClass(answer.get("failure_class", "EVAL_JUDGE_FAILED"))
        raise Day0Error(failure, f"{what}: {answer.get('message')}" + _tail_text(list(worker.tail)))
    lines = _read_lines(Path(job["samples_path"]))
    records = records_from_lines(lines, leaf, req.task.spec, key, pt.repeats)
    _write_records(req.records_path, records)
    reported = answer.get("metrics", {}).get(key)
    if req.log is not None:
        req.log(f"[day0]   {req.side}/{leaf}: lm-eval {answer.get('model')} (add_bos_token="
                f"{answer.get('add_bos_token')}, max_length={answer.get('max_length')}): {len(records)} documents, "
                f"{key} = {reported}")
    return task_result(req.task, records, req.side, str(req.records_path), key,
                       float(reported) if isinstance(reported, (int, float)) else None,
                       wall_s=round(time.time() - started, 3), asked=[str(d) for d in job["docs"]])


def cached(task: Task, records_path: Path, side: str) -> TaskResult | None:
    """An earlier run's result when its records cover every document asked now, all scored (no lm-eval started)."""
    if not records_path.is_file() or task.members:
        return None
    by_id = {r.id: r for r in read_records(records_path)}
    if any(s.id not in by_id or by_id[s.id].correct is None or by_id[s.id].error for s in task.samples):
        return None
    wanted = [by_id[s.id] for s in task.samples]
    return task_result(task, wanted, side, str(records_path), task.spec.metric, None)


def _description() -> str:
    return "lm-eval-harness against each side's served endpoint (local-completions / local-chat-completions)"


ENGINE = EvalEngine("lm-eval", evaluate, description=_description(), version=engine_version, cached=cached,
                    progress_unit="requests", tasks=chain_tasks)


__all__ = ["ENGINE", "POOL", "PROVEN_VERSION", "Worker", "cached", "chain_tasks", "engine_version", "evaluate",
           "job_for", "load_plan", "resolve_plan"]
