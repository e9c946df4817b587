"""Quantize and source stages with real ModelOpt on the demo model, and the workspace's guarantees."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from pytest_day0.checkpoint.inspect import inspect_checkpoint
from pytest_day0.checkpoint.recipes import resolve_recipe
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.stages import quantize as q
from pytest_day0.stages.source import CALIBRATION_TEXT, DEMO_MODEL_DIR, resolve_model
from pytest_day0.workspace import Workspace, atomic_write_json, checkpoint_fingerprint


def test_demo_resolves_to_shipped_checkpoint() -> None:
    path = resolve_model("demo")
    assert path == DEMO_MODEL_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert sum(f.stat().st_size for f in path.iterdir()) < 10 * 1024 * 1024


def test_hub_id_resolves_from_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Day0Error) as err:
        resolve_model("acme/absent-model")
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "Hugging Face cache" in str(err.value)
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(DEMO_MODEL_DIR, snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model("acme/tiny") == snapshot


def test_local_path_without_config_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(Day0Error, match=r"has no config\.json") as err:
        resolve_model(str(tmp_path))
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory: pytest.TempPathFactory) -> q.QuantizeResult:
    out = tmp_path_factory.mktemp("ptq") / "fp8"
    return q.quantize_modelopt(DEMO_MODEL_DIR, resolve_recipe("fp8"), out, CALIBRATION_TEXT, calib_size=16)


def test_modelopt_fp8_exports_a_gated_checkpoint(fp8_export: q.QuantizeResult) -> None:
    ckpt = fp8_export.checkpoint
    assert q.is_finished(ckpt) and not fp8_export.reused
    inspection = inspect_checkpoint(ckpt)
    counts = inspection.precision_counts()
    assert counts.get("FP8") == 28  # 4 layers x 7 linears; lm_head stays BF16
    assert inspection.quant_format == "modelopt"
    # Tokenizer files travel byte for byte (no re-save drift for the metadata gate to trip on).
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (DEMO_MODEL_DIR / name).read_bytes()
    assert not list(ckpt.parent.glob(f".{ckpt.name}.staging-*"))


def test_finished_export_is_reused_not_redone(fp8_export: q.QuantizeResult) -> None:
    again = q.quantize_modelopt(DEMO_MODEL_DIR, resolve_recipe("fp8"), fp8_export.checkpoint, CALIBRATION_TEXT)
    assert again.reused and again.wall_s == 0.0


def test_recipe_matching_no_module_is_model_unsupported(tmp_path: Path) -> None:
    with pytest.raises(Day0Error) as err:
        q.quantize_modelopt(DEMO_MODEL_DIR, resolve_recipe("nvfp4_experts_only"), tmp_path / "x", CALIBRATION_TEXT,
                            calib_size=4)
    assert err.value.failure_class is FailureClass.MODEL_UNSUPPORTED
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()  # nothing half-written is left to be mistaken for an export


def test_unloadable_source_is_classified_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(Day0Error) as err:
        q.quantize_modelopt(tmp_path / "src", resolve_recipe("fp8"), tmp_path / "out", CALIBRATION_TEXT)
    assert err.value.failure_class in {FailureClass.USER_CONFIG_ERROR, FailureClass.UNKNOWN}
    assert str(err.value).startswith(f"[{err.value.failure_class}] PTQ fp8:")


def test_existing_engine_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(Day0Error) as err:
        q.use_existing(tmp_path, resolve_recipe("fp8"))
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR


class _Unwritable:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialize")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"v": _Unwritable()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_event_log_is_safe_under_concurrent_writers(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    threads = [threading.Thread(target=lambda i=i: [ws.event("ping", n=i) for _ in range(25)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ws.events("ping")) == 100


def test_fingerprint_is_content_not_paths_or_times(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODEL_DIR, tmp_path / "m")
    cache = tmp_path / "fingerprints.json"
    before = checkpoint_fingerprint(tmp_path / "m", cache=cache)
    (tmp_path / "m" / "README.md").write_text("notes")
    assert checkpoint_fingerprint(tmp_path / "m", cache=cache) == before
    shutil.copytree(tmp_path / "m", tmp_path / "copy")  # the same bytes elsewhere: the same checkpoint
    assert checkpoint_fingerprint(tmp_path / "copy", cache=cache) == before
    os.utime(tmp_path / "m" / "model.safetensors", (1, 1))  # touched, not changed: same content, same key
    assert checkpoint_fingerprint(tmp_path / "m", cache=cache) == before
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_fingerprint(tmp_path / "m", cache=cache) != before


def test_a_same_size_same_second_rewrite_gets_a_new_key(tmp_path: Path) -> None:
    """One weight byte flipped in place, the file's size and mtime put back: the stat cache must not hide it."""
    shutil.copytree(DEMO_MODEL_DIR, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    cache = tmp_path / "fingerprints.json"
    before = checkpoint_fingerprint(tmp_path / "m", cache=cache)
    st = weights.stat()
    with weights.open("r+b") as fh:
        fh.seek(st.st_size - 1)
        last = fh.read(1)
        fh.seek(st.st_size - 1)
        fh.write(bytes([last[0] ^ 0x01]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert checkpoint_fingerprint(tmp_path / "m", cache=cache) != before
    assert checkpoint_fingerprint(tmp_path / "m") != before  # and without a cache, of course
