"""Read and validate safetensors headers without touching tensor data.

A checkpoint can be hundreds of GiB on a remote machine; the PTQ gate only needs names, dtypes, shapes and
byte ranges, which all live in the JSON header at the front of each shard. Reading goes through a tiny
random-access ``ByteSource`` so the same code serves a local file today and an SFTP file later, and it is
bounded: one read of the first ``FIRST_READ`` bytes, a second only when the header is longer than that.

Validation follows what the safetensors library itself refuses (contiguous, non-overlapping, fully covered
data buffer; byte size matching shape x dtype), because a file it refuses is a file no engine can serve:
every problem is a ``Day0Error(CHECKPOINT_NOT_SERVABLE)`` with a one-line message.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pytest_day0.failures import Day0Error, FailureClass

FIRST_READ = 64 * 1024  # one read usually holds the whole header (a 7B model's header is ~30-60 KiB)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap; anything larger is corrupt, not big

# Bits per element as the safetensors spec defines them; F4/F6 are sub-byte and packed by the writer.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@runtime_checkable
class ByteSource(Protocol):
    """Random access to one file; ``open_source`` callables raise FileNotFoundError for a missing file."""

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class LocalFileSource:
    """A ByteSource over a local file that counts its reads, so tests can prove header-only access."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(str(self.path))
        self.reads = 0
        self.bytes_read = 0

    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        with self.path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        self.bytes_read += len(data)
        return data


@dataclass(frozen=True)
class TensorHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data buffer, as in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorHeader]
    metadata: dict[str, str] = field(default_factory=dict)  # the ``__metadata__`` entry
    header_bytes: int = 0  # length of the JSON header
    file_size: int = 0
    reads: int = 0  # reads this parse made against the source (1 or 2)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _fail(name: str, problem: str) -> Day0Error:
    return Day0Error(FailureClass.CHECKPOINT_NOT_SERVABLE, f"{name}: not a valid safetensors file: {problem}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # C speed: this hook runs once per tensor entry (100k on a large MoE)
    if len(out) == len(pairs):
        return out
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(source: ByteSource, name: str = "model.safetensors") -> SafetensorsHeader:
    """Read and validate one shard's header with at most two reads; ``name`` only labels error messages."""
    size = source.size()
    if size < 8:
        raise _fail(name, f"file is {size} bytes, shorter than the 8-byte header length")
    first = source.read(0, min(size, FIRST_READ))
    reads = 1
    if len(first) < 8:
        raise _fail(name, f"short read: got {len(first)} bytes of the first {min(size, FIRST_READ)}")
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise _fail(name, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise _fail(name, f"header length {n} is larger than the file ({size} bytes)")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        rest = source.read(len(first), 8 + n - len(first))
        reads += 1
        raw += rest
        if len(raw) != n:
            raise _fail(name, f"short read: header is {n} bytes, got {len(raw)}")
    header = _parse_json(raw, name)
    metadata = _parse_metadata(header.pop("__metadata__", None), name)
    tensors = {key: _parse_entry(key, value, name) for key, value in header.items()}
    _check_layout(tensors, size - 8 - n, name)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_bytes=n, file_size=size, reads=reads)


def _parse_json(raw: bytes, name: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(name, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(name, f"header is a JSON {type(header).__name__}, not an object")
    return header


def _parse_metadata(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(name, "__metadata__ must be an object of string values")
    return dict(value)


def _parse_entry(key: str, value: object, name: str) -> TensorHeader:
    """A valid entry takes the straight path below; anything else falls through to ``_entry_error``."""
    if type(value) is dict:
        dtype: Any = value.get("dtype")  # a str in DTYPE_BITS once ``bits`` is not None
        shape = value.get("shape")
        offsets = value.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if bits is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2:
            begin, end = offsets
            if type(begin) is int and type(end) is int and 0 <= begin <= end:
                for d in shape:  # ``type is int`` also refuses bool, as _is_int does
                    if type(d) is not int or d < 0:
                        break
                    bits *= d
                else:
                    if not bits % 8 and end - begin == bits // 8:
                        return TensorHeader(key, dtype, tuple(shape), begin, end)
    raise _entry_error(key, value, name)


def _entry_error(key: str, value: object, name: str) -> Day0Error:
    """The first problem of an entry ``_parse_entry`` refused, named the way the checks below order them."""
    if not isinstance(value, dict):
        return _fail(name, f"tensor {key!r} entry is not an object")
    dtype = value.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return _fail(name, f"tensor {key!r} has unknown dtype {dtype!r}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return _fail(name, f"tensor {key!r} shape {shape!r} is not a list of non-negative ints")
    offsets = value.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return _fail(name, f"tensor {key!r} data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        needs = str(bits // 8) if bits % 8 == 0 else f"{bits} bits (not a whole number of bytes)"
        return _fail(name, f"tensor {key!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {needs}")
    return _fail(name, f"tensor {key!r} entry was refused")  # unreachable: the checks above mirror _parse_entry


_SPAN = operator.attrgetter("begin", "end")


def _check_layout(tensors: dict[str, TensorHeader], data_len: int, name: str) -> None:
    """Tensors must tile the data buffer exactly, as safetensors itself requires to open a file."""
    cursor = 0
    previous = ""
    for t in sorted(tensors.values(), key=_SPAN):
        if t.end > data_len:
            raise _fail(name, f"tensor {t.name!r} ends at {t.end}, past the end of the data ({data_len} bytes)")
        if t.begin < cursor:
            raise _fail(name, f"tensor {t.name!r} overlaps {previous!r} (begins at {t.begin} < {cursor})")
        if t.begin > cursor:
            raise _fail(name, f"gap of {t.begin - cursor} bytes before tensor {t.name!r}")
        cursor = t.end
        previous = t.name
    if cursor != data_len:
        raise _fail(name, f"tensors cover {cursor} bytes of a {data_len}-byte data buffer")
