"""lm-eval-harness output folders as an eval source: the layout lm-eval writes, read, checked and gated.

The folders are written the way lm-eval 0.4 writes them (``EvaluationTracker.save_results_aggregated`` and
``save_results_samples``): ``<output_path>/<model_name_sanitized>/results_<iso stamp>.json`` and, with the
same stamp, ``samples_<task>_<stamp>.jsonl`` — one line per (doc, filter), ``arguments`` as
``{"gen_args_i": {"arg_j": ...}}``, the target stringified, the metric values beside ``metrics``.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.run import check_run
from pytest_day0.scoring import lm_eval

STAMP = "2026-03-14T09-26-53.589793"
pytest_plugins = ["pytester"]


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mc_lines(values: list[float], norm: list[float] | None = None, shots: str = "") -> list[dict[str, Any]]:
    """arc_easy-like loglikelihood docs: four (context, continuation) requests, acc and acc_norm per doc;
    ``shots`` is the few-shot preamble lm-eval puts before every question."""
    lines = []
    for i, v in enumerate(values):
        ctx = f"{shots}Question: Which number is largest in set {i}?\nAnswer:"
        choices = [f" {i + k}" for k in range(4)]
        gold = 3
        ll = [-4.0, -3.5, -3.0, -2.0] if v == 1.0 else [-1.0, -3.5, -3.0, -2.0]
        line = {
            "doc_id": i,
            "doc": {"id": f"Mercury_{i}", "question": ctx, "choices": {"text": choices}, "answerKey": "D"},
            "target": str(gold),
            "arguments": {f"gen_args_{k}": {"arg_0": ctx, "arg_1": c} for k, c in enumerate(choices)},
            "resps": [[[x, False]] for x in ll],
            "filtered_resps": [[x, False] for x in ll],
            "filter": "none",
            "metrics": ["acc", "acc_norm"],
            "doc_hash": _h(json.dumps({"i": i})),
            "prompt_hash": _h(ctx),
            "target_hash": _h(str(gold)),
            "acc": v,
            "acc_norm": (norm or values)[i],
        }
        lines.append(line)
    return lines


def gen_lines(strict: list[float], flexible: list[float]) -> list[dict[str, Any]]:
    """gsm8k-like generate_until docs: one line per filter (strict-match, flexible-extract) per doc."""
    lines = []
    for i, (s, f) in enumerate(zip(strict, flexible, strict=True)):
        q = f"Question: What is {i} + {i}?\nAnswer:"
        answer = str(2 * i)
        resp = f"{i} + {i} = {answer}. #### {answer}" if s else f"The answer is {answer}"
        for flt, value in (("strict-match", s), ("flexible-extract", f)):
            lines.append({
                "doc_id": i,
                "doc": {"question": q, "answer": f"#### {answer}"},
                "target": f"#### {answer}",
                "arguments": {"gen_args_0": {"arg_0": q, "arg_1": {"until": ["Question:"], "do_sample": False}}},
                "resps": [[resp]],
                "filtered_resps": [answer if value else "[invalid]"],
                "filter": flt,
                "metrics": ["exact_match"],
                "doc_hash": _h(q),
                "prompt_hash": _h(q),
                "target_hash": _h(answer),
                "exact_match": value,
            })
    return lines


def write_run(root: Path, model: str, tasks: dict[str, tuple[str, list[dict[str, Any]]]],
              stamp: str = STAMP, reported: dict[str, dict[str, float]] | None = None) -> Path:
    """Write one lm-eval run; ``tasks``: name -> (output_type, sample lines). Returns the model folder."""
    folder = root / model.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    hib: dict[str, Any] = {}
    nsamples: dict[str, Any] = {}
    for name, (output_type, lines) in tasks.items():
        by_filter: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for line in lines:
            by_filter.setdefault(line["filter"], {}).setdefault(line["doc_id"], []).append(line)
        res: dict[str, Any] = {"alias": name}
        for flt, docs in by_filter.items():
            for metric in docs[next(iter(docs))][0]["metrics"]:
                per_doc = [sum(float(x[metric]) for x in d) / len(d) for d in docs.values()]
                mean = sum(per_doc) / len(per_doc)
                res[f"{metric},{flt}"] = (reported or {}).get(name, {}).get(f"{metric},{flt}", mean)
                res[f"{metric}_stderr,{flt}"] = (max(mean * (1 - mean), 0.0) / max(len(per_doc) - 1, 1)) ** 0.5
                hib.setdefault(name, {})[metric] = True
        docs_n = len({line["doc_id"] for line in lines})
        results[name] = res
        configs[name] = {"task": name, "output_type": output_type, "num_fewshot": 0, "metadata": {"version": 1.0}}
        nsamples[name] = {"original": docs_n, "effective": docs_n}
        with (folder / f"samples_{name}_{stamp}.jsonl").open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")
    results["ai2_arc"] = {"alias": "ai2_arc"}  # a group: aggregated, no samples file of its own
    doc = {
        "results": results, "groups": {"ai2_arc": {"alias": "ai2_arc"}}, "group_subtasks": {"ai2_arc": ["arc_easy"]},
        "configs": configs, "versions": {n: 1.0 for n in tasks}, "n-shot": {n: 0 for n in tasks},
        "higher_is_better": hib, "n-samples": nsamples,
        "config": {"model": "local-completions", "model_args": f"model={model},base_url=http://x/v1/completions",
                   "batch_size": 1, "limit": None, "bootstrap_iters": 100000},
        "git_hash": "4f8195f", "date": 1773480413.0, "task_hashes": {}, "model_source": "local-completions",
        "model_name": model, "model_name_sanitized": model.replace("/", "__"), "chat_template": None,
        "total_evaluation_time_seconds": "812.5", "lm_eval_version": "0.4.9",
    }
    (folder / f"results_{stamp}.json").write_text(json.dumps(doc, indent=2))
    return folder


def flip(values: list[float], k: int) -> list[float]:
    """The first k correct docs become wrong (a real loss, not noise)."""
    out, left = list(values), k
    for i, v in enumerate(out):
        if left and v == 1.0:
            out[i], left = 0.0, left - 1
    return out


ARC = [1.0 if i % 5 else 0.0 for i in range(400)]  # 80% accuracy
GSM_STRICT = [1.0 if i % 3 else 0.0 for i in range(300)]  # 66.7%
GSM_FLEX = [1.0 if i % 4 else 0.0 for i in range(300)]


def sides(tmp: Path, gsm_lost: int = 0, arc_lost: int = 0) -> tuple[Path, Path]:
    base = tmp / "lm_eval_out" / "baseline"
    cand = tmp / "lm_eval_out" / "candidate"
    write_run(base, "org/Model-8B", {"arc_easy": ("multiple_choice", mc_lines(ARC)),
                                     "gsm8k": ("generate_until", gen_lines(GSM_STRICT, GSM_FLEX))})
    write_run(cand, "org/Model-8B-FP8", {"arc_easy": ("multiple_choice", mc_lines(flip(ARC, arc_lost))),
                                         "gsm8k": ("generate_until", gen_lines(flip(GSM_STRICT, gsm_lost),
                                                                               GSM_FLEX))})
    return base, cand


# ---------------------------------------------------------------------------------------------- reading


def test_reads_the_layout_metric_keys_and_filters(tmp_path: Path) -> None:
    base, _ = sides(tmp_path)
    run = lm_eval.load_run(base)  # the --output_path folder: one model folder below it
    assert run.results_path.name == f"results_{STAMP}.json" and run.model_name == "org/Model-8B"
    assert set(run.tasks) == {"arc_easy", "gsm8k"} and run.unsampled == ("ai2_arc",)
    arc, gsm = run.tasks["arc_easy"], run.tasks["gsm8k"]
    assert (arc.metric_key, arc.kind, arc.n_effective) == ("acc,none", "multiple_choice", 400)
    assert (gsm.metric_key, gsm.filter, gsm.kind) == ("exact_match,strict-match", "strict-match", "generate")
    records = lm_eval.doc_records(gsm)
    assert len(records) == 300 and [r.id for r in records[:3]] == ["0", "1", "2"]  # one per doc, not per filter
    assert sum(r.correct or 0 for r in records) == sum(GSM_STRICT)  # the strict-match lines, not flexible
    assert lm_eval.task_names(base) == ["arc_easy", "gsm8k"]


def test_task_result_reproduces_the_reported_score(tmp_path: Path) -> None:
    base, _ = sides(tmp_path)
    r = lm_eval.task_result(base, "arc_easy", "baseline", tmp_path / "rec" / "arc.jsonl")
    assert r.status == "SUCCESS" and r.score == pytest.approx(0.8) and r.scale == (0.0, 1.0)
    assert r.expected_samples == r.scored_samples == 400 and check_run(r).passed
    assert len((tmp_path / "rec" / "arc.jsonl").read_text().splitlines()) == 400
    limited = lm_eval.task_result(base, "arc_easy", "baseline", tmp_path / "rec" / "a20.jsonl", limit=20)
    assert limited.expected_samples == 20 and limited.score == pytest.approx(16 / 20) and check_run(limited).passed


def test_newest_results_file_wins_and_needs_its_own_samples(tmp_path: Path) -> None:
    folder = write_run(tmp_path, "m", {"arc_easy": ("multiple_choice", mc_lines([1.0] * 10))},
                       stamp="2026-01-01T00-00-00.000001")
    write_run(tmp_path, "m", {"arc_easy": ("multiple_choice", mc_lines([0.0] * 10))}, stamp=STAMP)
    assert lm_eval.load_run(folder).stamp == STAMP
    r = lm_eval.task_result(folder, "arc_easy", "baseline", tmp_path / "r.jsonl")
    assert r.score == 0.0


def test_repeats_are_averaged_per_doc(tmp_path: Path) -> None:
    lines = mc_lines([1.0, 0.0, 1.0]) + mc_lines([0.0, 0.0, 1.0])  # a second pass over the same docs
    folder = write_run(tmp_path, "m", {"arc_easy": ("multiple_choice", lines)})
    records = lm_eval.doc_records(lm_eval.load_run(folder).tasks["arc_easy"])
    assert [r.correct for r in records] == [0.5, 0.0, 1.0] and [r.attempts for r in records] == [2, 2, 2]


def test_missing_docs_and_wrong_reported_scores_are_accounting_failures(tmp_path: Path) -> None:
    folder = write_run(tmp_path, "m", {"arc_easy": ("multiple_choice", mc_lines([1.0] * 10))})
    samples = folder / f"samples_arc_easy_{STAMP}.jsonl"
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:8]))  # two docs vanished
    r = lm_eval.task_result(folder, "arc_easy", "candidate", tmp_path / "r.jsonl")
    check = check_run(r)
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "8 docs" in check.message
    other = write_run(tmp_path / "o", "m", {"arc_easy": ("multiple_choice", mc_lines([1.0] * 10))},
                      reported={"arc_easy": {"acc,none": 0.7}})
    check = check_run(lm_eval.task_result(other, "arc_easy", "candidate", tmp_path / "o.jsonl"))
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "does not reproduce" in check.message


def test_bad_folders_are_one_line_user_config_errors(tmp_path: Path) -> None:
    with pytest.raises(Day0Error, match="does not exist"):
        lm_eval.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Day0Error, match="no results_"):
        lm_eval.load_run(tmp_path / "empty")
    write_run(tmp_path / "two", "a", {"arc_easy": ("multiple_choice", mc_lines([1.0]))})
    write_run(tmp_path / "two", "b", {"arc_easy": ("multiple_choice", mc_lines([1.0]))})
    with pytest.raises(Day0Error, match="several models"):
        lm_eval.load_run(tmp_path / "two")
    base, _ = sides(tmp_path)
    with pytest.raises(Day0Error) as info:
        lm_eval.task_names(base, ["ai2_arc"])
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and "no samples file" in info.value.message
    bleu = mc_lines([1.0, 1.0])
    for line in bleu:
        line["acc"] = 37.5  # a corpus-style number, not a per-sample correctness
    folder = write_run(tmp_path / "bleu", "m", {"t": ("generate_until", bleu)})
    with pytest.raises(Day0Error, match="outside"):
        lm_eval.doc_records(lm_eval.load_run(folder).tasks["t"])


# ---------------------------------------------------------------------------------------------- gating, end to end


def _session(pytester: pytest.Pytester, base: Path, cand: Path, *extra: str) -> tuple[Any, dict[str, Any]]:
    ws = pytester.path / "ws"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--day0-model=org/Model-8B", "--recipe", "fp8",
        f"--day0-lm-eval-baseline={base}", f"--day0-lm-eval-candidate={cand}",
        f"--day0-workdir={ws}", f"--junitxml={pytester.path / 'day0.xml'}", *extra)
    return result, json.loads((ws / "verdict.json").read_text())


def test_lm_eval_folders_gate_to_a_verdict(pytester: pytest.Pytester, tmp_path: Path) -> None:
    base, cand = sides(tmp_path, gsm_lost=25)  # gsm8k strict-match loses 25 of 200 right answers: -8.3 points
    result, verdict = _session(pytester, base, cand)
    out = result.stdout.str()
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "REGRESSION" and v["regressed_tasks"] == ["gsm8k"], out
    by_task = {c["task"]: c for c in verdict["comparisons"]}
    arc, gsm = by_task["arc_easy"], by_task["gsm8k"]
    assert arc["n"] == 400 and arc["stat"] == "paired" and arc["quality"]["passed"]
    assert arc["ci_low"] < 0 < arc["ci_high"] and arc["test"].startswith("paired betting CI")
    assert gsm["delta"] == pytest.approx(-25 / 300) and gsm["ci_high"] < -0.01
    assert gsm["quality"]["failure_class"] == "REGRESSION" and gsm["floor"]["passed"]  # not surely past 10 points
    assert gsm["p_value"] == pytest.approx(2 / 2**25)  # exact McNemar: 25 losses, no gains
    # flips: which docs changed answer, each way (the first 25 right strict-match docs were lost)
    lost = [str(i) for i, v in enumerate(GSM_STRICT) if v == 1.0][:25]
    assert gsm["flips"] == {"n": 300, "tolerance": 0.5, "lost": lost, "gained": []}
    assert arc["flips"]["lost"] == [] and arc["flips"]["gained"] == []
    # the terminal table: interval, n, flips and decision per task, the test named in its caption, 100 columns
    row = next(line for line in out.splitlines() if line.strip().startswith("gsm8k"))
    assert "[-0.1" in row and " 300 " in row and row.rstrip().endswith("REGRESSION") and len(row) <= 100
    assert "bounds (a 90% interval) of the betting test" in out
    assert "plot (Δ with its interval per task)" in out and (pytester.path / "ws" / "delta.svg").is_file()
    plot = [t.text or "" for t in ET.parse(pytester.path / "ws" / "delta.svg").iter("{http://www.w3.org/2000/svg}text")]
    assert "fp8 / gsm8k" in plot and any(t.startswith("Δ -0.083 [") and t.endswith("REGRESSION") for t in plot), plot
    # nothing was served and no PTQ ran: those gates skip, they do not fail
    assert result.parseoutcomes() == {"passed": 11, "skipped": 8, "warned": 1}
    # JUnit: the quality test of gsm8k carries the numbers
    tree = ET.parse(pytester.path / "day0.xml")
    case = next(c for c in tree.iter("testcase") if c.get("name") == "test_quality[fp8-gsm8k]")
    props = {p.get("name"): p.get("value") or "" for p in case.iter("property")}
    assert props["decision"] == "REGRESSION" and props["n"] == "300" and props["stat"] == "paired"
    assert float(props["ci_high"]) < 0 and props["test"].startswith("paired betting CI") and "p_value" in props
    assert (props["flips_lost"], props["flips_gained"], props["flipped_lost_ids"]) == ("25", "0", ",".join(lost))
    assert " 25↓ 0↑ " in row


def test_lm_eval_with_few_samples_is_inconclusive(pytester: pytest.Pytester, tmp_path: Path) -> None:
    base, cand = sides(tmp_path, gsm_lost=2)
    result, verdict = _session(pytester, base, cand, "--day0-limit=20")
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "INCONCLUSIVE", result.stdout.str()
    assert v["recommendation"].startswith("fp8 is not decided yet: evaluate more samples: ")
    assert all(c["n"] == 20 and c["quality"]["failure_class"] == "INCONCLUSIVE" for c in verdict["comparisons"])
    assert result.ret == 0  # warn tier


def test_point_rule_reproduces_the_skill(pytester: pytest.Pytester, tmp_path: Path) -> None:
    base, cand = sides(tmp_path, gsm_lost=2)
    _, verdict = _session(pytester, base, cand, "--day0-limit=20", "--day0-stat=point")
    gsm = next(c for c in verdict["comparisons"] if c["task"] == "gsm8k")
    assert gsm["stat"] == "point" and gsm["ci_low"] is None and gsm["test"] == "point estimate"
    # 2 of 20 lost is a 10-point drop: the point rule calls it a REGRESSION (and the floor sits exactly at it)
    assert gsm["quality"]["failure_class"] == "REGRESSION"


def test_published_baseline_mismatch_blocks_accept(pytester: pytest.Pytester, tmp_path: Path) -> None:
    base, cand = sides(tmp_path)
    published = tmp_path / "published.yaml"
    published.write_text("arc_easy: {score: 92.0, scale: [0, 100], source: model card}\n"
                         "gsm8k: {score: 0.667, scale: 1}\n")
    result, verdict = _session(pytester, base, cand, f"--day0-published={published}")
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "ANOMALOUS" and "EXTERNAL_BASELINE_MISMATCH" in v["failure_classes"]
    assert result.ret == 1  # hard tier
    published_outcomes = {o["task"]: o for o in verdict["extra"]["outcomes"] if o["gate"] == "published"}
    arc = published_outcomes["arc_easy"]
    assert arc["status"] == "failed" and arc["failure_class"] == "EXTERNAL_BASELINE_MISMATCH"
    assert "vs published 0.920 (92 on 0–100, model card)" in arc["message"] and "off by -0.120" in arc["message"]
    assert published_outcomes["gsm8k"]["status"] == "passed"  # 0.667 published, 0.667 measured


def test_a_5_shot_baseline_is_never_compared_with_a_0_shot_candidate(pytester: pytest.Pytester,
                                                                     tmp_path: Path) -> None:
    """Same docs, same ids, the same accuracy, asked differently: no pair is a pair (it gated to ACCEPT before)."""
    shots = "".join(f"Question: Which number is largest in set {k}?\nAnswer: {k + 3}\n\n" for k in range(5))
    base = tmp_path / "lm_eval_out" / "five-shot"
    cand = tmp_path / "lm_eval_out" / "zero-shot"
    write_run(base, "org/Model-8B", {"arc_easy": ("multiple_choice", mc_lines(ARC, shots=shots))})
    write_run(cand, "org/Model-8B-FP8", {"arc_easy": ("multiple_choice", mc_lines(ARC))})
    result, verdict = _session(pytester, base, cand)
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "ANOMALOUS" and "SAMPLE_ACCOUNTING_FAILED" in v["failure_classes"], result.stdout.str()
    assert result.ret == 1
    failed = [o for o in verdict["extra"]["outcomes"] if o["failure_class"] == "SAMPLE_ACCOUNTING_FAILED"]
    assert {o["gate"] for o in failed} == {"floor", "quality", "anomaly"}
    assert {o["status"] for o in failed} == {"failed"}
    message = failed[0]["message"]
    assert "400 ids were sent different prompts: 0, 1, 10, 100, 101 (+395 more)" in message
    assert "(id 0: at character 51: baseline …'\\nAnswer: 3\\n\\nQuestion: Which numb'… vs candidate …'\\nAnswer:' " \
           "(ends there))" in message
    assert not any(o["gate"] in ("floor", "quality") and o["status"] == "passed" for o in verdict["extra"]["outcomes"])


def test_bad_lm_eval_options_stop_the_session_in_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = pytester.runpytest_subprocess("--day0-model=x", f"--day0-lm-eval-baseline={tmp_path / 'nope'}",
                                           f"--day0-lm-eval-candidate={tmp_path}")
    assert result.ret == 4
    assert "[USER_CONFIG_ERROR] lm-eval folder" in result.stderr.str()
    result = pytester.runpytest_subprocess("--day0-model=x", "--day0-eval=lm-eval",
                                           f"--day0-lm-eval-baseline={tmp_path}")
    assert result.ret == 4 and "needs --day0-lm-eval-baseline and --day0-lm-eval-candidate" in result.stderr.str()
