"""Files others read get the user's umask, like any file a program creates: 0644 by default, 0640 under 027.

Before, every atomic write (verdict.json, delta.svg, the server registry, compacted records) went through
``tempfile.mkstemp`` and was 0600 whatever the umask, while events.jsonl beside them was 0644. Checked on the
workspace functions and on a real release session (the lm-eval path: no PTQ, no server, a few seconds) run
through the CLI with the umask set in the child.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lm_eval_source import sides

from pytest_day0.workspace import Workspace, atomic_write_json, atomic_write_text, replace_file

REPO = Path(__file__).resolve().parents[1]
UMASKS = [pytest.param(0o022, id="umask-022"), pytest.param(0o027, id="umask-027")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    value: int = request.param
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_atomic_writes_honour_the_umask(umask: int, tmp_path: Path) -> None:
    want = 0o666 & ~umask
    atomic_write_json(tmp_path / "verdict.json", {"decision": "ACCEPT"})
    atomic_write_text(tmp_path / "delta.svg", "<svg/>")
    replace_file(tmp_path / "records.jsonl", "{}\n")
    Workspace(tmp_path / "ws").event("probe")
    for name in ("verdict.json", "delta.svg", "records.jsonl", "ws/events.jsonl"):
        assert mode(tmp_path / name) == want, (name, oct(mode(tmp_path / name)), oct(want))
    # replacing an existing file gives the new one the same mode, and leaves no temporary copy
    (tmp_path / "verdict.json").chmod(0o600)
    atomic_write_json(tmp_path / "verdict.json", {"decision": "REGRESSION"})
    assert mode(tmp_path / "verdict.json") == want
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_a_release_session_writes_its_reports_with_the_umask(umask: int, tmp_path: Path) -> None:
    base, cand = sides(tmp_path / "lm_eval")
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAY0_", "GITHUB_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest_day0", "release", "-p", "no:cacheprovider", "--day0-model", "org/Model-8B",
         "--recipe", "fp8", "--day0-lm-eval-baseline", str(base), "--day0-lm-eval-candidate", str(cand),
         "--day0-workdir", str(ws)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.umask(umask))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    files = [p for p in ws.rglob("*") if p.is_file() and ".locks" not in p.parts]
    names = {p.relative_to(ws).as_posix() for p in files}
    assert {"verdict.json", "delta.svg"} <= names and len(names) > 5, names
    wrong = {p.relative_to(ws).as_posix(): oct(mode(p)) for p in files if mode(p) != 0o666 & ~umask}
    assert wrong == {}, f"not 0o{0o666 & ~umask:o}: {wrong}"
    dirs = {p.relative_to(ws).as_posix(): oct(mode(p)) for p in [ws, *ws.rglob("*")] if p.is_dir()}
    assert {d: m for d, m in dirs.items() if m != oct(0o777 & ~umask)} == {}, dirs
