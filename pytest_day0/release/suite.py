"""The built-in release suite: ordinary tests over the chain, in chain order. They only attach and assert.

Collected by the plugin when ``--day0-model`` is given (no file needed in the user's repo). The chain computes
every artifact and every check (its I/O calling the pure gates); a test builds its ``GateOutcome`` with the gate's
typed builder, attaches it once, and asserts. A stage failure in the test that owns the stage is a gate failure
of its class; in a test downstream of it, a skip that carries that class (``UpstreamSkip``), never a string to
parse back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome, stage_outcome
from pytest_day0.release.chain import BASELINE, ReleaseChain
from pytest_day0.release.state import COMPARISON_KEY, CONFIG_KEY, OUTCOME_KEY, STATE_KEY

T = TypeVar("T")


class UpstreamSkip(pytest.skip.Exception):  # type: ignore[name-defined,misc]
    """A skip whose cause has a failure class: the plugin reads ``failure_class`` from it, typed."""

    def __init__(self, failure_class: FailureClass | None, message: str) -> None:
        self.failure_class = failure_class
        self.day0_message = " ".join(message.split())
        prefix = f"[{failure_class}] " if failure_class else ""
        super().__init__(prefix + self.day0_message, allow_module_level=False)


def skip(failure_class: FailureClass | None, message: str) -> NoReturn:
    raise UpstreamSkip(failure_class, message)


def owns(fn: Callable[[], T]) -> T:
    """This test owns the stage: its failure is this test's gate failure, with the stage's class."""
    try:
        return fn()
    except Day0Error as exc:
        raise GateFailure(exc.failure_class, exc.message) from None


def needs(fn: Callable[[], T], what: str) -> T:
    """An upstream stage this test depends on: if it failed, skip with its class."""
    try:
        return fn()
    except Day0Error as exc:
        skip(exc.failure_class, f"upstream {what} failed: {exc.message}")


def attach(request: pytest.FixtureRequest, outcome: GateOutcome) -> None:
    """The test's own typed outcome; the plugin reports it once (a later exception only confirms it)."""
    request.node.stash[OUTCOME_KEY] = outcome


def _warn_as_error(chain: ReleaseChain) -> bool:
    return chain.config.gate_mode == "hard"


# ---------------------------------------------------------------------- setup


def test_setup(day0_chain: ReleaseChain, request: pytest.FixtureRequest) -> None:
    """Reachability and inputs: the source checkpoint, the tasks, external endpoints and their credentials."""
    # --day0-quantize none (lm-eval results, external endpoints) gates no checkpoint: the source is a label
    source = owns(day0_chain.source) if day0_chain.config.quantize != "none" else None
    tasks = owns(day0_chain.tasks)
    numbers: dict[str, Any] = {"source": str(source) if source else None, "tasks": ",".join(t.name for t in tasks),
                               "samples": sum(len(t.samples) for t in tasks)}
    executor = owns(day0_chain.check_placement)  # the SSH host / cluster: host key, auth, scheduler (SYSTEMIC)
    if executor:
        numbers["executor"] = executor
    if day0_chain.config.serve == "external":
        for side in (BASELINE, *day0_chain.config.recipes):
            numbers[f"{side}_model"] = owns(lambda s=side: day0_chain.endpoint(s)).model  # type: ignore[misc]
    attach(request, stage_outcome("setup", numbers=numbers))


# ---------------------------------------------------------------------- PTQ


def _no_checkpoint_skips(day0_chain: ReleaseChain) -> None:
    if day0_chain.config.quantize == "none":
        skip(None, "no checkpoint to gate (--day0-quantize none): the PTQ gates do not apply")


def test_ptq(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """The quantize stage produced a checkpoint that can be inspected."""
    _no_checkpoint_skips(day0_chain)
    needs(day0_chain.source, "setup")
    result = owns(lambda: day0_chain.quantized(day0_recipe))
    inspection = owns(lambda: day0_chain.candidate_inspection(day0_recipe))
    attach(request, stage_outcome("ptq", recipe=day0_recipe, numbers={
        "checkpoint": str(result.checkpoint), "engine": result.engine, "reused": int(result.reused),
        "ptq_seconds": round(result.wall_s, 2), "quant_algo": inspection.quant_algo or "none",
        "tensors": inspection.tensor_count}))


def _ptq_check(day0_chain: ReleaseChain, recipe: str, name: str, request: pytest.FixtureRequest) -> None:
    from pytest_day0.gates.ptq import assert_ptq_check, ptq_outcome

    _no_checkpoint_skips(day0_chain)
    checks = needs(lambda: day0_chain.ptq_checks(recipe), f"PTQ {recipe}")
    check = next(c for c in checks if c.name == name)
    attach(request, ptq_outcome(check, recipe))
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
    if day0_chain.config.lm_eval_folders:
        skip(None, "nothing is served: the scores come from lm-eval or NeMo Evaluator output folders "
                   "(--day0-lm-eval-baseline)")
    if day0_chain.config.quantize != "none":
        needs(day0_chain.source, "setup")
    upstream = day0_chain.infeasible_upstream(day0_side) if day0_side != BASELINE else None
    if upstream is not None:
        skip(upstream.failure_class, f"upstream PTQ {day0_side} failed: {upstream.message}")
    record = owns(lambda: day0_chain.deploy(day0_side))
    attach(request, stage_outcome("deploy", side=day0_side, recipe=None if day0_side == BASELINE else day0_side,
                                  numbers={"served_models": ",".join(record.models), "canary": record.canary_text[:80],
                                           "deploy_seconds": record.seconds, "cached": int(record.cached)}))


# ---------------------------------------------------------------------- divergence pre-check


def test_divergence(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """Before the long evaluation, both sides' next-token distributions on a few texts: top-1 agreement below
    --day0-divergence-floor is CATASTROPHIC_REGRESSION (hard: the candidate's evaluation is skipped with that
    class), mean token KL above --day0-divergence-kl is REGRESSION (warn)."""
    from pytest_day0.gates.divergence import assert_divergence, divergence_outcome

    for side in (BASELINE, day0_recipe):
        needs(lambda s=side: day0_chain.deployed(s, precheck=False), f"deploy {side}")  # type: ignore[misc]
    check = owns(lambda: day0_chain.divergence_check(day0_recipe))
    attach(request, divergence_outcome(check, warn_as_error=_warn_as_error(day0_chain)))
    if check.skipped:
        skip(None, check.message)
    assert_divergence(check)


# ---------------------------------------------------------------------- evaluate


def test_eval_complete(day0_chain: ReleaseChain, day0_side: str, day0_task: str,
                       request: pytest.FixtureRequest) -> None:
    """The run gate: terminal status, every sample accounted for, no errors, a finite score on the task's scale."""
    from pytest_day0.gates.run import assert_run, run_outcome

    needs(lambda: day0_chain.deployed(day0_side), f"deploy {day0_side}")
    needs(lambda: day0_chain.not_stopped(day0_side, day0_task), f"adaptive evaluation of {day0_side}")
    result = owns(lambda: day0_chain.evaluation(day0_side, day0_task))
    check = owns(lambda: day0_chain.run_check(day0_side, day0_task))
    attach(request, run_outcome(check, result, recipe=None if day0_side == BASELINE else day0_side))
    assert_run(check)


# ---------------------------------------------------------------------- compare


def _both_sides(day0_chain: ReleaseChain, recipe: str, task: str) -> None:
    for side in (BASELINE, recipe):
        needs(lambda s=side: day0_chain.deployed(s), f"deploy {side}")  # type: ignore[misc]
        needs(lambda s=side: day0_chain.not_stopped(s, task), f"adaptive evaluation of {side}")  # type: ignore[misc]
        needs(lambda s=side: day0_chain.evaluation(s, task), f"eval {side}/{task}")  # type: ignore[misc]


def _judge(day0_chain: ReleaseChain, recipe: str, task: str, gate: str, request: pytest.FixtureRequest) -> None:
    """Floor, quality and anomaly read one comparison (computed once by the chain); a gate that could not judge
    is a skip that carries its class."""
    from pytest_day0.gates.compare import assert_decision, decision_outcome

    _both_sides(day0_chain, recipe, task)
    comparison = owns(lambda: day0_chain.comparison(recipe, task))
    request.node.stash[COMPARISON_KEY] = comparison  # for reports that show a test's plot (pytest-html)
    decision = {"floor": comparison.floor, "quality": comparison.quality, "anomaly": comparison.anomaly}[gate]
    attach(request, decision_outcome(comparison, decision, warn_as_error=_warn_as_error(day0_chain)))
    if decision.skipped:
        skip(decision.failure_class, decision.message)
    assert_decision(decision)


def test_task_set(day0_chain: ReleaseChain, day0_recipe: str, request: pytest.FixtureRequest) -> None:
    """Baseline and candidate were evaluated on the same tasks (else the comparison is ANOMALOUS)."""
    from pytest_day0.gates.run import assert_run, task_set_outcome

    needs(day0_chain.tasks, "setup")
    for side in (BASELINE, day0_recipe):
        needs(lambda s=side: day0_chain.deployed(s), f"deploy {side}")  # type: ignore[misc]
    check = needs(lambda: day0_chain.task_set_check(day0_recipe), "eval")
    attach(request, task_set_outcome(check, recipe=day0_recipe))
    assert_run(check)


def test_floor(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Catastrophic floor (tier hard): the drop must stay under the floor, in points of the task's own scale."""
    _judge(day0_chain, day0_recipe, day0_task, "floor", request)


def test_quality(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Quality tier (warn): the drop must stay within the threshold."""
    _judge(day0_chain, day0_recipe, day0_task, "quality", request)


def test_gain_plausible(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str,
                        request: pytest.FixtureRequest) -> None:
    """A quantized model that beats its baseline by a wide margin means something is mis-measured (ANOMALOUS)."""
    _judge(day0_chain, day0_recipe, day0_task, "anomaly", request)


def test_verbosity(day0_chain: ReleaseChain, day0_recipe: str, day0_task: str, request: pytest.FixtureRequest) -> None:
    """Tier warn: mean completion tokens changed by more than --day0-verbosity of the baseline's (either way)."""
    from pytest_day0.gates.verbosity import assert_verbosity, verbosity_outcome

    _both_sides(day0_chain, day0_recipe, day0_task)
    check = owns(lambda: day0_chain.verbosity_check(day0_recipe, day0_task))
    attach(request, verbosity_outcome(check, day0_recipe, warn_as_error=_warn_as_error(day0_chain)))
    if check.skipped:
        skip(None, check.message)
    assert_verbosity(check)


def test_published_baseline(day0_chain: ReleaseChain, day0_task: str, request: pytest.FixtureRequest) -> None:
    """The measured baseline is within 5% of the task's range of its published score (EXTERNAL_BASELINE_MISMATCH).

    Tier hard: a baseline served or scored unlike the published run makes every comparison meaningless. With
    paired statistics on, it fires only when the whole interval of the measured score is out of tolerance
    (an interval reaching across the tolerance is INCONCLUSIVE, warn).
    """
    from pytest_day0.gates.published import assert_published, published_outcome

    needs(lambda: day0_chain.deployed(BASELINE), "deploy baseline")
    needs(lambda: day0_chain.evaluation(BASELINE, day0_task), f"eval baseline/{day0_task}")
    check = owns(lambda: day0_chain.published_check(day0_task))
    if check is None:
        run = day0_chain.run_check(BASELINE, day0_task)
        skip(run.failure_class, f"upstream eval baseline/{day0_task} failed: {run.message}")
    attach(request, published_outcome(check, warn_as_error=_warn_as_error(day0_chain)))
    assert_published(check)


# ---------------------------------------------------------------------- parametrization

GATES = {
    "test_setup": "setup", "test_ptq": "ptq", "test_ptq_size": "ptq.size", "test_ptq_coverage": "ptq.coverage",
    "test_ptq_metadata": "ptq.metadata", "test_deploy": "deploy", "test_divergence": "divergence",
    "test_eval_complete": "run",
    "test_task_set": "task_set", "test_floor": "floor", "test_quality": "quality", "test_gain_plausible": "anomaly",
    "test_verbosity": "verbosity", "test_published_baseline": "published",
}
TIERS = {"quality": Tier.WARN, "verbosity": Tier.WARN}


def published_tasks(config: Any, tasks: list[str]) -> list[str]:
    """The tasks test_published_baseline runs for: those with a published score (none without --day0-published)."""
    if config.published is None:
        return []
    from pytest_day0.scoring.published import load_published

    published = load_published(config.published)
    return [t for t in tasks if t in published]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    run = metafunc.config.stash.get(CONFIG_KEY, None)
    state = metafunc.config.stash.get(STATE_KEY, None)
    if run is None or state is None:
        return
    recipes = list(run.recipes)
    tasks = list(state.task_names)
    if metafunc.function.__name__ == "test_published_baseline":
        tasks = published_tasks(run, tasks)  # generated only where there is a published score: no phantom items
    if "day0_side" in metafunc.fixturenames:
        metafunc.parametrize("day0_side", [BASELINE, *recipes])
    if "day0_recipe" in metafunc.fixturenames:
        metafunc.parametrize("day0_recipe", recipes)
    if "day0_task" in metafunc.fixturenames:
        metafunc.parametrize("day0_task", tasks)
