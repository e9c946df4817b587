"""What a checkpoint's quantization config *declares*, per module (ModelOpt and compressed-tensors).

The PTQ gate compares this declaration with what the tensors say: a serving engine trusts the declaration
to pick kernels, so a module declared FP8 whose tensors are BF16 (or the reverse) loads wrongly or not at
all. Pure: it takes the parsed JSON and returns plain data; malformed declarations are
``CHECKPOINT_NOT_SERVABLE`` because an engine would refuse or misread them the same way.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_day0.checkpoint.recipes import Precision
from pytest_day0.failures import Day0Error, FailureClass

MIXED = "MIXED_PRECISION"


@dataclass(frozen=True)
class DeclaredGroup:
    """One rule of the declaration: which modules, quantized how. ``precision`` None: a scheme we cannot name."""

    targets: tuple[str, ...]  # "*" (all linears), class names ("Linear"), module names, fnmatch or "re:" patterns
    precision: Precision | None
    scheme: str  # the config's own words, for messages: "W4A16_AWQ", "int4 group 128 pack-quantized"
    num_bits: int | None = None
    group_size: int | None = None  # weights per scale along the input dimension, when the config says


@dataclass(frozen=True)
class QuantDeclaration:
    quant_format: str  # "modelopt" | "compressed-tensors" | another quant_method we only recognise by name
    quant_algo: str | None  # ModelOpt quant_algo, or the compressed-tensors format
    groups: tuple[DeclaredGroup, ...]  # first matching group wins
    exclude: tuple[str, ...]
    source: str  # the file the declaration came from
    raw: dict[str, Any] = field(default_factory=dict)

    def lookup(self, module: str) -> DeclaredGroup | None:
        """The group that declares ``module`` quantized, or None when it is excluded or not targeted."""
        if any(_matches(module, pat, self.quant_format) for pat in self.exclude):
            return None
        for group in self.groups:
            if any(_matches(module, target, self.quant_format) for target in group.targets):
                return group
        return None


def _matches(module: str, pattern: str, quant_format: str) -> bool:
    """ModelOpt writes fnmatch prefixes ("model.layers.0.self_attn*"); compressed-tensors writes "re:" regexes."""
    if pattern.startswith("re:"):
        try:
            return re.match(pattern[3:], module) is not None
        except re.error:
            raise Day0Error(
                FailureClass.CHECKPOINT_NOT_SERVABLE, f"{quant_format} quantization config: bad regex {pattern!r}"
            ) from None
    if pattern == "*" or module == pattern or module.startswith(pattern + "."):
        return True
    if "." not in pattern and pattern[:1].isupper():  # a class name such as "Linear": every linear module
        return pattern.endswith("Linear")
    return fnmatch.fnmatchcase(module, pattern)


def modelopt_precision(quant_algo: str) -> Precision | None:
    """Weight precision of a ModelOpt quant_algo; names vary by release, so match on the stable parts."""
    algo = quant_algo.upper()
    if "NVFP4" in algo:
        return Precision.NVFP4
    if "MXFP4" in algo:
        return Precision.MXFP4
    if "MXFP8" in algo:
        return Precision.MXFP8
    if algo.startswith("FP8"):
        return Precision.FP8
    if algo.startswith(("W4A16", "W4A8", "INT4")):
        return Precision.INT4
    if algo.startswith(("W8A8", "W8A16", "INT8")):
        return Precision.INT8
    return None


def scheme_precision(weights: Mapping[str, Any], fmt: str | None) -> Precision | None:
    """Weight precision of a compressed-tensors-style ``weights`` scheme (also used in ModelOpt config_groups)."""
    fmt = (fmt or "").lower()
    if "nvfp4" in fmt:
        return Precision.NVFP4
    if "mxfp4" in fmt:
        return Precision.MXFP4
    if "mxfp8" in fmt:
        return Precision.MXFP8
    kind = str(weights.get("type", "int")).lower()
    bits = weights.get("num_bits")
    group = weights.get("group_size")
    if kind == "float":
        if bits == 8:
            return Precision.FP8
        if bits == 4:
            return Precision.MXFP4 if group == 32 else Precision.NVFP4
    elif kind == "int":
        if bits == 4:
            return Precision.INT4
        if bits == 8:
            return Precision.INT8
    return None


def _bad(source: str, problem: str) -> Day0Error:
    return Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"{source}: {problem}")


def _obj(value: object, source: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(source, f"{what} must be an object, got {type(value).__name__}")
    return value


def _str_list(value: object, source: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(source, f"{what} must be a list of strings")
    return tuple(value)


def _group_size(value: object, source: str, what: str) -> int | None:
    """None when absent or per-channel (GPTQ's -1 convention); a non-integer is a broken declaration."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(source, f"{what} must be an integer, got {value!r}")
    return value if value > 0 else None


def _modelopt(q: Mapping[str, Any], source: str, exclude_key: str, raw: Mapping[str, Any]) -> QuantDeclaration:
    algo = q.get("quant_algo")
    if algo is not None and not isinstance(algo, str):
        raise _bad(source, f"quant_algo must be a string, got {algo!r}")
    size = _group_size(q.get("group_size"), source, "group_size")
    exclude = _str_list(q.get(exclude_key, q.get("exclude_modules")), source, exclude_key)
    groups: list[DeclaredGroup] = []
    if algo == MIXED and "quantized_layers" in q:
        for module, cfg in _obj(q["quantized_layers"], source, "quantized_layers").items():
            layer_algo = _obj(cfg, source, f"quantized_layers[{module!r}]").get("quant_algo")
            if not isinstance(layer_algo, str):
                raise _bad(source, f"quantized_layers[{module!r}] has no quant_algo")
            layer_size = _group_size(cfg.get("group_size"), source, f"quantized_layers[{module!r}].group_size")
            groups.append(DeclaredGroup((module,), modelopt_precision(layer_algo), layer_algo, group_size=layer_size))
    elif algo is not None and algo != MIXED:
        groups.append(DeclaredGroup(("*",), modelopt_precision(algo), algo, group_size=size))
    elif "config_groups" in q:
        groups.extend(_config_groups(q["config_groups"], None, source))
    elif algo == MIXED:
        raise _bad(source, "MIXED_PRECISION without quantized_layers or config_groups")
    return QuantDeclaration("modelopt", algo, tuple(groups), exclude, source, dict(raw))


def _config_groups(value: object, fmt: str | None, source: str) -> list[DeclaredGroup]:
    groups: list[DeclaredGroup] = []
    for gname, raw in _obj(value, source, "config_groups").items():
        group = _obj(raw, source, f"config_groups.{gname}")
        targets = _str_list(group.get("targets"), source, f"config_groups.{gname}.targets")
        weights = group.get("weights")
        if weights is None:  # activation-only group: weights stay in their original precision
            continue
        weights = _obj(weights, source, f"config_groups.{gname}.weights")
        gfmt = group.get("format") if isinstance(group.get("format"), str) else fmt
        bits = weights.get("num_bits")
        kind = weights.get("type", "int")
        size = weights.get("group_size")
        scheme = f"{kind}{bits}" + (f" group {size}" if size else "") + (f" {gfmt}" if gfmt else "")
        groups.append(
            DeclaredGroup(targets, scheme_precision(weights, gfmt), scheme, bits if isinstance(bits, int) else None,
                          _group_size(size, source, f"config_groups.{gname}.weights.group_size"))
        )
    return groups


def parse_quant_declaration(
    hf_quant_config: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> QuantDeclaration | None:
    """The declaration engines act on: config.json's quantization_config (what vLLM reads first), else
    ModelOpt's hf_quant_config.json. When both name a quant_algo they must agree."""
    hf_decl: QuantDeclaration | None = None
    if hf_quant_config is not None:
        q = _obj(hf_quant_config.get("quantization"), "hf_quant_config.json", "quantization")
        hf_decl = _modelopt(q, "hf_quant_config.json", "exclude_modules", hf_quant_config)
    qc_raw = (config or {}).get("quantization_config")
    if qc_raw is None:
        return hf_decl
    qc = _obj(qc_raw, "config.json", "quantization_config")
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":
        decl = _modelopt(qc, "config.json", "ignore", qc)
    elif method == "compressed-tensors":
        fmt = qc.get("format") if isinstance(qc.get("format"), str) else None
        groups = _config_groups(qc.get("config_groups", {}), fmt, "config.json")
        decl = QuantDeclaration(
            "compressed-tensors", fmt, tuple(groups), _str_list(qc.get("ignore"), "config.json", "ignore"),
            "config.json", dict(qc),
        )
    else:  # gptq, awq, fp8, bitsandbytes ...: recognised by name only; coverage is judged from tensors alone
        decl = QuantDeclaration(method or "unknown", None, (DeclaredGroup(("*",), None, method),), (), "config.json",
                                dict(qc))
    if hf_decl is not None and hf_decl.quant_algo and decl.quant_algo and hf_decl.quant_algo != decl.quant_algo:
        raise _bad(
            "config.json",
            f"quantization_config declares {decl.quant_algo} but hf_quant_config.json declares {hf_decl.quant_algo}",
        )
    # ModelOpt writes group_size only into hf_quant_config.json for some algos (W4A16_AWQ): carry it over.
    hf_size = hf_decl.groups[0].group_size if hf_decl is not None and len(hf_decl.groups) == 1 else None
    if hf_size is not None and any(g.group_size is None for g in decl.groups):
        decl = replace(decl, groups=tuple(g if g.group_size is not None else replace(g, group_size=hf_size)
                                          for g in decl.groups))
    return decl
