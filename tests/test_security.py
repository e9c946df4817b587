"""Security (issue 7, part 3): secrets never written, loopback-only serving, strict host keys, quoted commands.

* Canaries: random per run, placed in HF_TOKEN, the API key (``--day0-api-key`` / ``DAY0_API_KEY``) and the SSH
  key's passphrase (a real passphrase-encrypted key the loopback sshd accepts). Real release sessions run in
  subprocesses (local; against an external endpoint that *requires* the bearer key; over ``ssh://``; and
  failing ones: a rejected key, a wrong passphrase), writing JUnit, pytest-json-report, a GitHub step summary,
  events, logs. Every file under their trees (and the remote workspace) plus their stdout/stderr is scanned,
  binary-safe, for each canary in raw, base64 (all three alignments), URL-quoted and hex forms. A planted
  control canary proves each scan really walked the tree it claims to.
* The reference server listens on 127.0.0.1 only (read back from /proc/net/tcp); a non-loopback ``--host``
  is refused in one line unless ``--allow-remote-bind`` is given explicitly.
* Host keys: an unknown host (empty, missing or default known_hosts) and a known_hosts naming another key are
  refused with SYSTEMIC, and nothing is added to known_hosts.
* Quoting: every command string pytest_day0/remote builds (argv joins, job launch lines, job scripts, the
  default PTQ/serve templates, sbatch's argv including the URL's sbatch options, status/cancel probes) is
  driven through the real sshd and SLURM with hostile paths and values; no marker file appears and every
  value arrives byte-for-byte (dumped NUL-separated by the receiving side).

The release sessions are real (PTQ, two servers, scoring) and take ~40 s each: they are marked slow.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cluster.loopback import LoopbackCluster, cluster_or_skip

from pytest_day0.config import RunConfig, build_config
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.placement import QuantizeJob
from pytest_day0.remote import PTQ_FIELDS, SERVE_FIELDS, render_template
from pytest_day0.remote.executor import JobHandle, JobSpec, job_script
from pytest_day0.remote.jobs import watch_job
from pytest_day0.remote.placement import REFERENCE_MODULE, RemotePlacement
from pytest_day0.remote.slurm import SlurmExecutor
from pytest_day0.remote.ssh import SSHExecutor, SSHTarget, connect
from pytest_day0.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pytest_day0" / "demo" / "model"

# ---------------------------------------------------------------------- the scanner


def secret_forms(secret: str) -> list[bytes]:
    """Every way a secret is cheaply recognisable once written: raw, URL-quoted, hex, and base64 at each of the
    three byte alignments it can have inside a longer encoded string (``Bearer <key>``, ``user:pass``)."""
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode(), raw.hex().encode()}
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = enc(b"\0" * shift + raw)
            forms.add(encoded[4 if shift else 0:-4])  # drop the groups that mix in neighbouring bytes
    return sorted(forms)


@dataclass
class Scan:
    files: int = 0
    bytes: int = 0
    names: set[str] = field(default_factory=set)
    hits: list[tuple[str, str]] = field(default_factory=list)  # (secret label, where)


def scan(roots: Iterable[Path], secrets: dict[str, str], texts: dict[str, str] | None = None) -> Scan:
    """Walk every regular file under ``roots`` (links not followed) plus captured ``texts``; record each hit."""
    patterns = [(label, form) for label, value in secrets.items() for form in secret_forms(value)]
    longest = max(len(p) for _, p in patterns)
    result = Scan()

    def check(data: bytes, where: str, carry: bytes = b"") -> None:
        window = carry + data
        for label, form in patterns:
            if form in window and (label, where) not in result.hits:
                result.hits.append((label, where))

    for root in roots:
        for dirpath, _dirs, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                result.files += 1
                result.names.add(name)
                carry = b""
                with path.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        result.bytes += len(chunk)
                        check(chunk, str(path), carry)
                        carry = chunk[-longest:]
    for label, text in (texts or {}).items():
        result.bytes += len(text)
        check(text.encode(errors="surrogateescape"), label)
    return result


def assert_clean(roots: list[Path], secrets: dict[str, str], texts: dict[str, str], *, min_files: int,
                 must_cover: Iterable[str]) -> Scan:
    """Zero hits, with proof of reach: a control canary planted in the deepest directory of every root is found
    there (and only there), at least ``min_files`` files were read, and the named report files were among them."""
    control = f"canary-control-{uuid.uuid4().hex}"
    planted = []
    for root in roots:
        deepest = max((Path(d) for d, _, _ in os.walk(root)), key=lambda p: len(p.parts))
        target = deepest / f"zz-control-{uuid.uuid4().hex[:6]}.bin"
        target.write_bytes(os.urandom(4096) + base64.b64encode(b"Bearer " + control.encode()) + os.urandom(64))
        planted.append(str(target))
    try:
        result = scan(roots, {**secrets, "control": control}, texts)
    finally:
        for path in planted:
            Path(path).unlink(missing_ok=True)
    found_control = sorted(where for label, where in result.hits if label == "control")
    assert found_control == sorted(planted), "the scanner missed its own planted control canary"
    leaks = [(label, where) for label, where in result.hits if label != "control"]
    assert not leaks, f"secrets written: {leaks}"
    assert result.files >= min_files, (result.files, sorted(result.names))
    missing = [name for name in must_cover if not any(re.fullmatch(name, n) for n in result.names)]
    assert not missing, f"expected report files not among those scanned: {missing} (saw {sorted(result.names)})"
    return result


def test_scanner_finds_every_form_anywhere_and_counts_what_it_read(tmp_path: Path) -> None:
    secret = f"canary-scan-{uuid.uuid4().hex}"
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "clean.txt").write_text("nothing here\n")
    (tmp_path / "a" / "raw.bin").write_bytes(os.urandom(3 << 20) + secret.encode() + os.urandom(10))  # chunk 4
    (tmp_path / "a" / "b" / "b64.json").write_text(json.dumps(
        {"h": base64.b64encode(f"x:{secret}".encode()).decode()}))
    (tmp_path / "a" / "b" / "hex.log").write_text(f"token={secret.encode().hex()}\n")
    # a secret that straddles the 1 MiB read boundary is still found
    (tmp_path / "edge.bin").write_bytes(b"\0" * ((1 << 20) - 5) + secret.encode())
    (tmp_path / "link").symlink_to(tmp_path / "a" / "raw.bin")  # not followed: counted once, as the file
    result = scan([tmp_path], {"s": secret}, {"stdout": f"... {quote(secret)} ..."})
    assert result.files == 5 and result.bytes > 4 << 20
    assert sorted(Path(w).name for _, w in result.hits) == ["b64.json", "edge.bin", "hex.log", "raw.bin", "stdout"]
    clean = scan([tmp_path / "a" / "b"], {"other": f"canary-other-{uuid.uuid4().hex}"})
    assert clean.files == 2 and clean.hits == []


# ---------------------------------------------------------------------- release sessions


@dataclass
class Session:
    rc: int
    stdout: str
    stderr: str
    out_dir: Path  # junit, json report, GitHub summary/output, workspace (ws/)

    @property
    def texts(self) -> dict[str, str]:
        return {"stdout": self.stdout, "stderr": self.stderr}


def run_session(out_dir: Path, *args: str, env: dict[str, str], timeout: float = 420) -> Session:
    """``python -m pytest --day0-model demo ...`` as a CI job runs it, every report switched on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pytest", "--day0-model=demo", "--recipe", "fp8",
            f"--day0-workdir={out_dir / 'ws'}", "--junitxml", str(out_dir / "junit.xml"),
            "--json-report", "--json-report-file", str(out_dir / "report.json"), "-v", "-p", "no:cacheprovider",
            *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DAY0_", "PYTEST_", "GITHUB_"))}
    full_env.update({"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(out_dir / "summary.md"),
                     "GITHUB_OUTPUT": str(out_dir / "github_output"), "PYTHONPATH": str(ROOT), **env})
    (out_dir / "github_output").touch()
    proc = subprocess.run(argv, cwd=out_dir, env=full_env, capture_output=True, text=True, timeout=timeout)
    return Session(proc.returncode, proc.stdout, proc.stderr, out_dir)


REPORTS = ("junit.xml", "report.json", "summary.md", "events.jsonl", "verdict.json")


@pytest.fixture()
def canaries() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {"HF_TOKEN": f"canary-hf-{tag}", "api_key": f"canary-api-{uuid.uuid4().hex}",
            "passphrase": f"canary-pass-{uuid.uuid4().hex}"}


@pytest.mark.slow
def test_local_release_writes_no_secret_anywhere(tmp_path: Path, canaries: dict[str, str]) -> None:
    session = run_session(tmp_path / "run", "--day0-limit=6", "--day0-api-key", canaries["api_key"],
                          env={"HF_TOKEN": canaries["HF_TOKEN"], "DAY0_SSH_KEY_PASSPHRASE": canaries["passphrase"]})
    assert session.rc == 0, session.stdout[-3000:] + session.stderr[-2000:]
    assert "VERDICT fp8" in session.stdout
    result = assert_clean([tmp_path], canaries, session.texts, min_files=35,
                          must_cover=(*REPORTS, r"server-.*\.log", r"fp8-.*\.log", r".*\.jsonl", "model.safetensors"))
    print(f"local release: scanned {result.files} files, {result.bytes / 1e6:.1f} MB")


class AuthProxy:
    """A real HTTP front that demands ``Authorization: Bearer <key>`` (401 otherwise) before forwarding to an
    OpenAI-compatible upstream: what a hosted endpoint does, so the API key must really travel."""

    def __init__(self, upstream: str, key: str, *, echo: bool = False) -> None:
        self.upstream = upstream
        self.key = key
        self.echo = echo  # a careless server: its 401 body repeats the key it was given
        self.seen: list[tuple[str, int]] = []  # (Authorization header, status answered)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _forward(self, method: str) -> None:
                auth = self.headers.get("Authorization") or ""
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if auth != f"Bearer {proxy.key}":
                    said = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}" if proxy.echo else "bad key"
                    status, ctype = 401, "application/json"
                    payload = json.dumps({"error": {"message": said}}).encode()
                else:
                    resp = httpx.request(method, proxy.upstream + self.path, content=body, timeout=120,
                                         headers={"Content-Type": self.headers.get("Content-Type") or
                                                  "application/json"})
                    status, payload = resp.status_code, resp.content
                    ctype = resp.headers.get("content-type", "application/json")
                with proxy._lock:
                    proxy.seen.append((auth, status))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> AuthProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.mark.slow
def test_external_endpoint_key_is_sent_but_never_written_and_a_rejected_key_is_not_echoed(
        tmp_path: Path, canaries: dict[str, str]) -> None:
    from pytest_day0.stages.serve import start_reference_server

    wrong = f"canary-wrongkey-{uuid.uuid4().hex}"
    secrets = {**canaries, "wrong_key": wrong}
    with start_reference_server(DEMO, "demo", tmp_path / "server") as server, \
            AuthProxy(server.url, canaries["api_key"]) as base, AuthProxy(server.url, canaries["api_key"]) as cand:
        external = ("--day0-quantize=none", "--day0-serve=external", f"--day0-baseline-url={base.url}",
                    f"--day0-candidate-url={cand.url}", "--day0-limit=6")
        good = run_session(tmp_path / "good", *external,
                           env={"HF_TOKEN": canaries["HF_TOKEN"], "DAY0_API_KEY": canaries["api_key"],
                                "DAY0_SSH_KEY_PASSPHRASE": canaries["passphrase"]})
        accepted = [s for a, s in base.seen + cand.seen if a == f"Bearer {canaries['api_key']}" and s == 200]
        assert good.rc == 0, good.stdout[-3000:] + good.stderr[-2000:]
        assert len(accepted) >= 20 and all(s == 200 for _, s in base.seen + cand.seen), "the key was not used"
        before = len(base.seen)
        bad = run_session(tmp_path / "bad", *external, f"--day0-api-key={wrong}",
                          env={"HF_TOKEN": canaries["HF_TOKEN"]})
        assert bad.rc != 0
        assert ("Bearer " + wrong, 401) in base.seen[before:] + cand.seen, "the wrong key never reached the endpoint"
        assert re.search(r"\[(SYSTEMIC|USER_CONFIG_ERROR)\].*refused", bad.stdout + bad.stderr), bad.stdout[-3000:]
    result = assert_clean([tmp_path], secrets, {**good.texts, **{f"bad-{k}": v for k, v in bad.texts.items()}},
                          min_files=25, must_cover=(*REPORTS, r"server-demo\.log", r".*\.jsonl"))
    print(f"external endpoint: {len(accepted)} authorized requests; scanned {result.files} files")


def test_endpoint_urls_carrying_credentials_are_refused_without_echo(canaries: dict[str, str]) -> None:
    key = canaries["api_key"]
    for url in (f"https://user:{key}@models.example.org/v1", f"https://{key}@models.example.org",
                f"ftp://u:{key}@x"):
        with pytest.raises(Day0Error) as info:
            build_config({"model": "demo", "quantize": "none", "serve": "external", "baseline_url": url,
                          "candidate_url": "http://127.0.0.1:1"}, lambda _k: None)
        assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and "no credentials" in str(info.value)
        assert key not in str(info.value) and "\n" not in str(info.value)


def test_a_malformed_endpoint_url_is_one_line_even_with_showlocals(tmp_path: Path, canaries: dict[str, str]) -> None:
    """A port that is no number used to escape as a raw httpx traceback; with ``-l`` its frames' locals printed
    the Authorization header. Now config refuses it in one line before any request is built."""
    session = run_session(tmp_path, "--day0-quantize=none", "--day0-serve=external", "--day0-baseline-url",
                          "http://127.0.0.1:notaport", "--day0-candidate-url=http://127.0.0.1:1", "-l",
                          "--tb=long", env={"DAY0_API_KEY": canaries["api_key"], "HF_TOKEN": canaries["HF_TOKEN"]},
                          timeout=120)
    assert session.rc != 0 and "Traceback" not in session.stdout + session.stderr
    assert "[USER_CONFIG_ERROR] --day0-baseline-url: not a valid URL" in session.stdout + session.stderr
    assert_clean([tmp_path], canaries, session.texts, min_files=1, must_cover=())


def test_reports_mask_the_secret_options(canaries: dict[str, str]) -> None:
    from pydantic import SecretStr

    config = build_config({"model": "demo", "api_key": canaries["api_key"]}, lambda _k: None,
                          environ={"DAY0_SSH_KEY_PASSPHRASE": canaries["passphrase"]})
    assert isinstance(config.api_key, SecretStr) and config.api_key.get_secret_value() == canaries["api_key"]
    shown = json.dumps(config.public_dict()) + repr(config) + str(config) + config.fingerprint("api_key")
    assert canaries["api_key"] not in shown and canaries["passphrase"] not in shown
    assert config.public_dict()["api_key"] == config.public_dict()["ssh_key_passphrase"] == "**********"


def test_a_server_that_echoes_the_key_in_an_error_does_not_leak_it_through_us(canaries: dict[str, str]) -> None:
    import asyncio

    from pydantic import SecretStr

    from pytest_day0.scoring.client import OpenAIClient, RetryPolicy
    from pytest_day0.serving.endpoint import Endpoint

    wrong = f"canary-echoed-{uuid.uuid4().hex}"
    with AuthProxy("http://127.0.0.1:9", canaries["api_key"], echo=True) as proxy:
        endpoint = Endpoint(url=proxy.url, model="m", api_key=SecretStr(wrong))

        async def call() -> None:
            async with OpenAIClient(endpoint, policy=RetryPolicy(max_retries=0)) as client:
                await client.post("/v1/completions", {"prompt": "1+1=", "max_tokens": 1})

        with pytest.raises(Day0Error) as info:
            asyncio.run(call())
    assert proxy.seen == [(f"Bearer {wrong}", 401)]
    assert wrong not in str(info.value), str(info.value)


# ---------------------------------------------------------------------- the loopback cluster


@pytest.fixture(scope="module")
def cluster() -> LoopbackCluster:
    return cluster_or_skip()


def encrypted_key(cluster: LoopbackCluster, dest: Path, passphrase: str) -> Path:
    """The cluster's authorized client key, re-encrypted under ``passphrase`` (sshd accepts it unchanged)."""
    shutil.copyfile(cluster.key, dest)
    dest.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-f", str(dest), "-P", "", "-N", passphrase], check=True,
                   capture_output=True)
    assert subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(dest)], capture_output=True).returncode != 0
    return dest


@pytest.fixture()
def remote_wd(cluster: LoopbackCluster) -> Iterator[str]:
    path = cluster.workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)  # the cluster is this machine


@pytest.mark.slow
def test_ssh_release_with_an_encrypted_key_writes_no_secret(cluster: LoopbackCluster, tmp_path: Path,
                                                            canaries: dict[str, str], remote_wd: str) -> None:
    key = encrypted_key(cluster, tmp_path / "id_ed25519", canaries["passphrase"])
    remote = (f"--day0-executor={cluster.url('ssh')}", f"--day0-ssh-key={key}",
              f"--day0-known-hosts={cluster.known_hosts}", f"--day0-remote-workdir={remote_wd}")
    env = {"HF_TOKEN": canaries["HF_TOKEN"], "DAY0_API_KEY": canaries["api_key"]}
    ok = run_session(tmp_path / "run", *remote, "--day0-limit=4", "--day0-ssh-key-passphrase",
                     canaries["passphrase"], env=env)
    assert ok.rc == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "VERDICT fp8" in ok.stdout and "SSH tunnel" in ok.stdout  # it really ran remotely
    wrong = f"canary-wrongpass-{uuid.uuid4().hex}"
    bad = run_session(tmp_path / "badpass", *remote, env={**env, "DAY0_SSH_KEY_PASSPHRASE": wrong}, timeout=120)
    assert bad.rc != 0 and "wrong passphrase" in bad.stdout + bad.stderr and "[SYSTEMIC]" in bad.stdout + bad.stderr
    result = assert_clean([tmp_path, Path(remote_wd)], {**canaries, "wrong_passphrase": wrong},
                          {**ok.texts, **{f"bad-{k}": v for k, v in bad.texts.items()}}, min_files=45,
                          must_cover=(*REPORTS, r".*-job\d+\.log", r"day0-.*\.log", r"day0-.*\.sh",
                                      "model.safetensors"))
    print(f"ssh release: scanned {result.files} files ({result.bytes / 1e6:.1f} MB) here and in {remote_wd}")


# ---------------------------------------------------------------------- the reference server binds loopback


def _listeners(port: int) -> list[tuple[str, str]]:
    """(table, local address hex) of every LISTEN socket on ``port`` in /proc/net/tcp and tcp6."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            addr, port_hex = cols[1].rsplit(":", 1)
            if int(port_hex, 16) == port and cols[3] == "0A":
                found.append((table, addr))
    return found


def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = str(s.getsockname()[0])
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_reference_server_listens_on_127_0_0_1_only(tmp_path: Path) -> None:
    from pytest_day0.stages.serve import start_reference_server

    with start_reference_server(DEMO, "demo", tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        assert server.url == f"http://127.0.0.1:{port}"
        assert _listeners(port) == [("tcp", "0100007F")]  # 127.0.0.1, little-endian hex; nothing on tcp6
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        other = _non_loopback_ipv4()
        if other is not None:
            with pytest.raises(OSError), socket.create_connection((other, port), timeout=3):
                pass


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "localhost"])
def test_reference_server_refuses_a_non_loopback_host_unless_explicitly_allowed(
        host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_day0.serving.reference_server import main

    missing = tmp_path / "no-checkpoint"
    assert main(["--checkpoint", str(missing), "--served-model-name", "x", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"refusing to bind {host!r}" in err and "--allow-remote-bind" in err
    # the explicit flag passes the bind check: it gets as far as loading the (absent) checkpoint
    assert main(["--checkpoint", str(missing), "--served-model-name", "x", "--host", host, "--port", "0",
                 "--allow-remote-bind"]) == 3
    assert "load failed" in capsys.readouterr().err


def test_the_plugin_starts_reference_servers_on_loopback_and_remote_ones_too(tmp_path: Path) -> None:
    """The two places the plugin launches the reference server pass 127.0.0.1 (the remote one is reached
    through an SSH tunnel to the job's own loopback)."""
    import inspect

    from pytest_day0.stages import serve

    assert inspect.signature(serve.start_reference_server).parameters["host"].default == "127.0.0.1"
    config = build_config({"model": "demo", "executor": "ssh://u@example.org"}, lambda _k: None)
    stages = RemotePlacement(config, "s1", Workspace(tmp_path))
    command, port = stages._serve_command("/ckpt", "fp8", "/r.json")
    argv = shlex.split(command)
    assert port is None and argv[argv.index("--host") + 1] == "127.0.0.1" and "--allow-remote-bind" not in argv


# ---------------------------------------------------------------------- host keys


def _one_line_systemic(exc: Day0Error) -> str:
    text = str(exc)
    assert exc.failure_class is FailureClass.SYSTEMIC and "\n" not in text
    return text


def test_host_key_checking_is_on_by_default(cluster: LoopbackCluster, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert RunConfig().trust_new_host is False and SSHTarget("h").trust_new_host is False
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    missing = tmp_path / "nowhere" / "known_hosts"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default ~/.ssh/known_hosts: absent
    for known in (empty, missing, None):
        with pytest.raises(Day0Error) as info:
            connect(cluster.target(known_hosts=known))  # type: ignore[arg-type]
        assert "host key unknown" in _one_line_systemic(info.value)
    assert empty.read_text() == "" and not missing.exists() and not (tmp_path / "home" / ".ssh").exists()
    # the session's own executor, built from a default config, is just as strict
    config = build_config({"model": "demo", "executor": cluster.url("ssh"), "ssh_key": str(cluster.key),
                           "known_hosts": str(empty)}, lambda _k: None)
    stages = RemotePlacement(config, "hk", Workspace(tmp_path / "ws"))
    with pytest.raises(Day0Error) as info:
        stages.check()
    assert "host key unknown" in _one_line_systemic(info.value) and empty.read_text() == ""


def test_a_known_hosts_entry_with_another_key_is_refused(cluster: LoopbackCluster, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = (tmp_path / "impostor.pub").read_text().split()
    real = cluster.known_hosts.read_text().split()
    assert impostor[1] != real[2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{real[0]} {impostor[0]} {impostor[1]}\n")
    for trust in (False, True):
        with pytest.raises(Day0Error) as info:
            connect(cluster.target(known_hosts=wrong, trust_new_host=trust))  # type: ignore[arg-type]
        assert "does NOT match" in _one_line_systemic(info.value)
        assert wrong.read_text() == f"{real[0]} {impostor[0]} {impostor[1]}\n"  # never rewritten


# ---------------------------------------------------------------------- quoting of every remote command


@pytest.fixture()
def pwned() -> Iterator[Path]:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    yield marker
    made = sorted(marker.parent.glob(marker.name + "*"))  # also `touch {marker}.sh` from a split path
    for path in made:
        path.unlink(missing_ok=True)
    assert not made, f"{made} created: a remote command was injected"


def hostile(marker: Path) -> list[str]:
    """Values a shell would act on if they were not quoted; each touches ``marker`` if it runs."""
    m = str(marker)
    return [f"my model $(touch {m})", f"`touch {m}`", f"a; touch {m}", f"x' ; touch {m}; echo '",
            f'q" ; touch {m}; echo "', f"line1\ntouch {m}", f"&& touch {m} || touch {m} | cat > {m}",
            "$HOME ~ * ?", "-n", "", "tab\tand \\ backslash", "ünï €"]


def nul_args(output: str) -> list[str]:
    assert output.endswith("\0"), output
    return output[:-1].split("\0")


@pytest.fixture()
def ssh_ex(cluster: LoopbackCluster) -> Iterator[SSHExecutor]:
    ex = SSHExecutor(cluster.target())  # type: ignore[arg-type]
    yield ex
    ex.close()


def test_argv_commands_arrive_intact_over_ssh(ssh_ex: SSHExecutor, pwned: Path) -> None:
    values = hostile(pwned)
    result = ssh_ex.run(["printf", "%s\\0", *values])
    assert result.ok and nul_args(result.output) == values


def test_templates_quote_every_placeholder_over_ssh(ssh_ex: SSHExecutor, pwned: Path) -> None:
    values = hostile(pwned)
    for fields in (PTQ_FIELDS, SERVE_FIELDS | {"port"}):
        names = sorted(fields)
        filled = {n: values[i % len(values)] for i, n in enumerate(names)}
        line = render_template("printf '%s\\0' " + " ".join("{" + n + "}" for n in names), filled)
        result = ssh_ex.run(line)
        assert result.ok and nul_args(result.output) == [filled[n] for n in names]


DUMPER = r"""#!/bin/bash
# stands in for python: records its argv (NUL-separated) and behaves like a successful PTQ entry point
printf '%s\0' "$@" > "$(dirname "$0")/argv.bin"
while [ $# -gt 0 ]; do [ "$1" = --export-path ] && out="$2"; shift; done
if [ -n "$out" ]; then mkdir -p -- "$out" && echo '{}' > "$out/config.json"; fi
echo 'DAY0_RESULT {"ok": true}'
"""


def _remote_stages(cluster: LoopbackCluster, tmp_path: Path, kind: str, remote_wd: str, marker: Path,
                   ) -> tuple[RemotePlacement, str, str]:
    """RemotePlacement from a real config whose workspace and python paths are hostile; (stages, wd, python)."""
    evil = f"sp ace 'q\" $(touch {marker}) `touch {marker}`; touch {marker}\nnl %j 100%"
    wd = f"{remote_wd}/{evil}"
    python = f"{wd}/bin dir/py$(touch {marker})"
    query = f"partition=debug&time=00:10:00&comment={quote(f'c $(touch {marker}); `touch {marker}`')}"
    config = build_config({"model": "demo", "executor": cluster.url(kind, query), "ssh_key": str(cluster.key),
                           "known_hosts": str(cluster.known_hosts), "remote_workdir": wd, "remote_python": python},
                          lambda _k: None)
    stages = RemotePlacement(config, f"sec{uuid.uuid4().hex[:6]}", Workspace(tmp_path / "ws"))
    ex = stages.executor()
    ex.write_bytes(python, DUMPER.encode())
    assert isinstance(ex, SSHExecutor)
    ex.sftp().chmod(python, 0o755)
    return stages, wd, python


@pytest.mark.parametrize("kind", ["ssh", "slurm"])
def test_remote_stage_commands_quote_paths_end_to_end(kind: str, cluster: LoopbackCluster, tmp_path: Path,
                                                       remote_wd: str, pwned: Path) -> None:
    """The real quantize stage (upload, job script, launch line or sbatch argv with the URL's sbatch options,
    status polling, result) and the default serve command, with a workspace path no shell may split."""
    from pytest_day0.checkpoint.recipes import resolve_recipe

    source = tmp_path / "src model $(x)"
    source.mkdir()
    (source / "config.json").write_text("{}")
    calibration = tmp_path / "calib.txt"
    calibration.write_text("hello\n")
    stages, wd, python = _remote_stages(cluster, tmp_path, kind, remote_wd, pwned)
    try:
        with cluster.exclusive():
            result = stages.quantize(QuantizeJob(resolve_recipe("fp8"), source, "srckey", "ptqkey", calibration,
                                                 calib_size=3, timeout_s=120, engine="modelopt"))
        assert str(result.checkpoint) == f"{wd}/checkpoints/ptqkey" and not result.reused
        ex = stages.executor()
        dump = python.rsplit("/", 1)[0] + "/argv.bin"  # where the dumper writes: beside itself
        argv = nul_args((ex.read_bytes(dump) or b"").decode())
        staging = f"{wd}/checkpoints/.ptqkey.staging-{stages.session_id}"
        assert argv[:4] == ["-m", "pytest_day0.stages.quantize", "--model", f"{wd}/sources/srckey"]
        assert argv[argv.index("--export-path") + 1] == staging
        assert argv[argv.index("--calibration") + 1].startswith(f"{wd}/inputs/calibration-")
        assert ex.exists(f"{wd}/checkpoints/ptqkey/config.json")
        # the default serve command: run it through the same shell, the dumper records what python would get
        command, _ = stages._serve_command(f"{wd}/ckpt", "fp8 $(id)", f"{wd}/servers/r.json")
        assert ex.run(command, timeout_s=60).ok
        served = nul_args((ex.read_bytes(dump) or b"").decode())
        assert served == ["-m", REFERENCE_MODULE, "--checkpoint", f"{wd}/ckpt", "--served-model-name", "fp8 $(id)",
                          "--host", "127.0.0.1", "--port", "0", "--ready-file", f"{wd}/servers/r.json"]
    finally:
        stages.close()


def test_job_launch_and_status_probes_quote_everything(ssh_ex: SSHExecutor, remote_wd: str, pwned: Path) -> None:
    """The background-job launch line (cd, setsid bash -c, log and exit-code redirections) with hostile
    workdir/log/script paths, a job script exporting hostile values, and status/cancel with a forged job id."""
    evil = hostile(pwned)
    wd = f"{remote_wd}/{evil[0]}/{evil[3]}/{evil[5]}"
    ssh_ex.makedirs(f"{wd}/logs dir")
    script = job_script(shlex.join(["printf", "%s\\0", *evil]), {"DAY0_X": evil[4]}) + 'printf "%s\\0" "$DAY0_X"\n'
    spec = JobSpec("day0-sec", script, wd, f"{wd}/logs dir/{evil[1]}.log", f"{wd}/{evil[2]}.sh")
    ssh_ex.makedirs(spec.log_path.rsplit("/", 1)[0])  # the marker's own slashes nest the hostile names
    handle = ssh_ex.submit(spec)
    status, _ = watch_job(ssh_ex, handle, what="quoting", stage_class=FailureClass.UNKNOWN, timeout_s=60)
    assert status.state == "COMPLETED"
    assert nul_args((ssh_ex.read_bytes(spec.log_path) or b"").decode()) == [*evil, evil[4]]
    forged = JobHandle(f"1; touch {pwned}", "x", f"{wd}/none $(touch {pwned}).log", "ssh")
    assert ssh_ex.status(forged).state == "CANCELLED"  # no such process, no exit code: nothing was run
    ssh_ex.cancel([forged])  # a non-numeric id is never put on a command line
    ssh_ex.remove_tree(f"{remote_wd}/{evil[0]}")
    assert not ssh_ex.exists(f"{remote_wd}/{evil[0]}")


def test_slurm_sbatch_argv_and_probes_quote_everything(cluster: LoopbackCluster, remote_wd: str,
                                                       pwned: Path) -> None:
    """sbatch with hostile --chdir/--output/script paths and sbatch options; squeue/scontrol/sacct/scancel with
    a forged job id. ``%`` too: sbatch expands ``%j`` in --output itself, so the executor writes ``%%``."""
    m = str(pwned)
    ex = SlurmExecutor(cluster.target(), ["--partition=debug", "--time=00:10:00",  # type: ignore[arg-type]
                                          f"--comment=c $(touch {m}); `touch {m}`"])
    try:
        wd = f"{remote_wd}/w d $(touch {m}) %j %x 100%/'q\"; touch {m}"
        ex.makedirs(f"{wd}/logs")
        values = hostile(pwned)
        spec = JobSpec("day0-sec-sbatch", job_script(shlex.join(["printf", "%s\\0", *values, "$PWD"])), wd,
                       f"{wd}/logs/`touch {m}`.log", f"{wd}/job; touch {m}.sh")
        ex.makedirs(spec.log_path.rsplit("/", 1)[0])
        with cluster.exclusive():
            handle = ex.submit(spec)
            status, _ = watch_job(ex, handle, what="quoting", stage_class=FailureClass.UNKNOWN, timeout_s=90)
        assert status.state == "COMPLETED"
        assert nul_args((ex.read_bytes(spec.log_path) or b"").decode()) == [*values, "$PWD"]
        shown = cluster.slurm("scontrol", "show", "job", handle.job_id)
        if shown:  # still known to the controller (MinJobAge): the option arrived as the one value given
            assert f"Comment=c $(touch {m}); `touch {m}`" in shown, shown
        forged = JobHandle(f"1;touch {m}", "x", "", "slurm")
        assert ex.status(forged).state == "UNKNOWN"
        ex.cancel([forged])
        assert ex.jobs_named(f"$(touch {m})") == []
    finally:
        ex.close()
