"""Documents of pytest-day0's own lm-eval tasks, read at run time from the demo's task files (lm-eval's
``custom_dataset``): the lm-eval twin of a demo task asks exactly the samples the built-in scorer asks, and a
retrained demo never leaves a stale copy behind.

Standard library only apart from ``datasets`` (which lm-eval itself needs): lm-eval imports this file by path from
the YAML's folder, also when a user runs the shipped YAMLs with the lm-eval CLI (``--include_path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_TASKS = Path(__file__).resolve().parent.parent / "demo" / "tasks"


def demo_rows(task: str) -> list[dict[str, Any]]:
    """The samples of demo task ``task``, in file order (doc_id i is line i)."""
    spec = json.loads((DEMO_TASKS / f"{task}.task.json").read_text(encoding="utf-8"))
    text = (DEMO_TASKS / spec["samples"]).read_bytes().decode("utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    for row in rows:  # one column type per dataset: multiple-choice targets are indices, the rest strings
        if not isinstance(row.get("target"), int):
            row["target"] = str(row["target"])
    return rows


def load(day0_task: str, day0_part: int | None = None, day0_parts: int | None = None, **_: Any) -> Any:
    """lm-eval's ``custom_dataset``: a DatasetDict with one ``test`` split. ``day0_part`` of ``day0_parts`` keeps
    every n-th document (the MMLU-shaped group's subjects). lm-eval passes the task's metadata as further keyword
    arguments; they are not ours."""
    import datasets

    rows = demo_rows(day0_task)
    if day0_parts:
        rows = [r for i, r in enumerate(rows) if i % day0_parts == (day0_part or 0)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
