"""report.html with 100,000 flipped items: its size, the time to write it, and the time Chromium takes to show it.

A synthetic session (no model): two recipes' worth of flip details, 100k items in all by default, half multiple
choice with four log-likelihoods per side, half generation; prompts are a few-shot preamble shared by the task
(as lm-eval's are) plus a question of random words, responses are random words, so gzip finds what a real run
offers and no more. Steps timed:

* save + load the details as the chain and the controller do (``runs/<session>/flips/*.json``, pydantic),
* render and write report.html (``html_report.render_report``),
* in Debian's headless Chromium, offline (tests/browser.py): navigation start -> first page of the viewer shown,
  then a task filter, a direction filter, a search, a page turn (each from the event to the list re-rendered),
  and the JS heap in use.

    python bench/bench_report_html.py [--items 100000] [--out bench/results/report_html.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pytest_day0.gates.compare import Decision, Flips, TaskComparison  # noqa: E402
from pytest_day0.gates.flip_items import FlipDetail, FlipItem, SideAnswer  # noqa: E402
from pytest_day0.release.comparisons import load_flip_details, save_flip_detail  # noqa: E402
from pytest_day0.report.html_report import render_report, write_report  # noqa: E402
from pytest_day0.verdict import SessionVerdict, Verdict  # noqa: E402

_TEXT = ("the of and to in is was that for it as with be on not he by are this at from his but have an they which "
         "one you were all her she there would their we him been has when who will no more if out so up said what its "
         "about than into them can only other time new some could these two may first then do any like my now over "
         "such our man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three")
WORDS = _TEXT.split()
TASKS = (("mmlu_like", True), ("gsm_like", False), ("arc_like", True), ("hellaswag_like", True),
         ("math_like", False))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic(items: int, seed: int = 0) -> tuple[SessionVerdict, list[TaskComparison], list[FlipDetail]]:
    rng = random.Random(seed)
    recipes = ("nvfp4", "int4_awq")
    groups = [(r, t, mc) for r in recipes for t, mc in TASKS]
    per = items // len(groups)
    details, comparisons = [], []
    for g, (recipe, task, mc) in enumerate(groups):
        count = per + (items - per * len(groups) if g == len(groups) - 1 else 0)
        preamble = "\n\n".join(f"Question: {_sentence(rng, 25)}?\nAnswer: {_sentence(rng, 6)}" for _ in range(5))
        out = []
        for i in range(count):
            direction = "lost" if i < count * 0.7 else "gained"
            choices = [_sentence(rng, 4) for _ in range(4)] if mc else None
            target: int | str = rng.randrange(4) if mc else _sentence(rng, 3)

            def side(right: bool, choices: list[str] | None = choices, target: int | str = target) -> SideAnswer:
                if choices is not None:
                    lp = [round(rng.uniform(-30, -0.01), 4) for _ in choices]
                    pick = int(target) if right else (int(target) + 1) % 4
                    lp[pick] = max(lp) + 0.5
                    return SideAnswer(response=choices[pick], choice_logprobs=lp, correct=float(right))
                return SideAnswer(response=(str(target) if right else "") + " " + _sentence(rng, rng.randint(8, 60)),
                                  correct=float(right))

            out.append(FlipItem(id=f"{task}-{i:06d}", direction=direction,  # type: ignore[arg-type]
                                prompt=f"{preamble}\n\nQuestion: {_sentence(rng, 30)}?\nAnswer:", target=target,
                                choices=choices, baseline=side(direction == "lost"),
                                candidate=side(direction == "gained")))
        lost = [it.id for it in out if it.direction == "lost"]
        gained = [it.id for it in out if it.direction == "gained"]
        n = count * 4
        flips = Flips(n=n, tolerance=0.5, lost=lost, gained=gained)
        details.append(FlipDetail(recipe=recipe, task=task, n=n, tolerance=0.5, records={}, items=out))
        delta = (len(gained) - len(lost)) / n
        decision = Decision(gate="quality", tier="warn", passed=False, failure_class="REGRESSION",  # type: ignore[arg-type]
                            message=f"{task}: synthetic")
        comparisons.append(TaskComparison(
            task=task, recipe=recipe, scale=(0.0, 1.0), baseline=0.7, candidate=0.7 + delta, delta=delta,
            drop_fraction=-delta, gain_fraction=delta, threshold=0.01, floor_fraction=0.1, threshold_points=0.01,
            floor_points=0.1, floor=Decision(gate="floor", tier="hard", passed=True),  # type: ignore[arg-type]
            quality=decision, anomaly=Decision(gate="anomaly", tier="hard", passed=True),  # type: ignore[arg-type]
            stat="paired", n=n, ci_low=delta - 0.01, ci_high=delta + 0.01, confidence=0.95, test="betting",
            flips=flips))
    verdicts = [Verdict(recipe=r, decision="REGRESSION", recommendation=f"do not publish {r}") for r in recipes]
    return (SessionVerdict(verdicts=verdicts, recommended=None, recommendation="publish none", exit_status=0),
            comparisons, details)


def _browser_numbers(page: Path) -> dict[str, Any]:
    from browser import browser, offline_violations, wait_for_flips
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def timed(action: Any) -> float:
        """Milliseconds from the action to the list re-rendered (the status text changes with every render)."""
        drv.execute_script("window.__t0 = performance.now(); window.__mark = document.getElementById("
                           "'flip-status').textContent + '|' + document.getElementById('flip-page').textContent;")
        action()
        drv.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const now = () => document.getElementById('flip-status').textContent + '|' +
                              document.getElementById('flip-page').textContent;
            (function poll() { if (now() !== window.__mark) { done(); } else { setTimeout(poll, 1); } })();""")
        return float(drv.execute_script("return performance.now() - window.__t0"))

    with browser() as drv:
        drv.set_script_timeout(120)
        started = time.perf_counter()
        drv.get(page.as_uri())
        state = wait_for_flips(drv, timeout_s=300)
        wall = time.perf_counter() - started
        ready = drv.execute_script("return window.day0Flips")
        shown = len(drv.find_elements(By.CSS_SELECTOR, "#flip-list > li.flip"))
        task_ms = timed(lambda: Select(drv.find_element(By.ID, "flip-task")).select_by_value("3"))
        dir_ms = timed(lambda: Select(drv.find_element(By.ID, "flip-direction")).select_by_value("gained"))
        Select(drv.find_element(By.ID, "flip-task")).select_by_value("all")
        Select(drv.find_element(By.ID, "flip-direction")).select_by_value("all")
        next_ms = timed(lambda: drv.find_element(By.ID, "flip-next").click())
        search_ms = timed(lambda: drv.find_element(By.ID, "flip-search").send_keys("because people"))
        heap = drv.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
        violations = offline_violations(drv)
    return {"state": state, "items_in_page": ready["items"] if ready else None, "cards_shown": shown,
            "ready_ms_from_navigation": ready["readyMs"] if ready else None,
            "script_ms": ready["scriptMs"] if ready else None, "wall_s_driver": round(wall, 2),
            "task_filter_ms": round(task_ms, 1), "direction_filter_ms": round(dir_ms, 1),
            "next_page_ms": round(next_ms, 1), "first_search_ms": round(search_ms, 1),
            "js_heap_mb": round(heap / 2**20, 1) if heap else None, "offline_violations": violations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "report_html.json")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    t = time.perf_counter()
    session, comparisons, details = synthetic(args.items)
    made = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        for d in details:
            save_flip_detail(work, "bench", d)
        saved = time.perf_counter() - t
        detail_bytes = sum(p.stat().st_size for p in (work / "runs" / "bench" / "flips").glob("*.json"))
        t = time.perf_counter()
        loaded = load_flip_details(work, "bench", comparisons)
        load_s = time.perf_counter() - t
        assert sum(len(d.items) for d in loaded) == args.items
        t = time.perf_counter()
        page = render_report(session, comparisons, [], loaded, public_config={"model": "synthetic"},
                             session_id="bench", model="synthetic")
        path = write_report(work / "report.html", page)
        render_s = time.perf_counter() - t
        result: dict[str, Any] = {
            "items": args.items, "build_synthetic_s": round(made, 2), "save_details_s": round(saved, 2),
            "details_mb": round(detail_bytes / 2**20, 1), "load_details_s": round(load_s, 2),
            "render_write_s": round(render_s, 2), "report_mb": round(path.stat().st_size / 2**20, 2),
            "uncompressed_json_mb": round(len(json.dumps([d.model_dump(mode="json") for d in loaded])) / 2**20, 1),
        }
        if not args.no_browser:
            result["browser"] = _browser_numbers(path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
