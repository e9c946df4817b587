"""pytest wiring only: options, the built-in suite's collection, fixtures, report hooks, xdist hooks.

Nothing here computes a decision: gates live in ``gates/``, the verdict in ``verdict.py``, report formatting in
``report/``; this module moves their inputs and outputs between pytest's phases. Inert unless ``--day0-model``
is given: a session that does not use it pays one option table and one config check. Per-session state lives in
``config.stash`` and in one ``Day0Session`` object registered per session (never in module globals).
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.options import OPTIONS
from pytest_day0.release.state import (
    COMPARISON_KEY,
    CONFIG_KEY,
    IDENTITY_KEY,
    OUTCOME_KEY,
    STATE_KEY,
    GateIdentity,
    SessionState,
)

if TYPE_CHECKING:  # imported where used: a session that does not use the plugin never loads pydantic for it
    from pytest_day0.config import RunConfig
    from pytest_day0.gates.outcome import GateOutcome

SUITE_PATH = Path(__file__).resolve().parent / "release" / "suite.py"
SUITE_NODEID = "day0"
WARNED = "warned"
OUTCOME_PROPERTY = "day0_outcome"  # the one JSON property the controller reads back with the model's validation


# ---------------------------------------------------------------------- options


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_day0 import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


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


def _asked_for(config: pytest.Config) -> bool:
    """Is the plugin used in this session: a model to release, or any day0 flag on the command line (which must
    then be valid)? Day0 ini keys or environment variables alone leave other sessions of a project alone."""
    cli = _cli_values(config)
    if any(v not in (None, False) for v in cli.values()):
        return True
    return bool(os.environ.get("DAY0_MODEL") or _ini_value(config, "day0_model"))


def _split_values(args: list[str]) -> list[tuple[str, str]]:
    """Day0 options given as two words (``--day0-model /path``): (flag, value) pairs."""
    flags = {o.flag for o in OPTIONS if o.kind != "bool"}
    return [(a, args[i + 1]) for i, a in enumerate(args[:-1]) if a in flags]


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """pytest picks its rootdir and configfile before any plugin's options exist, so the value of
    ``--day0-model /path`` is taken for a test path and can move both into the model's tree (and apply another
    project's addopts). We cannot steer pytest there; we can see it happened and stop with the fix, in one line."""
    split = _split_values(args)
    if not split:
        return
    try:
        from _pytest.config.findpaths import determine_setup  # pytest's own rule, so the comparison is exact
    except ImportError:  # pragma: no cover - a pytest that moved it: no check rather than a wrong one
        return
    ns = parser.parse_known_args(args)  # now with our options known: their values are no test paths
    try:
        rootpath, inipath, *_ = determine_setup(inifile=ns.inifilename, override_ini=ns.override_ini,
                                                args=ns.file_or_dir, rootdir_cmd_arg=ns.rootdir or None,
                                                invocation_dir=early_config.invocation_params.dir)
    except Exception:  # pytest will report its own configuration problems
        return
    if (rootpath, inipath) == (early_config.rootpath, early_config.inipath):
        return
    invocation = early_config.invocation_params.dir
    flag, value = next(((f, v) for f, v in split if (invocation / v).expanduser().exists()), split[0])
    took = f"rootdir {early_config.rootpath}" + (f" and configfile {early_config.inipath}"
                                                 if early_config.inipath != inipath else "")
    raise pytest.UsageError(
        f"[{FailureClass.USER_CONFIG_ERROR}] pytest read '{flag} {value}' before pytest-day0 could claim it and took "
        f"{value} for a test path, which made {took}: write {flag}={value} (one word), as with every "
        "path-valued day0 option")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "day0_gate(name): a pytest-day0 release gate")
    if not _asked_for(config):
        return  # inert: nothing imported, nothing registered
    from pytest_day0.config import build_config

    try:
        run = build_config(_cli_values(config), lambda k: _ini_value(config, k),
                           rootdir=config.invocation_params.dir)
    except Day0Error as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[CONFIG_KEY] = run
    if not run.enabled:
        return
    if run.quantize != "none":  # the model is a label only for lm-eval folders / external endpoints
        from pytest_day0.stages.source import resolve_model

        assert run.model is not None
        try:
            resolve_model(run.model)
        except Day0Error as exc:
            raise pytest.UsageError(str(exc)) from None
    try:
        names = _task_names(config, run)
    except Day0Error as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    session_id = workerinput["day0_session"] if workerinput else uuid.uuid4().hex[:12]
    owner_pid = int(workerinput["day0_owner_pid"]) if workerinput else os.getpid()
    state = SessionState(run, session_id, names, owner_pid, controller=workerinput is None)
    config.stash[STATE_KEY] = state
    config.pluginmanager.register(Day0Session(config, state), f"day0-session-{session_id}")
    if state.controller and not config.option.collectonly:
        from pytest_day0.release.runner import start_session
        from pytest_day0.workspace import Workspace

        try:  # the once-per-session decisions every worker reads (whether this session is fresh)
            start_session(Workspace(run.workdir), session_id, fresh=run.fresh)
        except (Day0Error, OSError) as exc:
            raise pytest.UsageError(f"[{FailureClass.USER_CONFIG_ERROR}] --day0-workdir {run.workdir}: {exc}") \
                from None
        _terminate_as_interrupt()


def _task_names(config: pytest.Config, run: RunConfig) -> list[str]:
    """The names the suite is parametrized with: task files, what lm-eval folders logged, or what an engine that
    resolves names itself (lm-eval's registry) makes of them. Its progress lines reach the terminal (the first
    resolution of lm-eval names loads datasets); an xdist worker reads the controller's resolution back."""
    if run.lm_eval_folders:  # the tasks are whatever the baseline's lm-eval (or NeMo Evaluator) results logged
        from pytest_day0.scoring.external_results import task_names

        return task_names(run)
    from pytest_day0.engines import eval_engine

    engine = eval_engine(run.eval)
    if engine.tasks is not None:
        quiet = config.get_verbosity() < 0 or getattr(config, "workerinput", None) is not None

        def say(line: str) -> None:
            if not quiet:
                print(line, file=sys.stderr, flush=True)

        return [t.name for t in engine.tasks(run, say)]
    from pytest_day0.scoring.tasks import load_task

    return [load_task(t, run.limit).name for t in run.tasks]


def _terminate_as_interrupt() -> None:
    """SIGTERM (a cancelled CI job, ``kill``) and SIGHUP end the session like Ctrl-C, so servers and jobs are
    stopped: pytest runs its session-finish hooks on KeyboardInterrupt but not on those signals' default action.
    A second one does not cut that cleanup short (it would orphan the servers); a third quits at once."""
    import signal
    import threading

    from pytest_day0.signals import StopSignals

    if threading.current_thread() is not threading.main_thread():
        return
    StopSignals((signal.SIGTERM, signal.SIGHUP)).install()  # a handler someone else set is left alone


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller -> worker: one session id, so every process shares the same stage records."""
    state = node.config.stash.get(STATE_KEY, None)
    if state is not None:
        node.workerinput["day0_session"] = state.session_id
        node.workerinput["day0_owner_pid"] = state.owner_pid


# ---------------------------------------------------------------------- collection


class ReleaseSuite(pytest.Module):
    """The built-in suite as a module; gates that do not apply to this run are never generated (no phantom
    items: the 'collected N items' header counts what runs)."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        from pytest_day0.release.chain import divergence_applies
        from pytest_day0.release.suite import published_tasks

        state = self.config.stash[STATE_KEY]
        dropped = set()
        if not published_tasks(state.config, state.task_names):
            dropped.add("test_published_baseline")
        if not divergence_applies(state.config):
            dropped.add("test_divergence")
        return [node for node in super().collect() if getattr(node, "originalname", node.name) not in dropped]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the built-in release suite first, before -k/-m deselection sees the list."""
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    from pytest_day0.release.suite import GATES, TIERS

    module = ReleaseSuite.from_parent(session, path=SUITE_PATH, nodeid=SUITE_NODEID)
    suite_items = [item for item in session.genitems(module) if isinstance(item, pytest.Item)]
    for item in suite_items:
        gate = GATES.get(getattr(item, "originalname", item.name), "")
        params = getattr(item, "callspec", None)
        values = params.params if params is not None else {}
        identity = GateIdentity(gate=gate, tier=TIERS.get(gate, Tier.HARD), recipe=values.get("day0_recipe"),
                                task=values.get("day0_task"), side=values.get("day0_side"))
        item.stash[IDENTITY_KEY] = identity
        item.user_properties.append(("day0_gate", gate))
        item.user_properties.append(("tier", str(identity.tier)))
        for key in ("recipe", "task", "side"):
            if getattr(identity, key) is not None:
                item.user_properties.append((key, str(getattr(identity, key))))
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
                                   owner_pid=state.owner_pid, while_waiting=_report_prewarm(state))
    return state.chain


def _report_prewarm(state: SessionState) -> Callable[[], None] | None:
    """The process that writes the reports (the controller) warms up its plotting while stages wait on children."""
    if not state.controller:
        return None
    from pytest_day0.report.plot import prewarm

    return prewarm


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


def _progress_path(state: SessionState) -> Path:
    return state.config.workdir / "runs" / state.session_id / "progress.log"


def _progress_writer(config: pytest.Config) -> Any:
    """Stage lines reach the terminal even while output capture is on (-q: only ends of stages). An xdist worker
    has no terminal: it appends its lines to the session's progress log, which the controller prints as they come."""
    verbosity = config.get_verbosity()
    state = config.stash[STATE_KEY]

    def write(line: str) -> None:
        if verbosity < -1 or (verbosity < 0 and not (" done in " in line or " failed " in line)):
            return
        if not state.controller:
            path = _progress_path(state)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:  # one write per line: O_APPEND keeps lines whole
                fh.write(line.replace("\n", " ") + "\n")
            return
        _terminal_line(config, line)

    return write


def _terminal_line(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            _own_line(reporter, line)
    else:
        _own_line(reporter, line)


def _own_line(reporter: Any, line: str) -> None:
    """write_line ends a `file ...` progress line but not a bare `-q` row of dots: end that one too."""
    reporter.ensure_newline()
    tw = getattr(reporter, "_tw", None)
    if tw is not None and tw.width_of_current_line:
        reporter.write("\n")
    reporter.write_line(line)


# ---------------------------------------------------------------------- reports


def _outcome_of(item: pytest.Item, identity: GateIdentity, call: pytest.CallInfo[None],
                warn_as_error: bool) -> GateOutcome:
    """The gate's typed outcome: the one its test attached, else the one its exception carries."""
    from pytest_day0.gates.outcome import GateOutcome, breach_status
    from pytest_day0.release.suite import UpstreamSkip

    attached = item.stash.get(OUTCOME_KEY, None)
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, UpstreamSkip):
        built = GateOutcome(gate=identity.gate, status="skipped", tier=identity.tier,
                            failure_class=exc.failure_class, message=exc.day0_message)
        outcome = attached if attached is not None and attached.status == "skipped" else built
    elif isinstance(exc, pytest.skip.Exception):
        outcome = GateOutcome(gate=identity.gate, status="skipped", tier=identity.tier,
                              message=" ".join(str(exc.msg or "").split()))
    elif isinstance(exc, (GateFailure, Day0Error)):
        tier = exc.tier if isinstance(exc, GateFailure) else Tier.HARD
        if attached is not None and attached.status in ("failed", "warned"):
            outcome = attached
        else:
            outcome = GateOutcome(gate=identity.gate, tier=tier, failure_class=exc.failure_class,
                                  message=exc.message, status=breach_status(False, tier, warn_as_error=warn_as_error))
    elif exc is not None:  # a bug, in our suite or in a stage: say so, with its type; the traceback stays
        outcome = GateOutcome(gate=identity.gate, status="failed", tier=Tier.HARD, failure_class=FailureClass.UNKNOWN,
                              message=" ".join(f"{type(exc).__name__}: {exc}".split())[:500])
    else:
        outcome = attached or GateOutcome(gate=identity.gate, status="passed", tier=identity.tier)
    return outcome.model_copy(update={
        "recipe": outcome.recipe or identity.outcome_recipe(), "task": outcome.task or identity.task,
        "side": outcome.side or identity.side, "nodeid": item.nodeid})


def _set_properties(item: pytest.Item, outcome: GateOutcome) -> None:
    """Flat properties every JUnit/JSON reader shows (failure_class empty on a pass), plus the typed outcome."""
    props = [(k, v) for k, v in item.user_properties if k != "tier"]
    props += [("tier", str(outcome.tier)), ("day0_status", outcome.status),
              ("failure_class", str(outcome.failure_class or "")), ("day0_message", outcome.message)]
    taken = {k for k, _ in props}
    props += [(k, v if isinstance(v, (int, float, str)) else str(v)) for k, v in outcome.numbers.items()
              if v is not None and k not in taken]
    props.append((OUTCOME_PROPERTY, outcome.model_dump_json()))
    item.user_properties[:] = props


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Inner wrapper (trylast): its properties are in place before pytest-json-report reads the metadata."""
    report = yield
    identity = item.stash.get(IDENTITY_KEY, None)
    excinfo = call.excinfo
    if identity is None:  # a user's own test: a stage failing inside one of our fixtures is one line as well
        if excinfo is not None and isinstance(excinfo.value, (GateFailure, Day0Error)) and report.when != "teardown":
            report.longrepr = str(excinfo.value)
            item.user_properties += [("failure_class", str(excinfo.value.failure_class)),
                                     ("day0_message", excinfo.value.message)]
            report.user_properties = list(item.user_properties)
        return report
    decided = report.when == "call" or (report.when == "setup" and not report.passed)
    if decided:
        config = item.config.stash[CONFIG_KEY]
        outcome = _outcome_of(item, identity, call, warn_as_error=config.gate_mode == "hard")
        _set_properties(item, outcome)
        message = f"[{outcome.failure_class}] {outcome.message}" if outcome.failure_class else outcome.message
        if outcome.status == "skipped" and isinstance(report.longrepr, tuple):  # ours, not the exception's type
            report.longrepr = (report.longrepr[0], report.longrepr[1], message)
        elif outcome.status == WARNED:
            report.outcome = "skipped"
            report.wasxfail = message
            report.longrepr = None
        elif outcome.status == "failed" and excinfo is not None and isinstance(excinfo.value, (GateFailure, Day0Error)):
            detail = excinfo.value.detail if isinstance(excinfo.value, GateFailure) else None
            report.longrepr = message + (f"\n{detail}" if detail else "")
            if outcome.failure_class is FailureClass.SYSTEMIC or (
                    identity.gate == "setup" and outcome.failure_class is FailureClass.USER_CONFIG_ERROR):
                # shouldfail, not shouldstop: pytest maps shouldstop to exit 2 ("interrupted by the user"); the
                # run failed and nothing later can succeed.
                item.session.shouldfail = message
        if getattr(item.config.option, "htmlpath", None):  # pytest-html writes a report: our numbers and plot in it
            from pytest_day0.report.html_extras import gate_extras

            comparison = item.stash.get(COMPARISON_KEY, None)
            report.extras = [*getattr(report, "extras", []), *gate_extras(outcome, comparison)]
    report.user_properties = list(item.user_properties)
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    if report.when == "call" and any(k == "day0_status" and v == WARNED for k, v in report.user_properties):
        return WARNED, "W", ("WARN", {"yellow": True})
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_json_runtest_metadata(item: pytest.Item, call: pytest.CallInfo[None]) -> dict[str, Any]:
    if IDENTITY_KEY not in item.stash or not any(k == OUTCOME_PROPERTY for k, _ in item.user_properties):
        return {}
    return {"day0": {k: v for k, v in item.user_properties if k != OUTCOME_PROPERTY}}


# a server start (a reused checkpoint still prints "PTQ <recipe> done in", a re-run starts no server)
_STAGE_RAN = re.compile(r"\[day0\] serve [^\s:]+ (\.\.\.|done in )")


class _ProgressRelay:
    """On the xdist controller: prints the lines workers append to the session's progress log, as they come."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        import threading

        self.config = config
        self.path = path
        self.offset = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="day0-progress", daemon=True)

    def _pump(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next round
        self.offset += len(whole)
        for line in whole.decode("utf-8", errors="replace").splitlines():
            if _STAGE_RAN.match(line):  # a worker started a server: this session will draw a new plot
                from pytest_day0.report.plot import prewarm

                prewarm()
            _terminal_line(self.config, line)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._pump()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._pump()


class Day0Session:
    """The hooks of one release session (registered per session in ``pytest_configure``)."""

    def __init__(self, config: pytest.Config, state: SessionState) -> None:
        self.config = config
        self.state = state
        self.relay: _ProgressRelay | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        uses_workers = getattr(self.config.option, "numprocesses", None) not in (None, 0) and \
            self.config.pluginmanager.has_plugin("xdist")
        if self.state.controller and uses_workers and not self.config.option.collectonly:
            self.relay = _ProgressRelay(self.config, _progress_path(self.state))
            self.relay.thread.start()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """On the controller: each gate test's final report carries its typed outcome; read it back once."""
        if report.when != "teardown" or not self.state.controller:
            return
        raw = next((v for k, v in reversed(report.user_properties) if k == OUTCOME_PROPERTY), None)
        if isinstance(raw, str):
            from pytest_day0.gates.outcome import GateOutcome

            self.state.outcomes.append(GateOutcome.model_validate_json(raw))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> Any:
        """Before every other sessionfinish: pytest-json-report's (itself tryfirst) embeds the verdict there."""
        if self.state.controller:
            self._finish(session)
        return (yield)

    def _finish(self, session: pytest.Session) -> None:
        from pytest_day0.release.chain import ReleaseChain
        from pytest_day0.report import session_report

        if self.relay is not None:
            self.relay.close()
        state = self.state
        chain = state.chain or ReleaseChain(state.config, state.session_id)
        if self.config.option.collectonly:  # nothing ran: no verdict, and the last real verdict.json stays
            state.stopped_servers = chain.stop_servers()
            chain.close()
            return
        # the servers stop (each a grace period of waiting) while the reports, which never need them, are written
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="day0-stop") as pool:
            stopping = pool.submit(chain.stop_servers)
            try:
                session_report.finish(state, self.config)
            finally:
                state.stopped_servers = stopping.result()
                chain.close()
        systemic = any(o.status == "failed" and o.failure_class is FailureClass.SYSTEMIC for o in state.outcomes)
        if systemic and session.exitstatus == pytest.ExitCode.INTERRUPTED:
            # pytest-xdist turns a worker's shouldfail into an interruption; the run failed, nobody interrupted it.
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.state.session_verdict is None:
            return
        from pytest_day0.report import session_report

        for line in session_report.terminal_lines(self.state):
            terminalreporter.write_line(line)

    @pytest.hookimpl(optionalhook=True)
    def pytest_json_modifyreport(self, json_report: dict[str, Any]) -> None:
        if self.state.session_verdict is None:
            return
        from pytest_day0.report import session_report

        day0 = session_report.json_summary(self.state)
        rest = dict(json_report)
        json_report.clear()
        json_report["day0"] = day0
        json_report.update(rest)

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(self, prefix: list[str], summary: list[str], postfix: list[str],
                                    session: pytest.Session) -> None:
        """pytest-html's summary (after our session finish): the verdict, the plot, where report.html is."""
        if self.state.session_verdict is None:
            return
        from pytest_day0.report.html_extras import summary_html

        prefix.append(summary_html(self.state.session_verdict, self.state.comparisons, self.state.report_path))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        config.pluginmanager.unregister(self)
