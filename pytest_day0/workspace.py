"""The run's workspace: content-keyed directories, atomic writes, cross-process locks, an event log.

Under pytest-xdist several processes share one workspace; a stage runs once because whoever takes its
lock first does the work and leaves a finished artifact that the others find.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_day0.failures import Day0Error, FailureClass

# A full or failing disk: nothing later in the session can write either, so it is SYSTEMIC, never retried.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, exclusively created temporary file next to ``path``, mode 0666 minus the umask.

    Not ``tempfile.mkstemp``: its files are always 0600 whatever the umask, so verdict.json and delta.svg were
    unreadable to the group (a report publisher, a web server) while events.jsonl beside them was not. No
    maintained library does only this (``atomicwrites`` is unmaintained since 2022), hence these few lines.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def replace_file(path: Path, text: str | bytes) -> None:
    """A reader never sees half a file: write beside it, fsync, rename over it. Raises OSError, leaving the old
    file and no temporary copy, for callers that word their own error (the records file counts what it kept).
    The new file gets the mode any other new file would (0666 minus the umask: 0644 by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text if isinstance(text, bytes) else text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """``replace_file`` for the workspace's own files (text, or bytes such as a PNG): a full disk is one SYSTEMIC
    line, not a traceback."""
    try:
        replace_file(path, text)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise Day0Error(FailureClass.SYSTEMIC, f"cannot write {path}: {exc.strerror} "
                            "(the previous file, if any, is intact)", errno=exc.errno) from None
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_events(root: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """A workspace's events.jsonl, skipping a line being written right now (readers never lock)."""
    path = root / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if kind is None or rec.get("event") == kind:
            out.append(rec)
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz"}


def _stat_identity(path: Path) -> tuple[int, int, int, int, int]:
    """What changes whenever a file's bytes may have: size, mtime and ctime in ns, inode, device.

    ctime cannot be set back by a program (utime sets only atime/mtime), so a rewrite in place with the same size
    within the same second still changes it."""
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def checkpoint_fingerprint(path: Path, cache: Path | None = None) -> str:
    """Identity of a checkpoint by content: every file's bytes (sha256), configs and weights alike.

    Hashing a 100 GB checkpoint reads 100 GB once (minutes at disk speed), so each file's digest is remembered in
    ``cache`` (a JSON file, e.g. the workspace's) under its ``_stat_identity``: later sessions stat the files and
    read nothing unless a file changed. Without ``cache`` everything is read every time (fine for small models)."""
    known: dict[str, Any] = (read_json(cache) or {}) if cache is not None else {}
    changed = False
    parts: list[object] = []
    for child in sorted(path.iterdir()):
        if not child.is_file() or child.name.startswith("."):
            continue
        if child.suffix not in _WEIGHT_SUFFIXES and child.suffix not in {".json", ".jinja", ".model", ".txt",
                                                                          ".tiktoken", ".py"}:
            continue
        ident = [str(child.resolve()), *_stat_identity(child)]
        entry = known.get(str(child.resolve()))
        if entry is not None and entry.get("stat") == ident:
            file_hash = str(entry["sha256"])
        else:
            file_hash = file_digest(child)
            if _stat_identity(child) == tuple(ident[1:]):  # unchanged while we read it: safe to remember
                known[str(child.resolve())] = {"stat": ident, "sha256": file_hash}
                changed = True
        parts.append((child.name, file_hash))
    if cache is not None and changed:
        with contextlib.suppress(Day0Error, OSError):  # a cache that cannot be written costs a re-read next time
            atomic_write_json(cache, known)
    return digest(parts)


def pid_alive(pid: int) -> bool:
    """Is the process that registered a server or a job still there (so its records are not stale)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / ".locks").mkdir(exist_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @contextmanager
    def lock(self, name: str, timeout_s: float = -1) -> Iterator[None]:
        with FileLock(str(self.root / ".locks" / f"{name}.lock"), timeout=timeout_s):
            yield

    def event(self, kind: str, **fields: Any) -> None:
        """Append-only log of what actually ran (PTQ runs, server starts): proof of run-once under xdist."""
        line = json.dumps({"event": kind, "time": round(time.time(), 3), "pid": os.getpid(), **fields}, default=str)
        with self.lock("events"), (self.root / "events.jsonl").open("a") as fh:
            fh.write(line + "\n")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_events(self.root, kind)
