"""The two plots to look at: 1 recipe x 3 tasks, and 13 recipes x 3 tasks with long names, a -100% delta and
recipes that failed upstream. Real comparisons (compare_task on paired per-item values), synthetic items.

Run: python bench/plot_examples.py [OUT_DIR]   (default docs/; writes delta-1x3.{svg,png}, delta-13x3.{svg,png};
     the PNGs reduced to 64 colours to keep docs/ small)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_day0.gates.compare import TaskComparison, compare_task, missing_comparison  # noqa: E402
from pytest_day0.gates.stats import paired_stats  # noqa: E402
from pytest_day0.report.plot import write_delta_png, write_delta_svg  # noqa: E402
from pytest_day0.scoring.records import TaskResult  # noqa: E402
from pytest_day0.scoring.tasks import TaskSpec  # noqa: E402

TASKS = (("arc_like", (0.0, 100.0)), ("gsm_like", (0.0, 100.0)), ("kendall_tau", (-1.0, 1.0)))


def comparison(recipe: str, task: str, scale: tuple[float, float], lost: int, gained: int, n: int,
               wrong: float = 0.1) -> TaskComparison:
    """n items, the baseline right on all but ``wrong`` of them; the candidate loses ``lost`` and gains ``gained``."""
    spec = TaskSpec(name=task, kind="generate", metric="acc", scale=scale, samples="x.jsonl")
    base = [0.0] * int(n * wrong) + [1.0] * (n - int(n * wrong))
    cand = list(base)
    for i in range(gained):
        cand[i] = 1.0
    for i in range(lost):
        cand[n - 1 - i] = 0.0

    def result(side: str, values: list[float]) -> TaskResult:
        r: dict[str, Any] = dict(task=task, side=side, status="SUCCESS", expected_samples=n, scored_samples=n,
                                 errored_samples=0, scale=scale, metric="acc", records_path="x")
        return TaskResult(score=spec.to_scale(sum(values) / n), **r)

    stats = paired_stats(list(zip(base, cand, strict=True)))
    return compare_task(spec, result("baseline", base), result("candidate", cand), recipe=recipe, paired=stats)


def one_recipe() -> list[TaskComparison]:
    return [comparison("fp8", "arc_like", TASKS[0][1], 2, 1, 1000),
            comparison("fp8", "gsm_like", TASKS[1][1], 14, 2, 300),
            comparison("fp8", "kendall_tau", TASKS[2][1], 0, 0, 400)]


def thirteen_recipes() -> tuple[list[TaskComparison], dict[str, str]]:
    names = ["fp8", "fp8_pc_pt", "fp8_pb_wo", "mxfp8", "nvfp4", "nvfp4_awq_lite", "int4_awq", "w4a8_awq",
             "int8_sq", "int8_wo", "nvfp4-with-a-very-long-recipe-name-from-a-config-file",
             "w4a8_awq_block128_calib512", "int4_awq_gs64"]
    shapes = [(0, 0), (2, 1), (5, 0), (12, 1), (40, 0), (3, 3), (25, 5), (8, 0), (1, 0), (0, 2), (60, 0), (1, 1),
              (30, 0)]
    rows: list[TaskComparison] = []
    for i, (recipe, (lost, gained)) in enumerate(zip(names, shapes, strict=True)):
        for task, scale in TASKS:
            n = 300 if task == "gsm_like" else 1000
            if recipe == "nvfp4" and task == "gsm_like":
                rows.append(comparison(recipe, task, scale, n, 0, n, wrong=0.0))  # 100 -> 0: -100%
            elif recipe == "int8_wo" and task == "kendall_tau":
                spec = TaskSpec(name=task, kind="generate", metric="acc", scale=scale, samples="x.jsonl")
                rows.append(missing_comparison(spec, "evaluation failed (INFRA_TRANSIENT)", recipe=recipe))
            else:
                rows.append(comparison(recipe, task, scale, lost * (i % 3 + 1), gained, n))
    failed = {"nvfp4_awq_lite-needs-cuda": "INFEASIBLE (USER_CONFIG_ERROR)",
              "int4_awq-coverage-check": "INFEASIBLE (QUANT_COVERAGE_FAILURE)"}
    return rows, failed


def small_png(path: Path) -> None:
    """64 colours, optimised: a fifth of the bytes for a file committed to docs/ (the plot itself is unchanged)."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs"
    rows, failed = thirteen_recipes()
    for name, comparisons, missing in (("delta-1x3", one_recipe(), {}), ("delta-13x3", rows, failed)):
        write_delta_svg(out / f"{name}.svg", comparisons, failed_recipes=missing)
        small_png(write_delta_png(out / f"{name}.png", comparisons, failed_recipes=missing))
        for ext in ("svg", "png"):
            print(f"{out / name}.{ext}: {(out / f'{name}.{ext}').stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
