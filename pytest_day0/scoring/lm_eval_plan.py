"""The lm-eval engine's plan and its pure rules: which tasks a request names, how each is gated, and how lm-eval's
per-document samples become this plugin's records.

The plan is what the lm-eval worker reported after resolving the user's names with lm-eval's own task manager and
loading every dataset (``stages/lm_eval_worker.py``, ``plan``): per leaf task its output type, metrics, filters,
document count and digests; per group its members and aggregation. Everything here is a decision on that plain
data (no lm-eval import, no I/O), so it is tested without lm-eval.

Rules:

* **metric**: the first of ``METRIC_PREFERENCE`` among the task's ``<metric>,<filter>`` keys whose aggregation is
  a mean (the reader's rule, ``scoring/lm_eval.py``); a task with no per-document mean (BLEU, perplexity) cannot be
  paired and is refused by name.
* **groups**: every leaf is its own comparison; a group is one more, over the union of its leaves' documents, when
  lm-eval aggregates it as a size-weighted mean of the same metric key its leaves are gated on (MMLU: ``acc,none``,
  ``weight_by_size: true``) — that mean *is* the per-document mean of the union, so the paired statistics estimate
  exactly lm-eval's number. A group lm-eval averages unweighted, or over another metric, is listed as not compared.
* **records**: one per document (``id`` = lm-eval's ``doc_id``; the ``repeats`` of one document are lm-eval's own
  and arrive as one line, counted in ``attempts``); ``prompt_hash`` hashes every request lm-eval built for it
  (contexts, continuations, generation settings), so two sides asked differently never pair.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.lm_eval import METRIC_PREFERENCE
from pytest_day0.scoring.metrics import MEMBER_SEPARATOR, aggregate
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, Task, TaskSpec

MC_TYPES = frozenset({"multiple_choice", "loglikelihood"})


class PlanTask(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request: str  # the requested name it came from (NAME or NAME@N)
    output_type: str
    metrics: tuple[str, ...]
    aggregations: dict[str, str] = {}
    filters: tuple[str, ...] = ("none",)
    higher_is_better: dict[str, bool] = {}
    n_docs: int
    docs_digest: str
    config_digest: str
    dataset: str = ""
    num_fewshot: int | None = None
    repeats: int = 1
    day0: dict[str, Any] = {}  # metadata day0_* of pytest-day0's own tasks: scale, metric, chat
    alias: str | None = None


class PlanGroup(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request: str
    children: tuple[str, ...]
    leaves: tuple[str, ...]
    aggregate: tuple[dict[str, Any], ...] = ()
    alias: str | None = None


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    text: str
    name: str
    num_fewshot: int | None = None
    leaves: tuple[str, ...]
    groups: tuple[str, ...] = ()


class LmEvalPlan(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    lm_eval_version: str | None = None
    defaults: bool = True  # lm-eval's own task index was needed
    requests: tuple[PlanRequest, ...]
    tasks: dict[str, PlanTask]
    groups: dict[str, PlanGroup] = {}


def _config_error(message: str) -> Day0Error:
    return Day0Error(FailureClass.USER_CONFIG_ERROR, message)


# ---------------------------------------------------------------------- metrics and groups


def metric_key(name: str, task: PlanTask) -> str:
    """The ``<metric>,<filter>`` a leaf is gated on (see the module docstring)."""
    keys = [f"{m},{f}" for f in task.filters for m in task.metrics if task.aggregations.get(m, "mean") == "mean"]
    for key in METRIC_PREFERENCE:
        if key in keys:
            return key
    if keys:
        return sorted(keys)[0]
    raise _config_error(f"lm-eval task {name} reports no per-document mean ({', '.join(task.metrics) or 'no metric'}"
                        f" aggregated as {', '.join(sorted(set(task.aggregations.values()))) or '?'}): nothing to "
                        "pair document by document")


def group_key(plan: LmEvalPlan, name: str) -> tuple[str | None, str]:
    """The metric key a group is compared on, or None and why it is not."""
    group = plan.groups[name]
    if not group.aggregate:
        return None, "lm-eval reports no aggregate for it"
    leaf_keys = {leaf: metric_key(leaf, plan.tasks[leaf]) for leaf in group.leaves}
    for agg in group.aggregate:
        if not agg.get("weight_by_size", True) or agg.get("aggregation", "mean") != "mean":
            continue
        filters = agg.get("filter_list")
        if isinstance(filters, str):
            filters = [filters]
        wanted = {f"{agg['metric']},{f}" for f in filters} if filters else None
        keys = set(leaf_keys.values())
        if len(keys) == 1 and (wanted is None or keys <= wanted) and next(iter(keys)).startswith(f"{agg['metric']},"):
            return next(iter(keys)), ""
    return None, ("lm-eval aggregates it unweighted or over another metric than its subtasks are gated on; each "
                  "subtask is compared")


def parametrized(plan: LmEvalPlan) -> list[str]:
    """The names the suite is parametrized with, in request order: a request's comparable groups (outermost
    first), then its leaves."""
    out: list[str] = []
    for request in plan.requests:
        out += [g for g in request.groups if group_key(plan, g)[0] is not None and g not in out]
        out += [leaf for leaf in request.leaves if leaf not in out]
    return out


def not_compared(plan: LmEvalPlan) -> dict[str, str]:
    """Groups that get no comparison of their own, with the reason (for test_setup's numbers)."""
    return {g: why for g in plan.groups for key, why in [group_key(plan, g)] if key is None}


# ---------------------------------------------------------------------- tasks


def _spec(name: str, task: PlanTask, key: str, request_name: str) -> TaskSpec:
    day0 = task.day0
    scale = day0.get("scale") or (0.0, 1.0)
    metric = str(day0.get("metric") or key)
    better = task.higher_is_better.get(key.split(",")[0], True)
    try:
        return TaskSpec(
            name=name, kind="multiple_choice" if task.output_type in MC_TYPES else "generate", metric=metric,
            scale=(float(scale[0]), float(scale[1])), higher_is_better=better, chat=bool(day0.get("chat", False)),
            few_shot=task.num_fewshot or 0,
            samples=f"lm-eval:{request_name}/{name}@{task.config_digest}+{task.docs_digest}",
            description=f"lm-eval task {name} ({task.dataset or 'custom'}), {key}")
    except ValueError as exc:
        raise _config_error(f"lm-eval task {name!r} cannot be gated: {' '.join(str(exc).split())[:200]}") from None


def doc_ids(task: PlanTask, limit: int | None) -> list[str]:
    n = task.n_docs if limit is None else min(task.n_docs, limit)
    return [str(i) for i in range(n)]


def build_tasks(plan: LmEvalPlan, limit: int | None = None) -> list[Task]:
    """Task objects for the chain: a leaf's samples are its documents (lm-eval builds the prompts: the records
    carry them); a group's are its leaves' documents, ``<leaf>/<doc_id>``, and ``members`` names the leaves."""
    tasks: list[Task] = []
    by_leaf: dict[str, Task] = {}
    for request in plan.requests:
        for leaf in request.leaves:
            t = plan.tasks[leaf]
            key = metric_key(leaf, t)
            if not t.n_docs:
                raise _config_error(f"lm-eval task {leaf} has no documents")
            samples = tuple(Sample(id=i, prompt="", target="") for i in doc_ids(t, limit))
            by_leaf[leaf] = Task(spec=_spec(leaf, t, key, request.name), samples=samples,
                                 source=f"lm-eval {leaf} ({t.dataset or 'custom'})")
    for name in parametrized(plan):
        if name in by_leaf:
            tasks.append(by_leaf[name])
            continue
        group = plan.groups[name]
        group_metric = group_key(plan, name)[0]
        assert group_metric is not None
        key = group_metric
        first = plan.tasks[group.leaves[0]]
        scales = {tuple(plan.tasks[leaf].day0.get("scale") or (0, 1)) for leaf in group.leaves}
        digest = hashlib.sha256(json.dumps([[leaf, plan.tasks[leaf].config_digest, plan.tasks[leaf].docs_digest]
                                            for leaf in group.leaves]).encode()).hexdigest()[:16]
        scale = next(iter(scales)) if len(scales) == 1 else (0, 1)
        spec = TaskSpec(
            name=name, kind="multiple_choice" if first.output_type in MC_TYPES else "generate",
            metric=str(first.day0.get("metric") or key) if len(scales) == 1 else key,
            scale=(float(scale[0]), float(scale[1])), higher_is_better=by_leaf[group.leaves[0]].spec.higher_is_better,
            samples=f"lm-eval:{group.request}/{name}@{digest}",
            description=f"lm-eval group {name}: size-weighted {key} of {len(group.leaves)} tasks")
        samples = tuple(Sample(id=f"{leaf}{MEMBER_SEPARATOR}{s.id}", prompt="", target="")
                        for leaf in group.leaves for s in by_leaf[leaf].samples)
        tasks.append(Task(spec=spec, samples=samples, source=f"lm-eval group {name}", members=group.leaves))
    return tasks


# ---------------------------------------------------------------------- samples -> records


def prompt_hash(arguments: Any) -> str:
    """Every request lm-eval built for the document, as it logged them: context and continuation of each choice,
    or the prompt and its generation settings."""
    return hashlib.sha256(json.dumps(arguments, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _requests(line: Mapping[str, Any]) -> list[list[Any]]:
    args = line.get("arguments")
    if isinstance(args, dict):  # lm-eval's saved-file shape: {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
        return [[v for _, v in sorted(a.items())] for _, a in sorted(args.items()) if isinstance(a, dict)]
    if isinstance(args, list):
        return [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    return []


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def line_record(line: Mapping[str, Any], task: str, spec: TaskSpec, key: str, repeats: int = 1) -> SampleRecord:
    metric = key.split(",")[0]
    requests = _requests(line)
    context = requests[0][0] if requests and requests[0] and isinstance(requests[0][0], str) else None
    target = line.get("target", "")
    target = target if isinstance(target, int) and not isinstance(target, bool) else str(target)
    base = SampleRecord(id=str(line.get("doc_id")), task=task, prompt_hash=prompt_hash(line.get("arguments")),
                        prompt=context, target=target, attempts=max(repeats, 1))
    value = _number(line.get(metric))
    if value is None or not 0 <= value <= 1:
        why = "no numeric" if value is None else f"a value outside [0, 1] ({value}) for"
        return base.model_copy(update={"error": f"[{FailureClass.EVAL_JUDGE_FAILED}] lm-eval logged {why} {metric!r}"
                                                f" for doc {base.id}: only per-document correctness can be paired"})
    update: dict[str, Any] = {"correct": value}
    if spec.kind == "multiple_choice":
        resps = line.get("filtered_resps")
        lls = [float(r[0]) for r in resps if isinstance(r, (list, tuple)) and r] if isinstance(resps, list) else []
        greedy = [bool(r[1]) for r in resps if isinstance(r, (list, tuple)) and len(r) > 1] \
            if lls and isinstance(resps, list) else []
        if lls:
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # first index wins ties, like numpy.argmax
            choice = requests[pred][1] if pred < len(requests) and len(requests[pred]) > 1 else None
            update.update(choice_logprobs=lls, choice_greedy=greedy or None,
                          response=choice if isinstance(choice, str) else str(pred))
        norm = _number(line.get("acc_norm"))
        if norm is not None:
            update["correct_norm"] = norm
    else:
        resps = line.get("resps")
        first = resps[0] if isinstance(resps, list) and resps else None
        text = first[0] if isinstance(first, list) and first else first
        update["response"] = text if isinstance(text, str) else None
        tokens = line.get("day0_completion_tokens")
        update["completion_tokens"] = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None
    return base.model_copy(update=update)


def records_from_lines(lines: Iterable[Mapping[str, Any]], task: str, spec: TaskSpec, key: str,
                       repeats: int = 1) -> list[SampleRecord]:
    """One record per document from lm-eval's sample lines (those of the gated filter), in doc order."""
    wanted = key.partition(",")[2] or "none"
    by_doc: dict[str, SampleRecord] = {}
    for line in lines:
        if str(line.get("filter", "none")) != wanted:
            continue
        rec = line_record(line, task, spec, key, repeats)
        if rec.id in by_doc:
            raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{task}: lm-eval logged doc {rec.id} twice for "
                            f"filter {wanted}")
        by_doc[rec.id] = rec
    return sorted(by_doc.values(), key=lambda r: (int(r.id) if r.id.isdigit() else 1 << 62, r.id))


def task_result(task: Task, records: Sequence[SampleRecord], side: str, records_path: str, key: str,
                reported: float | None, wall_s: float = 0.0, asked: Sequence[str] | None = None) -> TaskResult:
    """The run gate's input over the documents ``asked`` (default: all of the task's). A document lm-eval did not
    log, or logged unasked, is SAMPLE_ACCOUNTING_FAILED; so is a mean of the logged values that does not
    reproduce lm-eval's own aggregate (something was read wrongly)."""
    by_id = {r.id: r for r in records}
    ids = list(asked) if asked is not None else [s.id for s in task.samples]
    result = aggregate(task.spec, ids, by_id, side=side, records_path=records_path, wall_s=wall_s)
    missing = [i for i in ids if i not in by_id]
    if missing:  # lm-eval finished without logging them: nothing a retry of the same run would change
        return result.model_copy(update={"status": "FAILED", "first_error": (
            f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] lm-eval logged {len(ids) - len(missing)} of the {len(ids)} "
            f"documents asked for; missing: {', '.join(missing[:5])}")})
    extra = sorted(set(by_id) - set(ids))
    if extra:
        return result.model_copy(update={"status": "FAILED", "first_error": (
            f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] lm-eval logged {len(extra)} documents that were not asked "
            f"for: {', '.join(extra[:5])}")})
    scored = [r.correct for r in records if r.correct is not None and r.error is None]
    if result.status == "SUCCESS" and reported is not None and scored:
        mean = math.fsum(scored) / len(scored)
        if abs(mean - reported) > 1e-6:
            return result.model_copy(update={"status": "FAILED", "first_error": (
                f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] the per-document {key} mean {mean:.6f} does not "
                f"reproduce lm-eval's {reported:.6f}")})
    return result


__all__ = ["LmEvalPlan", "PlanGroup", "PlanRequest", "PlanTask", "build_tasks", "group_key", "line_record",
           "metric_key", "not_compared", "parametrized", "records_from_lines", "task_result"]
