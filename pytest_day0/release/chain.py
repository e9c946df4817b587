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
    digest,
    file_digest,
    pid_alive,
    read_json,
)

if TYPE_CHECKING:
    from pytest_day0.checkpoint.model import CheckpointInspection
    from pytest_day0.gates.compare import AdaptiveStop, TaskComparison
    from pytest_day0.gates.divergence import DivergenceCheck
    from pytest_day0.gates.ptq import PtqCheck
    from pytest_day0.gates.published import PublishedCheck
    from pytest_day0.gates.run import RunCheck
    from pytest_day0.gates.verbosity import VerbosityCheck
    from pytest_day0.stages.divergence import SideLogprobs
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


def divergence_applies(config: RunConfig) -> bool:
    """The divergence pre-check runs when it is on and the scorer evaluates: its texts are the scorer's task samples
    (lm-eval's tasks, in the session or as folders, have none here)."""
    return config.eval != "lm-eval" and config.divergence_texts > 0


class ReleaseChain:
    def __init__(self, config: RunConfig, session_id: str, progress: Progress | None = None,
                 owner_pid: int | None = None, while_waiting: Callable[[], None] | None = None) -> None:
        self.config = config
        self.session_id = session_id
        # The process that lives as long as the session (the xdist controller): while it lives, the servers
        # this session registered are in use, even if another session shares the workspace.
        self.owner_pid = owner_pid or os.getpid()
        self.ws = Workspace(config.workdir)
        self.progress: Progress = progress or (lambda _line: None)
        self.runner = StageRunner(self.ws, session_id, fresh=config.fresh, progress=self.progress)
        self._placement: Placement | None = None
        # work for this process to do while a stage waits on a child (the controller warms up its report plot)
        self.while_waiting: Callable[[], None] = while_waiting or (lambda: None)

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
        if self.config.lm_eval_folders:  # scores from result folders: the tasks are what the baseline logged
            from pytest_day0.scoring import external_results

            return self.runner.local("tasks", lambda: external_results.run_tasks(self.config))
        engine = eval_engine(self.config.eval)
        if engine.tasks is not None:  # the engine resolves the names itself (lm-eval's registry)
            resolve = engine.tasks
            return self.runner.local("tasks", lambda: resolve(self.config, self.progress))
        return self.runner.local("tasks", lambda: [load_task(t, self.config.limit) for t in self.config.tasks])

    def tokenizer(self) -> str | None:
        """The served model's tokenizer for engines that tokenize themselves: the source checkpoint, else (an
        external endpoint gated by name) the model name as a hub id."""
        try:
            return str(self.source())
        except Day0Error:
            return self.config.model

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
            if not tail:  # a child is running (a reused checkpoint prints nothing)
                self.while_waiting()
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
        self.tasks()  # tasks that cannot run (unknown, a dataset out of reach) stop the side before a server starts
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
            self.while_waiting()
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

    def deployed(self, side: str, *, precheck: bool = True) -> None:
        """The side is servable and healthy (or nothing is served: lm-eval folders); raises the upstream failure,
        a candidate's divergence pre-check included unless ``precheck`` is off (the pre-check's own test)."""
        if side != BASELINE:
            upstream = self.infeasible_upstream(side)
            if upstream is not None:
                raise upstream
        if not self.config.lm_eval_folders:
            self.deploy(side)
            broken = self.broken_upstream(side) if precheck and side != BASELINE else None
            if broken is not None:  # the divergence pre-check found it broken: no evaluation time for it
                raise broken

    def _canary_prompt(self) -> str:
        """A prompt of the run's first task (lm-eval builds its prompts itself: then a plain greeting)."""
        return next((s.prompt for t in self.tasks() for s in t.samples[:1] if s.prompt), "Hello")

    # ------------------------------------------------------------------ evaluate

    def records_path(self, side: str, task: Task) -> Path:
        engine = eval_engine(self.config.eval)
        name = keys.records_key(task=task.name, spec=task.spec.model_dump(mode="json"), engine=engine.name,
                                engine_version=engine.version(self.config))
        return self.ws.path("evals", self.side_key(side), f"{name}.jsonl")

    def _cached(self, task: Task, path: Path, side: str) -> TaskResult | None:
        from pytest_day0.stages.evaluate import cached_result

        engine = eval_engine(self.config.eval)
        return (engine.cached or cached_result)(task, path, side)

    def _all_evals_cached(self, side: str) -> bool:
        try:
            return all(t.members or self._cached(t, self.records_path(side, t), side) is not None
                       for t in self.tasks())
        except Day0Error:
            return False

    def evaluation(self, side: str, task_name: str) -> TaskResult:
        """One side's evaluation of a task: all its items, or (``--day0-adaptive``) the prefix of its seeded order
        that the lockstep rounds needed (for the baseline, the longest any recipe needed)."""
        task = self.task(task_name)
        if self.config.lm_eval_folders:  # read, not served: the records land in the workspace like scored ones
            from pytest_day0.scoring import external_results

            return self.runner.local(f"eval-{side}-{task.name}", lambda: external_results.side_result(
                self.config, side, task.name, self.ws.root))
        if task.members:  # an aggregate (an lm-eval group): its members' evaluations, combined
            return self.runner.local(f"eval-{side}-{task.name}", lambda: self._members_evaluation(side, task))
        if self.config.adaptive:
            return self._evaluate(side, self._prefix(task, self._evaluated_items(side, task.name)))
        return self._evaluate(side, task)

    def _evaluate(self, side: str, task: Task, *, first_round: bool = True) -> TaskResult:
        """Evaluate ``task``'s samples on ``side`` once per session (any process). A subset of a task (an adaptive
        round) shares the task's records file, so a later round sends only the items it adds."""
        path = self.records_path(side, task)
        full = len(task.samples) == len(self.task(task.name).samples)

        def build() -> TaskResult:
            done = self._cached(task, path, side)
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

        stage = f"eval-{side}-{task.name}" + ("" if full else f"-{len(task.samples)}")
        return self.runner.run(stage, build, lock=f"eval-{path.parent.name}-{path.stem}",
                               reset=(lambda: path.unlink(missing_ok=True)) if first_round else None)

    # ------------------------------------------------------------------ adaptive (--day0-adaptive)

    def _order(self, task_name: str) -> list[str]:
        from pytest_day0.gates.stats import evaluation_order

        return evaluation_order([s.id for s in self.task(task_name).samples])

    def _prefix(self, task: Task, n: int) -> Task:
        """The first ``n`` items of the task's seeded evaluation order, in the task's own order."""
        keep = set(self._order(task.name)[:n])
        return task.model_copy(update={"samples": tuple(s for s in task.samples if s.id in keep)})

    def _stop_path(self, recipe: str) -> Path:
        return self.ws.root / "runs" / self.session_id / "adaptive" / f"{recipe}.stopped.json"

    def not_stopped(self, side: str, task_name: str) -> None:
        """Raises when an adaptive floor breach on another task stopped ``side`` before this task started."""
        stopped = self.recipe_stopped(side, task_name)
        if stopped is not None:
            raise stopped

    def recipe_stopped(self, recipe: str, task_name: str) -> Day0Error | None:
        """Another task of this recipe breached the floor (adaptive): this task, not started, is never evaluated."""
        if not self.config.adaptive or recipe == BASELINE:
            return None
        stop = read_json(self._stop_path(recipe))
        if not isinstance(stop, dict) or stop.get("task") == task_name:
            return None
        if (self.ws.root / "runs" / self.session_id / "adaptive" / f"{recipe}-{task_name}.json").exists():
            return None  # it ran (or is running) its own rounds: its evidence stands
        return Day0Error(FailureClass.CATASTROPHIC_REGRESSION,
                         f"{recipe} breached the floor on {stop.get('task')}: its evaluation stopped there, "
                         f"{task_name} was not evaluated")

    def adaptive(self, recipe: str, task_name: str) -> AdaptiveStop:
        """Both sides in lockstep rounds over the task's seeded item order, until the confidence sequence decides.

        After each round (64 items, then x1.5, gates/sequential.round_schedule) ``sequential.decide`` reads the
        anytime-valid confidence sequence of the paired difference: PASS, REGRESSION or the floor stop the task
        (a REGRESSION or floor stop at the per-task level that survives the family control, Bonferroni over the
        recipe's tasks), so does futility (no claim reachable by the task's end) and the task's end. A floor breach
        stops the whole recipe: tasks that have not started are not evaluated.
        """
        from pytest_day0.gates import sequential
        from pytest_day0.gates.compare import AdaptiveStop
        from pytest_day0.gates.family import per_task_confidence
        from pytest_day0.gates.stats import item_means

        c = self.config
        task = self.task(task_name)
        record_path = self.ws.root / "runs" / self.session_id / "adaptive" / f"{recipe}-{task_name}.json"

        def build() -> AdaptiveStop:
            stopped = self.recipe_stopped(recipe, task_name) or self.broken_upstream(recipe)
            if stopped is not None:  # a floor breach elsewhere, or the divergence pre-check: no rounds for it
                raise stopped
            order = self._order(task_name)
            size = len(order)
            schedule = sequential.round_schedule(size)
            state = sequential.start(size, c.confidence)
            regression_confidence = per_task_confidence(len(self.tasks()), c.confidence)
            atomic_write_json(record_path, {"recipe": recipe, "task": task_name, "task_size": size, "rounds": []})
            rounds: list[dict[str, object]] = []
            outcome, reason, n = "INCONCLUSIVE", "exhausted", 0
            for end in schedule:
                subset = self._prefix(task, end)
                results = {side: self._evaluate(side, subset, first_round=end == schedule[0])
                           for side in (BASELINE, recipe)}
                if any(r.errored_samples or r.status != "SUCCESS" for r in results.values()):
                    outcome, reason, n = "INCONCLUSIVE", "stopped: samples errored (see the run gate)", end
                    break
                means = {side: item_means((r.id, r.correct) for r in self._records(side, subset)
                                          if r.correct is not None) for side in (BASELINE, recipe)}
                state = sequential.update(state, [(means[BASELINE][i], means[recipe][i])
                                                  for i in order[state.n:end]])
                decision = sequential.decide(state, threshold=c.threshold, floor=c.floor, task_size=size,
                                             higher_is_better=task.spec.higher_is_better,
                                             regression_confidence=regression_confidence)
                outcome, reason, n = str(decision.outcome), decision.reason, end
                rounds.append({"n": end, "outcome": outcome, "reason": reason, "delta": decision.delta,
                               "ci": [decision.ci_low, decision.ci_high]})
                atomic_write_json(record_path, {"recipe": recipe, "task": task_name, "task_size": size,
                                                "rounds": rounds})
                self.ws.event("adaptive_round", recipe=recipe, task=task_name, n=end, outcome=outcome,
                              session=self.session_id)
                width = task.spec.scale_range
                self.progress(f"[day0]   adaptive {recipe}/{task_name}: {end}/{size} items, "
                              f"Δ {decision.delta * width:+.2f} [{decision.ci_low * width:+.2f}, "
                              f"{decision.ci_high * width:+.2f}] -> {outcome} ({reason})")
                if decision.stop:
                    break
                other = read_json(self._stop_path(recipe))
                if isinstance(other, dict) and other.get("task") != task_name:
                    outcome, reason = "INCONCLUSIVE", f"stopped: {recipe} breached the floor on {other.get('task')}"
                    break
            stop = AdaptiveStop(evaluated=n, task_size=size, outcome=outcome, reason=reason, rounds=len(rounds))
            atomic_write_json(record_path, {"recipe": recipe, "task": task_name, "task_size": size,
                                            "rounds": rounds, "stop": stop.model_dump(mode="json")})
            if outcome == "CATASTROPHIC":
                atomic_write_json(self._stop_path(recipe), {"task": task_name, "n": n})
            return stop

        return self.runner.run(f"adaptive-{recipe}-{task_name}", build,
                               lock=f"adaptive-{self.session_id}-{recipe}-{task_name}")

    def _evaluated_items(self, side: str, task_name: str) -> int:
        """How many items of the seeded order ``side`` needed: its own rounds, or the baseline's most for any
        recipe (at least the first round, so its run gate always has something to check)."""
        from pytest_day0.gates import sequential

        if side != BASELINE:
            return self.adaptive(side, task_name).evaluated
        needed = [sequential.round_schedule(len(self.task(task_name).samples))[0]]
        for recipe in self.config.recipes:
            if self.infeasible_upstream(recipe) is not None:
                continue
            try:
                needed.append(self.adaptive(recipe, task_name).evaluated)
            except Day0Error:
                continue  # that recipe's own tests report why
        return max(needed)

    def _records(self, side: str, task: Task) -> list[SampleRecord]:
        from pytest_day0.stages.evaluate import read_records

        by_id, _ = read_records(self.records_path(side, task))
        return [by_id[s.id] for s in task.samples if s.id in by_id]

    def _members_evaluation(self, side: str, task: Task) -> TaskResult:
        """Each member evaluated (run once, like any task), their records united under ``<member>/<id>`` ids."""
        from pytest_day0.scoring.metrics import member_records, members_result
        from pytest_day0.workspace import atomic_write_text

        results = {m: self.evaluation(side, m) for m in task.members}
        records = member_records(task.name, {m: self.records(side, m) for m in task.members})
        path = self.records_path(side, task)
        atomic_write_text(path, "".join(r.model_dump_json() + "\n" for r in records))
        return members_result(task.spec, [s.id for s in task.samples], records, results, side=side,
                              records_path=str(path))

    def _evaluate_once(self, side: str, task: Task, path: Path, attempt: int) -> TaskResult:
        endpoint = self.endpoint(side)
        engine = eval_engine(self.config.eval)
        self.ws.event("eval_run", side=side, task=task.name, session=self.session_id, attempt=attempt)
        last = [0.0]
        reused = [-1]  # the engine reports its first progress before sending anything: that count was reused
        counted = [len(task.samples)]  # what the engine counts (samples; lm-eval: requests), for eval_done
        started = time.time()

        def on_progress(done_n: int, total: int) -> None:
            counted[0] = total
            if reused[0] < 0:
                reused[0] = done_n
            now = time.time()
            if now - last[0] >= 5 or done_n == total:
                last[0] = now
                rate = done_n / max(now - started, 1e-6)
                self.progress(f"[day0]   {side}/{task.name}: {done_n}/{total} {engine.progress_unit} ({rate:.1f}/s)")

        result = self._timed(f"eval {side}/{task.name}", lambda: engine.evaluate(
            EvalRequest(task, endpoint, path, side, concurrency=self.config.concurrency, progress=on_progress,
                        timeout_s=self.config.stage_timeout, config=self.config, tokenizer=self.tokenizer(),
                        log=self.progress)))
        self.ws.event("eval_done", side=side, task=task.name, session=self.session_id, attempt=attempt,
                      reused=reused[0] if reused[0] >= 0 else None,
                      requested=counted[0] - reused[0] if reused[0] >= 0 else None, unit=engine.progress_unit,
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

    def records(self, side: str, task_name: str, items: int | None = None) -> list[SampleRecord]:
        """This run's records of one side (a records file may also hold samples outside --day0-limit); with
        ``items``, only the first that many of the task's seeded evaluation order (an adaptive prefix)."""
        from pytest_day0.stages.evaluate import read_records

        result = self.evaluation(side, task_name)
        by_id, _ = read_records(Path(result.records_path))
        task = self.task(task_name)
        if items is not None:
            task = self._prefix(task, items)
        return [by_id[s.id] for s in task.samples if s.id in by_id]

    # ------------------------------------------------------------------ divergence pre-check

    def divergence_applies(self) -> bool:
        return divergence_applies(self.config)

    def divergence_texts(self) -> list[str]:
        from pytest_day0.gates.divergence import text_set

        return self.runner.local("divergence-texts", lambda: text_set(self.tasks(), self.config.divergence_texts))

    def divergence_logprobs(self, side: str) -> SideLogprobs:
        """One side's top-k logprobs on the text set, kept per served side (the baseline's serves every recipe)."""
        from pytest_day0.gates.divergence import TextLogprobs
        from pytest_day0.stages.divergence import SideLogprobs, side_logprobs

        c = self.config
        texts = self.divergence_texts()
        side_key = self.side_key(side)
        path = self.ws.path("divergence", side_key, f"{digest(texts, c.divergence_top_k)}.json")

        def build() -> SideLogprobs:
            cached = read_json(path)
            if isinstance(cached, dict) and isinstance(cached.get("texts"), list):
                try:
                    return SideLogprobs([TextLogprobs.model_validate(t) for t in cached["texts"]],
                                        float(cached.get("seconds", 0.0)), reused=True)
                except (ValidationError, TypeError, ValueError):
                    pass  # a file from another version: measure again
            endpoint = self.endpoint(side)
            self.ws.event("divergence_run", side=side, session=self.session_id, texts=len(texts))
            started = time.time()
            result = self._timed(f"divergence {side}", lambda: side_logprobs(
                endpoint, texts, top_k=c.divergence_top_k, concurrency=c.concurrency, timeout_s=c.stage_timeout))
            seconds = time.time() - started
            atomic_write_json(path, {"seconds": round(seconds, 3), "top_k": c.divergence_top_k,
                                     "texts": [t.model_dump(mode="json") for t in result]})
            return SideLogprobs(result, seconds, reused=False)

        return self.runner.run(f"divergence-{side}", build, lock=f"divergence-{side_key}",
                               reset=lambda: path.unlink(missing_ok=True))

    def divergence_check(self, recipe: str) -> DivergenceCheck:
        """Baseline vs candidate on the text set (the pure gate decides), with the candidate's measuring time."""
        from pytest_day0.gates.divergence import check_divergence, not_measured

        c = self.config

        def build() -> DivergenceCheck:
            try:
                base, cand = self.divergence_logprobs(BASELINE), self.divergence_logprobs(recipe)
            except Day0Error as exc:  # a screen that could not look: the evaluation measures, and meets the trouble
                return not_measured(recipe, str(exc), floor=c.divergence_floor, tolerance=c.divergence_kl)
            check = check_divergence(recipe, base.texts, cand.texts, top_k=c.divergence_top_k,
                                     floor=c.divergence_floor, tolerance=c.divergence_kl)
            return check.model_copy(update={"seconds": cand.seconds, "baseline_seconds": base.seconds,
                                            "reused": cand.reused})

        return self.runner.local(f"divergence-check-{recipe}", build)

    def broken_upstream(self, recipe: str) -> Day0Error | None:
        """The pre-check found the candidate broken (CATASTROPHIC_REGRESSION): everything that would evaluate it
        skips with that class. A pre-check that could not run blocks nothing: its own test reports why."""
        if not self.divergence_applies():
            return None
        try:
            check = self.divergence_check(recipe)
        except Day0Error:
            return None
        if not check.catastrophic:
            return None
        return Day0Error(FailureClass.CATASTROPHIC_REGRESSION, f"divergence pre-check of {recipe}: {check.message}")

    # ------------------------------------------------------------------ checks (I/O here, decisions in gates/)

    def run_check(self, side: str, task_name: str) -> RunCheck:
        from pytest_day0.gates.run import check_run

        return check_run(self.evaluation(side, task_name))

    def task_comparison(self, recipe: str, task_name: str) -> TaskComparison:
        """One task's own comparison (per-task decisions, before the family-wise control); computed once."""
        from pytest_day0.gates.compare import compare_task, flips_of
        from pytest_day0.gates.flip_items import flip_detail
        from pytest_day0.gates.run import align_records, check_run
        from pytest_day0.gates.stats import item_pairs, paired_from_records

        c = self.config

        def build() -> TaskComparison:
            results = {side: self.evaluation(side, task_name) for side in (BASELINE, recipe)}
            stop, horizon, items = None, None, None
            if c.adaptive:  # both sides on the recipe's own prefix; the bets were tuned for the whole task
                stop = self.adaptive(recipe, task_name)
                items, horizon = stop.evaluated, stop.task_size
                results[BASELINE] = self._evaluate(BASELINE, self._prefix(self.task(task_name), items))
            abstain = any(check_run(r).abstain for r in results.values())
            base, cand = self.records(BASELINE, task_name, items), self.records(recipe, task_name, items)
            align_records(base, cand)  # ids and prompts: a pair that is no pair is SAMPLE_ACCOUNTING_FAILED
            spec = self.task(task_name).spec
            paired = paired_from_records(base, cand, c.confidence, horizon=horizon) if c.stat == "paired" else None
            flips = flips_of(item_pairs(base, cand), higher_is_better=spec.higher_is_better)
            comparison = compare_task(
                spec, results[BASELINE], results[recipe], threshold=c.threshold, floor=c.floor,
                relative=c.relative, abstain=abstain, recipe=recipe, paired=paired, flips=flips)
            save_flip_detail(self.ws.root, self.session_id, flip_detail(
                flips, base, cand, recipe=recipe, task=task_name, samples=self.task(task_name).samples,
                records={"baseline": results[BASELINE].records_path, "candidate": results[recipe].records_path}))
            # saved by comparison() once the family control is applied: that is the comparison the gates assert
            return comparison.model_copy(update={"adaptive": stop}) if stop is not None else comparison

        return self.runner.local(f"task-compare-{recipe}-{task_name}", build)

    def comparison(self, recipe: str, task_name: str) -> TaskComparison:
        """A task's comparison as the session claims it: the recipe's "worse" claims (REGRESSION, floor, anomaly)
        controlled family-wise over its tasks (Holm, gates/family.py); floor, quality and anomaly share it.

        Needs every task of the recipe compared (their p-values make the family); a task whose own stages failed
        is left out of the family (its tests say why) and re-raises here for its own tests."""
        from pytest_day0.gates.family import family_adjusted

        own = self.task_comparison(recipe, task_name)  # this task's failure is its own tests' failure

        def build() -> list[TaskComparison]:
            family = []
            for task in self.tasks():
                try:
                    family.append(self.task_comparison(recipe, task.name))
                except Day0Error:
                    continue
            adjusted = family_adjusted(family, self.config.confidence)
            for comparison in adjusted:
                save_comparison(self.ws.root, self.session_id, comparison)
            return adjusted

        adjusted = self.runner.local(f"compare-{recipe}", build)
        return next((c for c in adjusted if c.task == task_name), own)

    def task_set_check(self, recipe: str) -> RunCheck:
        from pytest_day0.gates.run import check_task_sets

        names = [t.name for t in self.tasks()]
        sides = {side: {n for n in names if self.evaluation(side, n) is not None} for side in (BASELINE, recipe)}
        return check_task_sets(sides[BASELINE], sides[recipe])

    def verbosity_check(self, recipe: str, task_name: str) -> VerbosityCheck:
        from pytest_day0.gates.verbosity import check_verbosity

        base, cand = self.evaluation(BASELINE, task_name), self.evaluation(recipe, task_name)
        spec = self.task(task_name).spec
        items = self.adaptive(recipe, task_name).evaluated if self.config.adaptive else None
        tokens = {side: {r.id: float(r.completion_tokens) for r in self.records(side, task_name, items)
                         if r.completion_tokens is not None and r.error is None} for side in (BASELINE, recipe)}
        paired = [(tokens[BASELINE][i], tokens[recipe][i]) for i in tokens[recipe] if i in tokens[BASELINE]]
        if items is not None:  # the baseline may have more items (another recipe needed them): this recipe's own
            keep = set(tokens[recipe])
            base_mean = sum(v for i, v in tokens[BASELINE].items() if i in keep) / max(len(keep), 1)
            cand_mean = sum(tokens[recipe].values()) / max(len(keep), 1)
        else:
            base_mean, cand_mean = base.mean_completion_tokens, cand.mean_completion_tokens  # type: ignore[assignment]
        return check_verbosity(task_name, spec.kind, base_mean, cand_mean, n=len(paired) or None,
                               threshold=self.config.verbosity, paired_tokens=paired or None,
                               max_tokens=float(spec.max_tokens), confidence=self.config.confidence)

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


__all__ = ["BASELINE", "DeployRecord", "ReleaseChain", "divergence_applies", "make_placement"]
