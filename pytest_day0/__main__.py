"""``python -m pytest_day0``: each engine on its own, for scripting and debugging a stage in isolation.

    python -m pytest_day0 inspect CHECKPOINT            per-layer precision, bytes, metadata (headers only)
    python -m pytest_day0 quantize --model demo --recipe fp8 --out DIR
    python -m pytest_day0 serve CHECKPOINT [--name NAME]  reference server until Ctrl-C
    python -m pytest_day0 evaluate --url URL --model NAME --task arc_like [--limit N] --records F.jsonl
    python -m pytest_day0 release [pytest args]          the release session, without any test files

Errors print one ``[FAILURE_CLASS] message`` line and exit 2 (bad input) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pytest_day0.failures import Day0Error, FailureClass


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


def _quantize(args: argparse.Namespace) -> int:
    from pytest_day0.checkpoint.recipes import resolve_recipe
    from pytest_day0.stages.quantize import quantize_modelopt
    from pytest_day0.stages.source import CALIBRATION_TEXT, resolve_model

    result = quantize_modelopt(resolve_model(args.model), resolve_recipe(args.recipe), Path(args.out),
                               Path(args.calibration) if args.calibration else CALIBRATION_TEXT,
                               calib_size=args.calib_size, on_line=print if args.verbose else None)
    print(f"{result.recipe}: {result.checkpoint} ({'reused' if result.reused else f'{result.wall_s:.1f}s'})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pytest_day0.stages.serve import start_reference_server
    from pytest_day0.stages.source import resolve_model

    checkpoint = resolve_model(args.checkpoint)
    with start_reference_server(checkpoint, args.name, Path(args.workdir)) as handle:
        print(f"serving {checkpoint} as {handle.model!r} at {handle.url} (Ctrl-C stops)", flush=True)
        try:
            while handle.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pytest_day0.scoring.tasks import load_task
    from pytest_day0.serving.endpoint import Endpoint
    from pytest_day0.stages.evaluate import run_evaluation

    task = load_task(args.task, args.limit)
    result = run_evaluation(task, Endpoint(url=args.url.rstrip("/"), model=args.model), Path(args.records),
                            args.side, concurrency=args.concurrency)
    print(result.model_dump_json(indent=2))
    return 0 if result.status == "SUCCESS" else 1


def _release(rest: list[str]) -> int:
    import os

    import pytest

    # Collect nothing of the current directory (the plugin inserts its own suite); rootdir, and so the default
    # workspace, stays here.
    cwd = os.getcwd()
    return int(pytest.main(["--rootdir", cwd, "--ignore-glob=*", cwd, *rest]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["release"]:
        return _release(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pytest_day0", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="header-only checkpoint inspection")
    p.add_argument("checkpoint")
    p = sub.add_parser("quantize", help="ModelOpt PTQ + HF export")
    p.add_argument("--model", default="demo")
    p.add_argument("--recipe", default="fp8")
    p.add_argument("--out", required=True)
    p.add_argument("--calibration")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("serve", help="the reference server on a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--name", default="model")
    p.add_argument("--workdir", default=".day0/logs")
    p = sub.add_parser("evaluate", help="score one task against an OpenAI-compatible URL")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--side", default="candidate")
    p.add_argument("--limit", type=int)
    p.add_argument("--concurrency", type=int, default=16)
    sub.add_parser("release", help="the release session (all further arguments go to pytest)")
    args = parser.parse_args(argv)
    handler = {"inspect": _inspect, "quantize": _quantize, "serve": _serve, "evaluate": _evaluate}[args.command]
    try:
        return handler(args)
    except Day0Error as exc:
        print(str(exc), file=sys.stderr)
        return 2 if exc.failure_class is FailureClass.USER_CONFIG_ERROR else 1


if __name__ == "__main__":
    sys.exit(main())
