"""Checkpoint gate: header-only inspection vs the peer a user would otherwise use (safetensors loading tensors).

Builds a synthetic sharded checkpoint out of *sparse* files (the data regions are holes, so 1,000 shards of
declared multi-GB tensors cost no disk), then times:

  ours      pytest_day0.checkpoint.inspect.inspect_checkpoint over every shard (headers only, reads counted)
  st-open   safetensors.safe_open per shard, listing keys and metadata (header only, the library's own path)
  st-load   safetensors loading every tensor of a sample of shards (what a gate that loads the model does);
            extrapolated linearly to all shards, because loading the whole declared size would take hours

Run: python bench/bench_checkpoint_gate.py [--shards 1000 --tensors-per-shard 100 --load-sample 2]
Prints a table and the ratios, and writes bench/results/checkpoint_gate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_sparse_shard(path: Path, names: list[str], shape: tuple[int, int]) -> int:
    nbytes = shape[0] * shape[1] * 2  # BF16
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)  # the data region is a hole: no blocks allocated
    return offset


def build(root: Path, shards: int, per_shard: int, shape: tuple[int, int]) -> int:
    weight_map: dict[str, str] = {}
    declared = 0
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = []
        for t in range(per_shard):
            expert, proj = divmod(t, 3)
            names.append(f"model.layers.{s}.mlp.experts.{expert}.{('gate_proj', 'up_proj', 'down_proj')[proj]}"
                         ".weight")
        declared += write_sparse_shard(root / shard, names, shape)
        weight_map.update({n: shard for n in names})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": declared}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["BenchForCausalLM"], "model_type": "bench",
                                                  "max_position_embeddings": 4096, "vocab_size": 32000}))
    return declared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--tensors-per-shard", type=int, default=100)
    parser.add_argument("--dim", type=int, default=4096, help="each tensor is dim x dim BF16")
    parser.add_argument("--load-sample", type=int, default=2, help="shards actually loaded by the peer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint_gate.json")
    args = parser.parse_args()

    from safetensors import safe_open

    from pytest_day0.checkpoint.inspect import inspect_checkpoint

    with tempfile.TemporaryDirectory(prefix="day0-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        declared = build(root, args.shards, args.tensors_per_shard, (args.dim, args.dim))
        build_s = time.perf_counter() - t0
        shard_files = sorted(root.glob("*.safetensors"))

        t0 = time.perf_counter()
        inspection = inspect_checkpoint(root)
        ours_s = time.perf_counter() - t0
        assert inspection.tensor_count == args.shards * args.tensors_per_shard

        t0 = time.perf_counter()
        keys = 0
        for shard in shard_files:
            with safe_open(str(shard), framework="pt") as fh:
                keys += len(list(fh.keys()))
                fh.metadata()
        st_open_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        loaded_bytes = 0
        for shard in shard_files[: args.load_sample]:
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    tensor = fh.get_tensor(name)
                    loaded_bytes += tensor.numel() * tensor.element_size()
                    del tensor
        sample_s = time.perf_counter() - t0
        st_load_s = sample_s / args.load_sample * args.shards

    rows = [
        ("ours (header-only inspect)", ours_s, inspection.header_reads / args.shards),
        ("safetensors safe_open keys", st_open_s, None),
        (f"safetensors load tensors (extrapolated from {args.load_sample} shards)", st_load_s, None),
    ]
    print(f"checkpoint: {args.shards} shards, {inspection.tensor_count} tensors, {declared / 2**40:.2f} TiB declared "
          f"(sparse; built in {build_s:.1f}s); machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"{'method':<62} {'seconds':>10} {'reads/shard':>12}")
    for name, secs, reads in rows:
        print(f"{name:<62} {secs:>10.3f} {'' if reads is None else f'{reads:.2f}':>12}")
    print(f"ratio load/ours: {st_load_s / ours_s:,.0f}x   (goal >= 1,000x)   ours < 2 s: {ours_s < 2}")
    print(f"ratio safe_open/ours: {st_open_s / ours_s:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "shards": args.shards, "tensors": inspection.tensor_count, "declared_bytes": declared,
        "ours_s": ours_s, "reads_per_shard": inspection.header_reads / args.shards, "st_open_s": st_open_s,
        "st_load_sample_shards": args.load_sample, "st_load_sample_s": sample_s, "st_load_extrapolated_s": st_load_s,
        "ratio_load_over_ours": st_load_s / ours_s, "machine": platform.platform(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
