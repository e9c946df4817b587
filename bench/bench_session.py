"""The release session itself: cached re-run vs first run, and the plugin's overhead around its stages.

Runs ``pytest --day0-model demo --recipe fp8`` twice against one fresh ``--day0-workdir`` (from an empty
directory, so only the plugin's own tests are collected), each as a child process timed from outside:

  first run   everything happens: ModelOpt PTQ, two reference servers started, every task scored on both
  re-run      the same command again: the checkpoint and every finished sample are reused, no server starts;
              goal: re-run wall <= 5% of the first run's

Plugin overhead (first run): session wall time minus the time spent inside stages. "Inside stages" is the union
of the intervals of the ``stage_time`` events the release chain writes to events.jsonl (release/chain.py
``_timed``): ``PTQ <recipe>`` (ModelOpt quantize + export), ``serve <side>`` (a reference server started until it
answers), ``eval <side>/<task>`` (scoring one task on one side). Overlapping stages are counted once. Everything
else is overhead: interpreter + pytest start-up and collection, importing the plugin, the source and checkpoint
gates (header inspection, coverage, metadata), comparison gates and statistics, writing reports, stopping the
servers. pytest's own share is measured apart (``pytest --version``; ``pytest -p no:day0`` collecting an empty
directory), as is importing the plugin module, so the table shows what is pytest's and what is ours.
Goal: overhead <= 5% of the session.

Before measuring, one tiny session (``--day0-limit 1``, another workspace) warms the bytecode caches, as on any
machine where the plugin has run once; PYTHONDONTWRITEBYTECODE is removed from the children's environment.

Run: python bench/bench_session.py [--limit N] (--limit passes --day0-limit N: a quick mode; the headline is
the full demo). Prints a table and writes bench/results/session.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STARTED: list[float] = []  # epoch start of each child, to place the stages inside the session


def timed(cmd: list[str], cwd: Path, log: Path | None = None) -> tuple[float, int, str]:
    """Wall seconds, exit status and output of one child process."""
    STARTED.append(time.time())
    t0 = time.perf_counter()
    # Bytecode as any installed package has it (pip compiles at install; pytest caches its assertion-rewritten
    # modules on first use): compiling our ~60 modules on every start would be measured as "overhead" otherwise.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(proc.stdout)
    return wall, proc.returncode, proc.stdout


def best_of(n: int, cmd: list[str], cwd: Path) -> float:
    return min(timed(cmd, cwd)[0] for _ in range(n))


def read_events(ws: Path) -> list[dict[str, Any]]:
    path = ws / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def stage_summary(events: list[dict[str, Any]], started: float, wall: float) -> dict[str, Any]:
    """Per-stage seconds, the union of their intervals (a stage_time event is written when a stage ends), and
    where the time outside them falls: before the first stage, between stages, after the last."""
    spans = sorted((e["time"] - e["seconds"], e["time"], e["stage"]) for e in events if e.get("event") == "stage_time")
    union = 0.0
    cur_start = cur_end = None
    for start, end, _ in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                union += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        union += cur_end - cur_start
    per_stage: dict[str, float] = {}
    for start, end, stage in spans:
        per_stage[stage] = per_stage.get(stage, 0.0) + (end - start)
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.get("event", "?")] = kinds.get(e.get("event", "?"), 0) + 1
    before = (spans[0][0] - started) if spans else wall
    after = (started + wall - max(end for _, end, _ in spans)) if spans else 0.0
    return {"inside_stages_s": union, "sum_of_stages_s": sum(per_stage.values()), "per_stage_s": per_stage,
            "events": kinds, "before_first_stage_s": before, "after_last_stage_s": after,
            "between_stages_s": wall - union - before - after}


def verdict(ws: Path) -> str | None:
    path = ws / "verdict.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    verdicts = data.get("session", {}).get("verdicts", []) if isinstance(data, dict) else []
    return ",".join(f"{v.get('recipe')}:{v.get('decision')}" for v in verdicts if isinstance(v, dict)) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--recipe", default="fp8")
    parser.add_argument("--limit", type=int, default=None, help="quick mode: --day0-limit N samples per task")
    parser.add_argument("--python", default=sys.executable, help="the python whose pytest runs the session")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "session.json")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and logs (printed)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="day0-bench-session-"))
    cwd = tmp / "cwd"  # empty: pytest collects only the plugin's own release tests
    cwd.mkdir()
    ws = tmp / "ws"
    py = args.python
    # a path option as one word: as two words, an existing workspace is also a positional path to pytest, which
    # moves its rootdir (the plugin then stops with USER_CONFIG_ERROR, exit 4: the re-run measured that once)
    session = [py, "-m", "pytest", "--day0-model", args.model, "--recipe", args.recipe, f"--day0-workdir={ws}",
               "-p", "no:cacheprovider", "-q"]
    if args.limit:
        session += ["--day0-limit", str(args.limit)]
    try:
        # warm-up, not measured: one tiny session in another workspace writes the bytecode caches a machine has
        # after its first session (see timed())
        timed([f"--day0-workdir={tmp / 'warm-up'}" if a == f"--day0-workdir={ws}" else a for a in session]
              + ["--day0-limit", "1"], cwd, tmp / "warm-up.log")
        python_s = best_of(3, [py, "-c", "pass"], cwd)
        pytest_version_s = best_of(3, [py, "-m", "pytest", "--version"], cwd)
        pytest_empty_s = best_of(3, [py, "-m", "pytest", "-p", "no:day0", "-p", "no:cacheprovider", "-q"], cwd)
        import_plugin_s = best_of(3, [py, "-c", "import pytest, pytest_day0.plugin"], cwd)
        import_pytest_s = best_of(3, [py, "-c", "import pytest"], cwd)

        first_s, first_rc, _ = timed(session, cwd, tmp / "first.log")
        first_events = read_events(ws)
        second_s, second_rc, _ = timed(session, cwd, tmp / "second.log")
        second_events = read_events(ws)[len(first_events):]
        first = stage_summary(first_events, STARTED[-2], first_s)
        second = stage_summary(second_events, STARTED[-1], second_s)
        first_verdict = verdict(ws)
        load = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    overhead = first_s - first["inside_stages_s"]
    pytest_share = pytest_empty_s
    plugin_import = max(import_plugin_s - import_pytest_s, 0.0)
    ours = overhead - pytest_share - plugin_import
    rerun_ratio = second_s / first_s
    overhead_ratio = overhead / first_s
    mode = f"--day0-limit {args.limit}" if args.limit else "full demo"
    print(f"session: pytest --day0-model {args.model} --recipe {args.recipe} ({mode}); "
          f"load average {load[0]:.2f} on {os.cpu_count()} cpus")
    print(f"{'measure':<58} {'seconds':>9} {'share':>8}")
    rows: list[tuple[str, float, float | None]] = [
        (f"first run: session wall (exit {first_rc}, verdict {first_verdict})", first_s, 1.0),
        ("  inside stages (union of stage_time intervals)", first["inside_stages_s"],
         first["inside_stages_s"] / first_s),
    ]
    rows += [(f"    {stage}", secs, secs / first_s) for stage, secs in sorted(first["per_stage_s"].items())]
    rows += [
        ("  overhead = wall - inside stages", overhead, overhead_ratio),
        ("    pytest start-up + empty collection (-p no:day0)", pytest_share, pytest_share / first_s),
        ("    importing the plugin (beyond `import pytest`)", plugin_import, plugin_import / first_s),
        ("    the rest: gates, statistics, reports, server stop", ours, ours / first_s),
        ("  overhead before the first stage (start-up, collection)", first["before_first_stage_s"],
         first["before_first_stage_s"] / first_s),
        ("  overhead between stages (gates between them)", first["between_stages_s"],
         first["between_stages_s"] / first_s),
        ("  overhead after the last stage (compare, reports, stop)", first["after_last_stage_s"],
         first["after_last_stage_s"] / first_s),
        (f"re-run: session wall (exit {second_rc})", second_s, rerun_ratio),
        ("  inside stages on the re-run", second["inside_stages_s"], second["inside_stages_s"] / first_s),
        ("reference: python -c pass", python_s, None),
        ("reference: pytest --version", pytest_version_s, None),
    ]
    for name, secs, share in rows:
        print(f"{name:<58} {secs:>9.2f} {'' if share is None else f'{share:.1%}':>8}")
    if first_rc or second_rc:  # a failed session measures the failure, not the plugin
        print(f"a session failed (exits {first_rc}, {second_rc}): see the logs (--keep); the ratios mean nothing")
    print(f"re-run / first: {rerun_ratio:.1%} (goal <= 5%: "
          f"{'met' if rerun_ratio <= 0.05 and not second_rc else 'MISSED'}); "
          f"re-run events: {second['events']}")
    print(f"plugin overhead / session: {overhead_ratio:.1%} (goal <= 5%: "
          f"{'met' if overhead_ratio <= 0.05 else 'MISSED'}); of it pytest's own start-up "
          f"{pytest_share / first_s:.1%}, ours {(plugin_import + ours) / first_s:.1%}")
    if args.keep:
        print(f"kept: {tmp}")
    result = {
        "command": " ".join(session[1:]).replace(str(ws), "<fresh workdir>"), "mode": mode,
        "first_run_s": first_s, "first_exit": first_rc, "first_verdict": first_verdict, "first": first,
        "rerun_s": second_s, "rerun_exit": second_rc, "rerun": second, "rerun_ratio": rerun_ratio,
        "overhead_s": overhead, "overhead_ratio": overhead_ratio, "pytest_startup_empty_s": pytest_share,
        "plugin_import_s": plugin_import, "overhead_ours_rest_s": ours, "python_startup_s": python_s,
        "pytest_version_s": pytest_version_s, "goal_rerun_le_5pct": rerun_ratio <= 0.05 and not second_rc,
        "goal_overhead_le_5pct": overhead_ratio <= 0.05, "machine": platform.platform(), "cpus": os.cpu_count(),
        "loadavg": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
