"""safetensors header reading: real files from safetensors.torch, corrupt files built byte by byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pytest_day0.checkpoint.safetensors_header import (
    FIRST_READ,
    MAX_HEADER_BYTES,
    ByteSource,
    LocalFileSource,
    read_safetensors_header,
)
from pytest_day0.failures import Day0Error, FailureClass


def raw_file(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors-shaped file; ``length`` overrides the 8-byte header length to corrupt it."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def corrupt(path: Path) -> Day0Error:
    source = LocalFileSource(path)
    with pytest.raises(Day0Error) as info:
        read_safetensors_header(source, path.name)
    err = info.value
    assert err.failure_class is FailureClass.CHECKPOINT_NOT_SERVABLE
    assert "\n" not in str(err) and str(err).startswith("[CHECKPOINT_NOT_SERVABLE]")
    assert path.name in str(err)
    return err


def test_real_file_header_matches_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.zeros(64, 32, dtype=torch.bfloat16),
        "a.weight_scale": torch.ones((), dtype=torch.float32),
        "b.packed": torch.zeros(16, 8, dtype=torch.uint8),
        "c.q": torch.zeros(8, 4, dtype=torch.float8_e4m3fn),
        "d.i": torch.zeros(3, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    source = LocalFileSource(path)
    header = read_safetensors_header(source)
    assert source.reads == 1 and header.reads == 1
    assert header.metadata == {"format": "pt"}
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            assert list(f.get_slice(name).get_shape()) == list(header.tensors[name].shape)
            assert f.get_slice(name).get_dtype() == header.tensors[name].dtype
    assert header.tensors["c.q"].dtype == "F8_E4M3" and header.tensors["b.packed"].nbytes == 128
    assert header.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert header.file_size == path.stat().st_size == 8 + header.header_bytes + header.data_bytes


def test_tensor_data_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1024, 1024, dtype=torch.float32)}, str(path))  # 4 MiB of data
    source = LocalFileSource(path)
    read_safetensors_header(source)
    assert source.reads == 1
    assert source.bytes_read <= FIRST_READ < path.stat().st_size


def test_long_header_takes_exactly_two_bounded_reads(tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.block.with_a_rather_long_module_name.weight": torch.zeros(2) for i in range(1500)}
    path = tmp_path / "long.safetensors"
    save_file(tensors, str(path))
    source = LocalFileSource(path)
    header = read_safetensors_header(source)
    assert header.header_bytes > FIRST_READ
    assert source.reads == 2 == header.reads
    assert source.bytes_read == 8 + header.header_bytes  # second read fetches exactly the rest of the header
    assert len(header.tensors) == 1500


class MemorySource:
    """A ByteSource that is not a file: proves the reader only needs size() and read()."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.calls: list[tuple[int, int]] = []

    def size(self) -> int:
        return len(self.blob)

    def read(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.blob[offset : offset + length]


def test_any_byte_source_works(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(4, 4, dtype=torch.float16)}, str(path))
    source = MemorySource(path.read_bytes())
    assert isinstance(source, ByteSource)
    header = read_safetensors_header(source)
    assert header.tensors["x"].shape == (4, 4) and source.calls == [(0, len(source.blob))]


def test_packed_and_sub_byte_dtypes(tmp_path: Path) -> None:
    header = {
        "u8": {"dtype": "U8", "shape": [4, 2], "data_offsets": [0, 8]},
        "f4": {"dtype": "F4", "shape": [2, 8], "data_offsets": [8, 16]},  # 16 x 4 bits = 8 bytes
    }
    parsed = read_safetensors_header(LocalFileSource(raw_file(tmp_path / "p.safetensors", header, bytes(16))))
    assert parsed.tensors["f4"].nbytes == 8


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert "shorter than the 8-byte" in corrupt(path).message


def test_header_longer_than_file(tmp_path: Path) -> None:
    err = corrupt(raw_file(tmp_path / "h.safetensors", {}, length=4096))
    assert "larger than the file" in err.message


def test_absurd_header_length_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "a.safetensors", {}, length=2**40)
    source = LocalFileSource(path)
    with pytest.raises(Day0Error, match=str(MAX_HEADER_BYTES)):
        read_safetensors_header(source)
    assert source.reads == 1


def test_header_not_json(tmp_path: Path) -> None:
    assert "not JSON" in corrupt(raw_file(tmp_path / "n.safetensors", b"{not json")).message


def test_header_not_an_object(tmp_path: Path) -> None:
    assert "not an object" in corrupt(raw_file(tmp_path / "l.safetensors", [1, 2])).message


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    blob = b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    assert "duplicate" in corrupt(raw_file(tmp_path / "d.safetensors", blob, bytes(2))).message


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"x": {"dtype": "Q3_K", "shape": [2], "data_offsets": [0, 2]}}
    assert "unknown dtype 'Q3_K'" in corrupt(raw_file(tmp_path / "u.safetensors", header, bytes(2))).message


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], ["0", "4"], [4, 0], [-1, 3], None, [0, 4.0]])
def test_bad_data_offsets(tmp_path: Path, offsets: object) -> None:
    header = {"x": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}
    assert "data_offsets" in corrupt(raw_file(tmp_path / "o.safetensors", header, bytes(4))).message


def test_bad_shape(tmp_path: Path) -> None:
    header = {"x": {"dtype": "U8", "shape": [2, -2], "data_offsets": [0, 4]}}
    assert "shape" in corrupt(raw_file(tmp_path / "s.safetensors", header, bytes(4))).message


def test_offsets_past_end_of_file(tmp_path: Path) -> None:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    err = corrupt(raw_file(tmp_path / "e.safetensors", header, bytes(8)))
    assert "past the end" in err.message


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    err = corrupt(raw_file(tmp_path / "ov.safetensors", header, bytes(24)))
    assert "overlaps" in err.message and "'b'" in err.message


def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    assert "gap" in corrupt(raw_file(tmp_path / "g.safetensors", header, bytes(20))).message


def test_trailing_bytes_after_the_last_tensor(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert "cover 8 bytes" in corrupt(raw_file(tmp_path / "tr.safetensors", header, bytes(12))).message


def test_byte_size_must_match_shape_and_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 12]}}
    err = corrupt(raw_file(tmp_path / "sz.safetensors", header, bytes(12)))
    assert "spans 12 bytes" in err.message and "needs 24" in err.message


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": 1}}
    assert "__metadata__" in corrupt(raw_file(tmp_path / "md.safetensors", header)).message


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalFileSource(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- fast entry path == detailed checks

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pytest_day0.checkpoint.safetensors_header import DTYPE_BITS, _entry_error, _parse_entry  # noqa: E402

_UNREACHABLE = "entry was refused"
_scalar = st.one_of(st.integers(-3, 70), st.booleans(), st.none(), st.text(max_size=3), st.floats(0, 9))
_shape = st.one_of(st.lists(st.one_of(st.integers(-1, 9), st.booleans()), max_size=3), _scalar)
_offsets = st.one_of(st.lists(st.one_of(st.integers(-2, 600), st.booleans()), min_size=0, max_size=3), _scalar)


@st.composite
def _entries(draw: st.DrawFn) -> Any:
    entry = draw(st.fixed_dictionaries({
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.sampled_from(sorted(DTYPE_BITS)), _scalar),
        "shape": st.one_of(st.lists(st.integers(-1, 3), max_size=3), _shape),
        "data_offsets": _offsets,
    }))
    missing = draw(st.sampled_from([None, None, None, "dtype", "shape", "data_offsets"]))
    if missing is not None:
        del entry[missing]
    if draw(st.booleans()) and isinstance(entry.get("shape"), list) and "dtype" in entry:  # often exactly right
        bits = DTYPE_BITS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        dims = entry["shape"]
        if bits is not None and all(type(d) is int for d in dims):  # negative dims too: a 0 can hide them
            for d in dims:
                bits *= d
            begin = draw(st.integers(0, 50))
            entry["data_offsets"] = [begin, begin + max(bits // 8, 0) + draw(st.sampled_from([0, 0, 0, 1]))]
    return draw(st.one_of(st.just(entry), st.just(entry), _scalar))


@settings(max_examples=1500, deadline=None)
@given(value=_entries())
@example({"dtype": "F32", "shape": [-1, 0], "data_offsets": [0, 0]})  # a zero dim hides a negative one
@example({"dtype": "F32", "shape": [0, -1], "data_offsets": [4, 4]})
@example({"dtype": "BOOL", "shape": [True], "data_offsets": [0, 1]})  # JSON true is not a dimension
@example({"dtype": "F32", "shape": [2], "data_offsets": [False, 8]})
@example({"dtype": "F32", "shape": [3], "data_offsets": [-12, 0]})
@example({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})  # valid
@example({"dtype": "F32", "shape": [], "data_offsets": [0, 4]})  # a valid scalar
@example({"dtype": "F4", "shape": [3], "data_offsets": [0, 1]})  # 12 bits: not a whole number of bytes
def test_the_fast_entry_path_accepts_exactly_what_the_detailed_checks_accept(value: Any) -> None:
    """``_parse_entry``'s straight path was written for speed (100k tensors in < 1 s); the detailed checks say why
    an entry is bad. They must agree: a fast accept the checks would refuse would let a bad header through."""
    detailed = str(_entry_error("t", value, "s.safetensors"))
    try:
        _parse_entry("t", value, "s.safetensors")
    except Day0Error as exc:
        assert _UNREACHABLE not in str(exc), f"fast path refused what the detailed checks accept: {value!r}"
        assert str(exc) == detailed
    else:
        assert _UNREACHABLE in detailed, f"fast path accepted {value!r}, detailed checks say: {detailed}"
