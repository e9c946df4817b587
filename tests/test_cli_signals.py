"""Every long-running ``python -m pytest_day0`` command stops on SIGINT and on SIGTERM within 10 s, and leaves
no process and no listening port behind.

Each command is started as a user starts it (a subprocess in its own session, the installed CLI, real PTQ, a real
reference server, a real release session); SIGINT goes to its process group as a terminal's Ctrl-C does, SIGTERM
to the process alone as ``docker stop``, systemd and a CI cancel do. What is left behind is read from /proc and
sockets: the command's process tree as it was just before the signal (the PTQ child of ``quantize``, the server of
``serve``, the servers of ``release``) and any process naming the test's directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _procs import port_refuses, processes_mentioning, wait_for

from pytest_day0.stages.serve import start_reference_server
from pytest_day0.stages.source import resolve_model

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time in clock ticks, state) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live process below ``root`` (start time: a reused pid is not a survivor)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def survivors(tree: dict[int, str], root: int, root_start: str, marker: str) -> list[str]:
    """What still runs of a command's tree (re-parented or not), or names the command's directory."""
    table = _proc_table()
    left = [f"{pid} (tree)" for pid, start in {root: root_start, **tree}.items()
            if pid in table and table[pid][1] == start and table[pid][2] != "Z"]
    return left + processes_mentioning(marker)


@dataclass
class Command:
    argv: list[str]
    underway: Callable[[Path], bool]  # the command is in the middle of its long-running part
    exit_code: Callable[[int], int]  # the exit status expected after this signal
    check: Callable[[Path, str, signal.Signals], None]  # what else must hold afterwards (ports, files, output)


def _out(d: Path) -> str:
    path = d / "out.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _record_lines(d: Path, pattern: str) -> int:
    return sum(p.read_bytes().count(b"\n") for p in d.glob(pattern))


def _serve_check(d: Path, out: str, sig: signal.Signals) -> None:
    url = re.search(r" at (http://\S+) ", out)
    assert url, out
    assert port_refuses(url.group(1)), f"{url.group(1)} still accepts connections"
    assert f"{sig.name}: server stopped" in out, out


def _quantize_check(d: Path, out: str, sig: signal.Signals) -> None:
    assert not list(d.glob("ckpt/.*staging*")), "a half-written export was left behind"
    assert not (d / "ckpt" / "fp8" / "day0_ptq.json").exists(), "an interrupted PTQ counted as finished"
    assert f"{sig.name}: quantize interrupted; everything it started is stopped" in out, out


def _evaluate_check(d: Path, out: str, sig: signal.Signals) -> None:
    raw = (d / "r.jsonl").read_bytes()
    assert raw.endswith(b"\n"), "a torn last record"
    lines = [json.loads(line) for line in raw.splitlines()]
    assert 0 < len(lines) < 300, len(lines)  # interrupted in the middle, whole lines only
    assert f"{sig.name}: evaluate interrupted" in out, out


def _release_check(d: Path, out: str, sig: signal.Signals) -> None:
    readies = list((d / "ws" / "logs").glob("*.ready.json"))
    assert readies, "the session's server never listened: no port was checked"
    for ready in readies:
        url = json.loads(ready.read_text())["url"]
        assert port_refuses(url), f"{url} still accepts connections after the session ended"
    assert "KeyboardInterrupt" in out, out[-3000:]
    assert list((d / "ws" / "servers").glob("*.json")) == []  # the registry is empty: nothing claims to run


def _interrupted(base: int) -> Callable[[int], int]:
    return lambda sig: base + sig


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server ``evaluate`` scores against: the test's, not the command's (it must outlive the command)."""
    with start_reference_server(resolve_model("demo"), "baseline", tmp_path_factory.mktemp("srv")) as handle:
        yield handle.url


def _commands(url: str) -> dict[str, Command]:
    return {
        "serve": Command(["serve", "demo", "--name", "baseline", "--workdir", "logs"],
                         lambda d: "serving " in _out(d), lambda sig: 0, _serve_check),
        "quantize": Command(["quantize", "--model", "demo", "--recipe", "fp8", "--out", "ckpt/fp8"],
                            lambda d: "[day0] quantizing" in ((d / "ckpt" / "fp8.log").read_text(errors="replace")
                                                              if (d / "ckpt" / "fp8.log").exists() else ""),
                            _interrupted(128), _quantize_check),
        "evaluate": Command(["evaluate", "--url", url, "--model", "baseline", "--task", "arc_like", "--side",
                             "baseline", "--records", "r.jsonl", "--concurrency", "2"],
                            lambda d: _record_lines(d, "r.jsonl") >= 3, _interrupted(128), _evaluate_check),
        "release": Command(["release", "-p", "no:cacheprovider", "--day0-model=demo", "--recipe=fp8",
                            "--day0-stat=point", "--day0-workdir=ws", "--day0-tasks=arc_like", "--day0-limit=300",
                            "--day0-concurrency=2", "-k", "test_eval_complete and baseline"],
                           lambda d: _record_lines(d, "ws/evals/baseline-*/*.jsonl") >= 3,
                           lambda sig: 2, _release_check),  # pytest's INTERRUPTED
    }


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", ["serve", "quantize", "evaluate", "release"])
def test_signal_stops_the_command_and_all_it_started(name: str, sig: signal.Signals, tmp_path: Path,
                                                     server_url: str) -> None:
    command = _commands(server_url)[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    with (tmp_path / "out.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest_day0", *command.argv], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    tree: dict[int, str] = {}
    try:
        seen = wait_for(lambda: command.underway(tmp_path) or proc.poll() is not None, 300, every_s=0.2)
        assert proc.poll() is None, f"{name} ended before it was interrupted: {_out(tmp_path)[-3000:]}"
        assert seen, f"{name} never got under way"
        root_start = _proc_table()[proc.pid][1]
        tree = descendants(proc.pid)
        if name != "evaluate":
            assert tree, f"{name} started no process to stop"
        sent = time.monotonic()
        if sig is signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C: the whole foreground group
        else:
            proc.send_signal(sig)  # docker stop, systemd, a CI cancel: the process alone
        try:
            returncode = proc.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running {STOP_WITHIN_S:.0f}s after {sig.name}: {_out(tmp_path)[-2000:]}")
        left = wait_for(lambda: not survivors(tree, proc.pid, root_start, str(tmp_path)),
                        max(0.0, STOP_WITHIN_S - (time.monotonic() - sent)))
        stopped_s = time.monotonic() - sent
        assert left is True, (f"{sig.name} left {survivors(tree, proc.pid, root_start, str(tmp_path))} "
                              f"{stopped_s:.1f}s later")
    finally:  # whatever the outcome, nothing of this test keeps running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        table = _proc_table()
        for pid, start in tree.items():
            if pid in table and table[pid][1] == start:
                os.kill(pid, signal.SIGKILL)
    output = _out(tmp_path)
    assert returncode == command.exit_code(sig), (returncode, output[-3000:])
    assert "Traceback" not in output or name == "release", output[-3000:]  # pytest prints its own on Ctrl-C
    command.check(tmp_path, output, sig)
    print(f"{name}: {sig.name} -> exit {returncode}, {len(tree)} child process(es) gone, {stopped_s:.2f}s")


def test_a_second_signal_does_not_cut_the_cleanup_short(tmp_path: Path) -> None:
    """An impatient second Ctrl-C (or a supervisor repeating SIGTERM) while ``serve`` stops its server must not
    kill the command half-way and orphan the server, which runs in its own session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    with (tmp_path / "out.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest_day0", "serve", "demo", "--workdir", "logs"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: dict[int, str] = {}
    try:
        wait_for(lambda: "serving " in _out(tmp_path) or proc.poll() is not None, 300, every_s=0.2)
        assert proc.poll() is None, _out(tmp_path)
        root_start = _proc_table()[proc.pid][1]
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=STOP_WITHIN_S)
        left = wait_for(lambda: not survivors(tree, proc.pid, root_start, str(tmp_path)), 5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        table = _proc_table()
        for pid, start in tree.items():
            if pid in table and table[pid][1] == start:
                os.kill(pid, signal.SIGKILL)
    assert left is True, survivors(tree, proc.pid, root_start, str(tmp_path))
    assert returncode == 0, _out(tmp_path)
    _serve_check(tmp_path, _out(tmp_path), signal.SIGTERM)
