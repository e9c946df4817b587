"""``python -m pytest_day0``: each engine on its own, for scripting and debugging a stage in isolation.

Every command stops on SIGINT (Ctrl-C), SIGTERM (a CI cancel, ``docker stop``, systemd) and SIGHUP (a closed
terminal) the same way: whatever it started (the reference server of ``serve``, the PTQ child of ``quantize``,
the servers and jobs of ``release``) is stopped before it exits. Bad input is one ``[USER_CONFIG_ERROR]`` line
and exit 2, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.signals import StopSignals

DESCRIPTION = """\
Each engine of a day-0 release on its own, for scripting and debugging one stage:

  python -m pytest_day0 inspect CHECKPOINT             per-layer precision, bytes, metadata (headers only)
  python -m pytest_day0 quantize --recipe fp8 --out DIR  ModelOpt PTQ + Hugging Face export
  python -m pytest_day0 serve CHECKPOINT [--port N]     the reference server, until Ctrl-C or SIGTERM
  python -m pytest_day0 evaluate --url URL --model NAME --task arc_like --side baseline --records F.jsonl
  python -m pytest_day0 release [pytest options]        the release session, without any test files

Errors print one "[FAILURE_CLASS] message" line and exit 2 (bad input) or 1 (anything else). Ctrl-C, SIGTERM
and SIGHUP stop every process the command started; a third signal quits at once.
"""

CLI_STOP_GRACE_S = 5.0  # a reference server has nothing to flush: SIGKILL after this, so a stop takes < 10 s


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every optional option's help with its default; an option without
    a value by default says in its own help what happens then ("default: all")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings or "default" in text:
            return text
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the project's one line (class, message, exit 2), not usage + traceback."""

    def error(self, message: str) -> NoReturn:
        print(f"[{FailureClass.USER_CONFIG_ERROR}] {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


STOP = StopSignals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


# ---------------------------------------------------------------- argument types: bad input fails at parse time


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0 = a free one), got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _endpoint_url(text: str) -> str:
    from pytest_day0.config import check_endpoint_url

    try:
        return check_endpoint_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


# ---------------------------------------------------------------- commands


def _inspect(args: argparse.Namespace) -> int:
    from pytest_day0.checkpoint.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps({
        "path": info.path, "quant_format": info.quant_format, "quant_algo": info.quant_algo,
        "total_bytes": info.total_bytes, "shards": list(info.shards), "tensors": info.tensor_count,
        "precision_counts": info.precision_counts(), "header_reads": info.header_reads,
        "layers": {layer.module: layer.precision.value for layer in info.linear_layers},
    }, indent=2))
    return 0


def _model(value: str, argument: str) -> Path:
    """resolve_model, its messages naming this command's argument instead of the plugin's --day0-model."""
    from pytest_day0.stages.source import resolve_model

    try:
        return resolve_model(value)
    except Day0Error as exc:
        if not exc.message.startswith("--day0-model "):
            raise
        raise Day0Error(exc.failure_class, argument + exc.message.removeprefix("--day0-model"), **exc.detail) from None


def _quantize(args: argparse.Namespace) -> int:
    from pytest_day0.checkpoint.recipes import resolve_recipe
    from pytest_day0.stages.quantize import quantize_modelopt
    from pytest_day0.stages.source import CALIBRATION_TEXT

    recipe = resolve_recipe(args.recipe)
    if "modelopt" not in recipe.engines:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"recipe {recipe.name!r} is made by {', '.join(recipe.engines)}, not ModelOpt (this command); "
                        f"run it in a release: --day0-quantize {recipe.engines[0]} --recipe {recipe.name}")
    result = quantize_modelopt(_model(args.model, "--model"), recipe, Path(args.out),
                               args.calibration or CALIBRATION_TEXT, calib_size=args.calib_size,
                               on_line=print if args.verbose else None)
    print(f"{result.recipe}: {result.checkpoint} ({'reused' if result.reused else f'{result.wall_s:.1f}s'})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pytest_day0.stages.serve import check_bind_host, start_reference_server

    check_bind_host(args.host, args.allow_remote_bind)  # before loading anything
    checkpoint = _model(args.checkpoint, "checkpoint")
    with start_reference_server(checkpoint, args.name, Path(args.workdir), timeout_s=args.start_timeout,
                                host=args.host, port=args.port, threads=args.threads, max_batch=args.max_batch,
                                allow_remote_bind=args.allow_remote_bind) as handle:
        print(f"serving {checkpoint} as {handle.model!r} at {handle.url} (Ctrl-C or SIGTERM stops it; "
              f"log: {handle.log_path})", flush=True)
        try:
            while handle.running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            handle.stop(grace_s=CLI_STOP_GRACE_S)
            print(f"{STOP.name}: server stopped", file=sys.stderr, flush=True)
            return 0  # the way a server is meant to end
        returncode = handle.process.poll() if handle.process is not None else None
        log = handle.log_path
    raise Day0Error(FailureClass.DEPLOYMENT_HEALTH_FAILED,
                    f"the reference server exited by itself with code {returncode} (log: {log})")


def _evaluate(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from pytest_day0.scoring.tasks import load_task
    from pytest_day0.serving.endpoint import Endpoint
    from pytest_day0.stages.evaluate import run_evaluation

    task = load_task(args.task, args.limit)
    key = os.environ.get("DAY0_API_KEY")
    endpoint = Endpoint(url=args.url, model=args.model, api_key=SecretStr(key) if key else None)
    result = run_evaluation(task, endpoint, Path(args.records), args.side, concurrency=args.concurrency)
    print(result.model_dump_json(indent=2))
    return 0 if result.status == "SUCCESS" else 1


def _release(rest: list[str]) -> int:
    import pytest

    # Collect nothing of the current directory (the plugin inserts its own suite); rootdir, and so the default
    # workspace, stays here.
    cwd = os.getcwd()
    return int(pytest.main(["--rootdir", cwd, "--ignore-glob=*", cwd, *rest]))


def build_parser() -> argparse.ArgumentParser:
    from pytest_day0.serving import REFERENCE_MAX_BATCH

    parser = _Parser(prog="python -m pytest_day0", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_Formatter)

    p = command("inspect", "header-only inspection of a checkpoint: per-layer precision, bytes, metadata (JSON)")
    p.add_argument("checkpoint", help="a checkpoint directory or one .safetensors file")

    p = command("quantize", "ModelOpt PTQ of a model and Hugging Face export (the PTQ runs in a child process)")
    p.add_argument("--model", default="demo", help="'demo', a checkpoint directory, or a cached hub id org/name")
    p.add_argument("--recipe", default="fp8", help="a ModelOpt qformat name (fp8, nvfp4, int4_awq, ...)")
    p.add_argument("--out", required=True, help="directory for the exported checkpoint (reused when finished)")
    p.add_argument("--calibration", type=_existing_file, default=None,
                   help="calibration text file (default: the text shipped with pytest-day0)")
    p.add_argument("--calib-size", type=_positive_int, default=64, help="calibration samples")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the PTQ child's output")

    p = command("serve", "the reference OpenAI-compatible server on a checkpoint, until Ctrl-C or SIGTERM")
    p.add_argument("checkpoint", help="'demo', a checkpoint directory, or a cached hub id org/name")
    p.add_argument("--name", default="model", help="the served model name (what requests put in 'model')")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but 127.0.0.1 or ::1 needs --allow-remote-bind")
    p.add_argument("--port", type=_port, default=0, help="port to listen on; 0 picks a free one (printed)")
    p.add_argument("--allow-remote-bind", action="store_true",
                   help="allow a non-loopback --host: the server has no authentication and runs any prompt")
    p.add_argument("--max-batch", type=_positive_int, default=REFERENCE_MAX_BATCH,
                   help="most queued scoring or greedy requests run as one forward; 1 = one at a time")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: 1 below 50M parameters, else up to 8)")
    p.add_argument("--start-timeout", type=_positive_seconds, default=120.0,
                   help="seconds to wait for the server to load the checkpoint and answer /health")
    p.add_argument("--workdir", default=".day0/logs", help="directory for the server's log and ready file")

    p = command("evaluate", "score one task against an OpenAI-compatible server; prints the task result (JSON)")
    p.add_argument("--url", required=True, type=_endpoint_url,
                   help="the server's base URL, http(s)://host:port (a trailing /v1 is accepted); an API key "
                        "is read from DAY0_API_KEY, never from the command line")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--task", required=True, help="a built-in task name (arc_like, gsm_like, tau_like) or a spec file")
    p.add_argument("--side", required=True, choices=("baseline", "candidate"),
                   help="which side of the comparison these records are (recorded in the result)")
    p.add_argument("--records", required=True,
                   help="per-sample JSONL records: appended as samples finish, finished ones are reused on a re-run")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N samples (default: all)")
    p.add_argument("--concurrency", type=_positive_int, default=16, help="requests in flight")

    command("release", "the release session; every further argument goes to pytest (release --help lists them)")
    return parser


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": _inspect, "quantize": _quantize, "serve": _serve, "evaluate": _evaluate,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    STOP.install()
    if argv[:1] == ["release"]:
        return _release(argv[1:])  # pytest reports its own interruption (exit 2) and stops what the session started
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except Day0Error as exc:
        print(str(exc), file=sys.stderr)
        return 2 if exc.failure_class is FailureClass.USER_CONFIG_ERROR else 1
    except KeyboardInterrupt:
        print(f"{STOP.name}: {args.command} interrupted; everything it started is stopped", file=sys.stderr)
        return 128 + signal.Signals[STOP.name].value  # the shell's convention for "ended by this signal"


if __name__ == "__main__":
    sys.exit(main())
