"""Checkpoint gate: header-only inspection vs the peer a user would otherwise use (safetensors loading tensors).

Builds a synthetic sharded checkpoint out of *sparse* files (the data regions are holes, so 1,000 shards of
declared multi-GB tensors cost no disk), then times:

  ours      pytest_day0.checkpoint.inspect.inspect_checkpoint over every shard (headers only, reads counted);
            best wall time of --repeat runs, with the CPU time of that run (wall on a shared machine is
            inflated by other processes, CPU time much less)
  st-open   safetensors.safe_open per shard, listing keys and metadata (header only, the library's own path)
  st-load   safetensors loading every tensor of a sample of shards (what a gate that loads the model does);
            extrapolated linearly to all shards, because loading the whole declared size would take hours

SFTP variant (when the loopback cluster's sshd is up: /tmp/day0-cluster/cluster.env): the same checkpoint
inspected over SFTP through pytest_day0.remote.ssh (the path it takes for a checkpoint on a cluster), counting
ByteSource reads per shard (goal <= 2) and the SFTP protocol requests behind them; the peer is copying the
shards here first (raw ssh stream throughput, measured on one shard's first --copy-mib MiB and extrapolated to
the checkpoint's file bytes: the fastest any scp/rsync could go) and then loading them.

Run: python bench/bench_checkpoint_gate.py [--shards 1000 --tensors-per-shard 100 --load-sample 2 --sftp auto]
Prints a table and the ratios, and writes bench/results/checkpoint_gate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLUSTER_ENV = Path(os.environ.get("SLURM_CI_BASE", "/tmp/day0-cluster")) / "cluster.env"


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


def cluster_env() -> dict[str, str]:
    """The loopback cluster's SSH variables, from the environment or its cluster.env; empty when it is not up."""
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    if "SLURM_SSH_HOST" not in env and CLUSTER_ENV.is_file():
        for line in CLUSTER_ENV.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line[len("export "):].partition("=")
                env[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env if "SLURM_SSH_HOST" in env else {}


def disk_read_rate(directory: Path, mib: int) -> float:
    """Bytes/s reading real (not sparse) bytes from this disk with O_DIRECT, past the page cache: what a real
    checkpoint's tensors would come off at. The sparse shards' holes read at memory speed instead."""
    path = directory / "disk-probe.bin"
    block = os.urandom(2**20)
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        return mib * 2**20 / (time.perf_counter() - t0)
    finally:
        path.unlink()


def time_ours(root: Path, repeat: int, **kwargs: Any) -> tuple[float, float, Any]:
    """Best wall time of ``repeat`` inspections, and the CPU time of that same run."""
    from pytest_day0.checkpoint.inspect import inspect_checkpoint

    best: tuple[float, float, Any] = (float("inf"), 0.0, None)
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        inspection = inspect_checkpoint(root, **kwargs)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu, inspection)
    return best


def sftp_variant(root: Path, env: dict[str, str], repeat: int, copy_mib: int, file_bytes: int) -> dict[str, Any]:
    """Inspect ``root`` (readable by the cluster user) over SFTP; count reads and protocol requests per shard."""
    import paramiko

    from pytest_day0.remote.ssh import SSHExecutor, SSHTarget

    target = SSHTarget(host=env["SLURM_SSH_HOST"], port=int(env["SLURM_SSH_PORT"]), user=env["SLURM_SSH_USER"],
                       key_file=Path(env["SLURM_SSH_KEY"]), known_hosts=Path(env["SLURM_SSH_KNOWN_HOSTS"]))
    ssh = SSHExecutor(target)
    requests: Counter[str] = Counter()
    codes = {n: getattr(paramiko.sftp, n) for n in dir(paramiko.sftp) if n.startswith("CMD_")}
    names = {v: n[4:].lower() for n, v in codes.items() if isinstance(v, int)}
    original = paramiko.SFTPClient._async_request

    def counted(self: Any, fileobj: Any, t: int, *args: Any) -> Any:  # measurement only: counts, then forwards
        requests[names.get(t, str(t))] += 1
        return original(self, fileobj, t, *args)

    try:
        ssh.sftp()  # connect outside the timed region: a session opens its connection once
        paramiko.SFTPClient._async_request = counted
        wall, cpu, inspection = time_ours(root, repeat, open_source=ssh.open_source)
        paramiko.SFTPClient._async_request = original
        shards = len(inspection.shards)
        per_shard = {k: v / repeat / shards for k, v in sorted(requests.items())}
    finally:
        paramiko.SFTPClient._async_request = original
        ssh.close()

    # the peer's first step: bring the bytes here. Raw ssh stream (no SFTP windowing) is the fastest copy.
    shard = str(sorted(root.glob("*.safetensors"))[0])
    cmd = ["ssh", "-p", env["SLURM_SSH_PORT"], "-i", env["SLURM_SSH_KEY"], "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={env['SLURM_SSH_KNOWN_HOSTS']}",
           f"{env['SLURM_SSH_USER']}@{env['SLURM_SSH_HOST']}",
           f"head -c {copy_mib * 2**20} {shlex.quote(shard)}"]
    t0 = time.perf_counter()
    copied = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, timeout=600).stdout
    copy_s = time.perf_counter() - t0
    throughput = len(copied) / copy_s
    return {
        "wall_s": wall, "cpu_s": cpu, "shards": shards, "reads_per_shard": inspection.header_reads / shards,
        "sftp_requests_per_shard": per_shard, "sftp_requests_per_shard_total": sum(per_shard.values()),
        "layers_equal_local": None, "copy_sample_bytes": len(copied), "copy_sample_s": copy_s,
        "copy_bytes_per_s": throughput, "copy_all_extrapolated_s": file_bytes / throughput,
        "_inspection": inspection,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--tensors-per-shard", type=int, default=100)
    parser.add_argument("--dim", type=int, default=4096, help="each tensor is dim x dim BF16")
    parser.add_argument("--load-sample", type=int, default=2, help="shards actually loaded by the peer")
    parser.add_argument("--repeat", type=int, default=3, help="inspections timed; the best wall time is reported")
    parser.add_argument("--sftp-repeat", type=int, default=2, help="inspections over SFTP timed")
    parser.add_argument("--sftp", choices=("auto", "on", "off"), default="auto",
                        help="SFTP variant: auto runs it when the loopback cluster's cluster.env exists")
    parser.add_argument("--disk-mib", type=int, default=512, help="MiB written then read with O_DIRECT (0: skip)")
    parser.add_argument("--copy-mib", type=int, default=256, help="MiB streamed over ssh to measure copy speed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint_gate.json")
    args = parser.parse_args()

    from safetensors import safe_open

    env = cluster_env() if args.sftp != "off" else {}
    if args.sftp == "on" and not env:
        sys.exit(f"--sftp on: no loopback cluster ({CLUSTER_ENV} missing); run tests/cluster/start-cluster.sh")

    # world-readable, so the cluster's SSH user can read the same files over SFTP
    root = Path(tempfile.mkdtemp(prefix="day0-bench-ckpt-", dir="/tmp"))
    try:
        root.chmod(0o755)
        t0 = time.perf_counter()
        declared = build(root, args.shards, args.tensors_per_shard, (args.dim, args.dim))
        build_s = time.perf_counter() - t0
        shard_files = sorted(root.glob("*.safetensors"))

        ours_s, ours_cpu, inspection = time_ours(root, args.repeat)
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
        disk_rate = disk_read_rate(root, args.disk_mib) if args.disk_mib else None
        # a real checkpoint of this size loads no faster than its bytes come off the disk
        real_load_s = max(st_load_s, inspection.file_bytes / disk_rate) if disk_rate else None

        sftp: dict[str, Any] | None = None
        if env:
            sftp = sftp_variant(root, env, args.sftp_repeat, args.copy_mib, inspection.file_bytes)
            remote = sftp.pop("_inspection")
            sftp["layers_equal_local"] = (remote.linear_layers == inspection.linear_layers
                                          and remote.total_bytes == inspection.total_bytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows: list[tuple[str, float, float | None, str]] = [
        ("ours: header-only inspect (local)", ours_s, ours_cpu, f"{inspection.header_reads / args.shards:.2f}"),
        ("safetensors safe_open: keys + metadata", st_open_s, None, ""),
        (f"safetensors load tensors (extrapolated from {args.load_sample} shards)", st_load_s, None, ""),
    ]
    if real_load_s is not None and disk_rate is not None:
        rows.append((f"  same on real bytes: >= file bytes / disk read {disk_rate / 2**20:.0f} MiB/s (O_DIRECT)",
                     real_load_s, None, ""))
    if sftp:
        rows.append(("ours: header-only inspect over SFTP", sftp["wall_s"], sftp["cpu_s"],
                     f"{sftp['reads_per_shard']:.2f} ({sftp['sftp_requests_per_shard_total']:.1f} req)"))
        rows.append((f"copy over ssh (extrapolated from {args.copy_mib} MiB) + load", sftp["copy_all_extrapolated_s"]
                     + st_load_s, None, ""))
    print(f"checkpoint: {args.shards} shards, {inspection.tensor_count} tensors, {declared / 2**40:.2f} TiB declared "
          f"(sparse; built in {build_s:.1f}s); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print(f"{'method':<66} {'wall s':>10} {'cpu s':>7} {'reads/shard':>18}")
    for name, secs, cpu, reads in rows:
        print(f"{name:<66} {secs:>10.3f} {'' if cpu is None else f'{cpu:.3f}':>7} {reads:>18}")
    ratio = st_load_s / ours_s
    print(f"ratio load/ours: {ratio:,.0f}x (goal >= 1,000x: {'met' if ratio >= 1000 else 'MISSED'}); "
          f"ours {ours_s:.2f} s wall, {ours_cpu:.2f} s cpu (goal < 2 s: {'met' if ours_s < 2 else 'MISSED'})")
    if real_load_s is not None:
        print(f"ratio load/ours on real bytes (disk-bound): {real_load_s / ours_s:,.0f}x; the sparse shards' holes "
              "read at memory speed, so the first ratio is the peer's best case")
    print(f"ratio safe_open/ours: {st_open_s / ours_s:.2f}x")
    result: dict[str, Any] = {
        "shards": args.shards, "tensors": inspection.tensor_count, "declared_bytes": declared,
        "file_bytes": inspection.file_bytes, "linear_layers": len(inspection.linear_layers),
        "ours_s": ours_s, "ours_cpu_s": ours_cpu, "repeat": args.repeat,
        "reads_per_shard": inspection.header_reads / args.shards, "st_open_s": st_open_s,
        "st_load_sample_shards": args.load_sample, "st_load_sample_s": sample_s, "st_load_extrapolated_s": st_load_s,
        "ratio_load_over_ours": ratio, "ratio_open_over_ours": st_open_s / ours_s,
        "disk_read_bytes_per_s": disk_rate, "st_load_real_bytes_s": real_load_s,
        "ratio_real_load_over_ours": real_load_s / ours_s if real_load_s else None,
        "goal_under_2s": ours_s < 2, "goal_1000x": ratio >= 1000,
        "machine": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "sftp": sftp if sftp else "skipped: no loopback cluster (" + str(CLUSTER_ENV) + ")",
    }
    if sftp:
        peer = sftp["copy_all_extrapolated_s"] + st_load_s
        sftp["ratio_copy_load_over_ours"] = peer / sftp["wall_s"]
        sftp["goal_reads_le_2"] = sftp["reads_per_shard"] <= 2
        print(f"SFTP: {sftp['reads_per_shard']:.2f} reads/shard (goal <= 2: "
              f"{'met' if sftp['reads_per_shard'] <= 2 else 'MISSED'}), SFTP requests/shard "
              f"{sftp['sftp_requests_per_shard']}; same layers as local: {sftp['layers_equal_local']}; "
              f"copy+load/ours over SFTP: {peer / sftp['wall_s']:,.0f}x "
              f"(ssh stream {sftp['copy_bytes_per_s'] / 2**20:.0f} MiB/s)")
    else:
        print(f"SFTP variant: skipped (no loopback cluster: {CLUSTER_ENV})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
