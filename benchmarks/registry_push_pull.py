"""Benchmark: `Registry.push` / `Registry.pull` of a ~200 MB patch vs a plain fsspec copy of the same bytes.

The patch is a delta of random fp32 tensors: 48 matrices of 1024 x 1024 (4 MB each) plus 384 LayerNorm-sized
vectors of 1024 (4 KB each), ~203 MB in one `tensors.safetensors`. Measured, locally and against moto's S3
server (in-process ThreadedMotoServer on 127.0.0.1, through s3fs):

  plain push    fs.put(patch/tensors.safetensors, DEST/tensors.safetensors)
  splice push   Registry.push(name, patch_dir): read every tensor, sha256 it, write the blobs (and, in format 2,
                the packs of small tensors) not stored yet, then the manifest (a fresh registry each round, so
                every blob is new)
  push again    the same push once more: every blob is found stored, 0 new blob bytes
  plain pull    fs.get(DEST/tensors.safetensors, local file)
  splice pull   Registry.pull(ref, out): every blob fetched, hash-checked, written into tensors.safetensors

Ratios are throughput ratios (plain seconds / splice seconds; target >= 0.8). Medians of --repeats rounds.
Not part of the test suite.  Usage:  .venv/bin/python benchmarks/registry_push_pull.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from splice.adapters.meta import BaseFingerprint  # noqa: E402
from splice.adapters.patch import Patch, PatchKind, PatchMeta  # noqa: E402
from splice.registry import Registry  # noqa: E402

MATRICES, MATRIX = 48, (1024, 1024)
VECTORS, VECTOR = 384, (1024,)
BUCKET = "splice-bench"


def build_patch(directory: Path) -> Path:
    if (directory / "tensors.safetensors").exists():
        return directory
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(MATRICES):
        tensors[f"model.layers.{layer}.mlp.weight"] = torch.randn(MATRIX, generator=generator) * 1e-3
    for index in range(VECTORS):
        tensors[f"model.layers.{index % MATRICES}.norm{index // MATRICES}.weight"] = (
            torch.randn(VECTOR, generator=generator) * 1e-3
        )
    meta = PatchMeta(kind=PatchKind.delta, targets=sorted(tensors), base=BaseFingerprint.of([]))
    Patch(tensors, meta).save(directory, force=True)
    return directory


def timed(fn, *args):
    """(seconds, result) of fn(*args), after flushing dirty pages so no case pays for an earlier one's writes."""
    os.sync()
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def hash_floor(path: str) -> float:
    """Seconds to read the file's bytes from the page cache and sha256 them in 4 MB pieces on every core: the
    least a push or pull that verifies content must spend on top of moving the bytes."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    piece = 4 << 20
    fd = os.open(path, os.O_RDONLY)

    def work(offset: int) -> str:
        buf = bytearray(min(piece, size - offset))
        os.preadv(fd, [buf], offset)
        return hashlib.sha256(buf).hexdigest()

    try:
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            seconds, _ = timed(lambda: list(pool.map(work, range(0, size, piece))))
    finally:
        os.close(fd)
    return seconds


def clear(fs, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def run_backend(
    label: str, fs, base: str, options: dict | None, url_of, patch_dir: Path, work: Path, repeats: int
) -> dict:
    source = str(patch_dir / "tensors.safetensors")
    nbytes = os.path.getsize(source)
    samples: dict[str, list[float]] = {
        k: [] for k in ("plain push", "splice push", "push again", "plain pull", "splice pull")
    }
    again_written = []
    for _ in range(repeats):
        tag = uuid.uuid4().hex[:8]
        plain = f"{base}/plain-{tag}/tensors.safetensors"
        registry_url = url_of(f"registry-{tag}")
        local_copy = work / f"plain-pull-{tag}.safetensors"
        pulled = work / f"pulled-{tag}"
        fs.makedirs(f"{base}/plain-{tag}", exist_ok=True)
        seconds, _ = timed(fs.put, source, plain)
        samples["plain push"].append(seconds)
        registry = Registry.init(registry_url, options)
        seconds, _ = timed(registry.push, "bench", patch_dir)
        samples["splice push"].append(seconds)
        seconds, pushed = timed(registry.push, "bench", patch_dir)
        samples["push again"].append(seconds)
        again_written.append(pushed.stats.bytes_written)
        seconds, _ = timed(fs.get, plain, str(local_copy))
        samples["plain pull"].append(seconds)
        seconds, _ = timed(registry.pull, "bench@1", pulled)
        samples["splice pull"].append(seconds)
        assert (pulled / "tensors.safetensors").read_bytes() == Path(source).read_bytes()
        local_copy.unlink()
        shutil.rmtree(pulled)
        clear(fs, f"{base}/plain-{tag}")
        clear(fs, registry_url if label == "local" else f"{base}/registry-{tag}")
    samples["read+hash floor"] = [hash_floor(source) for _ in range(repeats)]
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "backend": label,
        "bytes": nbytes,
        "seconds": medians,
        "samples": samples,
        "push_again_bytes_written": again_written,
        "ratios": {
            "push": medians["plain push"] / medians["splice push"],
            "pull": medians["plain pull"] / medians["splice pull"],
        },
    }


def start_moto():
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(timeout=30)
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / "_work" / "registry")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    patch_dir = build_patch(args.workdir / "patch")
    results = []
    if "local" in args.only:
        import fsspec

        fs = fsspec.filesystem("file")
        dest = args.workdir / "local-dest"
        dest.mkdir(exist_ok=True)
        results.append(
            run_backend(
                "local", fs, str(dest), None, lambda name: str(dest / name), patch_dir, args.workdir, args.repeats
            )
        )
    if "s3" in args.only:
        import boto3
        import s3fs

        server, endpoint = start_moto()
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            fs = s3fs.S3FileSystem(**options)
            results.append(
                run_backend(
                    "s3 (moto)",
                    fs,
                    BUCKET,
                    options,
                    lambda name: f"s3://{BUCKET}/{name}",
                    patch_dir,
                    args.workdir,
                    args.repeats,
                )
            )
        finally:
            server.stop()
    print(
        f"\npatch: {MATRICES} x {list(MATRIX)} + {VECTORS} x {list(VECTOR)} fp32 tensors, "
        f"{results[0]['bytes'] / 1e6:.1f} MB; medians of {args.repeats} rounds; CPUs: {os.cpu_count()}\n"
    )
    header = (
        f"{'backend':<11} {'case':<12} {'plain s':>8} {'splice s':>9} {'plain MB/s':>11} {'splice MB/s':>12} "
        f"{'ratio':>6} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        mb, s = result["bytes"] / 1e6, result["seconds"]
        for case in ("push", "pull"):
            plain, ours = s[f"plain {case}"], s[f"splice {case}"]
            ratio = result["ratios"][case]
            print(
                f"{result['backend']:<11} {case:<12} {plain:>8.3f} {ours:>9.3f} {mb / plain:>11.0f} "
                f"{mb / ours:>12.0f} {ratio:>6.2f} {'>= 0.8':>7} {'ok' if ratio >= 0.8 else 'MISSED'}"
            )
        print(
            f"{result['backend']:<11} {'push again':<12} {'':>8} {s['push again']:>9.3f} {'':>11} "
            f"{mb / s['push again']:>12.0f}   new blob bytes: {result['push_again_bytes_written']}"
        )
        floor = s["read+hash floor"]
        print(
            f"{result['backend']:<11} {'hash floor':<12} {'':>8} {floor:>9.3f} {'':>11} {mb / floor:>12.0f}   "
            f"(read + sha256 only, all cores; plain push / floor = {s['plain push'] / floor:.2f})"
        )
    out = args.workdir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
