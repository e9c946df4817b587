"""The README's "real engine on CPU" release, run as a user runs it: real llm-compressor PTQ, real vLLM serving
both sides, our scorer, our gates, a verdict. Then ModelOpt FP8 on the same vLLM: this CPU build has no FP8
kernels, so the candidate is CHECKPOINT_NOT_SERVABLE (vLLM's own reason) and the recipe INFEASIBLE, quickly.

Both sessions share one workspace, as two releases of one model do: the second reuses the baseline's records
and needs no baseline server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from real_engines import ensure_engines

pytestmark = pytest.mark.slow

RELEASE_TIMEOUT_S = 600
INFEASIBLE_BOUND_S = 240  # ModelOpt PTQ (~10 s) + vLLM failing to load the checkpoint (~35 s), with margin


def _release(cwd: Path, workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float, dict[str, Any]]:
    # 20 samples a task keep it bounded; at n=20 the paired interval cannot decide a 1-point threshold
    # (INCONCLUSIVE, by design), so the point rule decides here. The README command runs every sample.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--day0-model=demo", "--day0-limit",
           "20", "--day0-stat=point", "--day0-calib-size=16", f"--day0-workdir={workdir}", *args]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=RELEASE_TIMEOUT_S, check=False)
    verdict = json.loads((workdir / "verdict.json").read_text())
    return done, time.monotonic() - started, verdict


def test_real_engine_release_on_cpu(tmp_path: Path, record_property: Any) -> None:
    python, _ = ensure_engines()
    ws = tmp_path / "ws"

    done, wall, verdict = _release(tmp_path, ws, "--day0-quantize=llmcompressor", "--recipe", "w8a8",
                                   "--day0-serve=vllm", f"--day0-vllm-python={python}")
    out = done.stdout + done.stderr
    record_property("w8a8_release_s", round(wall, 1))
    (only,) = verdict["session"]["verdicts"]
    assert (only["recipe"], only["decision"]) == ("w8a8", "ACCEPT"), out[-3000:]
    assert done.returncode == 0, out[-3000:]
    assert "VERDICT" in out and "ACCEPT" in out
    # Real vLLM served both sides: its own log, one per side, each reached "Starting vLLM server".
    for side in ("baseline", "w8a8"):
        log = (ws / "logs" / f"vllm-{side}.log").read_text()
        assert "vllm.entrypoints.openai.api_server" in log and "Starting vLLM server on http://127.0.0.1:" in log
    ptq = json.loads(next((ws / "checkpoints").glob("w8a8-*/day0_ptq.json")).read_text())
    assert ptq["engine"] == "llmcompressor" and ptq["scheme"] == "W8A8"
    served = [json.loads(line) for line in (ws / "events.jsonl").read_text().splitlines()]
    assert {e["side"] for e in served if e.get("event") == "server_start"} >= {"baseline", "w8a8"}

    done, wall, verdict = _release(tmp_path, ws, "--recipe", "fp8", "--day0-serve=vllm",
                                   f"--day0-vllm-python={python}")
    out = done.stdout + done.stderr
    record_property("fp8_infeasible_s", round(wall, 1))
    (only,) = verdict["session"]["verdicts"]
    assert (only["recipe"], only["decision"]) == ("fp8", "INFEASIBLE"), out[-3000:]
    assert only["failure_classes"] == ["CHECKPOINT_NOT_SERVABLE"], only
    reasons = " ".join(only["reasons"])
    assert "vLLM cannot serve the checkpoint: RuntimeError: _C::static_scaled_fp8_quant()" in reasons, reasons
    assert done.returncode == 1 and wall < INFEASIBLE_BOUND_S, (done.returncode, wall)
    assert "[CHECKPOINT_NOT_SERVABLE]" in out
