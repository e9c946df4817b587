"""The built-in release suite: ordinary tests over the chain's fixtures, in chain order.

Collected by the plugin when ``--day0-model`` is given (no file needed in the user's repo). Each gate is
a plain assertion through a pure gate function; a stage failure in the test that owns the stage is a
gate failure of its class, and in a test downstream of it a skip whose reason starts with that class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.release.chain import BASELINE, ReleaseChain

T = TypeVar("T")


def _props(request: pytest.FixtureRequest, **values: Any) -> None:
    """Numbers behind a gate, as JUnit properties / JSON metadata (a key already recorded is not repeated)."""
    have = {k for k, _ in request.node.user_properties}
    for key, value in values.items():
        if value is not None and key not in have:
            request.node.user_properties.append((key, value if isinstance(value, (int, float, str)) else str(value)))


def owns(fn: Callable[[], T]) -> T:
    """This test owns the stage: its failure is this test's gate failure, with the stage's class."""
    try:
        return fn()
    except Day0Error as exc:
        raise GateFailure(exc.failure_class, exc.message) from None


def needs(fn: Callable[[], T], what: str) -> T:
    """An upstream stage this test depends on: if it failed, skip with its class first in the reason."""
    try:
        return fn()
    except Day0Error as exc:
        pytest.skip(f"[{exc.failure_class}] upstream {what} failed: {exc.message}")


@contextmanager
def _numbers(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    numbers: dict[str, Any] = {}
    try:
        yield numbers
    finally:
        _props(request, **numbers)


# ---------------------------------------------------------------------- setup


def test_setup(day0_chain: ReleaseChain, request: pytest.FixtureRequest) -> None:
    """Reachability and inputs: the source checkpoint, the tasks, external endpoints and their credentials."""
    # --day0-quantize none (lm-eval results, external endpoints) gates no checkpoint: the source is a label
    source = owns(day0_chain.source) if day0_chain.config.quantize != "none" else None
    tasks = owns(day0_chain.tasks)
    _props(request, source=str(source) if source else None, tasks=",".join(t.name for t in tasks),
           samples=sum(len(t.samples) for t in tasks))
    if day0_chain.remote is not None:  # the SSH host / cluster: host key, auth, scheduler (SYSTEMIC, one line)
        _props(request, executor=owns(day0_chain.remote.check))
    if day0_chain.config.serve == "external":
        owns(lambda: day0_chain.endpoint(BASELINE))
        for recipe in day0_chain.config.recipes:
            owns(lambda r=recipe: day0_chain.endpoint(r))  # type: ignore[misc]


# ---------------------------------------------------------------------- PTQ


def test_ptq(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """The quantize stage produced a checkpoint that can be inspected."""
    _no_checkpoint_skips(day0_chain)
    needs(day0_chain.source, "setup")
    result = owns(lambda: day0_chain.quantized(day0_recipe))
    inspection = owns(lambda: day0_chain.candidate_inspection(day0_recipe))
    _props(request, checkpoint=str(result.checkpoint), engine=result.engine, reused=int(result.reused),
           ptq_seconds=round(result.wall_s, 2), quant_algo=inspection.quant_algo or "none",
           tensors=inspection.tensor_count)


def _no_checkpoint_skips(day0_chain: ReleaseChain) -> None:
    if day0_chain.config.quantize == "none":
        pytest.skip("no checkpoint to gate (--day0-quantize none): the PTQ gates do not apply")


def _ptq_check(day0_chain: ReleaseChain, recipe: str, name: str, request: pytest.FixtureRequest) -> None:
    from pytest_day0.gates.ptq import assert_ptq_check

    _no_checkpoint_skips(day0_chain)
    checks = needs(lambda: day0_chain.ptq_checks(recipe), f"PTQ {recipe}")
    check = next(c for c in checks if c.name == name)
    _props(request, **check.numbers)
    assert_ptq_check(check)


def test_ptq_size(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """The checkpoint is smaller than the source (SIZE_NOT_REDUCED)."""
    _ptq_check(day0_chain, day0_recipe, "size", request)


def test_ptq_coverage(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """Every layer the recipe should quantize is quantized, in the recipe's precision."""
    _ptq_check(day0_chain, day0_recipe, "coverage", request)


def test_ptq_metadata(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """Tokenizer, chat template, special tokens, generation config, architecture, context length unchanged."""
    _ptq_check(day0_chain, day0_recipe, "metadata", request)


# ---------------------------------------------------------------------- deploy


def test_deploy(day0_chain: ReleaseChain, day0_side: str, request: pytest.FixtureRequest) -> None:
    """The side is served, healthy, and answers one canary generation."""
    if day0_chain.config.eval == "lm-eval":
        pytest.skip("nothing is served: the scores come from lm-eval results (--day0-eval lm-eval)")
    if day0_chain.config.quantize != "none":
        needs(day0_chain.source, "setup")
    if day0_side != BASELINE and day0_chain.config.quantize != "none":
        upstream = day0_chain.infeasible_upstream(day0_side)
        if upstream is not None:
            pytest.skip(f"[{upstream.failure_class}] upstream PTQ {day0_side} failed: {upstream.message}")
    record = owns(lambda: day0_chain.deploy(day0_side))
    _props(request, served_models=",".join(record.models), canary=record.canary_text[:80],
           deploy_seconds=record.seconds, cached=int(record.cached))


# ---------------------------------------------------------------------- evaluate


def _deployed(day0_chain: ReleaseChain, side: str) -> None:
    if side != BASELINE and day0_chain.config.quantize != "none":
        upstream = day0_chain.infeasible_upstream(side)
        if upstream is not None:
            raise upstream
    if day0_chain.config.eval != "lm-eval":  # lm-eval results: nothing to deploy
        day0_chain.deploy(side)


def test_eval_complete(day0_chain: ReleaseChain, day0_side: str, day0_task: str,
                       request: pytest.FixtureRequest) -> None:
    """The run gate: terminal status, every sample accounted for, no errors, a finite score on the task's scale."""
    from pytest_day0.gates.run import check_run

    needs(lambda: _deployed(day0_chain, day0_side), f"deploy {day0_side}")
    result = owns(lambda: day0_chain.evaluation(day0_side, day0_task))
    check = check_run(result)
    _props(request, **check.numbers)
    if not check.passed:
        assert check.failure_class is not None
        raise GateFailure(check.failure_class, f"{day0_side}/{day0_task}: {check.message}")


# ---------------------------------------------------------------------- compare


def _records(day0_chain: ReleaseChain, result: Any, task: str) -> list[Any]:
    """This run's records of one side (a records file may also hold samples outside --day0-limit)."""
    from pytest_day0.stages.evaluate import read_records

    by_id, _ = read_records(Path(result.records_path))
    wanted = [s.id for s in day0_chain.task(task).samples]
    return [by_id[i] for i in wanted if i in by_id]


def _paired(day0_chain: ReleaseChain, results: dict[str, Any], recipe: str, task: str) -> Any:
    """Paired per-sample statistics of the two sides (None with --day0-stat point)."""
    from pytest_day0.gates.stats import paired_from_records

    if day0_chain.config.stat != "paired":
        return None
    return paired_from_records(_records(day0_chain, results[BASELINE], task),
                               _records(day0_chain, results[recipe], task), day0_chain.config.confidence)


def _comparison(day0_chain: ReleaseChain, recipe: str, task: str) -> Any:
    from pytest_day0.gates.compare import compare_task
    from pytest_day0.gates.run import check_run
    from pytest_day0.report.session_report import save_comparison

    results = {}
    abstain = False
    for side in (BASELINE, recipe):
        needs(lambda s=side: _deployed(day0_chain, s), f"deploy {side}")  # type: ignore[misc]
        result = needs(lambda s=side: day0_chain.evaluation(s, task), f"eval {side}/{task}")  # type: ignore[misc]
        abstain = abstain or check_run(result).abstain
        results[side] = result
    c = day0_chain.config

    def compare() -> Any:
        comparison = compare_task(
            day0_chain.task(task).spec, results[BASELINE], results[recipe], threshold=c.threshold, floor=c.floor,
            relative=c.relative, abstain=abstain, recipe=recipe, paired=_paired(day0_chain, results, recipe, task))
        save_comparison(c.workdir, day0_chain.session_id, comparison)
        return comparison

    # floor, quality and anomaly share one comparison (the bootstrap runs once per task and process)
    return owns(lambda: day0_chain._once(f"compare-{recipe}-{task}", compare, retry_transient=False))


def _judge(assertion: Callable[[Any], None], comparison: Any, request: pytest.FixtureRequest) -> None:
    """Run a comparison gate; a gate that could not judge is a skip whose reason starts with its class."""
    from pytest_day0.gates.compare import GateSkipped, comparison_numbers

    _props(request, **{k: v for k, v in comparison_numbers(comparison).items() if v is not None})
    try:
        assertion(comparison)
    except GateSkipped as exc:
        pytest.skip(str(exc))


def test_task_set(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """Baseline and candidate were evaluated on the same tasks (else the comparison is ANOMALOUS)."""
    from pytest_day0.gates.run import check_task_sets

    names = [t.name for t in needs(day0_chain.tasks, "setup")]
    sides = {}
    for side in (BASELINE, day0_recipe):
        needs(lambda s=side: _deployed(day0_chain, s), f"deploy {side}")  # type: ignore[misc]
        sides[side] = {n for n in names
                       if needs(lambda s=side, n=n: day0_chain.evaluation(s, n), f"eval {side}") is not None}  # type: ignore[misc]
    check = check_task_sets(sides[BASELINE], sides[day0_recipe])
    _props(request, baseline_tasks=len(sides[BASELINE]), candidate_tasks=len(sides[day0_recipe]))
    if not check.passed:
        raise GateFailure(check.failure_class or FailureClass.ANOMALOUS, check.message)


def test_floor(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Catastrophic floor (tier hard): the drop must stay under the floor, in points of the task's own scale."""
    from pytest_day0.gates.compare import assert_floor

    _judge(assert_floor, _comparison(day0_chain, day0_recipe, day0_task), request)


def test_quality(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Quality tier (warn): the drop must stay within the threshold."""
    from pytest_day0.gates.compare import assert_quality

    _judge(assert_quality, _comparison(day0_chain, day0_recipe, day0_task), request)


def test_gain_plausible(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str,
                        request: pytest.FixtureRequest) -> None:
    """A quantized model that beats its baseline by a wide margin means something is mis-measured (ANOMALOUS)."""
    from pytest_day0.gates.compare import assert_no_anomaly

    _judge(assert_no_anomaly, _comparison(day0_chain, day0_recipe, day0_task), request)


def test_verbosity(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Tier warn: mean completion tokens changed by more than --day0-verbosity of the baseline's (either way)."""
    from pytest_day0.gates.verbosity import assert_verbosity, check_verbosity

    results = {}
    for side in (BASELINE, day0_recipe):
        needs(lambda s=side: _deployed(day0_chain, s), f"deploy {side}")  # type: ignore[misc]
        results[side] = needs(lambda s=side: day0_chain.evaluation(s, day0_task),  # type: ignore[misc]
                              f"eval {side}/{day0_task}")
    base, cand = results[BASELINE], results[day0_recipe]
    check = check_verbosity(day0_task, day0_chain.task(day0_task).spec.kind, base.mean_completion_tokens,
                            cand.mean_completion_tokens, n=min(base.scored_samples, cand.scored_samples),
                            threshold=day0_chain.config.verbosity)
    _props(request, **check.numbers)
    if check.note:
        _props(request, verbosity_note=check.note)
    if check.skipped:
        pytest.skip(check.message)
    assert_verbosity(check)


def test_published_baseline(day0_chain: ReleaseChain, day0_task: str, request: pytest.FixtureRequest) -> None:
    """The measured baseline is within 5% of the task's range of its published score (EXTERNAL_BASELINE_MISMATCH).

    Tier hard: a baseline served or scored unlike the published run makes every comparison meaningless. With
    paired statistics on, it fires only when the whole interval of the measured score is out of tolerance
    (an interval reaching across the tolerance is INCONCLUSIVE, warn).
    """
    from pytest_day0.gates.published import assert_published, check_published
    from pytest_day0.gates.run import check_run
    from pytest_day0.gates.stats import mean_interval
    from pytest_day0.scoring.published import load_published

    c = day0_chain.config
    assert c.published is not None
    published = owns(lambda: load_published(c.published))[day0_task]  # type: ignore[arg-type]
    needs(lambda: _deployed(day0_chain, BASELINE), "deploy baseline")
    result = needs(lambda: day0_chain.evaluation(BASELINE, day0_task), f"eval baseline/{day0_task}")
    spec = day0_chain.task(day0_task).spec
    if not check_run(result).passed or result.score is None:
        pytest.skip(f"[{check_run(result).failure_class}] upstream eval baseline/{day0_task} failed")
    interval = None
    n = result.scored_samples
    if c.stat == "paired":
        values = [r.correct for r in _records(day0_chain, result, day0_task) if r.correct is not None]
        low, high = mean_interval(values, c.confidence)
        interval, n = (spec.to_scale(low), spec.to_scale(high)), len(values)
    check = check_published(day0_task, spec.scale, float(result.score), published, interval=interval, n=n)
    _props(request, **check.numbers)
    if check.tier is Tier.WARN:
        request.node.user_properties.append(("tier", str(Tier.WARN)))  # later values win in the outcome
    assert_published(check)


# ---------------------------------------------------------------------- parametrization

GATES = {
    "test_setup": "setup", "test_ptq": "ptq", "test_ptq_size": "ptq.size", "test_ptq_coverage": "ptq.coverage",
    "test_ptq_metadata": "ptq.metadata", "test_deploy": "deploy", "test_eval_complete": "run",
    "test_task_set": "task_set", "test_floor": "floor", "test_quality": "quality", "test_gain_plausible": "anomaly",
    "test_verbosity": "verbosity", "test_published_baseline": "published",
}
TIERS = {"quality": Tier.WARN, "verbosity": Tier.WARN}


def collected(item: pytest.Item, config: Any) -> bool:
    """Which generated items the session keeps: test_published_baseline only for tasks with a published score."""
    if getattr(item, "originalname", item.name) != "test_published_baseline":
        return True
    if config.published is None:
        return False
    from pytest_day0.scoring.published import load_published

    params = getattr(item, "callspec", None)
    task = params.params.get("day0_task") if params is not None else None
    return task in load_published(config.published)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    chain_config = metafunc.config.stash.get(_CONFIG_KEY(), None)
    if chain_config is None:
        return
    recipes = list(chain_config.recipes)
    state = metafunc.config.stash.get(_STATE_KEY(), None)
    tasks = list(state.task_names) if state is not None else [
        t.rsplit("/", 1)[-1].removesuffix(".task.json").removesuffix(".yaml").removesuffix(".yml")
        for t in chain_config.tasks]
    if "day0_side" in metafunc.fixturenames:
        metafunc.parametrize("day0_side", [BASELINE, *recipes])
    if "day0_recipe" in metafunc.fixturenames:
        metafunc.parametrize("day0_recipe", recipes)
    if "day0_task" in metafunc.fixturenames:
        metafunc.parametrize("day0_task", tasks)


def _CONFIG_KEY() -> Any:
    from pytest_day0.plugin import CONFIG_KEY

    return CONFIG_KEY


def _STATE_KEY() -> Any:
    from pytest_day0.plugin import STATE_KEY

    return STATE_KEY
