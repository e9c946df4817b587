"""A stage error raised while a fixture sets up is reported like one raised in a test body: one line with its class.

Why it matters: pytest's default setup-error report is a traceback, and with ``-l`` a traceback prints the
frame's locals, which is where a passphrase or API key would be sitting.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]


def test_day0_error_in_fixture_setup_is_one_line_with_its_class(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_day0.failures import Day0Error, FailureClass

        @pytest.fixture
        def endpoint():
            secret_in_a_local = "canary-local-7f3a"
            raise Day0Error(FailureClass.INFRA_TRANSIENT, "server at 127.0.0.1:9 refused")

        def test_uses_it(endpoint):
            pass
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("-l", "--tb=long", f"--junitxml={junit}", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case is not None
    error = case.find("error")
    assert error is not None
    text = (error.text or "") + error.get("message", "")
    assert "[INFRA_TRANSIENT] server at 127.0.0.1:9 refused" in text
    assert "canary-local-7f3a" not in text and "Traceback" not in text
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props.get("failure_class") == "INFRA_TRANSIENT"
    assert "canary-local-7f3a" not in result.stdout.str()
