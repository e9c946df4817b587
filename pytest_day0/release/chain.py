"""The release chain: every stage run at most once per session, its artifact or its failure remembered.

Stages never decide (they produce artifacts or raise Day0Error); gates never do I/O. This object is
the seam between them: fixtures ask it for artifacts, tests hand the artifacts to pure gates.

Run-once across pytest-xdist workers: each stage takes a workspace file lock keyed by its content key;
whoever comes first does the work and leaves a finished artifact (or, within one session, a failure
record) the others read. Servers are started detached and recorded in the workspace; the process that
owns the session (the xdist controller, or the only process) stops them all at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from pytest_day0.config import RunConfig
from pytest_day0.engines import EvalRequest, QuantizeRequest, ServeRequest, eval_engine, quantize_engine, serve_engine
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote.stages import RemoteStages
from pytest_day0.scoring.tasks import Task, load_task
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages import quantize as quantize_stage
from pytest_day0.stages.source import CALIBRATION_TEXT, resolve_model
from pytest_day0.workspace import Workspace, atomic_write_json, checkpoint_fingerprint, digest, pid_alive, read_json

T = TypeVar("T")
BASELINE = "baseline"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DeployRecord:
    side: str
    healthy: bool
    models: tuple[str, ...]
    canary_prompt: str
    canary_text: str
    seconds: float
    cached: bool


def _remembered_error(data: dict[str, Any]) -> Day0Error:
    return Day0Error(FailureClass(data["failure_class"]), data["message"])


class ReleaseChain:
    def __init__(self, config: RunConfig, session_id: str, progress: Progress | None = None,
                 owner_pid: int | None = None) -> None:
        self.config = config
        self.session_id = session_id
        # The process that lives as long as the session (the xdist controller): while it lives, the servers
        # this session registered are in use, even if another session shares the workspace.
        self.owner_pid = owner_pid or os.getpid()
        self.ws = Workspace(config.workdir)
        self.progress: Progress = progress or (lambda _line: None)
        self._memo: dict[str, Any] = {}
        self._remote: RemoteStages | None = None

    @property
    def remote(self) -> RemoteStages | None:
        """RemoteStages when --day0-executor is ssh:// or slurm:// (PTQ and serving as remote jobs), else None."""
        if self._remote is None and self.config.executor != "local":
            self._remote = RemoteStages(self.config, self.session_id, self.ws, self.progress, self.owner_pid)
        return self._remote

    # ------------------------------------------------------------------ plumbing

    def _once(self, key: str, build: Callable[[], T], *, retry_transient: bool = True) -> T:
        """Memoize a stage in this process; retry INFRA_TRANSIENT once, then it is SYSTEMIC."""
        if key in self._memo:
            value = self._memo[key]
            if isinstance(value, Day0Error):
                raise value
            return value  # type: ignore[no-any-return]
        attempts = 2 if retry_transient else 1
        for attempt in range(1, attempts + 1):
            try:
                value = build()
            except Day0Error as exc:
                if exc.failure_class is FailureClass.INFRA_TRANSIENT and attempt < attempts:
                    self.progress(f"[day0] {key}: {exc} — retrying once")
                    continue
                if exc.failure_class is FailureClass.INFRA_TRANSIENT:
                    exc = Day0Error(FailureClass.SYSTEMIC, f"{key} failed twice with INFRA_TRANSIENT: {exc.message}")
                self._memo[key] = exc
                raise exc from None
            self._memo[key] = value
            return value
        raise AssertionError("unreachable")

    def _timed(self, name: str, fn: Callable[[], T]) -> T:
        self.progress(f"[day0] {name} ...")
        started = time.time()
        try:
            value = fn()
        except Day0Error as exc:
            self.progress(f"[day0] {name} failed after {time.time() - started:.1f}s: {exc}")
            raise
        self.progress(f"[day0] {name} done in {time.time() - started:.1f}s")
        self.ws.event("stage_time", stage=name, seconds=round(time.time() - started, 3), session=self.session_id)
        return value

    def _session_failure_path(self, key: str) -> Path:
        return self.ws.path("failures", self.session_id, f"{key}.json")

    def _shared_stage(self, key: str, lock: str, build: Callable[[], T]) -> T:
        """A stage other processes of this session may also want: a failure is recorded so they don't repeat it."""

        def guarded() -> T:
            with self.ws.lock(lock):
                failed = read_json(self._session_failure_path(key))
                if failed:
                    raise _remembered_error(failed)
                try:
                    return build()
                except Day0Error as exc:
                    if exc.failure_class is not FailureClass.INFRA_TRANSIENT:
                        atomic_write_json(self._session_failure_path(key),
                                          {"failure_class": exc.failure_class, "message": exc.message})
                    raise

        return self._once(key, guarded)

    # ------------------------------------------------------------------ inputs

    def source(self) -> Path:
        assert self.config.model is not None
        model = self.config.model
        return self._once("source", lambda: resolve_model(model), retry_transient=False)

    def source_key(self) -> str:
        return self._once("source_key", lambda: checkpoint_fingerprint(self.source()))

    def tasks(self) -> list[Task]:
        if self.config.eval == "lm-eval":  # scores from lm-eval folders: the tasks are what the baseline logged
            from pytest_day0.scoring import lm_eval

            return self._once("tasks", lambda: lm_eval.run_tasks(self.config), retry_transient=False)
        return self._once("tasks", lambda: [load_task(t, self.config.limit) for t in self.config.tasks],
                          retry_transient=False)

    def task(self, name: str) -> Task:
        for task in self.tasks():
            if task.name == name:
                return task
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task {name!r} is not part of this run")

    # ------------------------------------------------------------------ quantize

    def ptq_key(self, recipe: str) -> str:
        c = self.config
        if c.quantize == "existing" and self.remote is not None:  # a checkpoint on the remote side
            return "existing-" + digest(self.remote.key, str(c.checkpoint))
        if c.quantize == "existing":
            assert c.checkpoint is not None
            if not (c.checkpoint / "config.json").is_file():
                raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                                f"--day0-checkpoint {c.checkpoint} is not a checkpoint directory (no config.json)")
            return "existing-" + checkpoint_fingerprint(c.checkpoint)
        key = f"{recipe}-" + digest(self.source_key(), recipe, c.quantize, c.calib_size,
                                    quantize_engine(c.quantize).version(c))
        return key if self.remote is None else f"{key}-{digest(self.remote.key, c.ptq_command)[:8]}"

    def quantized(self, recipe: str) -> quantize_stage.QuantizeResult:
        from pytest_day0.checkpoint.recipes import resolve_recipe

        recipe_obj = resolve_recipe(recipe)
        c = self.config

        def build() -> quantize_stage.QuantizeResult:
            if self.remote is not None:  # a PTQ job on the remote executor; the checkpoint stays there
                return self.remote.quantize_stage(self, recipe_obj)
            if c.quantize == "existing":
                assert c.checkpoint is not None
                return quantize_stage.use_existing(c.checkpoint, recipe_obj)
            out_dir = self.ws.path("checkpoints", self.ptq_key(recipe))
            if c.fresh and not self._memo.get(f"fresh-ptq-{recipe}"):
                self._memo[f"fresh-ptq-{recipe}"] = True
                (out_dir / quantize_stage.DONE_MARKER).unlink(missing_ok=True)
            if quantize_stage.is_finished(out_dir):
                self.progress(f"[day0] PTQ {recipe}: reusing {out_dir}")
                return quantize_stage.QuantizeResult(out_dir, c.quantize, recipe, 0.0, True, None)
            self.ws.event("ptq_run", recipe=recipe, session=self.session_id)
            tail: list[str] = []

            def on_line(line: str) -> None:
                tail.append(line)
                if line.startswith("[day0]"):
                    self.progress("    " + line)

            try:
                return quantize_engine(c.quantize).run(QuantizeRequest(  # registered engines (pytest_day0.engines)
                    self.source(), recipe_obj, out_dir, CALIBRATION_TEXT, calib_size=c.calib_size,
                    timeout_s=c.stage_timeout, config=c, on_line=on_line))
            except Day0Error:
                for line in tail[-5:]:
                    self.progress("    | " + line)
                raise

        return self._shared_stage(f"ptq-{recipe}", f"ptq-{self.ptq_key(recipe)}",
                                  lambda: self._timed(f"PTQ {recipe}", build))

    def source_inspection(self) -> Any:
        from pytest_day0.checkpoint.inspect import inspect_checkpoint

        return self._once("inspect-source", lambda: inspect_checkpoint(self.source()), retry_transient=False)

    def candidate_inspection(self, recipe: str) -> Any:
        from pytest_day0.checkpoint.inspect import inspect_checkpoint

        opener = self.remote.open_source if self.remote is not None else None  # SFTP: headers only
        return self._once(f"inspect-{recipe}", lambda: inspect_checkpoint(str(self.quantized(recipe).checkpoint),
                                                                          open_source=opener),
                          retry_transient=False)

    def ptq_checks(self, recipe: str) -> list[Any]:
        from pytest_day0.checkpoint.recipes import resolve_recipe
        from pytest_day0.gates.ptq import evaluate_ptq

        return self._once(f"ptq-checks-{recipe}", lambda: evaluate_ptq(
            self.source_inspection(), self.candidate_inspection(recipe), resolve_recipe(recipe)),
            retry_transient=False)

    def infeasible_upstream(self, recipe: str) -> Day0Error | None:
        """A PTQ failure that makes everything downstream of this recipe pointless (-> skip, INFEASIBLE)."""
        from pytest_day0.failures import INFEASIBLE_CLASSES

        try:
            checks = self.ptq_checks(recipe)
        except Day0Error as exc:
            return exc
        for check in checks:
            if not check.passed and check.failure_class in INFEASIBLE_CLASSES:
                return Day0Error(check.failure_class, f"PTQ gate {check.name} of {recipe}: {check.message}")
        return None

    # ------------------------------------------------------------------ serve

    def side_checkpoint(self, side: str) -> Path:
        if side == BASELINE:
            return self.source()
        upstream = self.infeasible_upstream(side)
        if upstream is not None:
            raise upstream
        return self.quantized(side).checkpoint

    def side_key(self, side: str) -> str:
        c = self.config
        if c.serve == "external":
            url = c.baseline_url if side == BASELINE else c.candidate_url
            return f"{side}-external-" + digest(url)
        if side == BASELINE:
            return "baseline-" + digest(self.source_key(), c.serve, *([self.remote.key] if self.remote else []))
        return f"{side}-" + digest(self.ptq_key(side), c.serve)

    def _registry_path(self, side: str) -> Path:
        """One registration per session: two sessions sharing a workspace each serve (and stop) their own."""
        return self.ws.path("servers", f"{self.side_key(side)}.{self.session_id}.json")

    def _reap_abandoned(self, side: str) -> None:
        """Stop servers of this side left behind by sessions whose owner is gone (killed runs)."""
        for path in (self.ws.root / "servers").glob(f"{self.side_key(side)}.*.json"):
            known = read_json(path)
            if known and known.get("session") != self.session_id and not pid_alive(int(known.get("owner", 0))):
                _stop_pid(int(known.get("pid", 0)))
                path.unlink(missing_ok=True)

    def endpoint(self, side: str) -> Endpoint:
        c = self.config
        if c.serve == "external":
            url = c.baseline_url if side == BASELINE else c.candidate_url
            assert url is not None
            return self._once(f"endpoint-{side}", lambda: _discover_external(url, c.api_key))
        remote = self.remote
        if remote is not None:  # a serving job on the remote executor, reached through an SSH tunnel
            return self._once(f"endpoint-{side}", lambda: self._timed(f"serve {side}",
                                                                      lambda: remote.endpoint(self, side)))

        def build() -> Endpoint:
            checkpoint = self.side_checkpoint(side)
            registry = self._registry_path(side)
            with self.ws.lock(f"serve-{self.side_key(side)}"):
                failed = read_json(self._session_failure_path(f"serve-{side}"))
                if failed:
                    raise _remembered_error(failed)
                known = read_json(registry)
                if known and _healthy(known["url"]):
                    return Endpoint(url=known["url"], model=known["model"])
                if known:
                    _stop_pid(int(known.get("pid", 0)))
                self._reap_abandoned(side)
                self.ws.event("server_start", side=side, session=self.session_id)
                try:
                    handle = self._timed(f"serve {side}", lambda: serve_engine(c.serve).start(ServeRequest(
                        checkpoint, side, self.ws.root / "logs", timeout_s=min(c.stage_timeout, 600), config=c,
                        progress=self.progress)))
                except Day0Error as exc:
                    atomic_write_json(self._session_failure_path(f"serve-{side}"),
                                      {"failure_class": exc.failure_class, "message": exc.message})
                    raise
                # Detached: the server outlives this process (an xdist worker may finish before a sibling
                # that still evaluates); stop_servers() at session end stops it through the registry.
                atexit.unregister(handle.stop)
                atomic_write_json(registry, {"url": handle.url, "model": handle.model, "pid": handle.pid,
                                             "session": self.session_id, "owner": self.owner_pid, "side": side,
                                             "log": str(handle.log_path)})
                return handle.endpoint

        return self._once(f"endpoint-{side}", build)

    def stop_servers(self) -> list[str]:
        """Stop every server this session started (from any process). Idempotent."""
        stopped = self.remote.stop_session() if self.remote is not None else []  # scancel, tunnels closed
        mine = [(path, known) for path in sorted((self.ws.root / "servers").glob("*.json"))
                if (known := read_json(path)) and known.get("session") == self.session_id]
        _stop_pids([int(known.get("pid", 0)) for _, known in mine])  # together: each may take its grace period
        for path, known in mine:
            path.unlink(missing_ok=True)
            stopped.append(str(known.get("side")))
        return stopped

    def deploy(self, side: str) -> DeployRecord:
        """Health + one canary generation, remembered per served checkpoint so a cached re-run only re-gates."""
        record_path = self.ws.path("deploy", f"{self.side_key(side)}.json")

        def build() -> DeployRecord:
            cached = read_json(record_path)
            if cached and cached.get("healthy") and not self.config.fresh and self._all_evals_cached(side):
                return DeployRecord(**{**cached, "models": tuple(cached["models"]), "cached": True})
            endpoint = self.endpoint(side)
            record = _health_and_canary(side, endpoint, self._canary_prompt())
            atomic_write_json(record_path, {k: v for k, v in record.__dict__.items() if k != "cached"})
            return record

        return self._once(f"deploy-{side}", build)

    def _canary_prompt(self) -> str:
        tasks = self.tasks()
        return tasks[0].samples[0].prompt if tasks else "Hello"

    # ------------------------------------------------------------------ evaluate

    def records_path(self, side: str, task: Task) -> Path:
        spec_key = digest(task.spec.model_dump(mode="json"))
        return self.ws.path("evals", self.side_key(side), f"{task.name}-{spec_key}.jsonl")

    def _all_evals_cached(self, side: str) -> bool:
        from pytest_day0.stages.evaluate import cached_result

        try:
            return all(cached_result(t, self.records_path(side, t), side) is not None for t in self.tasks())
        except Day0Error:
            return False

    def evaluation(self, side: str, task_name: str) -> Any:
        from pytest_day0.stages.evaluate import cached_result

        task = self.task(task_name)
        if self.config.eval == "lm-eval":  # read, not served: the records land in the workspace like scored ones
            from pytest_day0.scoring import lm_eval

            return self._once(f"eval-{side}-{task.name}", lambda: lm_eval.side_result(
                self.config, side, task.name, self.ws.root), retry_transient=False)
        path = self.records_path(side, task)

        def build() -> Any:
            with self.ws.lock(f"eval-{self.side_key(side)}-{task.name}"):
                if self.config.fresh and not self._memo.get(f"fresh-eval-{side}-{task.name}"):
                    self._memo[f"fresh-eval-{side}-{task.name}"] = True
                    path.unlink(missing_ok=True)
                done = cached_result(task, path, side)
                if done is not None:
                    return done
                result = self._evaluate_once(side, task, path, attempt=1)
                if self._server_lost(side, result):
                    # The server died under us (killed, OOM): the finished samples are on disk, so restart it and
                    # resume once; a second death leaves the result INCOMPLETE and the run gate INFRA_TRANSIENT.
                    self.progress(f"[day0] eval {side}/{task.name}: the {side} server is gone "
                                  f"({result.errored_samples} samples unscored) — restarting it and resuming once")
                    self.ws.event("server_lost", side=side, task=task.name, session=self.session_id)
                    self._memo.pop(f"endpoint-{side}", None)
                    result = self._evaluate_once(side, task, path, attempt=2)
                return result

        return self._once(f"eval-{side}-{task.name}", build)

    def _evaluate_once(self, side: str, task: Task, path: Path, attempt: int) -> Any:
        endpoint = self.endpoint(side)
        self.ws.event("eval_run", side=side, task=task.name, session=self.session_id, attempt=attempt)
        last = [0.0]
        reused = [-1]  # the engine reports its first progress before sending anything: that count was reused
        started = time.time()

        def on_progress(done_n: int, total: int) -> None:
            if reused[0] < 0:
                reused[0] = done_n
            now = time.time()
            if now - last[0] >= 5 or done_n == total:
                last[0] = now
                rate = done_n / max(now - started, 1e-6)
                self.progress(f"[day0]   {side}/{task.name}: {done_n}/{total} samples ({rate:.1f}/s)")

        result = self._timed(f"eval {side}/{task.name}", lambda: eval_engine(self.config.eval).evaluate(
            EvalRequest(task, endpoint, path, side, concurrency=self.config.concurrency, progress=on_progress)))
        total = len(task.samples)
        self.ws.event("eval_done", side=side, task=task.name, session=self.session_id, attempt=attempt,
                      reused=reused[0] if reused[0] >= 0 else None,
                      requested=total - reused[0] if reused[0] >= 0 else None,
                      scored=result.scored_samples, errored=result.errored_samples)
        return result

    def _server_lost(self, side: str, result: Any) -> bool:
        """Samples failed and the server we started no longer answers: a restart can save the evaluation."""
        if self.remote is not None or not serve_engine(self.config.serve).managed:
            return False  # a remote job or someone else's server: not ours to restart
        if getattr(result, "errored_samples", 0) == 0 or getattr(result, "status", "") != "INCOMPLETE":
            return False
        known = read_json(self._registry_path(side))
        return bool(known) and not _healthy(str(known["url"]))


# ---------------------------------------------------------------------- helpers (I/O)


def _healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    _stop_pids([pid], grace_s)


def _stop_pids(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM every group first, then wait once for all of them: stopping N servers costs one grace period."""
    alive = set()
    for pid in pids:
        if pid <= 0:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
            alive.add(pid)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.time() + grace_s
    while alive and time.time() < deadline:
        for pid in list(alive):
            with contextlib.suppress(ChildProcessError):  # started by this process: reap it, a zombie looks alive
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _discover_external(url: str, api_key: Any) -> Endpoint:
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    try:
        resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise Day0Error(FailureClass.SYSTEMIC, f"{url} is unreachable: {type(exc).__name__}") from None
    if resp.status_code in (401, 403):
        raise Day0Error(FailureClass.SYSTEMIC, f"{url} refused our credentials (HTTP {resp.status_code})")
    try:
        models = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"{url}/v1/models answered no model list") from None
    if not models:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"{url} serves no model")
    return Endpoint(url=url, model=models[0], api_key=api_key)


def _health_and_canary(side: str, endpoint: Endpoint, prompt: str) -> DeployRecord:
    started = time.time()
    try:
        with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=60) as client:
            health = client.get("/health")
            models = client.get("/v1/models").json()
            chat = client.post("/v1/chat/completions", json={
                "model": endpoint.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8, "temperature": 0})
    except (httpx.HTTPError, ValueError) as exc:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED,
                        f"{side} at {endpoint.url}: {type(exc).__name__}: {exc}") from None
    if health.status_code != 200:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"{side}: /health answered {health.status_code}")
    if chat.status_code != 200:
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED,
                        f"{side}: canary generation answered HTTP {chat.status_code}: {chat.text[:200]}")
    try:
        text = chat.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"{side}: canary answer is not a chat completion") \
            from None
    if not isinstance(text, str) or not text.strip():
        raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED, f"{side}: canary generation came back empty")
    ids = tuple(str(m.get("id")) for m in models.get("data", [])) if isinstance(models, dict) else ()
    return DeployRecord(side, True, ids, prompt, text, round(time.time() - started, 3), False)
