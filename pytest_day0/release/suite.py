"""The built-in release suite: ordinary tests over the chain's fixtures, in chain order.

Collected by the plugin when ``--day0-model`` is given (no file needed in the user's repo). Each gate is
a plain assertion through a pure gate function; a stage failure in the test that owns the stage is a
gate failure of its class, and in a test downstream of it a skip whose reason starts with that class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    source = owns(day0_chain.source)
    tasks = owns(day0_chain.tasks)
    _props(request, source=str(source), tasks=",".join(t.name for t in tasks),
           samples=sum(len(t.samples) for t in tasks))
    if day0_chain.config.serve == "external":
        owns(lambda: day0_chain.endpoint(BASELINE))
        for recipe in day0_chain.config.recipes:
            owns(lambda r=recipe: day0_chain.endpoint(r))  # type: ignore[misc]


# ---------------------------------------------------------------------- PTQ


def test_ptq(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """The quantize stage produced a checkpoint that can be inspected."""
    needs(day0_chain.source, "setup")
    result = owns(lambda: day0_chain.quantized(day0_recipe))
    inspection = owns(lambda: day0_chain.candidate_inspection(day0_recipe))
    _props(request, checkpoint=str(result.checkpoint), engine=result.engine, reused=int(result.reused),
           ptq_seconds=round(result.wall_s, 2), quant_algo=inspection.quant_algo or "none",
           tensors=inspection.tensor_count)


def _ptq_check(day0_chain: ReleaseChain, recipe: str, name: str, request: pytest.FixtureRequest) -> None:
    from pytest_day0.gates.ptq import assert_ptq_check

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
    needs(day0_chain.source, "setup")
    if day0_side != BASELINE:
        upstream = day0_chain.infeasible_upstream(day0_side)
        if upstream is not None:
            pytest.skip(f"[{upstream.failure_class}] upstream PTQ {day0_side} failed: {upstream.message}")
    record = owns(lambda: day0_chain.deploy(day0_side))
    _props(request, served_models=",".join(record.models), canary=record.canary_text[:80],
           deploy_seconds=record.seconds, cached=int(record.cached))


# ---------------------------------------------------------------------- evaluate


def _deployed(day0_chain: ReleaseChain, side: str) -> None:
    if side != BASELINE:
        upstream = day0_chain.infeasible_upstream(side)
        if upstream is not None:
            raise upstream
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
    comparison = owns(lambda: compare_task(
        day0_chain.task(task).spec, results[BASELINE], results[recipe], threshold=c.threshold, floor=c.floor,
        relative=c.relative, abstain=abstain, recipe=recipe))
    save_comparison(c.workdir, day0_chain.session_id, comparison)
    return comparison


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


# ---------------------------------------------------------------------- parametrization

GATES = {
    "test_setup": "setup", "test_ptq": "ptq", "test_ptq_size": "ptq.size", "test_ptq_coverage": "ptq.coverage",
    "test_ptq_metadata": "ptq.metadata", "test_deploy": "deploy", "test_eval_complete": "run",
    "test_task_set": "task_set", "test_floor": "floor", "test_quality": "quality", "test_gain_plausible": "anomaly",
}
TIERS = {"quality": Tier.WARN}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    chain_config = metafunc.config.stash.get(_CONFIG_KEY(), None)
    if chain_config is None:
        return
    recipes = list(chain_config.recipes)
    tasks = [t.rsplit("/", 1)[-1].removesuffix(".task.json").removesuffix(".yaml").removesuffix(".yml")
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
