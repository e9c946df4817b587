"""Finished result folders (``--day0-lm-eval-baseline/-candidate``): lm-eval-harness's or NeMo Evaluator's.

The kind is told by what the folder holds (``nel eval run`` writes ``eval-*.json`` bundles, lm-eval
``results_*.json``); both sides must be the same kind, since their per-sample records are built differently
(lm-eval docs by ``doc_id``, NeMo Evaluator problems by ``problem_idx`` with their repeats averaged).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from pytest_day0.config import RunConfig
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import Task


def kind(path: str | Path) -> str:
    from pytest_day0.scoring.nemo_evaluator import is_nel_output

    return "NeMo Evaluator" if is_nel_output(path) else "lm-eval"


def reader(config: RunConfig) -> ModuleType:
    """The module that reads this run's folders; a baseline of one kind and a candidate of the other is refused."""
    assert config.lm_eval_baseline is not None
    base = kind(config.lm_eval_baseline)
    if config.lm_eval_candidate is not None and kind(config.lm_eval_candidate) != base:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"the baseline folder {config.lm_eval_baseline} is {base} output, the candidate folder "
                        f"{config.lm_eval_candidate} is {kind(config.lm_eval_candidate)} output: give two of a kind")
    if base == "NeMo Evaluator":
        from pytest_day0.scoring import nemo_evaluator

        return nemo_evaluator
    from pytest_day0.scoring import lm_eval

    return lm_eval


def task_names(config: RunConfig) -> list[str]:
    assert config.lm_eval_baseline is not None
    names: list[str] = reader(config).task_names(config.lm_eval_baseline, config.tasks)
    return names


def run_tasks(config: RunConfig) -> list[Task]:
    """The release chain's tasks: what the baseline folder logged (or the ``--day0-tasks`` subset)."""
    assert config.lm_eval_baseline is not None
    module = reader(config)
    tasks: list[Task] = module.load_tasks(config.lm_eval_baseline, task_names(config), config.limit)
    return tasks


def side_result(config: RunConfig, side: str, task: str, workdir: Path) -> TaskResult:
    result: TaskResult = reader(config).side_result(config, side, task, workdir)
    return result
