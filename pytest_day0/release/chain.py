"""The release chain: every stage's artifact (or failure) for the tests, each made at most once per session.

Stages never decide (they produce artifacts or raise Day0Error); gates never do I/O. This object is the seam
between them: the suite asks it for artifacts and for the checks computed from them (it reads the records,
calls the pure gate functions, saves what the reports need); the tests only attach outcomes and assert.

Three collaborators, each in its own module: ``StageRunner`` (run-once across processes: memo, lock, session
records, the fresh decision, transient retries), ``keys`` (every artifact's content key) and a ``Placement``
(where PTQ runs and servers live: this machine, an SSH host, a SLURM cluster). The server-registry sequence —
lock, remembered failure, registered server, reap abandoned ones, start, register — exists once, here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

from pytest_day0.config import RunConfig
from pytest_day0.engines import EvalRequest, ServeRequest, eval_engine, quantize_engine, serve_engine
from pytest_day0.failures import INFEASIBLE_CLASSES, Day0Error, FailureClass
from pytest_day0.placement import LocalPlacement, Placement, QuantizeJob, ServeJob, ServerRecord
from pytest_day0.release import keys
from pytest_day0.release.comparisons import save_comparison, save_flip_detail
from pytest_day0.release.runner import StageRunner
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Task, load_task
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages.source import CALIBRATION_TEXT, resolve_model
from pytest_day0.workspace import (
    Workspace,
    atomic_write_json,
    checkpoint_fingerprint,
    file_digest,
    pid_alive,
    read_json,
)

if TYPE_CHECKING:
    from pytest_day0.checkpoint.model import CheckpointInspection
    from pytest_day0.gates.compare import TaskComparison
    from pytest_day0.gates.ptq import PtqCheck
    from pytest_day0.gates.published import PublishedCheck
    from pytest_day0.gates.run import RunCheck
    from pytest_day0.gates.verbosity import VerbosityCheck
    from pytest_day0.stages.quantize import QuantizeResult

T = TypeVar("T")
BASELINE = keys.BASELINE
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


def make_placement(config: RunConfig, ws: Workspace, session_id: str, owner_pid: int,
                   progress: Progress) -> Placement:
    if config.executor == "local":
        return LocalPlacement(ws, session_id, owner_pid)
    from pytest_day0.remote.placement import RemotePlacement

    return RemotePlacement(config, session_id, ws, progress, owner_pid)


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
        self.runner = StageRunner(self.ws, session_id, fresh=config.fresh, progress=self.progress)
        self._placement: Placement | None = None

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            self._placement = make_placement(self.config, self.ws, self.session_id, self.owner_pid, self.progress)
        return self._placement

    def check_placement(self) -> str | None:
        """Setup gate of a remote executor: host key, authentication, scheduler (SYSTEMIC, one line)."""
        return self.placement.check()

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

    # ------------------------------------------------------------------ inputs

    def source(self) -> Path:
        assert self.config.model is not None
        model = self.config.model
        return self.runner.local("source", lambda: resolve_model(model))

    def source_key(self) -> str:
        return self.runner.local("source_key", lambda: checkpoint_fingerprint(
            self.source(), cache=self.ws.root / "fingerprints.json"))

    def tasks(self) -> list[Task]:
        if self.config.eval == "lm-eval":  # scores from lm-eval folders: the tasks are what the baseline logged
            from pytest_day0.scoring import lm_eval

            return self.runner.local("tasks", lambda: lm_eval.run_tasks(self.config))
        return self.runner.local("tasks", lambda: [load_task(t, self.config.limit) for t in self.config.tasks])

    def task(self, name: str) -> Task:
        for task in self.tasks():
            if task.name == name:
                return task
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"task {name!r} is not part of this run")

    # ------------------------------------------------------------------ quantize

    def checkpoint_key(self, recipe: str) -> str:
        c = self.config
        placement = self.placement.key
        if c.quantize == "existing":
            assert c.checkpoint is not None
            if placement:  # a checkpoint on the remote side: its path there is all we know
                return keys.existing_key(str(c.checkpoint), placement)
            if not (c.checkpoint / "config.json").is_file():
                raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                                f"--day0-checkpoint {c.checkpoint} is not a checkpoint directory (no config.json)")
            return self.runner.local("existing_key", lambda: keys.existing_key(checkpoint_fingerprint(
                c.checkpoint, cache=self.ws.root / "fingerprints.json")))  # type: ignore[arg-type]
        return keys.checkpoint_key(
            recipe=recipe, source=self.source_key(), engine=c.quantize,
            engine_version=quantize_engine(c.quantize).version(c),
            calibration=file_digest(CALIBRATION_TEXT), calib_size=c.calib_size, placement=placement,
            ptq_command=c.ptq_command)

    def quantized(self, recipe: str) -> QuantizeResult:
        from pytest_day0.checkpoint.recipes import resolve_recipe

        recipe_obj = resolve_recipe(recipe)
        c = self.config
        if c.quantize == "existing":
            checkpoint = str(c.checkpoint)
            return self.runner.local(f"ptq-{recipe}", lambda: self.placement.existing(checkpoint, recipe_obj))
        key = self.checkpoint_key(recipe)
        tail: list[str] = []

        def on_line(line: str) -> None:
            tail.append(line)
            del tail[:-20]
            if line.startswith("[day0]"):
                self.progress("    " + line)

        def build() -> QuantizeResult:
            try:
                result = self.placement.quantize(QuantizeJob(
                    recipe_obj, self.source(), self.source_key(), key, CALIBRATION_TEXT, c.calib_size,
                    c.stage_timeout, c.quantize, c, on_line))
            except Day0Error:
                from pytest_day0.stages.quantize import relevant_log_lines

                for line in relevant_log_lines(tail)[-5:]:
                    self.progress("    | " + line)
                raise
            if result.reused:
                self.progress(f"[day0] PTQ {recipe}: reusing {result.checkpoint}")
            else:
                self.ws.event("ptq_run", recipe=recipe, session=self.session_id, seconds=round(result.wall_s, 3))
            return result

        return self.runner.run(f"ptq-{recipe}", lambda: self._timed(f"PTQ {recipe}", build), lock=f"ptq-{key}",
                               reset=lambda: self.placement.discard_checkpoint(key))

    def source_inspection(self) -> CheckpointInspection:
        from pytest_day0.checkpoint.inspect import inspect_checkpoint

        return self.runner.local("inspect-source", lambda: inspect_checkpoint(self.source()))

    def candidate_inspection(self, recipe: str) -> CheckpointInspection:
        from pytest_day0.checkpoint.inspect import inspect_checkpoint

        opener = self.placement.opener()  # remote: SFTP, headers only
        return self.runner.local(f"inspect-{recipe}", lambda: inspect_checkpoint(
            str(self.quantized(recipe).checkpoint), open_source=opener))

    def ptq_checks(self, recipe: str) -> list[PtqCheck]:
        from pytest_day0.checkpoint.recipes import resolve_recipe
        from pytest_day0.gates.ptq import evaluate_ptq

        return self.runner.local(f"ptq-checks-{recipe}", lambda: evaluate_ptq(
            self.source_inspection(), self.candidate_inspection(recipe), resolve_recipe(recipe)))

    def infeasible_upstream(self, recipe: str) -> Day0Error | None:
        """A PTQ failure that makes everything downstream of this recipe pointless (-> skip, INFEASIBLE)."""
        if self.config.quantize == "none":
            return None
        try:
            checks = self.ptq_checks(recipe)
        except Day0Error as exc:
            return exc
        for check in checks:
            if not check.passed and check.failure_class in INFEASIBLE_CLASSES:
                return Day0Error(check.failure_class, f"PTQ gate {check.name} of {recipe}: {check.message}")
        return None

    # ------------------------------------------------------------------ serve

    def side_checkpoint(self, side: str) -> str:
        """Where the placement sees what ``side`` serves (raises the upstream failure of an infeasible recipe)."""
        if side == BASELINE:
            return self.placement.source_checkpoint(self.source(), self.source_key())
        upstream = self.infeasible_upstream(side)
        if upstream is not None:
            raise upstream
        return str(self.quantized(side).checkpoint)

    def _external_url(self, side: str) -> tuple[str, str | None]:
        c = self.config
        if side == BASELINE:
            assert c.baseline_url is not None
            return c.baseline_url, c.baseline_model
        assert c.candidate_url is not None
        return c.candidate_url, c.candidate_model

    def side_key(self, side: str) -> str:
        c = self.config
        engine = serve_engine(c.serve)
        if not engine.managed:
            url, model = self._external_url(side)
            return keys.external_side_key(side, url=url, model=model)
        served = self.source_key() if side == BASELINE else self.checkpoint_key(side)
        return keys.side_key(side, checkpoint=served, engine=c.serve, engine_version=engine.version(c),
                             engine_args=c.vllm_args, serve_command=c.serve_command, placement=self.placement.key)

    def _registry_path(self, side_key: str) -> Path:
        """One registration per session: two sessions sharing a workspace each serve (and stop) their own."""
        return self.ws.path("servers", f"{side_key}.{self.session_id}.json")

    def _registered(self, path: Path) -> ServerRecord | None:
        data = read_json(path)
        try:
            return ServerRecord.model_validate(data) if isinstance(data, dict) else None
        except ValidationError:
            return None

    def _reap_abandoned(self, side_key: str) -> None:
        """Stop servers of this side left behind by sessions whose owner is gone (killed runs)."""
        for path in (self.ws.root / "servers").glob(f"{side_key}.*.json"):
            known = self._registered(path)
            if known is not None and known.session != self.session_id and not pid_alive(known.owner):
                self.placement.stop([known])
                path.unlink(missing_ok=True)

    def endpoint(self, side: str) -> Endpoint:
        c = self.config
        engine = serve_engine(c.serve)
        if not engine.managed:  # someone else's server: nothing to start, stop or register
            return self.runner.local(f"endpoint-{side}", lambda: engine.start(ServeRequest(
                Path(), side, self.ws.root / "logs", timeout_s=min(c.stage_timeout, 60), config=c,
                progress=self.progress)).endpoint)
        checkpoint = self.side_checkpoint(side)  # an upstream failure is that stage's, not this one's
        side_key = self.side_key(side)
        registry = self._registry_path(side_key)

        def build() -> Endpoint:
            known = self._registered(registry)
            if known is not None:
                reached = self.placement.reach(known)
                if reached is not None:
                    return reached
                self.placement.stop([known])
                registry.unlink(missing_ok=True)
            self._reap_abandoned(side_key)
            self.ws.event("server_start", side=side, session=self.session_id)
            record = self._timed(f"serve {side}", lambda: self.placement.serve(ServeJob(
                side, checkpoint, side_key, c.stage_timeout, c.serve, c, self.progress)))
            atomic_write_json(registry, record.model_dump(mode="json"))
            return Endpoint(url=record.url, model=record.model)

        return self.runner.run(f"serve-{side}", build, lock=f"serve-{side_key}")

    def stop_servers(self) -> list[str]:
        """Stop every server and job this session started (from any process). Idempotent."""
        mine = [(path, known) for path in sorted((self.ws.root / "servers").glob("*.json"))
                if (known := self._registered(path)) is not None and known.session == self.session_id]
        stopped = [known.side for _, known in mine]
        if mine or self._placement is not None or self.config.executor != "local":
            self.placement.stop([known for _, known in mine])  # together: each may take its grace period
            stopped += [name for name in self.placement.stop_session() if name not in stopped]
        for path, _ in mine:
            path.unlink(missing_ok=True)
        return stopped

    def close(self) -> None:
        if self._placement is not None:
            self._placement.close()

    def deploy(self, side: str) -> DeployRecord:
        """Health + one canary generation, remembered per served checkpoint so a cached re-run only re-gates."""
        record_path = self.ws.path("deploy", f"{self.side_key(side)}.json")

        def build() -> DeployRecord:
            cached = read_json(record_path)
            if cached and cached.get("healthy") and not self.runner.fresh and self._all_evals_cached(side):
                return DeployRecord(**{**cached, "models": tuple(cached["models"]), "cached": True})
            endpoint = self.endpoint(side)
            record = _health_and_canary(side, endpoint, self._canary_prompt())
            atomic_write_json(record_path, {k: v for k, v in record.__dict__.items() if k != "cached"})
            return record

        return self.runner.local(f"deploy-{side}", build)

    def deployed(self, side: str) -> None:
        """The side is servable and healthy (or nothing is served: lm-eval folders); raises the upstream failure."""
        if side != BASELINE:
            upstream = self.infeasible_upstream(side)
            if upstream is not None:
                raise upstream
        if self.config.eval != "lm-eval":
            self.deploy(side)

    def _canary_prompt(self) -> str:
        tasks = self.tasks()
        return tasks[0].samples[0].prompt if tasks else "Hello"

    # ------------------------------------------------------------------ evaluate

    def records_path(self, side: str, task: Task) -> Path:
        engine = eval_engine(self.config.eval)
        name = keys.records_key(task=task.name, spec=task.spec.model_dump(mode="json"), engine=engine.name,
                                engine_version=engine.version(self.config))
        return self.ws.path("evals", self.side_key(side), f"{name}.jsonl")

    def _all_evals_cached(self, side: str) -> bool:
        from pytest_day0.stages.evaluate import cached_result

        try:
            return all(cached_result(t, self.records_path(side, t), side) is not None for t in self.tasks())
        except Day0Error:
            return False

    def evaluation(self, side: str, task_name: str) -> TaskResult:
        from pytest_day0.stages.evaluate import cached_result

        task = self.task(task_name)
        if self.config.eval == "lm-eval":  # read, not served: the records land in the workspace like scored ones
            from pytest_day0.scoring import lm_eval

            return self.runner.local(f"eval-{side}-{task.name}", lambda: lm_eval.side_result(
                self.config, side, task.name, self.ws.root))
        path = self.records_path(side, task)

        def build() -> TaskResult:
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
                self.runner.forget(f"serve-{side}")
                result = self._evaluate_once(side, task, path, attempt=2)
            return result

        return self.runner.run(f"eval-{side}-{task.name}", build, lock=f"eval-{path.parent.name}-{path.stem}",
                               reset=lambda: path.unlink(missing_ok=True))

    def _evaluate_once(self, side: str, task: Task, path: Path, attempt: int) -> TaskResult:
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
            EvalRequest(task, endpoint, path, side, concurrency=self.config.concurrency, progress=on_progress,
                        timeout_s=self.config.stage_timeout)))
        total = len(task.samples)
        self.ws.event("eval_done", side=side, task=task.name, session=self.session_id, attempt=attempt,
                      reused=reused[0] if reused[0] >= 0 else None,
                      requested=total - reused[0] if reused[0] >= 0 else None,
                      scored=result.scored_samples, errored=result.errored_samples)
        return result

    def _server_lost(self, side: str, result: TaskResult) -> bool:
        """Samples failed and the server we started no longer answers: a restart can save the evaluation."""
        if self.placement.key or not serve_engine(self.config.serve).managed:
            return False  # a remote job or someone else's server: not ours to restart
        if result.errored_samples == 0 or result.status != "INCOMPLETE":
            return False
        known = self._registered(self._registry_path(self.side_key(side)))
        return known is not None and self.placement.reach(known) is None

    def records(self, side: str, task_name: str) -> list[SampleRecord]:
        """This run's records of one side (a records file may also hold samples outside --day0-limit)."""
        from pytest_day0.stages.evaluate import read_records

        result = self.evaluation(side, task_name)
        by_id, _ = read_records(Path(result.records_path))
        return [by_id[s.id] for s in self.task(task_name).samples if s.id in by_id]

    # ------------------------------------------------------------------ checks (I/O here, decisions in gates/)

    def run_check(self, side: str, task_name: str) -> RunCheck:
        from pytest_day0.gates.run import check_run

        return check_run(self.evaluation(side, task_name))

    def comparison(self, recipe: str, task_name: str) -> TaskComparison:
        """Floor, quality and anomaly of one task share one comparison, computed once per process and saved."""
        from pytest_day0.gates.compare import compare_task, flips_of
        from pytest_day0.gates.flip_items import flip_detail
        from pytest_day0.gates.run import align_records, check_run
        from pytest_day0.gates.stats import item_pairs, paired_from_records

        c = self.config

        def build() -> TaskComparison:
            results = {side: self.evaluation(side, task_name) for side in (BASELINE, recipe)}
            abstain = any(check_run(r).abstain for r in results.values())
            base, cand = self.records(BASELINE, task_name), self.records(recipe, task_name)
            align_records(base, cand)  # ids and prompts: a pair that is no pair is SAMPLE_ACCOUNTING_FAILED
            spec = self.task(task_name).spec
            paired = paired_from_records(base, cand, c.confidence) if c.stat == "paired" else None
            flips = flips_of(item_pairs(base, cand), higher_is_better=spec.higher_is_better)
            comparison = compare_task(
                spec, results[BASELINE], results[recipe], threshold=c.threshold, floor=c.floor,
                relative=c.relative, abstain=abstain, recipe=recipe, paired=paired, flips=flips)
            save_flip_detail(self.ws.root, self.session_id, flip_detail(
                flips, base, cand, recipe=recipe, task=task_name, samples=self.task(task_name).samples,
                records={"baseline": results[BASELINE].records_path, "candidate": results[recipe].records_path}))
            save_comparison(self.ws.root, self.session_id, comparison)
            return comparison

        return self.runner.local(f"compare-{recipe}-{task_name}", build)

    def task_set_check(self, recipe: str) -> RunCheck:
        from pytest_day0.gates.run import check_task_sets

        names = [t.name for t in self.tasks()]
        sides = {side: {n for n in names if self.evaluation(side, n) is not None} for side in (BASELINE, recipe)}
        return check_task_sets(sides[BASELINE], sides[recipe])

    def verbosity_check(self, recipe: str, task_name: str) -> VerbosityCheck:
        from pytest_day0.gates.verbosity import check_verbosity

        base, cand = self.evaluation(BASELINE, task_name), self.evaluation(recipe, task_name)
        return check_verbosity(task_name, self.task(task_name).spec.kind, base.mean_completion_tokens,
                               cand.mean_completion_tokens, n=min(base.scored_samples, cand.scored_samples),
                               threshold=self.config.verbosity)

    def published_check(self, task_name: str) -> PublishedCheck | None:
        """None when the baseline has no valid score to hold against its published one (the run gate says why)."""
        from pytest_day0.gates.published import check_published
        from pytest_day0.gates.run import check_run
        from pytest_day0.gates.stats import mean_interval
        from pytest_day0.scoring.published import load_published

        c = self.config
        assert c.published is not None
        published = load_published(c.published)[task_name]
        result = self.evaluation(BASELINE, task_name)
        if not check_run(result).passed or result.score is None:
            return None
        spec = self.task(task_name).spec
        interval = None
        n = result.scored_samples
        if c.stat == "paired":
            values = [r.correct for r in self.records(BASELINE, task_name) if r.correct is not None]
            low, high = mean_interval(values, c.confidence)
            interval, n = (spec.to_scale(low), spec.to_scale(high)), len(values)
        return check_published(task_name, spec.scale, float(result.score), published, interval=interval, n=n)


# ---------------------------------------------------------------------- helpers (I/O)


def _health_and_canary(side: str, endpoint: Endpoint, prompt: str) -> DeployRecord:
    import httpx

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


__all__ = ["BASELINE", "DeployRecord", "ReleaseChain", "make_placement"]
