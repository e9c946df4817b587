"""A good citizen: installed in an environment, the plugin never breaks another pytest run, and what it says
at the start of a session (its errors, its counts) is true.

Real ``pytest`` subprocesses (pytester), judged on exit codes, stderr and the JUnit XML.
"""

from __future__ import annotations

import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_lm_eval_source import sides

from pytest_day0.failures import FailureClass
from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.stages.quantize import relevant_log_lines
from pytest_day0.verdict import decide

pytest_plugins = ["pytester"]
NEIGHBOURS = ("xdist", "pytest_jsonreport", "junitxml", "cacheprovider")  # plugins we work with, by plugin name
DEMO_MODEL = Path(__file__).resolve().parents[1] / "pytest_day0" / "demo" / "model"


@pytest.mark.parametrize("disabled", [c for n in range(len(NEIGHBOURS) + 1)
                                      for c in itertools.combinations(NEIGHBOURS, n)],
                         ids=lambda c: "+".join(c) or "none")
def test_an_unrelated_project_runs_with_any_neighbour_disabled(pytester: pytest.Pytester,
                                                               disabled: tuple[str, ...]) -> None:
    """``-p no:xdist`` once crashed every session of the environment (an xdist hook without optionalhook)."""
    pytester.makepyfile(test_one="def test_one():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess(*(a for name in disabled for a in ("-p", f"no:{name}")))
    assert result.ret == 0, result.stderr.str() + result.stdout.str()[-2000:]
    result.assert_outcomes(passed=1)
    assert "day0" not in result.stdout.str().lower().replace("day0-0.1.0", "")  # nothing of ours is printed


def test_a_release_runs_with_every_neighbour_disabled(pytester: pytest.Pytester, tmp_path: Path) -> None:
    base, cand = sides(tmp_path, gsm_lost=25)
    ws = tmp_path / "ws"
    args = [a for name in NEIGHBOURS for a in ("-p", f"no:{name}")]
    result = pytester.runpytest_subprocess(*args, "--day0-model=org/Model-8B", f"--day0-lm-eval-baseline={base}",
                                           f"--day0-lm-eval-candidate={cand}", f"--day0-workdir={ws}")
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert json.loads((ws / "verdict.json").read_text())["session"]["verdicts"][0]["decision"] == "REGRESSION"


def test_ini_keys_and_environment_alone_leave_other_sessions_alone(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A project that configures day0 in its ini for release runs keeps running its own tests unchanged."""
    pytester.makeini("[pytest]\nday0_limit = not-a-number\nday0_recipe = fp8\n")
    pytester.makepyfile(test_one="def test_one():\n    assert True\n")
    monkeypatch.setenv("DAY0_THRESHOLD", "0.02")
    result = pytester.runpytest_subprocess()
    assert result.ret == 0 and "USER_CONFIG_ERROR" not in result.stderr.str()
    bad = pytester.runpytest_subprocess("--day0-limit=0")  # a day0 flag typed on the command line is checked
    assert bad.ret == 4 and "[USER_CONFIG_ERROR] --day0-limit" in bad.stderr.str()


@pytest.mark.parametrize("flag", ["--day0-model", "--day0-vllm-python"])
def test_a_path_given_as_two_words_never_moves_rootdir_or_configfile(pytester: pytest.Pytester, tmp_path: Path,
                                                                     flag: str) -> None:
    """pytest decides its rootdir before our options exist; where it took our value for a test path, one line
    at the start says so and gives the fix (it used to run with the model's parent project's config)."""
    other = tmp_path / "other-project"
    (other / "models").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-x --strict-markers"\n')
    model = other / "models" / "m"
    model.symlink_to(DEMO_MODEL, target_is_directory=True)
    (other / "models" / "python").write_text("#!/bin/sh\n")
    value = str(model) if flag == "--day0-model" else str(other / "models" / "python")
    extra = [] if flag == "--day0-model" else ["--day0-model=demo"]
    result = pytester.runpytest_subprocess(flag, value, *extra, "--co", "-q")
    assert result.ret == 4
    err = [ln for ln in result.stderr.str().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"ERROR: [USER_CONFIG_ERROR] pytest read '{flag} {value}'")
    assert f"configfile {other / 'pyproject.toml'}" in err[0] and f"write {flag}={value} (one word)" in err[0]
    fixed = pytester.runpytest_subprocess(f"{flag}={value}", *extra, "--co")
    assert fixed.ret == 0, fixed.stderr.str()
    assert f"rootdir: {pytester.path}" in fixed.stdout.lines  # this directory, and no configfile: after it


def test_a_missing_model_is_one_line_and_runs_nothing(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = pytester.runpytest_subprocess(f"--day0-model={tmp_path / 'nonexistent'}",
                                           f"--junitxml={tmp_path / 'j.xml'}")
    assert result.ret == 4
    err = [ln for ln in result.stderr.str().splitlines() if ln.strip()]
    assert err == [f"ERROR: [USER_CONFIG_ERROR] --day0-model {tmp_path / 'nonexistent'}: no such path, and not an "
                   "org/name hub id"]
    assert not (pytester.path / ".day0" / "verdict.json").exists() and "ANOMALOUS" not in result.stdout.str()


def test_the_collected_count_is_what_runs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """No phantom items: without --day0-published no test_published_baseline is generated at all."""
    base, cand = sides(tmp_path)
    args = ["-p", "no:cacheprovider", "--day0-model=org/Model-8B", f"--day0-lm-eval-baseline={base}",
            f"--day0-lm-eval-candidate={cand}", f"--day0-workdir={tmp_path / 'ws'}"]
    listed = pytester.runpytest_subprocess(*args, "--co", "-q")
    count = int(next(ln.split()[0] for ln in listed.stdout.lines if " collected in " in ln))
    result = pytester.runpytest_subprocess(*args, f"--junitxml={tmp_path / 'j.xml'}")
    header = next(ln for ln in result.stdout.lines if ln.startswith("collected "))
    cases = list(ET.parse(tmp_path / "j.xml").getroot().iter("testcase"))
    assert header == f"collected {count} items" and len(cases) == count
    assert not any("published" in (c.get("name") or "") for c in cases)
    assert all(p.get("value") is not None for c in cases for p in c.iter("property") if p.get("name") ==
               "failure_class")  # every gate test carries failure_class, empty on a pass
    assert {p.get("value") for c in cases for p in c.iter("property") if p.get("name") == "failure_class"} >= {""}


def test_the_reason_behind_a_verdict_is_said_once() -> None:
    cause = "PTQ nvfp4_experts_only: RuntimeError: no weight quantizer is enabled"
    outcomes = [GateOutcome(gate="ptq", recipe="r", status="failed", failure_class=FailureClass.MODEL_UNSUPPORTED,
                            message=cause)]
    outcomes += [GateOutcome(gate=g, recipe="r", task=t, status="skipped", failure_class=FailureClass.MODEL_UNSUPPORTED,
                             message=f"upstream {w} r failed: {cause}")
                 for g, w in (("floor", "deploy"), ("quality", "deploy"), ("ptq.size", "PTQ"))
                 for t in ("a", "b", "c", "d", "e", "f", "g")]
    verdict = decide("r", outcomes, None)
    assert verdict.decision == "INFEASIBLE"
    assert verdict.reasons == [f"[MODEL_UNSUPPORTED] ptq failed: {cause}",
                               "[MODEL_UNSUPPORTED] 21 more gates downstream skipped for the same reason"]


def test_upstream_advice_that_cannot_apply_is_not_shown() -> None:
    log = ["RuntimeError: The quantization config asks for weight quantization but no weight quantizer is",
           "Either the patterns do not match this architecture's module names (check the model-specific recipes",
           "Under pipeline parallelism, a rank whose local stage genuinely has none of the targeted modules",
           "just a wrong per-rank verdict. Set MODELOPT_SKIP_WEIGHT_QUANT_CHECK=1 to bypass this",
           "check in that situation -- note this is process-global, so it silences the check on every rank"]
    assert relevant_log_lines(log) == log[:2]
