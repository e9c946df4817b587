"""``python -m pytest_day0``: help that says what every option does and defaults to, serve's --host/--port/
--max-batch, and bad input refused at once as one ``[USER_CONFIG_ERROR]`` line with exit 2.

Run as a user runs it (a subprocess of the real CLI); the serve cases start the real reference server on
127.0.0.1 (or 127.0.0.2, a loopback address the allow flag is needed for) and read the machine (/proc, sockets).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from _procs import port_refuses, processes_mentioning, wait_for

from pytest_day0.__main__ import build_parser
from pytest_day0.config import build_config, check_endpoint_url
from pytest_day0.failures import Day0Error, FailureClass

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    return dict(env, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_day0", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess[str], cls: str, code: int, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"[{cls}] "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_is_plain_text_and_lists_every_command(tmp_path: Path) -> None:
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout  # reStructuredText markup printed literally
    for command in ("inspect", "quantize", "serve", "evaluate", "release"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), (command, proc.stdout)


@pytest.mark.parametrize("command", ["inspect", "quantize", "serve", "evaluate"])
def test_every_option_has_help_and_shows_its_default(command: str, tmp_path: Path) -> None:
    sub = _subparsers(build_parser())[command]
    actions = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    shown = " ".join(cli(command, "--help", cwd=tmp_path).stdout.split())
    for action in actions:
        assert action.help and len(action.help) > 10, (command, action.dest)
        if action.option_strings and not action.required:
            # the default is printed, or (no value by default) the help says what happens then
            expected = "default: off" if action.default is False else f"default: {action.default}"
            assert (expected in shown if action.default is not None else "default" in action.help), \
                (command, action.dest, expected)


def test_serve_exposes_host_port_and_max_batch(tmp_path: Path) -> None:
    options = {o for a in _subparsers(build_parser())["serve"]._actions for o in a.option_strings}
    assert {"--host", "--port", "--max-batch", "--allow-remote-bind"} <= options


def test_the_cli_parser_reads_the_servers_limits_without_importing_the_server_or_httpx() -> None:
    """The reference server's limits live in pytest_day0.serving, so `evaluate --help` and argument checks start
    without torch (the server) or httpx (the serve stage): ~0.3 s of every CLI start-up."""
    out = subprocess.run([sys.executable, "-c", "import sys; from pytest_day0.__main__ import build_parser; "
                          "build_parser(); print(sorted(m for m in ('torch', 'httpx') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]
    from pytest_day0.serving import REFERENCE_MAX_BATCH, reference_server

    assert reference_server.MAX_BATCH == REFERENCE_MAX_BATCH


# ---------------------------------------------------------------------------------------------- bad input


BAD_URLS = [
    pytest.param("127.0.0.1:8000", "must be an http(s) URL", id="no-scheme"),
    pytest.param("http://127.0.0.1:99999", "Port out of range", id="port-99999"),
    pytest.param("http://127.0.0.1:0", "port 0", id="port-0"),
    pytest.param("http://127.0.0.1:http", "not a valid URL", id="port-not-a-number"),
    pytest.param("http://:8000", "names no host", id="no-host"),
    pytest.param("http://me:s3cret@127.0.0.1:8000", "no credentials", id="credentials"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_evaluate_bad_url_is_one_config_error_at_once(url: str, why: str, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = cli("evaluate", "--url", url, "--model", "m", "--task", "arc_like", "--side", "baseline",
               "--records", "r.jsonl", cwd=tmp_path)
    took = time.monotonic() - started
    line = assert_one_line(proc, "USER_CONFIG_ERROR", 2, "--url", why)
    assert "s3cret" not in line
    assert not (tmp_path / "r.jsonl").exists()  # nothing ran
    assert took < 15, took  # no retries: before, a scheme-less URL took 4 attempts (~23 s)


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_config_refuses_the_same_urls(url: str, why: str) -> None:
    with pytest.raises(Day0Error) as info:
        build_config({"model": "demo", "serve": "external", "baseline_url": url,
                      "candidate_url": "http://127.0.0.1:8001"}, lambda _k: None, environ={})
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert why in str(info.value) and "s3cret" not in str(info.value)


def test_endpoint_url_is_normalised() -> None:
    assert check_endpoint_url(" http://127.0.0.1:8000/v1/ ") == "http://127.0.0.1:8000"
    assert check_endpoint_url("https://api.example.org") == "https://api.example.org"


@pytest.mark.parametrize(("args", "needle"), [
    pytest.param(["--side", "basline"], "invalid choice: 'basline'", id="side-typo"),
    pytest.param([], "required: --side", id="side-missing"),
    pytest.param(["--side", "baseline", "--limit", "0"], "--limit: must be at least 1", id="limit-0"),
    pytest.param(["--side", "baseline", "--concurrency", "x"], "--concurrency: not a whole number", id="conc-x"),
])
def test_evaluate_bad_options(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = cli("evaluate", "--url", "http://127.0.0.1:9", "--model", "m", "--task", "arc_like", "--records",
               "r.jsonl", *args, cwd=tmp_path)
    assert_one_line(proc, "USER_CONFIG_ERROR", 2, needle)


@pytest.mark.parametrize(("args", "needle"), [
    pytest.param(["serve", "demo", "--host", "0.0.0.0"], "--allow-remote-bind", id="remote-host"),
    pytest.param(["serve", "demo", "--port", "99999"], "port must be 0-65535", id="port-99999"),
    pytest.param(["serve", "demo", "--max-batch", "0"], "--max-batch: must be at least 1", id="max-batch-0"),
    pytest.param(["quantize", "--out", "o", "--calibration", "missing.txt"], "no such file", id="calibration"),
    pytest.param(["quantize", "--recipe", "w8a8", "--out", "o"], "is made by llmcompressor, not ModelOpt",
                 id="recipe-of-another-engine"),
    pytest.param(["quantize", "--model", "/nope", "--out", "o"], "--model /nope: no such path", id="no-model"),
    pytest.param(["serve", "/nope"], "checkpoint /nope: no such path", id="no-checkpoint"),
    pytest.param([], "required: COMMAND", id="no-command"),
    pytest.param(["serv"], "invalid choice: 'serv'", id="unknown-command"),
])
def test_bad_input_starts_nothing(args: list[str], needle: str, tmp_path: Path) -> None:
    """Including messages that name this command's arguments, not the plugin's (--day0-model)."""
    proc = cli(*args, "--workdir", "logs", cwd=tmp_path) if args[:1] == ["serve"] else cli(*args, cwd=tmp_path)
    assert "--day0-" not in assert_one_line(proc, "USER_CONFIG_ERROR", 2, needle).split("release:")[0]
    assert not (tmp_path / "logs").exists() and not (tmp_path / "o").exists()  # no server, no PTQ started
    assert processes_mentioning(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------- serve, real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _servers(tmp_path: Path) -> list[str]:
    return [p for p in processes_mentioning(str(tmp_path / "logs")) if "pytest_day0.serving.reference_server" in p]


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``serve demo ARGS`` until it printed its URL; SIGTERM (and a check that it took the server along) after."""
    out = (tmp_path / "serve.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pytest_day0", "serve", "demo", "--workdir", str(tmp_path / "logs"),
                             *args], cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        def url() -> str | None:
            found = re.search(r" at (http://\S+) ", (tmp_path / "serve.out").read_text())
            return found.group(1) if found else None

        wait_for(lambda: url() or proc.poll() is not None, 180, every_s=0.2)
        assert url(), (tmp_path / "serve.out").read_text()
        yield proc, str(url())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        out.close()
        assert wait_for(lambda: not processes_mentioning(str(tmp_path / "logs")), 10) is True


def test_serve_on_the_port_and_batch_asked_for(tmp_path: Path) -> None:
    port = _free_port()
    with serving(tmp_path, "--port", str(port), "--max-batch", "1", "--name", "demo-bf16") as (proc, url):
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "demo-bf16"
        (server,) = _servers(tmp_path)
        argv = server.split()
        flags = dict(itertools.pairwise(argv))
        assert (flags["--port"], flags["--max-batch"], flags["--host"]) == (str(port), "1", "127.0.0.1"), server
        assert "--allow-remote-bind" not in argv
    assert proc.returncode == 0
    assert port_refuses(port)


def test_serve_needs_the_flag_for_a_non_default_host_and_binds_only_there(tmp_path: Path) -> None:
    """127.0.0.2 is loopback too, but not in the server's allow-list: the flag is what lets it bind there."""
    refused = cli("serve", "demo", "--host", "127.0.0.2", "--workdir", "logs", cwd=tmp_path)
    assert_one_line(refused, "USER_CONFIG_ERROR", 2, "'127.0.0.2'", "--allow-remote-bind")
    with serving(tmp_path, "--host", "127.0.0.2", "--allow-remote-bind") as (_proc, url):
        assert url.startswith("http://127.0.0.2:")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert port_refuses(url.rsplit(":", 1)[1], host="127.0.0.1")  # bound to the address asked for only


def test_serve_on_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = cli("serve", "demo", "--port", str(port), "--workdir", "logs", cwd=tmp_path, timeout=180)
    assert_one_line(proc, "USER_CONFIG_ERROR", 2, f"port {port} on 127.0.0.1 is already in use")
    assert processes_mentioning(str(tmp_path)) == []


def test_serve_reports_a_server_that_died_on_its_own(tmp_path: Path) -> None:
    """Before, ``serve`` exited 0 without a word when its server crashed: a supervisor would not restart it."""
    with serving(tmp_path) as (proc, _url):
        (server,) = _servers(tmp_path)
        os.killpg(int(server.split(":", 1)[0]), signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == 1
    lines = [ln for ln in (tmp_path / "serve.out").read_text().splitlines() if ln.startswith("[")]
    assert lines == [lines[-1]] and lines[-1].startswith("[DEPLOYMENT_HEALTH_FAILED] the reference server exited "
                                                         "by itself with code -9"), lines


def test_an_earlier_start_in_the_same_log_does_not_decide_this_failure(tmp_path: Path) -> None:
    """The server log is appended to by every start of the same name: an old "address already in use" must not
    turn this start's load failure (a checkpoint without weights) into a port problem."""
    from pytest_day0.stages.serve import start_reference_server

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "server-m.log").write_text("ERROR: [Errno 98] error while attempting to bind on address "
                                       "('127.0.0.1', 8000): address already in use\n")
    with pytest.raises(Day0Error) as info:
        start_reference_server(checkpoint, "m", logs, timeout_s=120, port=_free_port())
    assert info.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE, str(info.value)
