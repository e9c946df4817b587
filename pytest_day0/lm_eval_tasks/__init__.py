"""lm-eval-harness tasks shipped with pytest-day0: the demo's tasks as lm-eval runs them, and an MMLU-shaped group.

The YAMLs are generated from the demo's own specs (``generate.py``; ``tests/test_lm_eval_engine.py`` fails when
they differ from what the generator writes now) and read their documents from the demo's JSONL at run time
(``day0_demo.py``). The lm-eval engine always includes this folder, after lm-eval's own tasks and before the
user's ``--day0-lm-eval-include`` folders; with the lm-eval CLI: ``--include_path <this folder>``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
