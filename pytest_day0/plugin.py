"""pytest wiring only: options, the built-in suite's collection, fixtures, report hooks, xdist hooks.

Nothing here computes a decision: gates live in ``gates/``, the verdict in ``verdict.py``, report
formatting in ``report/``; this module moves their inputs and outputs between pytest's phases.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.config import OPTIONS, RunConfig, build_config
from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier

CONFIG_KEY = pytest.StashKey[RunConfig]()
STATE_KEY = pytest.StashKey["SessionState"]()
SUITE_PATH = Path(__file__).resolve().parent / "release" / "suite.py"
SUITE_NODEID = "day0"
WARNED = "warned"


class SessionState:
    """What the controller (or the only process) accumulates for the verdict and the reports."""

    def __init__(self, config: RunConfig, session_id: str, task_names: list[str], owner_pid: int) -> None:
        self.config = config
        self.session_id = session_id
        self.owner_pid = owner_pid  # the process that lives as long as the session (xdist: the controller)
        self.task_names = task_names
        self.outcomes: list[Any] = []
        self.chain: Any = None
        self.session_verdict: Any = None
        self.stopped_servers: list[str] = []


# ---------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("day0", "pytest-day0: a day-0 quantized model release as a test session")
    for option in OPTIONS:
        ini_type: Any = "bool" if option.kind == "bool" else "string"
        parser.addini(option.ini, option.help, type=ini_type, default=None)
        env_note = f" [env {option.env}, ini {option.ini}]"
        if option.kind == "bool":
            group.addoption(option.flag, action="store_true", default=False, dest=f"day0_{option.name}",
                            help=option.help + env_note)
        elif option.kind == "choice":
            group.addoption(option.flag, choices=option.choices, default=None, dest=f"day0_{option.name}",
                            help=option.help + f" (default {option.default})" + env_note)
        else:
            # No argparse type: numbers are validated with everything else in build_config, so a bad value is
            # one USER_CONFIG_ERROR line (argparse would print a multi-line usage dump instead).
            group.addoption(option.flag, default=None, dest=f"day0_{option.name}",
                            help=option.help + (f" (default {option.default})" if option.default is not None else "")
                            + env_note)


def _cli_values(config: pytest.Config) -> dict[str, Any]:
    return {o.name: config.getoption(f"day0_{o.name}") for o in OPTIONS}


def _ini_value(config: pytest.Config, key: str) -> Any:
    try:
        return config.getini(key)
    except (ValueError, KeyError):
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "day0_gate(name): a pytest-day0 release gate")
    try:
        run = build_config(_cli_values(config), lambda k: _ini_value(config, k), rootdir=config.rootpath)
    except Day0Error as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[CONFIG_KEY] = run
    if not run.enabled:
        return
    from pytest_day0.scoring.tasks import load_task

    try:
        if run.eval == "lm-eval":  # the tasks are whatever the baseline's lm-eval results logged samples for
            from pytest_day0.scoring.lm_eval import task_names

            assert run.lm_eval_baseline is not None
            names = task_names(run.lm_eval_baseline, run.tasks)
        else:
            names = [load_task(t, run.limit).name for t in run.tasks]
    except Day0Error as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    session_id = workerinput["day0_session"] if workerinput else uuid.uuid4().hex[:12]
    owner_pid = int(workerinput["day0_owner_pid"]) if workerinput else os.getpid()
    config.stash[STATE_KEY] = SessionState(run, session_id, names, owner_pid)
    if workerinput is None:
        _terminate_as_interrupt()


def _terminate_as_interrupt() -> None:
    """SIGTERM (a cancelled CI job, ``kill``) ends the session like Ctrl-C, so servers and jobs are stopped.

    pytest runs its session-finish hooks on KeyboardInterrupt but not on SIGTERM's default action.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone (a runner, the user) already decided what SIGTERM means

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_configure_node(node: Any) -> None:
    """xdist controller -> worker: one session id, so every process shares the same stage records."""
    state = node.config.stash.get(STATE_KEY, None)
    if state is not None:
        node.workerinput["day0_session"] = state.session_id
        node.workerinput["day0_owner_pid"] = state.owner_pid


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


# ---------------------------------------------------------------------- collection


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the built-in release suite first, before -k/-m deselection sees the list."""
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    module = pytest.Module.from_parent(session, path=SUITE_PATH, nodeid=SUITE_NODEID)
    from pytest_day0.release.suite import GATES, TIERS, collected

    suite_items = [item for item in session.genitems(module) if isinstance(item, pytest.Item)
                   and collected(item, state.config)]

    for item in suite_items:
        gate = GATES.get(getattr(item, "originalname", item.name), "")
        params = getattr(item, "callspec", None)
        values = params.params if params is not None else {}
        item.user_properties.append(("day0_gate", gate))
        item.user_properties.append(("tier", str(TIERS.get(gate, Tier.HARD))))
        for key in ("day0_recipe", "day0_task", "day0_side"):
            if key in values:
                item.user_properties.append((key.removeprefix("day0_"), str(values[key])))
    items[:0] = suite_items


# ---------------------------------------------------------------------- fixtures


def _state(request: pytest.FixtureRequest) -> SessionState:
    state = request.config.stash.get(STATE_KEY, None)
    if state is None:
        pytest.skip("pytest-day0 is not enabled: pass --day0-model")
    return state


def _chain(request: pytest.FixtureRequest) -> Any:
    from pytest_day0.release.chain import ReleaseChain

    state = _state(request)
    if state.chain is None:
        state.chain = ReleaseChain(state.config, state.session_id, progress=_progress_writer(request.config),
                                   owner_pid=state.owner_pid)
    return state.chain


@pytest.fixture(scope="session")
def day0_config(request: pytest.FixtureRequest) -> RunConfig:
    """The validated run configuration (CLI > environment > ini > defaults)."""
    return _state(request).config


@pytest.fixture(scope="session")
def day0_chain(request: pytest.FixtureRequest) -> Any:
    """The release chain: ``.quantized(recipe)``, ``.endpoint(side)``, ``.evaluation(side, task)`` ... run once."""
    return _chain(request)


@pytest.fixture(scope="session")
def day0_source_checkpoint(day0_chain: Any) -> Path:
    """The resolved source (baseline) checkpoint directory."""
    return Path(_or_skip(day0_chain.source))


@pytest.fixture(scope="session")
def day0_quantized(day0_chain: Any) -> Any:
    """The first recipe's quantize result (``.checkpoint``); use ``day0_chain.quantized(r)`` for others."""
    return _or_skip(lambda: day0_chain.quantized(day0_chain.config.recipes[0]))


@pytest.fixture(scope="session")
def day0_candidate_inspection(day0_chain: Any) -> Any:
    """Header-only inspection of the first recipe's checkpoint (per-layer precision, bytes, metadata)."""
    return _or_skip(lambda: day0_chain.candidate_inspection(day0_chain.config.recipes[0]))


@pytest.fixture(scope="session")
def day0_baseline_endpoint(day0_chain: Any) -> Any:
    """The served baseline (an Endpoint: url, model, api_key)."""
    return _or_skip(lambda: day0_chain.endpoint("baseline"))


@pytest.fixture(scope="session")
def day0_candidate_endpoint(day0_chain: Any) -> Any:
    """The served candidate of the first recipe."""
    return _or_skip(lambda: day0_chain.endpoint(day0_chain.config.recipes[0]))


@pytest.fixture(scope="session")
def day0_results(day0_chain: Any) -> dict[str, dict[str, Any]]:
    """side -> task -> TaskResult (baseline and the first recipe); records are in ``result.records_path``."""
    sides = ("baseline", day0_chain.config.recipes[0])
    return {s: {t.name: _or_skip(lambda s=s, t=t: day0_chain.evaluation(s, t.name))
                for t in _or_skip(day0_chain.tasks)} for s in sides}


def _or_skip(fn: Any) -> Any:
    try:
        return fn()
    except Day0Error as exc:
        pytest.skip(f"[{exc.failure_class}] {exc.message}")


# ---------------------------------------------------------------------- progress


def _progress_writer(config: pytest.Config) -> Any:
    """Stage lines reach the terminal even while output capture is on (-q: only ends of stages)."""
    verbosity = config.get_verbosity()

    def write(line: str) -> None:
        if verbosity < -1 or (verbosity < 0 and not (" done in " in line or " failed " in line)):
            return
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or not _is_controller(config):
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                _own_line(reporter, line)
        else:
            _own_line(reporter, line)

    return write


def _own_line(reporter: Any, line: str) -> None:
    """write_line ends a `file ...` progress line but not a bare `-q` row of dots: end that one too."""
    reporter.ensure_newline()
    tw = getattr(reporter, "_tw", None)
    if tw is not None and tw.width_of_current_line:
        reporter.write("\n")
    reporter.write_line(line)


# ---------------------------------------------------------------------- reports


def _prop(report: Any, key: str) -> Any:
    for k, v in getattr(report, "user_properties", []):
        if k == key:
            return v
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if _prop(item, "day0_gate") is None and call.excinfo is None:
        return report
    excinfo = call.excinfo
    # setup too: a stage failing inside a fixture is one line as well (a traceback would show its locals with -l)
    if excinfo is not None and isinstance(excinfo.value, (GateFailure, Day0Error)) and report.when in ("setup", "call"):
        exc = excinfo.value
        tier = getattr(exc, "tier", Tier.HARD)
        item.user_properties.append(("failure_class", str(exc.failure_class)))
        item.user_properties.append(("day0_message", exc.message))
        message = f"[{exc.failure_class}] {exc.message}"
        detail = getattr(exc, "detail", None)
        gate_mode = item.config.stash[CONFIG_KEY].gate_mode
        if tier is Tier.WARN and gate_mode != "hard":
            report.outcome = "skipped"
            report.wasxfail = message
            report.longrepr = None
            item.user_properties.append(("day0_status", WARNED))
        else:
            report.longrepr = message + (f"\n{detail}" if detail else "")
            item.user_properties.append(("day0_status", "failed"))
            if exc.failure_class is FailureClass.SYSTEMIC:
                # shouldfail, not shouldstop: pytest maps shouldstop to exit 2 ("interrupted by the user");
                # a systemic failure is a failed test (exit 1), as in the verdict's exit status.
                item.session.shouldfail = message
    elif report.when in ("setup", "call") and report.skipped and _prop(item, "day0_gate") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith("[") and "]" in reason:
            item.user_properties.append(("failure_class", reason[1:reason.index("]")]))
            reason = reason[reason.index("]") + 1:].strip()
        item.user_properties.append(("day0_message", reason))
        item.user_properties.append(("day0_status", "skipped"))
    elif report.when == "call" and report.passed and _prop(item, "day0_gate") is not None:
        item.user_properties.append(("day0_status", "passed"))
    report.user_properties = list(item.user_properties)
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    if report.when == "call" and _prop(report, "day0_status") == WARNED:
        return WARNED, "W", ("WARN", {"yellow": True})
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """On the controller: turn each gate test's final report into a GateOutcome for the verdict."""
    if report.when != "teardown" or _prop(report, "day0_gate") is None:
        return
    config = _CONFIG.get("config")
    if config is None or not _is_controller(config):
        return
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    from pytest_day0.report.outcomes import outcome_from_properties

    outcome = outcome_from_properties(report.nodeid, report.user_properties)
    if outcome is not None:
        state.outcomes.append(outcome)


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Any:
    """Before every other sessionfinish: pytest-json-report's (itself tryfirst) embeds the verdict there."""
    _finish_session(session)
    return (yield)


def _finish_session(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None or not _is_controller(config):
        return
    from pytest_day0.release.chain import ReleaseChain
    from pytest_day0.report import session_report

    chain = state.chain or ReleaseChain(state.config, state.session_id)
    state.stopped_servers = chain.stop_servers()
    if config.option.collectonly:  # nothing ran: no verdict, and the last real verdict.json stays
        return
    state.session_verdict = session_report.finish(state, config)
    systemic = any(o.status == "failed" and o.failure_class is FailureClass.SYSTEMIC for o in state.outcomes)
    if systemic and session.exitstatus == pytest.ExitCode.INTERRUPTED:
        # pytest-xdist turns a worker's shouldfail into an interruption; the run failed, nobody interrupted it.
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.session_verdict is None:
        return
    from pytest_day0.report import session_report

    for line in session_report.terminal_lines(state, config):
        terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_json_modifyreport(json_report: dict[str, Any]) -> None:
    config = _CONFIG.get("config")
    state = config.stash.get(STATE_KEY, None) if config else None
    if state is None or state.session_verdict is None:
        return
    from pytest_day0.report import session_report

    day0 = session_report.json_summary(state)
    rest = dict(json_report)
    json_report.clear()
    json_report["day0"] = day0
    json_report.update(rest)


@pytest.hookimpl(optionalhook=True)
def pytest_json_runtest_metadata(item: pytest.Item, call: pytest.CallInfo[None]) -> dict[str, Any]:
    if call.when != "call" or _prop(item, "day0_gate") is None:
        return {}
    return {"day0": {k: v for k, v in item.user_properties}}
