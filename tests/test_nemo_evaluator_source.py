"""NeMo Evaluator (``nel eval run``) output as an eval source, on files nemo-evaluator 0.3.0 itself wrote.

The fixtures (tests/data/nemo_evaluator, README there) are real ``nel eval run`` outputs of the demo model served
by the reference server; ``nel_compare_base_truncated.json`` is ``nel compare``'s own report on two of them, so the
pairing here is checked against the tool's, not against our reading of its code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.config import RunConfig
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.run import align_records, check_run
from pytest_day0.scoring import external_results
from pytest_day0.scoring import nemo_evaluator as nel

DATA = Path(__file__).parent / "data" / "nemo_evaluator"
TASK = "demo_gsm_like"
pytest_plugins = ["pytester"]


def raw_lines(run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / run / "results.jsonl").read_text().splitlines() if line.strip()]


def records(run: str, side: str, tmp_path: Path, baseline: str | None = None) -> tuple[Any, list[Any]]:
    path = tmp_path / run / side / f"{TASK}.jsonl"
    result = nel.task_result(DATA / run, TASK, side, path, baseline=DATA / baseline if baseline else None)
    from pytest_day0.scoring.records import SampleRecord

    return result, [SampleRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def copy_run(run: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / run, tmp_path / run))


# ---------------------------------------------------------------------------------------------- reading


def test_reads_the_bundle_nel_wrote() -> None:
    (bench,) = nel.load_run(DATA / "base").values()
    assert (bench.name, bench.problems, bench.repeats, bench.n_results) == (TASK, 60, 2, 120)
    assert (bench.metric, bench.reported) == ("pass@1", 1.0)
    assert bench.results_path == DATA / "base" / "results.jsonl"
    (trunc,) = nel.load_run(DATA / "truncated").values()
    assert (trunc.metric, trunc.reported) == ("pass@1", 0.4833)


def test_one_record_per_problem_every_field_from_the_lines(tmp_path: Path) -> None:
    """Each record against the raw lines: id = problem_idx, repeats averaged, the prompt and its sha256, the
    expected answer, repeat 0's response, the repeat count."""
    result, recs = records("truncated", "fp8", tmp_path)
    lines = raw_lines("truncated")
    by_idx: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_idx.setdefault(line["problem_idx"], []).append(line)
    assert [r.id for r in recs] == [str(i) for i in sorted(by_idx)]  # problem order, all 60
    for rec in recs:
        reps = sorted(by_idx[int(rec.id)], key=lambda line: line["repeat"])
        assert [line["repeat"] for line in reps] == [0, 1]
        assert rec.task == TASK and rec.attempts == 2 and rec.error is None
        assert rec.prompt == reps[0]["prompt"] == reps[1]["prompt"]
        assert rec.prompt_hash == hashlib.sha256(reps[0]["prompt"].encode()).hexdigest()
        assert rec.target == reps[0]["expected_answer"]
        assert rec.response == reps[0]["model_response"]
        assert rec.correct == (reps[0]["reward"] + reps[1]["reward"]) / 2
        assert rec.choice_logprobs is None and rec.completion_tokens is None
    # a record read back from the files, named: problem 18 is "54+66=", 120; two tokens cannot say "120"
    r18 = next(r for r in recs if r.id == "18")
    assert (r18.prompt, r18.target, r18.correct, r18.response) == ("54+66=", "120", 0.0, "12")
    assert result.status == "SUCCESS" and result.first_error is None
    assert (result.expected_samples, result.scored_samples, result.errored_samples) == (60, 60, 0)
    assert result.score == pytest.approx(29 / 60) and round(result.score, 4) == 0.4833  # nel's pass@1
    assert (result.metric, result.scale, result.mean_completion_tokens) == ("pass@1", (0.0, 1.0), None)
    assert check_run(result).passed


def test_pairs_by_problem_like_nel_compare(tmp_path: Path) -> None:
    """nel compare's own report on the same two folders: 60 problems paired, 31 lost; the same problems here."""
    _, base = records("base", "baseline", tmp_path)
    _, cand = records("truncated", "fp8", tmp_path, baseline="base")
    pairs = align_records(base, cand)
    lost = sorted(int(b.id) for b, c in pairs if b.correct == 1.0 and c.correct == 0.0)
    report = json.loads((DATA / "nel_compare_base_truncated.json").read_text())
    assert report["verdict"] == "BLOCK" and report["flip_report"]["summary"]["n_paired"] == len(pairs) == 60
    assert lost == sorted(f["problem_idx"] for f in report["flip_report"]["regressions"])
    assert len(lost) == report["flip_report"]["summary"]["n_regressions"] == 31
    assert not any(c.correct == 1.0 and b.correct == 0.0 for b, c in pairs)  # no improvements either
    assert report["flip_report"]["summary"]["n_improvements"] == 0


def test_a_different_repeat_count_is_refused(tmp_path: Path) -> None:
    """nel compare pairs 2-repeat means with 1-repeat values and says PASS; averages of different N are not the
    same measurement, so the candidate side stops here (either way round)."""
    with pytest.raises(Day0Error, match="the baseline ran 2 repeats per problem, fp8 ran 1") as err:
        records("once", "fp8", tmp_path, baseline="base")
    assert err.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    with pytest.raises(Day0Error, match="the baseline ran 1 repeats per problem, fp8 ran 2"):
        records("base", "fp8", tmp_path, baseline="once")
    result, _ = records("once", "baseline", tmp_path)  # on its own a one-repeat run is fine
    assert result.status == "SUCCESS" and result.score == 1.0


def test_an_unreachable_endpoint_is_errored_samples_not_wrong_answers(tmp_path: Path) -> None:
    """nel graded the three problems 0.0 (pass@1 0.0) with error_category infra_error: nothing was answered."""
    assert all(line["reward"] == 0.0 and line["scoring_details"]["error_category"] == "infra_error"
               for line in raw_lines("unreachable"))
    (bench,) = nel.load_run(DATA / "unreachable").values()
    assert bench.reported == 0.0
    result, recs = records("unreachable", "baseline", tmp_path)
    assert all(r.correct is None and r.error and r.error.startswith("[INFRA_TRANSIENT]") for r in recs)
    assert "infra_error: Model returned HTTP 500 after retries" in (recs[0].error or "")
    assert (result.scored_samples, result.errored_samples, result.score, result.status) == (0, 3, None, "FAILED")
    check = check_run(result)
    assert not check.passed and check.failure_class is FailureClass.INFRA_TRANSIENT


# ---------------------------------------------------------------------------------------------- bad folders


def test_layout_nel_eval_run_writes_and_format_detection(tmp_path: Path) -> None:
    """``-o OUT`` puts each benchmark in OUT/<benchmark>/; a flat copy, the bundle file and OUT are all found."""
    out = tmp_path / "out"
    shutil.copytree(DATA / "base", out / TASK)
    (out / "report.md").write_text("# Evaluation Report: demo\n")
    assert nel.is_nel_output(out) and nel.is_nel_output(DATA / "base")
    bundle = next((DATA / "base").glob("eval-*.json"))
    assert nel.is_nel_output(bundle) and nel.bundle_paths(bundle) == [bundle]
    assert nel.bundle_paths(out) == [next((out / TASK).glob("eval-*.json"))]
    assert nel.task_names(out) == [TASK]
    lm_eval_like = tmp_path / "lm" / "org__Model"
    lm_eval_like.mkdir(parents=True)
    (lm_eval_like / "results_2026-03-14T09-26-53.589793.json").write_text("{}")
    assert not nel.is_nel_output(tmp_path / "lm") and external_results.kind(tmp_path / "lm") == "lm-eval"
    tasks = nel.load_tasks(out, [TASK])
    assert tasks[0].spec.metric == "pass@1" and tasks[0].spec.repeats == 2 and len(tasks[0].samples) == 60
    first = min(raw_lines("base"), key=lambda line: line["problem_idx"])
    assert (tasks[0].samples[0].id, tasks[0].samples[0].prompt) == (str(first["problem_idx"]), first["prompt"])


def _accounting_message(folder: Path, side: str = "baseline") -> str:
    result = nel.task_result(folder, TASK, side, folder.parent / f"{folder.name}.records.jsonl")
    assert result.status == "FAILED" and result.first_error is not None
    check = check_run(result)
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED, check
    return result.first_error


def test_missing_duplicated_and_edited_lines_are_accounting_failures(tmp_path: Path) -> None:
    lines = (DATA / "base" / "results.jsonl").read_text().splitlines(keepends=True)
    dropped = copy_run("base", tmp_path / "dropped")
    (dropped / "results.jsonl").write_text("".join(lines[:-1]))  # problem 965's repeat 1 is gone
    last = json.loads(lines[-1])
    message = _accounting_message(dropped)
    assert f"problem {last['problem_idx']} has repeats [{1 - last['repeat']}], the bundle says 2" in message
    assert "(+1 more)" in message  # and the line count no longer matches n_results
    doubled = copy_run("base", tmp_path / "doubled")
    (doubled / "results.jsonl").write_text("".join(lines + lines[:1]))
    first = json.loads(lines[0])
    assert f"problem {first['problem_idx']} repeat {first['repeat']} is logged twice" in _accounting_message(doubled)
    edited = copy_run("base", tmp_path / "edited")
    first["reward"] = 0.0
    (edited / "results.jsonl").write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    assert "per-problem reward mean 0.991667 does not reproduce" in _accounting_message(edited)
    torn = copy_run("base", tmp_path / "torn")
    (torn / "results.jsonl").write_text("".join(lines) + lines[0][:40])
    with pytest.raises(Day0Error, match="line 121 is not JSON") as err:
        nel.task_result(torn, TASK, "baseline", tmp_path / "torn.records.jsonl")
    assert err.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    gone = copy_run("base", tmp_path / "gone")
    (gone / "results.jsonl").unlink()
    with pytest.raises(Day0Error, match=r"has the bundle but no results\.jsonl") as err:
        nel.task_result(gone, TASK, "baseline", tmp_path / "gone.records.jsonl")
    assert err.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED


def test_bad_folders_are_one_line_user_config_errors(tmp_path: Path) -> None:
    two = copy_run("base", tmp_path / "two")
    shutil.copy(next((DATA / "rerun").glob("eval-*.json")), two)
    cases = [
        (tmp_path / "nope", "does not exist"),
        (tmp_path, "has no eval-*.json bundle"),
        (two, "holds 2 eval-*.json bundles: keep one run per folder"),
        (next(two.glob("eval-*.json")), "holds 2 eval-*.json bundles"),  # whose results.jsonl would it be?
    ]
    broken = copy_run("base", tmp_path / "broken")
    bundle = next(broken.glob("eval-*.json"))
    data = json.loads(bundle.read_text())
    data["benchmark"]["scores"] = {"summary": data["benchmark"]["scores"]["summary"]}
    bundle.write_text(json.dumps(data))
    cases.append((broken, "reports no pass@1 or mean_reward value"))
    for folder, why in cases:
        with pytest.raises(Day0Error, match=why.replace("*", r"\*").replace("(", r"\(")) as err:
            nel.task_names(folder)
        assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR and "\n" not in str(err.value)
    with pytest.raises(Day0Error, match="task 'gsm8k' is not in NeMo Evaluator output"):
        nel.task_names(DATA / "base", ["gsm8k"])
    mixed = RunConfig(model="demo", lm_eval_baseline=DATA / "base", lm_eval_candidate=tmp_path / "nope")
    with pytest.raises(Day0Error, match=r"is NeMo Evaluator output, the candidate folder .* is lm-eval output"):
        external_results.reader(mixed)


def test_a_reward_outside_0_1_cannot_be_paired(tmp_path: Path) -> None:
    lines = raw_lines("base")
    lines[0]["reward"] = 7.5
    bench = nel.parse_bundle(json.loads(next((DATA / "base").glob("eval-*.json")).read_text()),
                             DATA / "base" / "eval-x.json")
    with pytest.raises(Day0Error, match="reward outside \\[0, 1\\]") as err:
        nel.problem_records(bench, lines)
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert math.isclose(sum(r.correct or 0 for r in nel.problem_records(bench, raw_lines("base"))[0]), 60)


# ---------------------------------------------------------------------------------------------- end to end


def _session(pytester: pytest.Pytester, base: str, cand: str, *extra: str) -> tuple[Any, dict[str, Any], ET.Element]:
    ws = pytester.path / "ws"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--day0-model=demo", "--recipe", "fp8", f"--day0-lm-eval-baseline={DATA / base}",
        f"--day0-lm-eval-candidate={DATA / cand}", f"--day0-workdir={ws}",
        f"--junitxml={pytester.path / 'day0.xml'}", *extra)
    return result, json.loads((ws / "verdict.json").read_text()), ET.parse(pytester.path / "day0.xml").getroot()


def _props(junit: ET.Element, name: str) -> dict[str, str]:
    case = next(c for c in junit.iter("testcase") if c.get("name") == name)
    return {p.get("name") or "": p.get("value") or "" for p in case.iter("property")}


def test_two_nel_runs_gate_to_a_regression(pytester: pytest.Pytester) -> None:
    result, verdict, junit = _session(pytester, "base", "truncated")
    out = result.stdout.str()
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "REGRESSION" and v["regressed_tasks"] == [TASK], out
    (cmp,) = verdict["comparisons"]
    assert cmp["task"] == TASK and cmp["n"] == 60 and cmp["stat"] == "paired"
    assert cmp["delta"] == pytest.approx(29 / 60 - 1) and cmp["ci_high"] < -0.1
    report = json.loads((DATA / "nel_compare_base_truncated.json").read_text())
    nel_lost = sorted(f["problem_idx"] for f in report["flip_report"]["regressions"])
    assert cmp["flips"]["lost"] == [str(i) for i in nel_lost] and cmp["flips"]["gained"] == []  # problem order
    props = _props(junit, f"test_quality[fp8-{TASK}]")
    # the task's own decision: past the 10-point floor with its whole interval; the session's verdict is REGRESSION
    assert props["decision"] == "CATASTROPHIC_REGRESSION" and props["n"] == "60" and props["flips_lost"] == "31"
    assert result.ret == 1  # the floor (hard) fired: a 52-point drop


def test_two_identical_nel_runs_are_not_a_regression(pytester: pytest.Pytester) -> None:
    """No answer changed, but 60 problems cannot rule out a 1-point drop: not decided yet, never ACCEPT."""
    result, verdict, junit = _session(pytester, "base", "rerun")
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "INCONCLUSIVE", result.stdout.str()
    (cmp,) = verdict["comparisons"]
    assert cmp["delta"] == 0 and cmp["n"] == 60 and cmp["flips"]["lost"] == cmp["flips"]["gained"] == []
    assert _props(junit, f"test_quality[fp8-{TASK}]")["decision"] == "INCONCLUSIVE"
    assert result.ret == 0


def test_a_repeat_count_mismatch_stops_the_comparison(pytester: pytest.Pytester) -> None:
    result, verdict, _ = _session(pytester, "base", "once")
    v = verdict["session"]["verdicts"][0]
    assert v["decision"] == "ANOMALOUS" and "SAMPLE_ACCOUNTING_FAILED" in v["failure_classes"], result.stdout.str()
    assert verdict["comparisons"] == [] or all(c.get("quality") is None for c in verdict["comparisons"])
    assert "the baseline ran 2 repeats per problem, fp8 ran 1" in result.stdout.str()
    assert result.ret == 1


def test_a_nel_baseline_with_an_lm_eval_candidate_stops_in_one_line(pytester: pytest.Pytester) -> None:
    lm = pytester.path / "lm" / "org__Model"
    lm.mkdir(parents=True)
    (lm / "results_2026-03-14T09-26-53.589793.json").write_text("{}")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--day0-model=demo", "--recipe", "fp8",
                                           f"--day0-lm-eval-baseline={DATA / 'base'}",
                                           f"--day0-lm-eval-candidate={lm.parent}")
    assert result.ret == 4
    line = next(li for li in result.stderr.lines if "USER_CONFIG_ERROR" in li)
    assert line.startswith("ERROR: [USER_CONFIG_ERROR] the baseline folder") and "give two of a kind" in line
