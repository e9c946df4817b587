"""Executors: where PTQ and serving run (this machine, an SSH host, a SLURM cluster).

This module holds the pure parts shared by config validation and the stages: the ``--day0-executor`` URL
grammar and command templates. A template's placeholders are filled with shell-quoted values, so a model
path with ``;`` or spaces stays one argument; the template text itself is the user's own shell.
"""

from __future__ import annotations

import re
import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

ExecutorKind = Literal["local", "ssh", "slurm"]
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")

PTQ_FIELDS = frozenset({"python", "model", "qformat", "recipe", "export_path", "calibration", "calib_size"})
SERVE_FIELDS = frozenset({"python", "checkpoint", "name", "port", "ready_file"})
VLLM_SERVE_TEMPLATE = ("vllm serve {checkpoint} --served-model-name {name} --host 0.0.0.0 --port {port}")


@dataclass(frozen=True)
class ExecutorSpec:
    kind: ExecutorKind
    host: str | None = None
    user: str | None = None
    port: int = 22
    sbatch_args: tuple[str, ...] = ()  # from the URL query: ?partition=debug&time=02:00:00

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    @property
    def identity(self) -> str:
        """What makes two runs' remote artifacts the same place (not the scheduling options)."""
        return "local" if not self.remote else f"{self.kind}://{self.user or ''}@{self.host}:{self.port}"


def parse_executor(url: str) -> ExecutorSpec:
    """``local`` | ``ssh://[user@]host[:port]`` | ``slurm://[user@]host[:port][?sbatch_option=value&...]``.

    Raises ValueError with the reason (config turns it into one USER_CONFIG_ERROR line).
    """
    text = url.strip()
    if text in ("", "local"):
        return ExecutorSpec("local")
    parts = urlsplit(text)
    if parts.password is not None:  # checked first: no later message may echo it
        raise ValueError("put no password in --day0-executor (it would be logged); use a key: --day0-ssh-key")
    if parts.scheme not in ("ssh", "slurm"):
        raise ValueError(f"unknown executor {text!r}: use local, ssh://user@host[:port] or slurm://user@host[:port]")
    if not parts.hostname:
        raise ValueError(f"executor {text!r} names no host")
    if parts.path not in ("", "/"):
        raise ValueError(f"executor {text!r}: a path is not part of it; use --day0-remote-workdir")
    try:
        port = parts.port or 22
    except ValueError:
        raise ValueError(f"executor {text!r}: bad port") from None
    if parts.query and parts.scheme != "slurm":
        raise ValueError(f"executor {text!r}: query options are sbatch options, for slurm:// only")
    sbatch: list[str] = []
    for field in (f for f in parts.query.split("&") if f):
        key, _, value = (unquote(x) for x in field.partition("="))
        if not _OPTION.match(key):
            raise ValueError(f"executor {text!r}: {key!r} is not an sbatch option name")
        sbatch.append(f"--{key}={value}" if value else f"--{key}")
    user = unquote(parts.username) if parts.username else None
    return ExecutorSpec(parts.scheme, parts.hostname, user, port, tuple(sbatch))  # type: ignore[arg-type]


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, allowed: frozenset[str]) -> None:
    """Config-time validation: unknown placeholders are a typo the user should hear about before a job runs."""
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    unknown = sorted(n for n in names if n not in allowed or not n)
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                         f"known: {', '.join('{' + n + '}' for n in sorted(allowed))}")


def render_template(template: str, values: Mapping[str, object]) -> str:
    """Fill placeholders with shell-quoted values: ``{model}`` = ``'/data/my model; rm -rf ~'`` stays one word."""
    quoted = {k: shlex.quote(str(v)) for k, v in values.items()}
    return template.format_map(quoted)


def split_sbatch_args(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"--day0-sbatch-args: {exc}") from None
