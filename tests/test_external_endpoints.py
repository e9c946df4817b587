"""External endpoints name their model: no silent first pick from a server that serves several.

The servers are real HTTP servers on 127.0.0.1 (tests/fakes: a deterministic toy model); the sessions are real
``pytest --day0-serve external`` subprocesses, judged on their JUnit XML and verdict.json.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from fakes.openai_server import ToyOpenAIServer

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages.serve import external_endpoint

pytest_plugins = ["pytester"]


def test_several_models_and_none_named_is_one_config_error() -> None:
    with ToyOpenAIServer() as server:
        server.state.models = ["org/base", "org/base-fp8"]
        with pytest.raises(Day0Error) as info:
            external_endpoint(server.url, model_flag="--day0-baseline-model")
        assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR
        assert str(info.value) == (f"[USER_CONFIG_ERROR] {server.url}: endpoint serves several models (org/base, "
                                   "org/base-fp8): name the one to evaluate with --day0-baseline-model")
        assert external_endpoint(server.url, "org/base-fp8").model == "org/base-fp8"
        with pytest.raises(Day0Error, match="does not serve model 'org/other'"):
            external_endpoint(server.url, "org/other")


def _session(pytester: pytest.Pytester, url: str, *extra: str) -> tuple[pytest.RunResult, dict[str, dict[str, str]]]:
    ws = pytester.path / "ws"
    junit = pytester.path / "day0.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--day0-model=org/base", "--recipe", "fp8", "--day0-quantize=none",
        "--day0-serve=external", f"--day0-baseline-url={url}", f"--day0-candidate-url={url}",
        "--day0-tasks=gsm_like", "--day0-limit=5", f"--day0-workdir={ws}", f"--junitxml={junit}", *extra)
    cases = {tc.get("name", ""): {p.get("name", ""): p.get("value", "") for p in tc.iter("property")}
             for tc in ET.parse(junit).getroot().iter("testcase")}
    return result, cases


def test_the_release_refuses_to_guess_which_model(pytester: pytest.Pytester) -> None:
    with ToyOpenAIServer() as server:
        server.state.models = ["org/base", "org/base-fp8"]
        result, cases = _session(pytester, server.url)
        assert result.ret == 1, result.stdout.str()[-2000:]
        assert list(cases) == ["test_setup"]  # the session stops at setup: nothing was scored against a guess
        assert cases["test_setup"]["failure_class"] == "USER_CONFIG_ERROR"
        assert "serves several models (org/base, org/base-fp8)" in cases["test_setup"]["day0_message"]
        assert server.request_count("/v1/completions") == 0
        verdict = json.loads((pytester.path / "ws" / "verdict.json").read_text())
        assert verdict["session"]["verdicts"][0]["decision"] == "ANOMALOUS"


def test_named_models_are_the_ones_asked_for(pytester: pytest.Pytester) -> None:
    with ToyOpenAIServer() as server:
        server.state.models = ["org/base", "org/base-fp8"]
        result, cases = _session(pytester, server.url, "--day0-baseline-model=org/base",
                                 "--day0-candidate-model=org/base-fp8")
        setup = cases["test_setup"]
        assert setup["day0_status"] == "passed", result.stdout.str()[-2000:]
        assert (setup["baseline_model"], setup["fp8_model"]) == ("org/base", "org/base-fp8")
        completions = [r["body"] for r in server.state.requests if r["path"] == "/v1/completions"]
        assert sorted({body.get("model") for body in completions}) == ["org/base", "org/base-fp8"]
        # 5 samples per side scored, and the divergence pre-check's 5 texts per side (echo, top-20 logprobs)
        assert len([body for body in completions if not body.get("echo")]) == 10
        prechecked = [body for body in completions if body.get("echo")]
        assert len(prechecked) == 10 and {body["logprobs"] for body in prechecked} == {20}


def test_model_names_without_external_serving_are_refused(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--day0-model=demo", "--day0-baseline-model=x")
    assert result.ret == 4
    assert "ERROR: [USER_CONFIG_ERROR] --day0-baseline-model/--day0-candidate-model name the models of external " \
           "endpoints: add --day0-serve external" in result.stderr.str()
