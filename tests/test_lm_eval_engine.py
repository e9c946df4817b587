"""The lm-eval engine: its settings, its plan rules, its records, and real lm-eval runs against a real server.

The first half is pure (plain data in, decisions out: no lm-eval, no server). The second half runs the real
lm-eval 0.4.13 worker against the real reference server serving the demo model on 127.0.0.1 (one server for the
module): the plan of the shipped tasks, a run killed at its deadline and resumed from lm-eval's request cache,
and the failure classes of an endpoint that is down and of one that refuses lm-eval's requests.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.openai_server import ToyOpenAIServer

from pytest_day0.config import RunConfig, build_config
from pytest_day0.engines import EvalRequest, eval_engine
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.run import check_run
from pytest_day0.lm_eval_tasks import generate
from pytest_day0.scoring.lm_eval_plan import (
    LmEvalPlan,
    build_tasks,
    group_key,
    metric_key,
    not_compared,
    parametrized,
    records_from_lines,
    task_result,
)
from pytest_day0.scoring.lm_eval_settings import (
    LmEvalArgs,
    SettingsError,
    load_suites,
    parse_lm_eval_args,
    parse_task_request,
)
from pytest_day0.scoring.metrics import member_records, members_result
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages.source import resolve_model

DEMO = resolve_model("demo")


# ---------------------------------------------------------------------- the shipped tasks


def test_shipped_task_yamls_are_what_the_generator_writes_from_the_demo_specs() -> None:
    """A demo whose specs change without regenerating fails here, naming the stale files."""
    assert generate.differences() == []
    assert {"arc_like.yaml", "gsm_like.yaml", "tau_like.yaml", "_demo_mmlu_like.yaml"} <= set(generate.expected_files())


def test_a_changed_demo_spec_is_caught(tmp_path: Path) -> None:
    demo = tmp_path / "tasks"
    shutil.copytree(generate.DEMO_TASKS, demo)
    spec = json.loads((demo / "gsm_like.task.json").read_text())
    spec["max_tokens"] = 9
    (demo / "gsm_like.task.json").write_text(json.dumps(spec))
    assert generate.differences(demo_tasks=demo) == ["gsm_like.yaml"]
    assert "max_gen_toks: 9" in generate.expected_files(demo)["gsm_like.yaml"]


def test_the_demo_loader_reads_the_demo_jsonl_in_file_order() -> None:
    from pytest_day0.lm_eval_tasks import day0_demo
    from pytest_day0.scoring.tasks import load_task

    for name in ("arc_like", "gsm_like", "tau_like"):
        rows = day0_demo.demo_rows(name)
        task = load_task(name)
        assert [r["id"] for r in rows] == [s.id for s in task.samples]
        assert [r["prompt"] for r in rows] == [s.prompt for s in task.samples]
    part = day0_demo.load("arc_like", day0_part=1, day0_parts=4)["test"]
    assert [r["id"] for r in part] == [r["id"] for r in day0_demo.demo_rows("arc_like")[1::4]]


# ---------------------------------------------------------------------- settings


def test_lm_eval_args_parse_into_one_normalized_setting() -> None:
    args = parse_lm_eval_args("--num_fewshot 5 --apply_chat_template --gen_kwargs max_gen_toks=64,temperature=0 "
                              "--model_args max_length=4096 --system_instruction 'Be brief.' --seed 7")
    assert args.num_fewshot == 5 and args.apply_chat_template is True and args.multiturn is True
    assert args.gen_kwargs == (("max_gen_toks", 64), ("temperature", 0))
    assert args.model_args == (("max_length", 4096),) and args.system_instruction == "Be brief."
    assert args.fewshot_seed == 7
    assert parse_lm_eval_args(None) == LmEvalArgs()
    # the same settings in another order are the same key
    assert parse_lm_eval_args("--gen_kwargs temperature=0,max_gen_toks=64").normalized() == \
        parse_lm_eval_args("--gen_kwargs max_gen_toks=64,temperature=0").normalized()
    assert parse_lm_eval_args("--apply_chat_template --fewshot_as_multiturn false").multiturn is False


@pytest.mark.parametrize(("text", "says"), [
    ("--limit 10", "--day0-limit"),
    ("--tasks mmlu", "--day0-tasks"),
    ("--include_path x", "--day0-lm-eval-include"),
    ("--batch_size 8", "one request per document"),
    ("--num_fewshot five", "invalid int value"),
    ("--frobnicate", "not an lm-eval setting"),
    ("--gen_kwargs temperature", "key=value"),
    ("--fewshot_as_multiturn", "needs --apply_chat_template"),
    ("--system_instruction 'unclosed", "No closing quotation"),
])
def test_bad_lm_eval_args_are_named(text: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        parse_lm_eval_args(text)


def test_task_requests_and_suites(tmp_path: Path) -> None:
    assert parse_task_request("mmlu@5").text == "mmlu@5" and parse_task_request("arc_easy").num_fewshot is None
    with pytest.raises(SettingsError):
        parse_task_request("mmlu@five")
    suites = load_suites(None)
    assert suites["smoke"].tasks == ("arc_like", "gsm_like", "tau_like", "demo_mmlu_like")
    assert "mmlu@5" in suites["standard"].tasks and "gsm8k@5" in suites["standard"].tasks
    mine = tmp_path / "suites.yaml"
    mine.write_text("quick: [arc_easy, {task: gsm8k, num_fewshot: 8}]\nsmoke: {tasks: [arc_like]}\n")
    suites = load_suites(str(mine))
    assert suites["quick"].tasks == ("arc_easy", "gsm8k@8") and suites["smoke"].tasks == ("arc_like",)
    assert load_suites("inline:\n  - arc_like\n")["inline"].tasks == ("arc_like",)  # ini text
    with pytest.raises(SettingsError, match="unknown keys"):
        load_suites("bad: {tasks: [a], shots: 5}\n")
    with pytest.raises(SettingsError, match="No such file"):
        load_suites(str(tmp_path / "missing.yaml"))


def _config(**values: Any) -> RunConfig:
    return build_config({}, lambda _key: None, environ={"DAY0_MODEL": "demo", **values})


def test_config_modes_of_the_lm_eval_engine(tmp_path: Path) -> None:
    engine = _config(DAY0_EVAL="lm-eval")
    assert engine.lm_eval_engine and not engine.lm_eval_folders and engine.quantize == "modelopt"
    assert engine.tasks == ("arc_like", "gsm_like", "tau_like")
    smoke = _config(DAY0_SUITE="smoke")
    assert smoke.eval == "lm-eval" and smoke.tasks[-1] == "demo_mmlu_like"
    for values, says in [
        ({"DAY0_SUITE": "smoke", "DAY0_TASKS": "arc_like"}, "not both"),
        ({"DAY0_SUITE": "nope"}, "no such suite"),
        ({"DAY0_LM_EVAL_ARGS": "--num_fewshot 5"}, "add --day0-eval lm-eval"),
        ({"DAY0_EVAL": "lm-eval", "DAY0_LM_EVAL_ARGS": "--limit 5"}, "--day0-limit"),
        ({"DAY0_EVAL": "lm-eval", "DAY0_LM_EVAL_INCLUDE": str(tmp_path / "nope")}, "is not a folder"),
        ({"DAY0_EVAL": "lm-eval", "DAY0_TASKS": "mmlu@x"}, "number of shots"),
        ({"DAY0_LM_EVAL_BASELINE": str(tmp_path)}, "needs --day0-lm-eval-baseline and --day0-lm-eval-candidate"),
    ]:
        with pytest.raises(Day0Error) as info:
            _config(**values)
        assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and says in info.value.message, values
    folders = _config(DAY0_LM_EVAL_BASELINE=str(tmp_path), DAY0_LM_EVAL_CANDIDATE=str(tmp_path))
    assert folders.lm_eval_folders and not folders.lm_eval_engine and folders.quantize == "none"


# ---------------------------------------------------------------------- plan rules (plain data)


def _plan_task(request: str, n: int = 4, **extra: Any) -> dict[str, Any]:
    return {"request": request, "output_type": "multiple_choice", "metrics": ["acc", "acc_norm"],
            "aggregations": {"acc": "mean", "acc_norm": "mean"}, "filters": ["none"],
            "higher_is_better": {"acc": True, "acc_norm": True}, "n_docs": n, "docs_digest": f"d-{request}-{n}",
            "config_digest": "c", **extra}


def mmlu_like_plan(weight_by_size: bool = True, metric: str = "acc") -> LmEvalPlan:
    leaves = {"sub_a": 3, "sub_b": 5, "sub_c": 2}
    return LmEvalPlan.model_validate({
        "requests": [{"text": "mmlu", "name": "mmlu", "leaves": list(leaves), "groups": ["mmlu", "mmlu_stem"]},
                     {"text": "gsm8k@5", "name": "gsm8k", "num_fewshot": 5, "leaves": ["gsm8k"]}],
        "tasks": {**{k: _plan_task("mmlu", n) for k, n in leaves.items()},
                  "gsm8k": _plan_task("gsm8k@5", 6, output_type="generate_until", metrics=["exact_match"],
                                      aggregations={"exact_match": "mean"}, filters=["strict-match",
                                                                                      "flexible-extract"])},
        "groups": {"mmlu": {"request": "mmlu", "children": ["mmlu_stem", "sub_c"], "leaves": list(leaves),
                            "aggregate": [{"metric": metric, "filter_list": None, "aggregation": "mean",
                                           "weight_by_size": weight_by_size}]},
                   "mmlu_stem": {"request": "mmlu", "children": ["sub_a", "sub_b"], "leaves": ["sub_a", "sub_b"],
                                 "aggregate": []}},
    })


def test_metric_and_group_rules() -> None:
    plan = mmlu_like_plan()
    assert metric_key("sub_a", plan.tasks["sub_a"]) == "acc,none"
    assert metric_key("gsm8k", plan.tasks["gsm8k"]) == "exact_match,strict-match"
    assert group_key(plan, "mmlu") == ("acc,none", "")
    assert parametrized(plan) == ["mmlu", "sub_a", "sub_b", "sub_c", "gsm8k"]
    assert set(not_compared(plan)) == {"mmlu_stem"}  # it reports no aggregate
    for unweighted in (mmlu_like_plan(weight_by_size=False), mmlu_like_plan(metric="acc_norm")):
        assert group_key(unweighted, "mmlu")[0] is None and "mmlu" not in parametrized(unweighted)
    corpus = LmEvalPlan.model_validate({"requests": [{"text": "t", "name": "t", "leaves": ["t"]}], "tasks": {
        "t": _plan_task("t", metrics=["bleu"], aggregations={"bleu": "bleu"})}})
    with pytest.raises(Day0Error, match="no per-document mean"):
        build_tasks(corpus)


def test_tasks_of_a_plan_with_a_limit_and_a_group() -> None:
    tasks = {t.name: t for t in build_tasks(mmlu_like_plan(), limit=4)}
    assert [s.id for s in tasks["sub_b"].samples] == ["0", "1", "2", "3"]  # first 4 of 5
    group = tasks["mmlu"]
    assert group.members == ("sub_a", "sub_b", "sub_c")
    assert [s.id for s in group.samples] == ["sub_a/0", "sub_a/1", "sub_a/2", "sub_b/0", "sub_b/1", "sub_b/2",
                                             "sub_b/3", "sub_c/0", "sub_c/1"]
    assert tasks["gsm8k"].spec.kind == "generate" and tasks["gsm8k"].spec.scale == (0.0, 1.0)
    assert tasks["gsm8k"].spec.few_shot == 0 and tasks["sub_a"].spec.metric == "acc,none"
    # the records key sees the task's config and documents through the spec
    other = mmlu_like_plan().model_copy(deep=True)
    other.tasks["sub_a"] = other.tasks["sub_a"].model_copy(update={"docs_digest": "changed"})
    assert build_tasks(other)[1].spec != build_tasks(mmlu_like_plan())[1].spec


def mc_line(doc: int, lls: list[float], acc: float, shots: str = "") -> dict[str, Any]:
    ctx = f"{shots}max(1,{doc})="
    return {"doc_id": doc, "doc": {"id": f"x-{doc}"}, "target": 1,
            "arguments": [[ctx, str(c)] for c in range(len(lls))], "resps": [[[v, False]] for v in lls],
            "filtered_resps": [[v, i == 1] for i, v in enumerate(lls)], "filter": "none",
            "metrics": ["acc", "acc_norm"], "acc": acc, "acc_norm": acc, "day0_completion_tokens": None}


def gen_line(doc: int, text: str, value: float, flt: str = "strict-match") -> dict[str, Any]:
    return {"doc_id": doc, "doc": {}, "target": "4", "arguments": [[f"{doc}+{doc}=", {"until": ["\n"]}]],
            "resps": [[text]], "filtered_resps": [text.strip()], "filter": flt, "metrics": ["exact_match"],
            "exact_match": value, "day0_completion_tokens": len(text)}


def test_samples_become_records() -> None:
    tasks = {t.name: t for t in build_tasks(mmlu_like_plan())}
    mc = records_from_lines([mc_line(i, [-2.0, -0.5, -3.0], 1.0) for i in (2, 0, 1)], "sub_a",
                            tasks["sub_a"].spec, "acc,none")
    assert [r.id for r in mc] == ["0", "1", "2"] and mc[0].response == "1" and mc[0].target == 1
    assert mc[0].choice_logprobs == [-2.0, -0.5, -3.0] and mc[0].choice_greedy == [False, True, False]
    assert mc[0].prompt == "max(1,0)=" and mc[0].correct == 1.0 and mc[0].correct_norm == 1.0
    lines = [gen_line(i, " 4\n", 1.0) for i in range(6)] + [gen_line(i, "4", 0.0, "flexible-extract")
                                                             for i in range(6)]
    gen = records_from_lines(lines, "gsm8k", tasks["gsm8k"].spec, "exact_match,strict-match")
    assert len(gen) == 6 and all(r.correct == 1.0 and r.completion_tokens == 3 for r in gen)  # strict-match lines
    assert gen[0].response == " 4\n"
    # the prompt hash sees every request: a 1-shot context is another prompt than a 0-shot one
    shot = records_from_lines([mc_line(0, [-2.0, -0.5, -3.0], 1.0, shots="max(2,3)=3\n")], "sub_a",
                              tasks["sub_a"].spec, "acc,none")
    assert shot[0].prompt_hash != mc[0].prompt_hash
    bad = records_from_lines([{**mc_line(0, [-1.0], 1.0), "acc": 37.5}], "sub_a", tasks["sub_a"].spec, "acc,none")
    assert bad[0].error is not None and bad[0].error.startswith("[EVAL_JUDGE_FAILED]")
    with pytest.raises(Day0Error, match="twice"):
        records_from_lines([mc_line(0, [-1.0], 1.0)] * 2, "sub_a", tasks["sub_a"].spec, "acc,none")


def test_results_account_for_every_document() -> None:
    task = {t.name: t for t in build_tasks(mmlu_like_plan())}["sub_a"]  # 3 documents
    good = records_from_lines([mc_line(i, [-1.0, -0.1], 1.0) for i in range(3)], "sub_a", task.spec, "acc,none")
    assert task_result(task, good, "baseline", "r.jsonl", "acc,none", 1.0).status == "SUCCESS"
    check = check_run(task_result(task, good[:2], "baseline", "r.jsonl", "acc,none", 1.0))
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "logged 2 of the 3" in check.message
    extra = good + records_from_lines([mc_line(7, [-1.0], 1.0)], "sub_a", task.spec, "acc,none")
    assert "not asked for: 7" in str(task_result(task, extra, "baseline", "r.jsonl", "acc,none", 1.0).first_error)
    wrong = check_run(task_result(task, good, "baseline", "r.jsonl", "acc,none", 0.5))
    assert wrong.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "does not reproduce" in wrong.message


def test_a_group_is_the_size_weighted_mean_of_its_members() -> None:
    """lm-eval's weight_by_size aggregate (sum of n_i * score_i / sum n_i) is the mean over the union."""
    plan = mmlu_like_plan()
    tasks = {t.name: t for t in build_tasks(plan)}
    values = {"sub_a": [1.0, 1.0, 0.0], "sub_b": [1.0, 0.0, 0.0, 0.0, 0.0], "sub_c": [1.0, 1.0]}
    records = {leaf: records_from_lines([mc_line(i, [-1.0, -2.0], v) for i, v in enumerate(vals)], leaf,
                                        tasks[leaf].spec, "acc,none") for leaf, vals in values.items()}
    results = {leaf: task_result(tasks[leaf], recs, "fp8", f"{leaf}.jsonl", "acc,none", None)
               for leaf, recs in records.items()}
    union = member_records("mmlu", records)
    group = members_result(tasks["mmlu"].spec, [s.id for s in tasks["mmlu"].samples], union, results, side="fp8",
                           records_path="g.jsonl")
    weighted = sum(results[k].score * len(v) for k, v in values.items()) / 10  # type: ignore[operator]
    assert group.status == "SUCCESS" and group.score == pytest.approx(weighted) == pytest.approx(0.5)
    assert union[3].id == "sub_b/0" and union[3].task == "mmlu"
    failed = {**results, "sub_b": results["sub_b"].model_copy(update={"status": "INCOMPLETE", "first_error": "x"})}
    assert members_result(tasks["mmlu"].spec, [s.id for s in tasks["mmlu"].samples], union, failed, side="fp8",
                          records_path="g.jsonl").status == "INCOMPLETE"


# ---------------------------------------------------------------------- real lm-eval, real server


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from pytest_day0.stages.serve import start_reference_server

    with start_reference_server(DEMO, "baseline", tmp_path_factory.mktemp("srv"), timeout_s=180) as handle:
        yield handle.url


def _engine_config(ws: Path, **values: Any) -> RunConfig:
    return RunConfig(model="demo", eval="lm-eval", workdir=ws, **values)


def _request(config: RunConfig, task_name: str, url: str, ws: Path, model: str = "baseline",
             **kwargs: Any) -> EvalRequest:
    task = next(t for t in eval_engine("lm-eval").tasks(config, None) if t.name == task_name)  # type: ignore[misc]
    return EvalRequest(task, Endpoint(url=url, model=model), ws / "evals" / f"{task_name}.jsonl", "baseline",
                       concurrency=8, config=config, tokenizer=str(DEMO), **kwargs)


def test_the_plan_of_the_shipped_tasks(tmp_path: Path) -> None:
    from pytest_day0.stages.evaluate_lm_eval import resolve_plan

    config = _engine_config(tmp_path / "ws", tasks=("arc_like", "gsm_like", "demo_mmlu_like"))
    lines: list[str] = []
    plan = resolve_plan(config, lines.append)
    assert not plan.defaults  # shipped tasks only: lm-eval's 15k-file index was not needed
    assert plan.tasks["arc_like"].n_docs == 500 and plan.tasks["gsm_like"].output_type == "generate_until"
    assert plan.tasks["arc_like"].day0 == {"scale": [0, 100], "metric": "acc", "chat": False}
    assert set(plan.groups) == {"demo_mmlu_like", "demo_mmlu_like_stem", "demo_mmlu_like_other"}
    assert sum(plan.tasks[f"demo_mmlu_like_p{i}"].n_docs for i in range(4)) == 500
    assert parametrized(plan) == ["arc_like", "gsm_like", "demo_mmlu_like", "demo_mmlu_like_stem",
                                  "demo_mmlu_like_other", "demo_mmlu_like_p0", "demo_mmlu_like_p1",
                                  "demo_mmlu_like_p2", "demo_mmlu_like_p3"]
    assert any("resolving arc_like, gsm_like, demo_mmlu_like" in line for line in lines)
    lines.clear()
    assert resolve_plan(config, lines.append) == plan and lines == []  # the second session reads it back


def test_a_run_stopped_at_its_deadline_resumes_from_the_request_cache(demo_server: str, tmp_path: Path) -> None:
    """Killed mid-run (stage timeout): INFRA_TRANSIENT, the worker's process group gone, the answers received kept in
    lm-eval's request cache; the retry sends only the rest and scores every document."""
    from pytest_day0.stages.evaluate_lm_eval import POOL

    ws = tmp_path / "ws"
    config = _engine_config(ws, tasks=("arc_like",))
    engine = eval_engine("lm-eval")
    warm = _request(config, "arc_like", demo_server, ws, doc_ids=("0",))
    assert engine.evaluate(warm).status == "SUCCESS"  # the worker is up: the deadline below is all lm-eval's
    req = _request(config, "arc_like", demo_server, ws, timeout_s=3.0)
    worker = POOL.get(config)
    pid = worker.proc.pid if worker.proc is not None else None
    with pytest.raises(Day0Error) as info:
        engine.evaluate(req)
    assert info.value.failure_class is FailureClass.INFRA_TRANSIENT and "stage timeout (3s)" in info.value.message
    assert pid is not None and worker.proc is not None and worker.proc.poll() is not None  # killed and reaped
    assert not Path(f"/proc/{pid}").exists()
    cache = req.records_path.with_name(req.records_path.stem + ".lm-eval-cache.sqlite")
    with sqlite3.connect(cache) as db:
        kept = db.execute("select count(*) from unnamed").fetchone()[0]
    assert 0 < kept < 2000, kept  # some of the 2,000 answers came back before the kill, not all
    lines: list[str] = []
    result = engine.evaluate(_request(config, "arc_like", demo_server, ws, log=lines.append))
    assert result.status == "SUCCESS" and result.scored_samples == 500 and check_run(result).passed
    resumed = next(line for line in lines if "request cache answers" in line)
    reused, sent = (int(w) for w in resumed.split("answers ")[1].replace(" to send", "").split(", "))
    assert reused >= kept and reused + sent == 2000, resumed


def test_an_endpoint_that_is_down_or_refuses_is_a_named_class(tmp_path: Path) -> None:
    engine = eval_engine("lm-eval")
    ws = tmp_path / "ws"
    config = _engine_config(ws, tasks=("gsm_like",))
    with ToyOpenAIServer() as toy:
        toy.faults.status_always = 503
        with pytest.raises(Day0Error) as down:
            engine.evaluate(_request(config, "gsm_like", toy.url, ws, doc_ids=("0", "1")))
        toy.faults.status_always = None  # up, but it takes text prompts only: lm-eval sends token ids
        with pytest.raises(Day0Error) as refused:
            engine.evaluate(_request(config, "gsm_like", toy.url, ws, doc_ids=("0", "1")))
    assert down.value.failure_class is FailureClass.INFRA_TRANSIENT and "HTTP 503" in down.value.message
    assert refused.value.failure_class is FailureClass.EVAL_JUDGE_FAILED
    assert "HTTP 400" in refused.value.message and "\n" not in refused.value.message


def test_a_chat_template_asked_for_goes_through_chat_completions(demo_server: str, tmp_path: Path) -> None:
    """--apply_chat_template: generation through local-chat-completions (the server applies the template);
    multiple choice stays on local-completions with the rendered template, whose own BOS is not doubled: on the
    demo (template = BOS + message) both ask exactly what the plain run asks."""
    from pytest_day0.stages.evaluate_lm_eval import read_records

    engine = eval_engine("lm-eval")
    docs = tuple(str(i) for i in range(20))
    runs: dict[str, dict[str, Any]] = {}
    for label, args in (("plain", None), ("chat", "--apply_chat_template")):
        ws = tmp_path / label
        config = _engine_config(ws, tasks=("arc_like", "gsm_like"), lm_eval_args=args)
        lines: list[str] = []
        for task in ("arc_like", "gsm_like"):
            result = engine.evaluate(_request(config, task, demo_server, ws, doc_ids=docs, log=lines.append))
            assert result.status == "SUCCESS", result.first_error
            runs.setdefault(label, {})[task] = read_records(Path(result.records_path))
        runs[label]["log"] = lines
    chat_log = " ".join(runs["chat"]["log"])
    assert "gsm_like: lm-eval local-chat-completions" in chat_log
    assert "arc_like: lm-eval local-completions (add_bos_token=False" in chat_log  # the template wrote it
    assert "arc_like: lm-eval local-completions (add_bos_token=True" in " ".join(runs["plain"]["log"])
    for task in ("arc_like", "gsm_like"):
        plain = {r.id: r for r in runs["plain"][task]}
        for rec in runs["chat"][task]:
            assert rec.correct == plain[rec.id].correct and rec.response == plain[rec.id].response
            if rec.choice_logprobs is not None:
                assert rec.choice_logprobs == pytest.approx(plain[rec.id].choice_logprobs, abs=1e-4)


def test_the_bos_lm_eval_sends_is_the_servers_and_it_matters(demo_server: str, tmp_path: Path) -> None:
    """The served tokenizer prepends BOS to a text prompt (its post-processor does, whatever tokenizer_config.json
    declares), so the engine has lm-eval send token ids with BOS: its log-likelihoods are the scorer's to the last
    digit. Forced off (--model_args add_bos_token=False, lm-eval's default), they are not: the check can fail."""
    import transformers

    from pytest_day0.scoring.tasks import load_task
    from pytest_day0.stages.evaluate import read_records, run_evaluation
    from pytest_day0.stages.lm_eval_worker import tokenizer_facts

    facts = tokenizer_facts(transformers.AutoTokenizer.from_pretrained(DEMO))
    assert facts["add_bos_token"] is True and facts["special"][0] == 1 and facts["plain"][0] != 1
    n = 20
    scored = run_evaluation(load_task("arc_like", n), Endpoint(url=demo_server, model="baseline"),
                            tmp_path / "scorer.jsonl", "baseline")
    scorer = list(read_records(Path(scored.records_path))[0].values())
    engine = eval_engine("lm-eval")
    worst = {}
    for label, args in (("default", None), ("no-bos", "--model_args add_bos_token=False")):
        ws = tmp_path / label
        config = _engine_config(ws, tasks=("arc_like",), lm_eval_args=args)
        result = engine.evaluate(_request(config, "arc_like", demo_server, ws, doc_ids=tuple(map(str, range(n)))))
        lm = {r.id: r for r in read_records(Path(result.records_path))[0].values()}
        worst[label] = max(abs(x - y) for i, rec in enumerate(scorer) for x, y in
                           zip(rec.choice_logprobs or [], lm[str(i)].choice_logprobs or [], strict=True))
    assert worst["default"] <= 1e-4 < worst["no-bos"], worst


def test_only_the_worker_imports_lm_eval() -> None:
    """lm-eval never enters the pytest process (a session that does not use it never loads it; one that does runs
    it in the worker child): read from the source, function-level imports included."""
    import ast

    package = Path(__file__).resolve().parents[1] / "pytest_day0"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names):
                importers.add(str(path.relative_to(package)))
    assert importers == {"stages/lm_eval_worker.py"}
