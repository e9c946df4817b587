"""The SSH executor against a real sshd (tests/cluster/start-cluster.sh: 127.0.0.1:2222, its own host key).

Commands stream and return their exit status, quoting holds against `;` and spaces, SFTP moves bytes and
reads safetensors headers in at most two reads per shard, a local port reaches a remote service, and every
connection problem (unknown or changed host key, bad key, refused port) is one SYSTEMIC line that never
carries a secret. The local executor is held to the same interface.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cluster.loopback import LoopbackCluster, cluster_or_skip, processes_mentioning

from pytest_day0.checkpoint.inspect import inspect_checkpoint
from pytest_day0.checkpoint.safetensors_header import FIRST_READ, LocalFileSource, read_safetensors_header
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote import render_template
from pytest_day0.remote.executor import JobSpec, LocalExecutor, job_script
from pytest_day0.remote.jobs import watch_job
from pytest_day0.remote.ssh import SSHExecutor, connect

DEMO = Path(__file__).resolve().parents[1] / "pytest_day0" / "demo" / "model"


@pytest.fixture(scope="module")
def cluster() -> LoopbackCluster:
    return cluster_or_skip()


@pytest.fixture(scope="module")
def ssh(cluster: LoopbackCluster) -> Iterator[SSHExecutor]:
    ex = SSHExecutor(cluster.target())  # type: ignore[arg-type]
    yield ex
    ex.close()


@pytest.fixture()
def remote_dir(cluster: LoopbackCluster, ssh: SSHExecutor) -> Iterator[str]:
    path = cluster.workdir()
    ssh.makedirs(path)
    yield path
    ssh.remove_tree(path)


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True)
    return path


def _one_line(exc: Day0Error) -> str:
    text = str(exc)
    assert "\n" not in text and text.startswith(f"[{exc.failure_class}]")
    return text


# ---------------------------------------------------------------------- commands


def test_run_streams_output_and_returns_exit_status(ssh: SSHExecutor) -> None:
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    result = ssh.run(["bash", "-c", "echo one; sleep 1; echo two >&2; exit 7"],
                     on_line=lambda line: seen.append((time.monotonic() - started, line)))
    ended = time.monotonic() - started
    assert result.exit_status == 7 and not result.ok
    assert [line for _, line in seen] == ["one", "two"]
    assert seen[0][0] < ended - 0.5, "the first line must arrive while the command still runs (streamed)"
    assert result.output.split() == ["one", "two"]  # stderr interleaved into the same stream


def test_arguments_with_semicolons_and_spaces_cannot_inject(ssh: SSHExecutor, remote_dir: str) -> None:
    marker = f"{remote_dir}/PWNED"
    evil = f"{remote_dir}/my model; touch {marker} #"
    assert not ssh.run(["ls", "-d", "--", evil]).ok  # one argument that names no file, not two commands
    ssh.makedirs(evil)
    listed = ssh.run(["ls", "-d", "--", evil])
    assert listed.ok and listed.output.strip() == evil
    line = render_template("ls -d -- {model} && echo {qformat}", {"model": evil, "qformat": "fp8; id"})
    templated = ssh.run(line)
    assert templated.ok and templated.output.splitlines() == [evil, "fp8; id"]
    assert not ssh.exists(marker)


# ---------------------------------------------------------------------- SFTP


def test_sftp_put_get_write_and_ranged_reads(ssh: SSHExecutor, remote_dir: str, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(payload)
    ssh.put(tmp_path / "blob.bin", f"{remote_dir}/blob.bin")
    ssh.get(f"{remote_dir}/blob.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload
    assert ssh.read_bytes(f"{remote_dir}/blob.bin", 123_456, 1000) == payload[123_456:124_456]
    assert ssh.read_bytes(f"{remote_dir}/missing.bin") is None
    ssh.write_bytes(f"{remote_dir}/deep/er/state.json", b'{"ok": true}')
    assert json.loads(ssh.read_bytes(f"{remote_dir}/deep/er/state.json") or b"") == {"ok": True}
    assert not [n for n in ssh.sftp().listdir(f"{remote_dir}/deep/er") if n.endswith(".tmp")]
    with pytest.raises(FileNotFoundError):
        ssh.open_source(f"{remote_dir}/missing.safetensors")


def _big_header_safetensors(path: Path) -> None:
    """A shard whose JSON header is longer than FIRST_READ, so the reader needs exactly its second read."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {f"model.layers.{i}.mlp.a_rather_long_projection_name_to_grow_the_header_{i:05d}.weight":
               np.full((4, 4), i, dtype=np.float32) for i in range(900)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_sftp_byte_source_reads_a_header_in_at_most_two_reads(ssh: SSHExecutor, remote_dir: str,
                                                              tmp_path: Path) -> None:
    local = tmp_path / "model.safetensors"
    _big_header_safetensors(local)
    ssh.put(local, f"{remote_dir}/model.safetensors")
    source = ssh.open_source(f"{remote_dir}/model.safetensors")
    header = read_safetensors_header(source)
    expected = read_safetensors_header(LocalFileSource(local))
    assert header.header_bytes > FIRST_READ  # the two-read case
    assert header == expected
    assert source.reads == header.reads == 2
    assert source.bytes_read == 8 + header.header_bytes  # header only: no tensor byte was transferred


def test_inspect_checkpoint_over_sftp_equals_local(ssh: SSHExecutor, remote_dir: str) -> None:
    remote = f"{remote_dir}/demo"
    ssh.put_tree(DEMO, remote)
    local = inspect_checkpoint(DEMO)
    over_sftp = inspect_checkpoint(remote, open_source=ssh.open_source)
    assert over_sftp.linear_layers == local.linear_layers
    assert over_sftp.metadata == local.metadata
    assert (over_sftp.total_bytes, over_sftp.tensor_count) == (local.total_bytes, local.tensor_count)
    assert over_sftp.header_reads <= 2 * len(over_sftp.shards)


# ---------------------------------------------------------------------- port forwarding + process jobs

_HTTP_SERVER = """
import http.server, json, os, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "pid": os.getpid()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
open(sys.argv[1] + ".tmp", "w").write(str(srv.server_address[1])); os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("listening", flush=True)
srv.serve_forever()
"""


def test_tunnel_reaches_a_remote_service_started_as_a_process_job(ssh: SSHExecutor, remote_dir: str) -> None:
    ssh.write_bytes(f"{remote_dir}/srv.py", _HTTP_SERVER.encode())
    port_file = f"{remote_dir}/port"
    job = ssh.submit(JobSpec("day0-test-http", job_script(shlex.join([sys.executable, "srv.py", port_file])),
                             remote_dir, f"{remote_dir}/srv.log", f"{remote_dir}/srv.sh"))
    try:
        status, _ = watch_job(ssh, job, what="http", stage_class=FailureClass.DEPLOYMENT_HEALTH_FAILED,
                              timeout_s=60, ready=lambda _s: ssh.exists(port_file))
        assert status.state == "RUNNING"
        port = int(ssh.read_bytes(port_file) or b"0")
        tunnel = ssh.forward("127.0.0.1", port)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: httpx.get(f"{tunnel.url}/q{i}", timeout=10), range(24)))
        assert [a.status_code for a in answers] == [200] * 24
        assert sorted(a.json()["path"] for a in answers) == sorted(f"/q{i}" for i in range(24))
        assert tunnel.connections == 24  # one SSH channel per client connection
        tunnel.close()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{tunnel.url}/after-close", timeout=3)
    finally:
        ssh.cancel([job])
    assert ssh.status(job).state == "CANCELLED"
    assert processes_mentioning(f"{remote_dir}/port") == []


# ---------------------------------------------------------------------- connection failures: SYSTEMIC, one line


def test_unknown_host_key_is_refused_by_default(cluster: LoopbackCluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(Day0Error) as info:
        connect(cluster.target(known_hosts=empty))  # type: ignore[arg-type]
    assert info.value.failure_class is FailureClass.SYSTEMIC
    assert "host key unknown" in _one_line(info.value) and "--day0-trust-new-host" in str(info.value)
    assert empty.read_text() == ""  # nothing recorded without the explicit option


def test_trust_new_host_records_the_key_then_verifies_it(cluster: LoopbackCluster, tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    client = connect(cluster.target(known_hosts=known, trust_new_host=True))  # type: ignore[arg-type]
    client.close()
    recorded = known.read_text()
    assert recorded.startswith(f"[{cluster.host}]:{cluster.port} ssh-ed25519 ")
    assert recorded.split()[2] == cluster.known_hosts.read_text().split()[2]  # the server's real key
    connect(cluster.target(known_hosts=known)).close()  # type: ignore[arg-type]  # now known: strict works


def test_changed_host_key_is_refused_even_when_trusting_new_hosts(cluster: LoopbackCluster, tmp_path: Path) -> None:
    other = _keygen(tmp_path / "other_host_key")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{cluster.host}]:{cluster.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    for trust in (False, True):
        with pytest.raises(Day0Error) as info:
            connect(cluster.target(known_hosts=wrong, trust_new_host=trust))  # type: ignore[arg-type]
        assert info.value.failure_class is FailureClass.SYSTEMIC
        assert "does NOT match" in _one_line(info.value)


def test_unauthorized_key_and_refused_port_are_systemic(cluster: LoopbackCluster, tmp_path: Path) -> None:
    stranger = _keygen(tmp_path / "stranger")
    with pytest.raises(Day0Error) as info:
        connect(cluster.target(key_file=stranger))  # type: ignore[arg-type]
    assert info.value.failure_class is FailureClass.SYSTEMIC and "authentication failed" in _one_line(info.value)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(Day0Error) as info:
        connect(cluster.target(port=free))  # type: ignore[arg-type]
    assert info.value.failure_class is FailureClass.SYSTEMIC and "cannot connect" in _one_line(info.value)


def test_key_passphrase_never_appears_in_messages(cluster: LoopbackCluster, tmp_path: Path) -> None:
    from pydantic import SecretStr

    from pytest_day0.config import build_config

    secret = "correct-horse-7f3a"
    key = _keygen(tmp_path / "locked", passphrase=secret)
    for given in ("wrong-battery-9c1d", secret):  # wrong passphrase; right passphrase but unauthorized key
        with pytest.raises(Day0Error) as info:
            connect(cluster.target(key_file=key, passphrase=SecretStr(given)))  # type: ignore[arg-type]
        assert info.value.failure_class is FailureClass.SYSTEMIC
        assert given not in str(info.value) and secret not in repr(info.value.detail)
    with pytest.raises(Day0Error) as info:
        connect(cluster.target(key_file=key))  # type: ignore[arg-type]
    assert "passphrase" in _one_line(info.value)
    config = build_config({"model": "demo", "executor": cluster.url(), "ssh_key_passphrase": secret}, lambda _k: None)
    assert secret not in json.dumps(config.public_dict()) and secret not in repr(config)


# ---------------------------------------------------------------------- the local executor, same interface


def test_local_executor_implements_the_same_interface(tmp_path: Path) -> None:
    ex = LocalExecutor()
    lines: list[str] = []
    assert ex.run(["bash", "-c", "echo a; exit 3"], on_line=lines.append).exit_status == 3 and lines == ["a"]
    ex.write_bytes(str(tmp_path / "d" / "f.txt"), b"hello")
    assert ex.read_bytes(str(tmp_path / "d" / "f.txt"), 1, 3) == b"ell"
    job = ex.submit(JobSpec("t", job_script("echo out; exit 4"), str(tmp_path), str(tmp_path / "j.log"),
                            str(tmp_path / "j.sh")))
    with pytest.raises(Day0Error) as info:
        watch_job(ex, job, what="local job", stage_class=FailureClass.UNKNOWN, timeout_s=30)
    assert "FAILED, exit 4: out" in str(info.value)
    assert inspect_checkpoint(str(DEMO), open_source=ex.open_source).tensor_count > 0
