"""Run configuration: precedence CLI > environment > ini > default, and one-line USER_CONFIG_ERRORs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_day0.config import RunConfig, build_config
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.options import OPTIONS


def _ini(values: dict[str, Any]) -> Any:
    return lambda key: values.get(key)


def test_defaults_resolve_demo_tasks_and_fp8() -> None:
    cfg = build_config({"model": "demo"}, _ini({}), {})
    assert cfg.recipes == ("fp8",)
    assert cfg.tasks == ("arc_like", "gsm_like", "tau_like")
    assert cfg.threshold == 0.01 and cfg.floor == 0.10 and cfg.gate_mode == "warn"


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        ({"limit": 3}, {"DAY0_LIMIT": "7"}, {"day0_limit": "5"}, 3),  # CLI wins
        ({}, {"DAY0_LIMIT": "7"}, {"day0_limit": "5"}, 7),  # then environment
        ({}, {}, {"day0_limit": "5"}, 5),  # then ini
        ({}, {}, {}, None),  # then the default
    ],
)
def test_precedence(cli: dict[str, Any], env: dict[str, str], ini: dict[str, str], expected: int | None) -> None:
    assert build_config({"model": "demo", **cli}, _ini(ini), env).limit == expected


def test_boolean_from_environment_and_ini() -> None:
    assert build_config({"model": "demo"}, _ini({}), {"DAY0_FRESH": "yes"}).fresh is True
    assert build_config({"model": "demo"}, _ini({"day0_relative": True}), {}).relative is True
    with pytest.raises(Day0Error, match="expected a boolean"):
        build_config({"model": "demo"}, _ini({}), {"DAY0_FRESH": "maybe"})


def test_recipe_list_resolves_old_aliases_and_dedupes() -> None:
    cfg = build_config({"model": "demo", "recipe": "fp8, int8_sq,int8_smoothquant,fp8_pb_wo"}, _ini({}), {})
    assert cfg.recipes == ("fp8", "int8_smoothquant", "fp8_2d_blockwise_weight_only")
    # nvfp4_awq (CUDA-only calibration) resolves too where it may run: on a remote executor
    cfg = build_config({"model": "demo", "recipe": "nvfp4_awq", "executor": "slurm://u@h?partition=p"}, _ini({}), {})
    assert cfg.recipes == ("nvfp4_awq_lite",)


def test_relative_workdir_is_under_rootdir(tmp_path: Path) -> None:
    cfg = build_config({"model": "demo", "workdir": "ws"}, _ini({}), {}, rootdir=tmp_path)
    assert cfg.workdir == tmp_path / "ws"


@pytest.mark.parametrize(
    ("cli", "needle"),
    [
        ({"recipe": "fp9"}, "unknown recipe 'fp9'"),
        ({"threshold": "abc"}, "--day0-threshold"),
        ({"threshold": 0.2, "floor": 0.1}, "floor (0.1) must be at least the quality threshold"),
        ({"serve": "external"}, "needs --day0-baseline-url and --day0-candidate-url"),
        ({"baseline_url": "ftp://x", "candidate_url": "http://y", "serve": "external"}, "http(s) URL"),
        ({"quantize": "existing"}, "needs --day0-checkpoint"),
        ({"limit": 0}, "--day0-limit"),
        ({"concurrency": 0}, "--day0-concurrency"),
    ],
)
def test_bad_values_are_one_line_user_config_errors(cli: dict[str, Any], needle: str) -> None:
    with pytest.raises(Day0Error) as err:
        build_config({"model": "demo", **cli}, _ini({}), {})
    assert err.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("[USER_CONFIG_ERROR] ")


def test_secret_is_masked_in_public_dict() -> None:
    cfg = build_config({"model": "demo", "api_key": "sk-canary-123"}, _ini({}), {})
    assert "sk-canary-123" not in repr(cfg)
    assert cfg.public_dict()["api_key"] == "**********"


def test_every_option_maps_to_a_field() -> None:
    fields = set(RunConfig.model_fields)
    for option in OPTIONS:
        assert option.name in fields or (option.name == "recipe" and "recipes" in fields), option.name
        assert option.ini == f"day0_{option.name}" and option.env == f"DAY0_{option.name.upper()}"
