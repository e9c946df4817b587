"""What pytest-day0 costs a pytest session that does not use it: an unrelated one-test project, timed with the
plugin loaded (as it is in every session of an environment where it is installed) and with ``-p no:day0``.

Runs alternate (with, without, with, ...) so load on the machine hits both alike; the table shows the median and
the spread, the ratio of medians, and the plugin module's own import time (``python -X importtime``).

    python bench/bench_plugin_idle.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _session(project: Path, *extra: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAY0_", "PYTEST_"))}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "test_one.py"],
                          cwd=project, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the session failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return took


def _import_ms() -> float:
    """Cumulative import time of pytest_day0.plugin beyond what pytest itself imports."""
    probe = "import pytest; import pytest_day0.plugin"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                          check=True)
    for line in done.stderr.splitlines():
        if line.rstrip().endswith("| pytest_day0.plugin"):
            return int(line.split("|")[1]) / 1000
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="sessions per variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
        _session(project)  # warm the bytecode and page caches once, unmeasured
        _session(project, "-p", "no:day0")
        with_plugin, without = [], []
        for _ in range(args.runs):
            with_plugin.append(_session(project))
            without.append(_session(project, "-p", "no:day0"))
    med_with, med_without = statistics.median(with_plugin), statistics.median(without)
    imports = [_import_ms() for _ in range(5)]
    rows = [("with pytest-day0", med_with, min(with_plugin), max(with_plugin)),
            ("-p no:day0", med_without, min(without), max(without))]
    print(f"{'unrelated 1-test session':<26}{'median s':>10}{'min s':>9}{'max s':>9}")
    for name, med, lo, hi in rows:
        print(f"{name:<26}{med:>10.3f}{lo:>9.3f}{hi:>9.3f}")
    ratio = med_with / med_without
    print(f"ratio of medians: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%); plugin import on top of pytest: "
          f"{statistics.median(imports):.1f} ms (median of 5)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plugin_idle.json").write_text(json.dumps({
        "runs": args.runs, "with_s": with_plugin, "without_s": without, "median_with_s": med_with,
        "median_without_s": med_without, "ratio": ratio, "plugin_import_ms": imports}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
