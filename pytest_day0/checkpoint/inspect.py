"""Inspect a checkpoint from its safetensors headers and small JSON side files: what the PTQ gate needs.

No tensor data is ever read: per-layer precision is decided from dtypes, shapes and which scale tensors sit
next to each weight, checked against what the quantization config declares. All file access goes through
``open_source`` (default: local files), so a checkpoint on a remote host is inspected the same way.
"""

from __future__ import annotations

import gc
import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pytest_day0.checkpoint.formats import DeclaredGroup, QuantDeclaration, parse_quant_declaration
from pytest_day0.checkpoint.model import CheckpointInspection, CheckpointMetadata, LinearLayer
from pytest_day0.checkpoint.recipes import Precision
from pytest_day0.checkpoint.safetensors_header import (
    ByteSource,
    LocalFileSource,
    TensorHeader,
    read_safetensors_header,
)
from pytest_day0.failures import Day0Error, FailureClass

OpenSource = Callable[[str], ByteSource]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SIDE_FILE = 256 * 1024 * 1024  # tokenizer.json of a 256k vocab is ~30 MiB; anything near this is not JSON config

# The ModelOpt day0 skill's rule: any of these next to a weight means the layer was quantized.
# compressed-tensors' NVFP4 global scales are the same signal under other names.
QUANT_SIGNALS = frozenset(
    {"weight_scale", "weight_scale_2", "input_scale", "activation_scale", "weight_scale_inv",
     "weight_global_scale", "input_global_scale"}
)
_PLAIN = {"BF16": Precision.BF16, "F16": Precision.FP16, "F32": Precision.FP32, "F64": Precision.FP32}
_E8M0 = {"U8", "F8_E8M0"}  # MX formats store power-of-two scales as raw bytes
_FLOAT_SCALE = {"F32", "BF16", "F16"}
_WRITER_VERSION = "transformers_version"


def _not_servable(message: str) -> Day0Error:
    return Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, message)


class _Dir:
    """The checkpoint directory seen through ``open_source``: no listing, so any ByteSource backend works."""

    def __init__(self, root: str, opener: OpenSource) -> None:
        self.root = root
        self.opener = opener

    def open(self, rel: str) -> ByteSource | None:
        try:
            return self.opener(posixpath.join(self.root, rel))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _not_servable(f"cannot open {rel} in {self.root}: {exc}") from None

    def read_all(self, rel: str) -> bytes | None:
        source = self.open(rel)
        if source is None:
            return None
        try:
            size = source.size()
            if size > MAX_SIDE_FILE:
                raise _not_servable(f"{rel} is {size} bytes, too large to be a config file")
            data = source.read(0, size) if size else b""
        except OSError as exc:
            raise _not_servable(f"cannot read {rel} in {self.root}: {exc}") from None
        if len(data) != size:
            raise _not_servable(f"short read of {rel}: {len(data)} of {size} bytes")
        return data

    def json(self, rel: str) -> dict[str, Any] | None:
        data = self.read_all(rel)
        if data is None:
            return None
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _not_servable(f"{rel} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise _not_servable(f"{rel} must hold a JSON object, got {type(value).__name__}")
        return value


def _safe_shard(name: object) -> str:
    """A shard path from the index, refused if it could point outside the checkpoint directory."""
    if not isinstance(name, str) or not name.strip():
        raise _not_servable(f"{INDEX}: shard name {name!r} is not a file name")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or (len(norm) > 1 and norm[1] == ":"):
        raise _not_servable(f"{INDEX}: shard path {name!r} escapes the checkpoint directory")
    return norm


def _shard_plan(ckpt: _Dir) -> tuple[list[str], dict[str, str] | None]:
    """Shard names to read and, when sharded, the index's tensor -> shard map (transformers' precedence)."""
    if ckpt.open(SINGLE) is not None:
        return [SINGLE], None
    index = ckpt.json(INDEX)
    if index is None:
        raise _not_servable(f"{ckpt.root}: no {SINGLE} or {INDEX}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _not_servable(f"{INDEX}: weight_map must be a non-empty object")
    checked: dict[str, str] = {}  # a 100k-tensor index names ~1k shards: check each name once
    resolved: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        safe = checked.get(shard) if isinstance(shard, str) else None
        if safe is None:
            safe = _safe_shard(shard)
            checked[shard] = safe
        resolved[str(tensor)] = safe
    return sorted(set(resolved.values())), resolved


@contextmanager
def _gc_paused() -> Iterator[None]:
    """An inspection allocates ~1M acyclic objects (JSON entries, headers, layers); the cyclic collector would
    rescan them over and over as they pile up (~30% of a 100k-tensor inspection) and can free none of them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def inspect_checkpoint(path: str | Path, open_source: OpenSource | None = None) -> CheckpointInspection:
    """Inspect the checkpoint at ``path`` (a directory, or one ``.safetensors`` file) from headers only."""
    with _gc_paused():
        return _inspect(path, open_source)


def _inspect(path: str | Path, open_source: OpenSource | None) -> CheckpointInspection:
    root = str(path)
    shard_names: list[str]
    if root.endswith(".safetensors"):
        root, single = posixpath.split(root)
        ckpt = _Dir(root or ".", open_source or LocalFileSource)
        shard_names, weight_map = [single], None
    else:
        ckpt = _Dir(root, open_source or LocalFileSource)
        shard_names, weight_map = _shard_plan(ckpt)

    tensors: dict[str, TensorHeader] = {}
    shard_of: dict[str, str] = {}  # tensor -> shard it was read from
    reads = file_bytes = total_bytes = 0
    for shard in shard_names:
        source = ckpt.open(shard)
        if source is None:
            raise _not_servable(f"{INDEX if weight_map else ckpt.root}: shard {shard} is missing")
        try:
            header = read_safetensors_header(source, shard)
        except OSError as exc:
            raise _not_servable(f"cannot read {shard} in {ckpt.root}: {exc}") from None
        reads += header.reads
        file_bytes += header.file_size
        total_bytes += header.data_bytes
        if not shard_of.keys().isdisjoint(header.tensors):  # dict-level merges: 100k tensors in ~10 ms
            name = next(n for n in header.tensors if n in shard_of)
            raise _not_servable(f"tensor {name!r} is stored in both {shard_of[name]} and {shard}")
        shard_of.update(dict.fromkeys(header.tensors, shard))
        tensors.update(header.tensors)
    for name, shard in (weight_map or {}).items():
        if shard_of.get(name) != shard:
            raise _not_servable(f"{INDEX}: tensor {name!r} is mapped to {shard} but that shard does not hold it")

    config = ckpt.json("config.json")
    declaration = parse_quant_declaration(ckpt.json("hf_quant_config.json"), config)
    return CheckpointInspection(
        path=str(path),
        total_bytes=total_bytes,
        file_bytes=file_bytes,
        shards=tuple(shard_names),
        tensor_count=len(tensors),
        quant_format=declaration.quant_format if declaration else None,
        quant_algo=declaration.quant_algo if declaration else None,
        quant_config=dict(declaration.raw) if declaration else {},
        linear_layers=classify_layers(tensors, declaration),
        metadata=read_metadata(ckpt, config),
        header_reads=reads,
    )


# ---------------------------------------------------------------- pure: tensors + declaration -> layers


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return "embed" in module.lower() or last in {"wte", "wpe"}


class TensorLike(Protocol):
    """What classification reads of a tensor: a header entry (TensorHeader) or a TensorInfo both qualify."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


_NOT_SCALES = frozenset({"weight", "weight_packed", "bias"})
_QUANTIZED = frozenset(p for p in Precision if p.quantized)  # the enum property costs ~2 us a call
_LAYER_FIELDS = ("module", "precision", "weight_dtype", "scale_tensors", "declared_precision", "declaration_mismatch")
# LinearLayer.model_construct walks every field for aliases and defaults (~6 us a layer, ~0.6 s for a 100k-expert
# MoE). With all fields given and no aliases, extras or private state, it reduces to the four assignments below;
# should the model ever grow such a feature, the check here sends every layer back through model_construct.
_FAST_LAYER = (
    tuple(LinearLayer.model_fields) == _LAYER_FIELDS
    and all(f.alias is None and f.validation_alias is None for f in LinearLayer.model_fields.values())
    and not LinearLayer.__pydantic_post_init__
    and not LinearLayer.__private_attributes__
    and LinearLayer.model_config.get("extra") != "allow"
)


def _new_layer(fields: dict[str, Any]) -> LinearLayer:
    """``LinearLayer.model_construct(**fields)`` (fields in declaration order, built from validated data)."""
    if not _FAST_LAYER:
        return LinearLayer.model_construct(**fields)
    layer = LinearLayer.__new__(LinearLayer)
    object.__setattr__(layer, "__dict__", fields)
    object.__setattr__(layer, "__pydantic_fields_set__", set(_LAYER_FIELDS))  # a tuple: same set layout as .add
    object.__setattr__(layer, "__pydantic_extra__", None)
    object.__setattr__(layer, "__pydantic_private__", None)
    return layer


def classify_layers(tensors: Mapping[str, TensorLike], declaration: QuantDeclaration | None) -> tuple[LinearLayer, ...]:
    """Every linear module (2-D ``weight`` or compressed-tensors ``weight_packed``) with its precision."""
    by_module: dict[str, dict[str, TensorLike]] = {}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module:
            parts = by_module.get(module)
            if parts is None:
                by_module[module] = {leaf: info}
            else:
                parts[leaf] = info
    layers = []
    for module in sorted(by_module):
        parts = by_module[module]
        packed = "weight_packed" in parts
        weight = parts.get("weight_packed") or parts.get("weight")
        if weight is None or len(weight.shape) != 2 or _is_embedding(module):
            continue
        group = declaration.lookup(module) if declaration else None
        precision = _precision(module, weight, packed, parts, group)
        if group is not None and group.group_size and precision in _GROUPED and weight.dtype not in _PLAIN:
            _check_group_size(module, weight, packed, parts.get("weight_scale"), group, precision)
        declared = group.precision if group else None
        judged = group is None or group.precision is not None  # an unnameable scheme cannot be contradicted
        actual = precision if precision in _QUANTIZED else None
        layers.append(
            _new_layer({  # fields are built here from validated data, not user input
                "module": module,
                "precision": precision,
                "weight_dtype": weight.dtype,
                "scale_tensors": tuple(sorted(parts.keys() - _NOT_SCALES)) if len(parts) > 1 else (),
                "declared_precision": declared,
                "declaration_mismatch": judged and actual != declared,
            })
        )
    return tuple(layers)


def _precision(
    module: str, weight: TensorLike, packed: bool, parts: Mapping[str, TensorLike], group: DeclaredGroup | None
) -> Precision:
    """Precision from what is stored, as observed in ModelOpt 0.47 and compressed-tensors exports.

    ModelOpt: FP8 = F8_E4M3 + F32 scale; MXFP8 = F8_E4M3 + U8 (e8m0) scale; NVFP4 = U8 [out, in/2] + F8_E4M3
    scale + F32 weight_scale_2; INT4 AWQ = U8 [out/2, in] + F32 scale [out, in/group]; INT8 = I8 + F32 scale.
    compressed-tensors: weight_packed I32 (pack-quantized, bits from the declaration) or U8 + weight_global_scale
    (NVFP4); float-quantized and int-quantized keep ``weight`` as F8_E4M3 / I8.
    """
    dtype = weight.dtype
    signalled = not QUANT_SIGNALS.isdisjoint(parts)
    scale = parts.get("weight_scale") or parts.get("weight_scale_inv")
    scale_dtype = scale.dtype if scale else None
    if dtype in _PLAIN and not packed:
        if signalled and group is not None and group.precision is not None:
            return group.precision  # fake-quant export (16-bit weights + scales): counts as quantized, as declared
        return _PLAIN[dtype]
    if not signalled:
        raise _not_servable(f"{module}: weight is {dtype} but no scale tensor sits next to it")
    if packed and dtype == "I32":
        bits = group.num_bits if group and group.num_bits else 4
        return Precision.INT8 if bits == 8 else Precision.INT4
    if dtype in {"F8_E4M3", "F8_E5M2"}:
        return Precision.MXFP8 if scale_dtype in _E8M0 else Precision.FP8
    if dtype in {"U8", "F4"}:
        if scale_dtype == "F8_E4M3" or "weight_global_scale" in parts:
            return Precision.NVFP4
        if scale_dtype in _E8M0:
            return Precision.MXFP4
        if scale_dtype in _FLOAT_SCALE:
            return Precision.INT4
        if group is not None and group.precision in {Precision.NVFP4, Precision.MXFP4, Precision.INT4}:
            return group.precision
        raise _not_servable(f"{module}: packed {dtype} weight with scale dtype {scale_dtype} is no known 4-bit format")
    if dtype == "I8":
        return Precision.INT8
    raise _not_servable(f"{module}: weight dtype {dtype} is not a linear weight format")


_GROUPED = frozenset({Precision.NVFP4, Precision.MXFP4, Precision.INT4})


def _check_group_size(module: str, weight: TensorLike, packed: bool, scale: TensorLike | None, group: DeclaredGroup,
                      precision: Precision) -> None:
    """The declared group size must give the stored scale's width: an engine slices the scales by the
    declaration, so a mismatch silently applies the wrong scale to every group (or fails to load)."""
    if scale is None or len(scale.shape) != 2 or len(weight.shape) != 2 or not group.group_size:
        return
    cols = weight.shape[1]
    if packed and weight.dtype == "I32":
        in_features = cols * (32 // (group.num_bits or 4))
    elif weight.dtype == "U8" and precision is not Precision.INT4:
        in_features = cols * 2  # two FP4 values per byte along the input dimension
    else:
        in_features = cols  # F4 (logical shape) and ModelOpt INT4 AWQ (packed along the output dimension)
    expected = -(-in_features // group.group_size)
    if scale.shape[1] != expected:
        raise _not_servable(
            f"{module}: weight_scale {list(scale.shape)} holds {scale.shape[1]} groups per row over {in_features} "
            f"inputs, but the quantization config declares group_size {group.group_size} ({group.scheme}) "
            f"which needs {expected}"
        )


# ---------------------------------------------------------------- metadata


def _sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def tokenizer_digest(data: bytes) -> str:
    """sha256 of tokenizer.json's meaning, not its bytes: re-saving through another tokenizers release
    reorders keys and rewrites BPE merges ("a b" -> ["a", "b"]) without changing a single token id."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return hashlib.sha256(data).hexdigest()
    model = obj.get("model") if isinstance(obj, dict) else None
    if isinstance(model, dict) and isinstance(model.get("merges"), list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_hash(template: object) -> str | None:
    if isinstance(template, str):
        return _sha256(template.encode("utf-8"))
    if isinstance(template, (list, dict)):  # named templates: [{"name": ..., "template": ...}]
        return _sha256(json.dumps(template, sort_keys=True).encode("utf-8"))
    return None


def read_metadata(ckpt: _Dir, config: Mapping[str, Any] | None) -> CheckpointMetadata:
    """What a serving engine takes from the side files; any change between source and output alters behaviour."""
    config = config or {}
    text_config = config.get("text_config")
    text: Mapping[str, Any] = text_config if isinstance(text_config, dict) else {}

    def pick(key: str) -> Any:
        return config.get(key, text.get(key))

    archs = config.get("architectures")
    tok_cfg = ckpt.json("tokenizer_config.json") or {}
    special_map = ckpt.json("special_tokens_map.json") or {}
    special: dict[str, str] = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = _token_text(tok_cfg.get(f"{role}_token")) or _token_text(special_map.get(f"{role}_token"))
        if token is not None:
            special[role] = token

    template_hash = _sha256(ckpt.read_all("chat_template.jinja"))
    if template_hash is None:
        template_json = ckpt.json("chat_template.json") or {}
        template_hash = _template_hash(template_json.get("chat_template", tok_cfg.get("chat_template")))

    tokenizer_json = ckpt.read_all("tokenizer.json")
    tokenizer_hash = tokenizer_digest(tokenizer_json) if tokenizer_json is not None else None
    if tokenizer_hash is None:
        tokenizer_hash = _sha256(ckpt.read_all("tokenizer.model"))  # sentencepiece: bytes are the meaning
    generation = ckpt.json("generation_config.json") or {}
    max_pos, vocab = pick("max_position_embeddings"), pick("vocab_size")
    return CheckpointMetadata(
        architectures=tuple(str(a) for a in archs) if isinstance(archs, list) else (),
        model_type=str(config["model_type"]) if isinstance(config.get("model_type"), str) else None,
        max_position_embeddings=max_pos if isinstance(max_pos, int) else None,
        vocab_size=vocab if isinstance(vocab, int) else None,
        chat_template_sha256=template_hash,
        tokenizer_sha256=tokenizer_hash,
        special_tokens=special,
        # Writer bookkeeping changes with every save and says nothing about generation behaviour.
        generation_config={k: v for k, v in generation.items() if not k.startswith("_") and k != _WRITER_VERSION},
    )
