"""The vLLM and llm-compressor engines' decisions, without starting either: the command line for each checkpoint
format, vLLM's own failure reason from real vLLM 0.32 CPU logs (tests/data/vllm), and the fast one-line
refusals when the engine is not installed where we would launch it."""

from __future__ import annotations

import http.server
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from pytest_day0.checkpoint.formats import parse_quant_declaration
from pytest_day0.checkpoint.recipes import resolve_recipe
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages import engines_env
from pytest_day0.stages.quantize_llmcompressor import modifiers_for, quantize_llmcompressor
from pytest_day0.stages.serve_vllm import (
    build_vllm_command,
    classify_vllm_failure,
    root_cause,
    serves_launch,
    start_vllm_server,
    vllm_quantization,
)
from pytest_day0.stages.source import CALIBRATION_TEXT, DEMO_MODEL_DIR

LOGS = Path(__file__).resolve().parent / "data" / "vllm"


def _modelopt(algo: str) -> dict[str, object]:
    return {"quantization_config": {"quant_method": "modelopt", "quant_algo": algo, "ignore": ["lm_head"]}}


@pytest.mark.parametrize(("config", "method"), [
    (_modelopt("FP8"), "modelopt"),
    (_modelopt("NVFP4"), "modelopt_fp4"),
    (_modelopt("MXFP8"), "modelopt_mxfp8"),
    (_modelopt("W4A16_AWQ"), "modelopt"),  # vLLM then says itself that it has no such ModelOpt method
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}}}}}, None),  # auto-detected
    ({}, None),  # bf16
])
def test_quantization_flag_follows_the_checkpoint_format(config: dict[str, object], method: str | None) -> None:
    assert vllm_quantization(parse_quant_declaration(None, config)) == method


def test_command_line_carries_every_setting_and_user_args_come_last() -> None:
    cmd = build_vllm_command("/e/bin/python", Path("/ckpt"), "fp8", 8123, quantization="modelopt", max_model_len=64,
                             tensor_parallel=2, dtype="bfloat16", enforce_eager=True,
                             extra_args=["--dtype", "float32"])
    assert cmd[:3] == ["/e/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(itertools.pairwise(cmd))
    assert pairs["--model"] == "/ckpt" and pairs["--served-model-name"] == "fp8"
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123"
    assert pairs["--quantization"] == "modelopt" and pairs["--max-model-len"] == "64"
    assert pairs["--tensor-parallel-size"] == "2"
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--dtype", "float32"]  # argparse keeps the last one
    plain = build_vllm_command("python", Path("/c"), "b", 1, enforce_eager=False)
    assert "--quantization" not in plain and "--max-model-len" not in plain and "--enforce-eager" not in plain


def test_modelopt_fp8_on_cpu_is_not_servable_with_vllms_reason() -> None:
    log = (LOGS / "modelopt_fp8_on_cpu.log").read_text()
    failure_class, reason = classify_vllm_failure(1, log)
    assert failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE
    assert reason.startswith("vLLM cannot serve the checkpoint: RuntimeError: _C::static_scaled_fp8_quant()")
    assert "\n" not in reason and "WorkerProc initialization failed" not in reason


def test_multi_line_kernel_reason_is_joined_into_one_line() -> None:
    reason, in_loader = root_cause((LOGS / "w8a16_on_cpu.log").read_text())
    assert in_loader
    assert reason is not None and reason.startswith(
        "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ")
    assert "CPUWNA16LinearKernel cannot implement" in reason and "\n" not in reason


@pytest.mark.parametrize(("returncode", "log", "expected", "fragment"), [
    (1, "(APIServer pid=1) ERROR 11-23 01:00:00 [x.py:1] OSError: [Errno 98] Address already in use\n",
     FailureClass.DEPLOYMENT_HEALTH_FAILED, "Address already in use"),
    (None, "(APIServer pid=1) INFO 11-23 01:00:00 [x.py:1] Waiting for the engine\n",
     FailureClass.INFRA_TRANSIENT, "not healthy within the stage timeout; last log line: Waiting for the engine"),
    (-9, "", FailureClass.DEPLOYMENT_HEALTH_FAILED, "exited with code -9; last log line: (empty log)"),
    (1, "(Worker pid=2) ERROR 11-23 01:00:00 [x.py:1] RuntimeError: Exception: WorkerProc initialization failed\n",
     FailureClass.DEPLOYMENT_HEALTH_FAILED, "exited with code 1"),  # a wrapper alone is no reason
])
def test_host_trouble_is_a_deployment_failure(returncode: int | None, log: str, expected: FailureClass,
                                              fragment: str) -> None:
    failure_class, reason = classify_vllm_failure(returncode, log)
    assert failure_class is expected and fragment in reason


def test_engines_python_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAY0_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(engines_env, "PROJECT_ROOT", tmp_path)
    monkeypatch.delenv("DAY0_ENGINES_VENV", raising=False)
    assert engines_env.engines_python() == sys.executable  # nothing installed: this interpreter
    venv_python = tmp_path / ".venv-engines" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert engines_env.engines_python() == str(venv_python)
    monkeypatch.setenv("DAY0_VLLM_PYTHON", sys.executable)
    assert engines_env.engines_python() == sys.executable
    assert engines_env.engines_python("/explicit/python") == "/explicit/python"


def test_vllm_missing_from_the_chosen_python_is_one_line_and_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(Day0Error) as err:
        start_vllm_server(DEMO_MODEL_DIR, "baseline", tmp_path, python=sys.executable)
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "vllm is not installed for" in str(err.value) and "scripts/install-engines.sh" in str(err.value)
    assert time.monotonic() - started < 20


def test_a_directory_without_config_is_not_servable(tmp_path: Path) -> None:
    with pytest.raises(Day0Error) as err:
        start_vllm_server(tmp_path, "candidate", tmp_path / "logs", python=sys.executable)
    assert err.value.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE


def test_llmcompressor_recipes_and_refusals(tmp_path: Path) -> None:
    assert [m for m, _ in modifiers_for("W8A8")] == ["SmoothQuantModifier", "GPTQModifier"]
    assert [m for m, _ in modifiers_for("W4A16")] == ["GPTQModifier"]
    assert [m for m, _ in modifiers_for("FP8_DYNAMIC")] == ["QuantizationModifier"]
    assert all(kw.get("ignore") == ["lm_head"] for _, kw in modifiers_for("W8A8")[1:])
    with pytest.raises(Day0Error, match="llm-compressor does not make recipe fp8") as err:
        quantize_llmcompressor(DEMO_MODEL_DIR, resolve_recipe("fp8"), tmp_path / "x", CALIBRATION_TEXT)
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    with pytest.raises(Day0Error, match="llmcompressor is not installed for") as err:
        quantize_llmcompressor(DEMO_MODEL_DIR, resolve_recipe("w8a8"), tmp_path / "x", CALIBRATION_TEXT,
                               python=sys.executable)
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert not (tmp_path / "x").exists()


def test_each_launch_serves_a_unique_alias_beside_the_name_unless_the_user_names_it() -> None:
    cmd = build_vllm_command("python", Path("/c"), "fp8", 1, launch_alias="day0-launch-0123")
    at = cmd.index("--served-model-name")
    assert cmd[at + 1:at + 3] == ["fp8", "day0-launch-0123"] and cmd[at + 3].startswith("--")


class _Models(http.server.BaseHTTPRequestHandler):
    """A real server on 127.0.0.1 standing for whatever holds the port: healthy, serving the names it is given."""

    names: ClassVar[list[str]] = []
    body: ClassVar[bytes | None] = None

    def do_GET(self) -> None:
        if self.path == "/health":
            payload = b""
        elif self.body is not None:
            payload = self.body
        else:
            payload = json.dumps({"object": "list", "data": [{"id": n} for n in self.names]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("names", "body", "ours"), [
    (["fp8", "day0-launch-mine"], None, True),
    (["fp8", "day0-launch-someone-else"], None, False),  # another session's vLLM took the port first
    (["fp8"], None, False),  # any other server, same served name
    ([], b"<html>not json</html>", False),
])
def test_the_health_poll_accepts_only_the_server_this_launch_started(names: list[str], body: bytes | None,
                                                                   ours: bool) -> None:
    handler = type("Handler", (_Models,), {"names": names, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert serves_launch(f"http://127.0.0.1:{server.server_address[1]}", "day0-launch-mine") is ours
    finally:
        server.shutdown()
        server.server_close()
