"""The SSH executor (paramiko): commands with streamed output, SFTP files and header reads, port forwards.

Host keys are verified against known_hosts (paramiko's RejectPolicy): an unknown host is refused unless the
user explicitly trusts new hosts, and then its key is recorded; a *changed* key is always refused (paramiko
raises BadHostKeyException before any policy is asked). Every connection problem becomes one SYSTEMIC line:
the session cannot do anything useful without its cluster, so it stops instead of failing every test.
Commands are built from argv lists with ``shlex.join``; secrets (the key's passphrase) never reach a message.
"""

from __future__ import annotations

import contextlib
import errno
import select
import shlex
import socket
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from pydantic import SecretStr

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote.executor import (
    Command,
    CommandResult,
    Executor,
    JobHandle,
    JobSpec,
    JobStatus,
    LineSink,
    Tunnel,
    launch_line,
    process_job_status,
    shell_line,
)

CONNECT_TIMEOUT_S = 15.0
POLL_S = 0.2


@dataclass(frozen=True)
class SSHTarget:
    host: str
    user: str | None = None
    port: int = 22
    key_file: Path | None = None
    passphrase: SecretStr | None = field(default=None, repr=False)
    known_hosts: Path | None = None  # default ~/.ssh/known_hosts
    trust_new_host: bool = False
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    @property
    def label(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    @property
    def known_hosts_path(self) -> Path:
        return (self.known_hosts or Path("~/.ssh/known_hosts")).expanduser()


def _systemic(message: str) -> Day0Error:
    return Day0Error(FailureClass.SYSTEMIC, message)


class _RecordNewHost(paramiko.MissingHostKeyPolicy):  # type: ignore[misc,unused-ignore]
    """--day0-trust-new-host: accept a host seen for the first time and append its key to known_hosts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: list[str] = []

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        entry = paramiko.hostkeys.HostKeyEntry([hostname], key)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.path.open("a") as fh:
            fh.write(entry.to_line() or "")
        self.path.chmod(0o600)
        self.recorded.append(f"{hostname} {key.get_name()} {key.fingerprint}")


def load_key(path: Path, passphrase: SecretStr | None) -> paramiko.PKey:
    """A private key of any type paramiko reads; a failure names the file, never the passphrase."""
    secret = passphrase.get_secret_value() if passphrase else None
    try:
        password: Any = secret.encode() if secret else None  # cryptography wants bytes (the stubs say str)
        return paramiko.PKey.from_path(path, password=password)
    except FileNotFoundError:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"SSH key file {path} does not exist") from None
    except paramiko.PasswordRequiredException:
        raise _systemic(f"SSH key {path} is encrypted: give its passphrase in DAY0_SSH_KEY_PASSPHRASE") from None
    except Exception as exc:  # any escape would print the passphrase among a traceback's locals
        if isinstance(exc, TypeError) and not secret:  # cryptography's word for an encrypted OpenSSH-format key
            raise _systemic(f"SSH key {path} is encrypted: give its passphrase in DAY0_SSH_KEY_PASSPHRASE") from None
        problem = "wrong passphrase or unreadable key" if secret else f"not a readable private key " \
            f"({type(exc).__name__})"
        raise _systemic(f"cannot load SSH key {path}: {problem}") from None


def connect(target: SSHTarget) -> paramiko.SSHClient:
    """An authenticated client whose host key matched known_hosts, or a SYSTEMIC Day0Error (one line)."""
    client = paramiko.SSHClient()
    known = target.known_hosts_path
    if known.is_file():
        try:
            client.load_host_keys(str(known))
        except (OSError, paramiko.SSHException) as exc:
            raise _systemic(f"cannot read known_hosts {known}: {type(exc).__name__}") from None
    client.set_missing_host_key_policy(_RecordNewHost(known) if target.trust_new_host else paramiko.RejectPolicy())
    pkey = load_key(target.key_file, target.passphrase) if target.key_file else None
    where = f"ssh {target.label}"
    try:
        client.connect(target.host, port=target.port, username=target.user, pkey=pkey,
                       look_for_keys=pkey is None, allow_agent=pkey is None, timeout=target.connect_timeout_s,
                       banner_timeout=target.connect_timeout_s, auth_timeout=target.connect_timeout_s)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise _systemic(f"{where}: host key {exc.key.get_name()} {exc.key.fingerprint} does NOT match {known} "
                        "(possible man-in-the-middle; if the host was re-keyed, fix known_hosts by hand)") from None
    except paramiko.AuthenticationException:
        client.close()
        key = f"key {target.key_file}" if target.key_file else "agent / default keys"
        raise _systemic(f"{where}: authentication failed ({key})") from None
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise _systemic(f"{where}: host key unknown: not in {known}; add it (ssh-keyscan -p {target.port} "
                            f"{target.host} >> {known}) or pass --day0-trust-new-host") from None
        raise _systemic(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    except (OSError, EOFError) as exc:  # refused, unreachable, DNS, timeout (NoValidConnectionsError is OSError)
        client.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise _systemic(f"{where}: cannot connect: {' '.join(str(reason).split())[:200]}") from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(30)
    return client


class SFTPByteSource:
    """A remote file for ``read_safetensors_header``: each ``read`` is one ranged SFTP read, counted."""

    def __init__(self, executor: SSHExecutor, path: str) -> None:
        self.executor = executor
        self.path = path
        self.reads = 0
        self.bytes_read = 0
        st = executor._stat(path)
        if st is None or st.st_mode is None or not stat_mod.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "no such remote file", path)
        self._size = int(st.st_size or 0)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        data = self.executor.read_bytes(self.path, offset, length)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "remote file vanished", self.path)
        self.bytes_read += len(data)
        return data


class SSHTunnel(Tunnel):
    """``-L 127.0.0.1:<free port>:host:port`` over the executor's own transport, one channel per connection."""

    def __init__(self, transport: paramiko.Transport, host: str, port: int) -> None:
        self.transport = transport
        self.remote_host = host
        self.remote_port = port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.local_port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, name=f"day0-tunnel-{self.local_port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            try:
                chan = self.transport.open_channel("direct-tcpip", (self.remote_host, self.remote_port), peer,
                                                   timeout=15)
            except (paramiko.SSHException, OSError, EOFError):
                conn.close()  # the client sees a reset: the service is not (yet) listening
                continue
            self.connections += 1
            with self._lock:
                self._open.update((conn, chan))
            threading.Thread(target=self._pump, args=(conn, chan), daemon=True).start()

    def _pump(self, conn: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while not self._closed.is_set():
                watched: list[Any] = [conn, chan]
                ready, _, _ = select.select(watched, [], [], 1.0)
                if conn in ready:
                    data = conn.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
                self._open.discard(chan)
            chan.close()
            conn.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            items = list(self._open)
            self._open.clear()
        for item in items:
            with contextlib.suppress(Exception):
                item.close()


class SSHExecutor(Executor):
    """One SSH connection per process: commands, SFTP and tunnels all share its transport."""

    kind = "ssh"

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()  # paramiko's SFTPClient is not safe for concurrent requests
        self._home: str | None = None

    def describe(self) -> str:
        return f"ssh://{self.target.label}"

    # ------------------------------------------------------------------ connection

    def transport(self) -> paramiko.Transport:
        with self._lock:
            if self._client is not None:
                t = self._client.get_transport()
                if t is not None and t.is_active():
                    return t
                self._client.close()
                self._client = self._sftp = None
            self._client = connect(self.target)
            t = self._client.get_transport()
            assert t is not None
            return t

    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            transport = self.transport()
            channel = self._sftp.get_channel() if self._sftp is not None else None
            if self._sftp is None or channel is None or channel.closed:
                try:
                    client = paramiko.SFTPClient.from_transport(transport)
                except (paramiko.SSHException, OSError) as exc:
                    raise _systemic(f"ssh {self.target.label}: SFTP subsystem unavailable: {exc}") from None
                assert client is not None
                self._sftp = client
            return self._sftp

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
            if self._client is not None:
                self._client.close()
            self._client = self._sftp = None

    # ------------------------------------------------------------------ commands

    def run(self, command: Command, *, on_line: LineSink | None = None, timeout_s: float | None = None,
            ) -> CommandResult:
        line = shell_line(command)
        try:
            chan = self.transport().open_session(timeout=CONNECT_TIMEOUT_S)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _systemic(f"ssh {self.target.label}: cannot open a session: {type(exc).__name__}") from None
        chan.set_combine_stderr(True)
        chan.settimeout(POLL_S)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        chunks: list[bytes] = []
        pending = b""
        try:
            chan.exec_command(line)
            while True:
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"remote command ran past {timeout_s}s") from None
                    continue
                if not data:
                    break
                chunks.append(data)
                if on_line is not None:
                    pending += data
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        on_line(raw.decode(errors="replace").rstrip("\r"))
            if on_line is not None and pending:
                on_line(pending.decode(errors="replace"))
            chan.settimeout(None)
            code = chan.recv_exit_status()
        finally:
            chan.close()
        return CommandResult(code, b"".join(chunks).decode(errors="replace")[-100_000:])

    def check(self, command: Command, what: str) -> str:
        result = self.run(command, timeout_s=120)
        if not result.ok:
            raise Day0Error(FailureClass.INFRA_TRANSIENT,
                            f"{self.describe()}: {what} exited {result.exit_status}: {result.last_line()}")
        return result.output

    # ------------------------------------------------------------------ files

    def _stat(self, path: str) -> paramiko.SFTPAttributes | None:
        with self._lock:
            try:
                return self.sftp().stat(path)
            except OSError as exc:
                _raise_unless_missing(exc)
                return None

    def home(self) -> str:
        if self._home is None:
            with self._lock:
                self._home = self.sftp().normalize(".")
        return self._home

    def put(self, local: Path, remote: str) -> None:
        with self._lock:
            self.sftp().put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.sftp().get(remote, str(local))

    def exists(self, path: str) -> bool:
        return self._stat(path) is not None

    def read_bytes(self, path: str, offset: int = 0, max_bytes: int | None = None) -> bytes | None:
        with self._lock:
            try:
                with self.sftp().open(path, "rb") as fh:
                    if offset:
                        fh.seek(offset)
                    data: bytes = fh.read() if max_bytes is None else fh.read(max_bytes)
                    return data
            except OSError as exc:
                _raise_unless_missing(exc)
                return None

    def write_bytes(self, path: str, data: bytes) -> None:
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self._lock:
            sftp = self.sftp()
            self.makedirs(parent)
            with sftp.open(tmp, "wb") as fh:
                fh.write(data)
            sftp.posix_rename(tmp, path)

    def makedirs(self, path: str) -> None:
        with self._lock:
            sftp = self.sftp()
            parts = [p for p in path.split("/") if p]
            current = "" if path.startswith("/") else "."
            for part in parts:
                current = f"{current}/{part}"
                if self._stat(current) is None:
                    with contextlib.suppress(OSError):  # a sibling process may have made it meanwhile
                        sftp.mkdir(current)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self.sftp().posix_rename(src, dst)

    def remove_tree(self, path: str) -> None:
        self.run(["rm", "-rf", "--", path], timeout_s=300)

    def open_source(self, path: str) -> SFTPByteSource:
        return SFTPByteSource(self, path)

    # ------------------------------------------------------------------ jobs (background process groups)

    def submit(self, job: JobSpec) -> JobHandle:
        self.write_bytes(job.script_path, job.script.encode())
        result = self.run(launch_line(job), timeout_s=60)
        pid = result.output.strip().splitlines()[-1] if result.output.strip() else ""
        if not result.ok or not pid.isdigit():
            raise Day0Error(FailureClass.INFRA_TRANSIENT, f"{self.describe()}: could not start job {job.name}: "
                            f"{result.last_line()}")
        return JobHandle(pid, job.name, job.log_path, self.kind)

    def status(self, job: JobHandle) -> JobStatus:
        pid = shlex.quote(job.job_id)
        out = self.run(f's=$(ps -o stat= -p {pid} 2>/dev/null); case "$s" in ""|Z*) echo dead;; *) echo alive;; '
                       'esac', timeout_s=60).output
        rc = self.read_bytes(job.log_path + ".rc")
        return process_job_status(out.strip() == "alive", None if rc is None else rc.decode(errors="replace"))

    def cancel(self, jobs: Sequence[JobHandle]) -> None:
        for job in jobs:
            if not job.job_id.isdigit():
                continue
            pid = job.job_id
            # TERM the whole process group, KILL what is left after 10 s.
            self.run(f"kill -TERM -- -{pid} 2>/dev/null; for i in $(seq 100); do kill -0 -- -{pid} 2>/dev/null "
                     f"|| exit 0; sleep 0.1; done; kill -KILL -- -{pid} 2>/dev/null; exit 0", timeout_s=60)

    # ------------------------------------------------------------------ network

    def forward(self, host: str, port: int) -> SSHTunnel:
        return SSHTunnel(self.transport(), host, port)


def _raise_unless_missing(exc: OSError) -> None:
    """SFTP says "no such file" as FileNotFoundError or as a bare ENOENT: both mean absent, anything else raises."""
    if not (isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT):
        raise exc
