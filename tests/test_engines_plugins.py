"""Engines are plugins: the entry-point registry, config validation against it, and a third-party engine that a
real (installed-on-sys.path) distribution registers, dispatched by the release chain."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pytest_day0 import engines
from pytest_day0.config import build_config
from pytest_day0.engines import (
    BUILTIN,
    GROUP,
    QuantizeEngine,
    ServeEngine,
    build_registry,
    registry,
    reset_registry,
)
from pytest_day0.failures import Day0Error, FailureClass

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution 'acme-day0' on sys.path declaring two engines in the pytest_day0.engines group: a serve
    engine that wraps the reference server (and records its calls), and one whose module fails to import."""
    site = tmp_path / "site"
    (site / "acme_day0").mkdir(parents=True)
    (site / "acme_day0" / "__init__.py").write_text(textwrap.dedent('''
        from pytest_day0.engines import ServeEngine
        from pytest_day0.stages.serve import start_reference_server

        CALLS = []

        def _start(request):
            CALLS.append((request.name, str(request.checkpoint)))
            return start_reference_server(request.checkpoint, request.name, request.workdir,
                                          timeout_s=request.timeout_s)

        ENGINE = ServeEngine("acme", _start, description="a third-party server")
    '''))
    (site / "acme_broken.py").write_text("raise ImportError('acme_broken needs libfoo')\n")
    dist = site / "acme_day0-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-day0\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\nacme = acme_day0:ENGINE\nbroken = acme_broken:ENGINE\n")
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    yield site
    sys.modules.pop("acme_day0", None)
    reset_registry()


def test_builtin_rows_are_the_pyproject_entry_points() -> None:
    """BUILTIN (the fallback for stale metadata) and the declared entry points must never drift apart."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    assert declared == BUILTIN


def test_builtin_engines_register_by_kind() -> None:
    reg = registry()
    assert {"existing", "llmcompressor", "modelopt"} <= set(reg.names("quantize"))
    assert {"reference", "vllm", "external"} <= set(reg.names("serve"))
    assert "scorer" in reg.names("eval")
    assert not engines.serve_engine("external").managed and engines.serve_engine("vllm").managed
    llmc = engines.quantize_engine("llmcompressor")
    from pytest_day0.checkpoint.recipes import resolve_recipe

    assert llmc.supports(resolve_recipe("w8a8")) and not llmc.supports(resolve_recipe("fp8"))
    assert engines.quantize_engine("modelopt").supports(resolve_recipe("nvfp4"))
    assert not engines.quantize_engine("modelopt").supports(resolve_recipe("w4a16"))


@pytest.mark.parametrize(("cli", "message"), [
    ({"serve": "vlm"}, "unknown serve engine 'vlm'; registered: external, reference, vllm"),
    ({"quantize": "gptq"}, "unknown quantize engine 'gptq'; registered: existing, llmcompressor, modelopt"),
    ({"eval": "helm"}, "unknown eval engine 'helm'; registered: scorer"),  # (more names may follow: a subset)
    ({"quantize": "llmcompressor"}, "--recipe fp8: quantize engine llmcompressor does not make it (made by: modelopt)"),
    ({"recipe": "w4a16"}, "--recipe w4a16: quantize engine modelopt does not make it (made by: llmcompressor)"),
    ({"serve": "vllm", "vllm_args": "--dtype 'float32"}, "--day0-vllm-args: No closing quotation"),
])
def test_config_validates_engine_names_in_one_line(cli: dict[str, str], message: str) -> None:
    with pytest.raises(Day0Error) as err:
        build_config({"model": "demo", **cli}, lambda _k: None, environ={})
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    text = str(err.value)
    assert "\n" not in text
    if "registered: " in message:  # engines other packages register may join the list: each listed name is there
        head, names = message.split("registered: ")
        assert text.startswith(f"[USER_CONFIG_ERROR] {head}registered: ")
        assert set(names.split(", ")) <= set(text.split("registered: ")[1].split(", "))
    else:
        assert text == f"[USER_CONFIG_ERROR] {message}"


def test_config_accepts_the_real_engine_names_from_cli_and_environment() -> None:
    config = build_config({"model": "demo", "recipe": "w8a8,w4a16"}, lambda _k: None,
                          environ={"DAY0_QUANTIZE": "llmcompressor", "DAY0_SERVE": "vllm",
                                   "DAY0_VLLM_PYTHON": "/x/bin/python", "DAY0_VLLM_ARGS": "--dtype float32"})
    assert (config.quantize, config.serve, config.recipes) == ("llmcompressor", "vllm", ("w8a8", "w4a16"))
    assert config.vllm_python == "/x/bin/python" and config.vllm_args == "--dtype float32"


def test_pure_assembly_first_claim_wins_and_conflicts_are_reported() -> None:
    a = ServeEngine("x", lambda _r: None)  # type: ignore[arg-type,return-value]
    b = ServeEngine("x", lambda _r: None)  # type: ignore[arg-type,return-value]
    q = QuantizeEngine("x", lambda _r: None)  # type: ignore[arg-type,return-value]
    reg = build_registry([("x", "one", lambda: a), ("x", "one-again", lambda: a), ("x", "two", lambda: [b, q]),
                          ("bad", "three", lambda: object())])
    assert reg.get("serve", "x") is a and reg.get("quantize", "x") is q
    assert "already registered by another package" in reg.broken["x"]
    with pytest.raises(Day0Error, match=r"serve engine 'bad' failed to load: three: TypeError"):
        reg.get("serve", "bad")


def test_third_party_engine_is_selected_and_dispatched_by_the_chain(third_party: Path, tmp_path: Path) -> None:
    """A package's entry point is all it takes: config accepts --day0-serve acme and the chain starts it."""
    from pytest_day0.release.chain import ReleaseChain

    assert "acme" in registry().names("serve")
    config = build_config({"model": "demo", "serve": "acme", "workdir": str(tmp_path / "ws")}, lambda _k: None,
                          environ={})
    chain = ReleaseChain(config, "s1")
    try:
        endpoint = chain.endpoint("baseline")
        assert httpx.get(f"{endpoint.url}/health", timeout=5).status_code == 200
        assert endpoint.model == "baseline"
    finally:
        stopped = chain.stop_servers()
    import acme_day0  # type: ignore[import-not-found]

    assert [name for name, _ in acme_day0.CALLS] == ["baseline"]
    assert acme_day0.CALLS[0][1] == str(chain.source())
    assert "baseline" in stopped


def test_broken_third_party_engine_only_fails_when_selected(third_party: Path) -> None:
    build_config({"model": "demo"}, lambda _k: None, environ={})  # unaffected: it does not use 'broken'
    with pytest.raises(Day0Error) as err:
        build_config({"model": "demo", "serve": "broken"}, lambda _k: None, environ={})
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "serve engine 'broken' failed to load: acme-day0: ImportError: acme_broken needs libfoo" in str(err.value)
