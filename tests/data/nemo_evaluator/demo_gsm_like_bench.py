"""The demo's gsm_like task as a NeMo Evaluator bring-your-own benchmark (``nel eval run --bench THIS_FILE``).

Only used to generate the fixtures next to it (see README.md there); never imported by the plugin or its tests.
The scorer is the demo task's own rule: the leading integer of the response equals the target.
"""

import re
from pathlib import Path

from nemo_evaluator.environments.custom import benchmark
from nemo_evaluator.scoring import ScorerInput

_ANSWER = re.compile(r"^\s*(-?\d+)")
_DATASET = Path(__file__).resolve().parents[3] / "pytest_day0" / "demo" / "tasks" / "gsm_like.jsonl"


@benchmark(name="demo_gsm_like", dataset=str(_DATASET), prompt="{prompt}", target_field="target")
def score(sample: ScorerInput) -> dict:
    found = _ANSWER.match(sample.response)
    extracted = found.group(1) if found else ""
    return {"correct": extracted == str(sample.target), "extracted": extracted}
