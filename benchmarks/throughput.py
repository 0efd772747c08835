"""Benchmark: merging at the speed of the storage, at the scale users have: three Llama-shaped bf16 checkpoints of
1.6 GB each in 5 shards (and the merge benchmark's fp32 case, 3 x 340 MB), from a warm page cache and from a cold one.

Inputs (built once under --workdir, reused while their spec is unchanged): `merge_vs_mergekit.build_models` with
hidden 2048, MLP 5632, 13 layers, 16 heads, vocab 32000, untied head: 800 M parameters, 1.60 GB in bf16 per model;
B and C are A plus small seeded noise. `--spec fp32`: merge_vs_mergekit's MODEL_SPEC (85 M parameters, fp32).

Cases, each in its own process through `merge_vs_mergekit`'s wrapper (wall time from fork to reaping, peak RSS,
CPU seconds):

  raw-floor          import torch; read every input tensor once (safe_open + get_tensor, as stored), write the
                     first model's tensors as the output's bytes (save_file): no arithmetic, no planning
  splice-soup        splice soup A B C --out X
  mergekit-linear    mergekit-yaml (linear, weights 1/3, dtype as stored) --lazy-unpickle
  splice-linear      splice merge of the same config file
  splice-METHOD      splice merge METHOD.yml for METHOD in ties, dare_ties, della (base A; B and C at density 0.5,
                     weight 0.5) and slerp (A to B, t 0.5): the same config files mergekit runs
  mergekit-METHOD    mergekit-yaml METHOD.yml --lazy-unpickle
  splice-*-direct    the soup and each splice-METHOD with SPLICE_DIRECT_WRITE=1: the output written around the page
                     cache (O_DIRECT, splice.tensors.direct_write)
  splice-lora-apply  splice patch apply LORA --base A (a rank-16 LoRA on every attention and MLP matrix)
  splice-port        splice port LORA --to B --from A --out X (the LoRA made on A, ported onto B)

Modes: `warm` (one untimed run of the first case first fills the page cache) and `cold` (before every run each
input file's pages are dropped with posix_fadvise(DONTNEED) and `mincore` checks that none are left:
benchmarks/pagecache.py). Reported per
case and mode: wall, GB/s of input read, the wall's ratio to the raw floor of the same mode and to mergekit's (the
same method), peak RSS and CPU seconds. `--profile` adds where the time of the soup and of ties goes, measured in
one process: the stream's reader, compute and writer threads, and inside compute the torch operations by kind.

Mode `s3`: moto's S3 server on 127.0.0.1 in its own process, the three models uploaded to it once, then

  s3-download      a plain concurrent download of the same bytes by s3fs: `S3FileSystem.get` of every shard object
                   to local files (several objects at once, each in concurrent ranged parts: s3fs's own concurrency)
  s3-read          every shard byte read into memory once by s3fs, in 8 MB ranges fetched concurrently by
                   `cat_ranges` (fsspec's batches): the download without writing anything
  s3-soup c=N      splice soup s3://... --storage-options '{"endpoint_url": ...}' --max-concurrency N, for each N of
                   --concurrencies (the sweep the default max_concurrency was chosen from)
  raw-floor        the local floor above, warm, for reference

reported as input GB/s and each soup's throughput as a fraction of the download's and of the read's. moto 5 reads a
whole object for every GET and slices the range out of it (`FakeKey.value`); a real S3 reads only the range. The
server here keeps every object in memory and hands moto's range code the object's bytes without that copy
(S3_SERVER_SCRIPT), so a ranged GET costs what its range costs, for splice and the baselines alike. A real store's time
to first byte can be added with --s3-latency-ms (the server waits that long before each object GET).

Not run in CI. Usage:  .venv/bin/python benchmarks/throughput.py [--spec bf16|fp32] [--modes warm cold s3]
[--only splice-soup ...] [--profile] [--device cuda] (splice --device cuda, mergekit-yaml --cuda; results-cuda.json)
[--concurrencies 1 2 4 8 16] [--s3-latency-ms 0] [--quiet-wait S].
See benchmarks/README.md for the figures measured so far.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (  # noqa: E402
    MODEL_SPEC,
    Case,
    Run,
    _tool,
    build_models,
    machine_info,
    measure,
    prepare_workdir,
    splice_fingerprint,
    summarize,
)
from pagecache import evicted  # noqa: E402
from port_llama import save_lora  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work" / "throughput"
BF16_SPEC = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 13,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "shards": 5,
    "init_std": 0.02,
    "finetune_delta_std": 0.001,
    "seeds": [0, 1, 2],
    "dtype": "bfloat16",
    "format_version": 2,
}
SPECS = {"bf16": BF16_SPEC, "fp32": MODEL_SPEC}
METHODS = {  # the configs splice merge and mergekit-yaml both run: what each model of A, B, C gives
    "ties": {"B": {"density": 0.5, "weight": 0.5}, "C": {"density": 0.5, "weight": 0.5}},
    "dare_ties": {"B": {"density": 0.5, "weight": 0.5}, "C": {"density": 0.5, "weight": 0.5}},
    "della": {
        "B": {"density": 0.5, "weight": 0.5, "epsilon": 0.1},
        "C": {"density": 0.5, "weight": 0.5, "epsilon": 0.1},
    },
    "slerp": {"B": {}},
}

RAW_FLOOR_SCRIPT = r"""
import json, os, shutil, sys
from safetensors import safe_open
from safetensors.torch import save_file

*models, out = sys.argv[1:]
INDEX = "model.safetensors.index.json"
maps = [json.load(open(os.path.join(m, INDEX)))["weight_map"] for m in models]
by_shard = {}
for name, shard in maps[0].items():
    by_shard.setdefault(shard, []).append(name)
os.makedirs(out)
for shard in sorted(by_shard):
    first = by_shard[shard][0]
    handles = [safe_open(os.path.join(m, w[first]), framework="pt", device="cpu") for m, w in zip(models, maps)]
    tensors = {}
    for name in by_shard[shard]:
        tensors[name] = handles[0].get_tensor(name)
        for other in handles[1:]:
            other.get_tensor(name)  # read once, as a merge must; nothing computed
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
    del tensors, handles
total = sum(os.path.getsize(os.path.join(out, s)) for s in by_shard)
json.dump({"metadata": {"total_size": total}, "weight_map": maps[0]}, open(os.path.join(out, INDEX), "w"))
shutil.copy(os.path.join(models[0], "config.json"), out)
"""


S3_BUCKET = "splice-bench"
S3_CONCURRENCIES = [1, 2, 4, 8, 16]

S3_SERVER_SCRIPT = r"""
import io, os, sys, time
os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 40)  # every object kept in memory, never spooled to disk
from moto.s3.models import FakeKey
from moto.server import ThreadedMotoServer

latency = float(sys.argv[1]) / 1000  # before each object GET: an object store's time to first byte
stored = FakeKey.value

def value(self):
    # moto reads a whole object for every GET and slices the range out of it; S3 reads only the range. A BytesIO
    # hands back its bytes without a copy once they are exactly its size, so a ranged GET costs what its range costs.
    with self.lock:
        buffer = self._value_buffer._file
        if isinstance(buffer, io.BytesIO):
            return buffer.getvalue()
    return stored.fget(self)

FakeKey.value = property(value, stored.fset)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
app = server._server.app

def delayed(environ, start_response):
    if latency and environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO", "").count("/") > 1:
        time.sleep(latency)  # werkzeug serves each connection on its own thread: concurrent requests wait together
    return app(environ, start_response)

server._server.app = delayed
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the benchmark closes this pipe
server.stop()
"""

S3_FETCH_SCRIPT = r"""
import os, sys
import s3fs

how, endpoint, target, *objects = sys.argv[1:]
fs = s3fs.S3FileSystem(endpoint_url=endpoint)
if how == "download":  # every object to a local file, several at once, each in concurrent parts: s3fs's own get
    os.makedirs(target)
    fs.get(objects, [os.path.join(target, path.replace("/", "_")) for path in objects])
else:  # every byte into memory, once: each object in 8 MB ranges, fetched concurrently by fsspec's cat_ranges
    step = 8 << 20
    for path in objects:
        size = fs.size(path)
        starts = list(range(0, size, step))
        assert sum(map(len, fs.cat_ranges([path] * len(starts), starts, [min(s + step, size) for s in starts]))) == size
"""


def s3_environment(environ: dict) -> dict:
    """`environ` with test credentials for moto, and no endpoint, profile or config from the machine."""
    dropped = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3", "FSSPEC_S3_ENDPOINT_URL")
    env = {key: value for key, value in environ.items() if key not in dropped}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextlib.contextmanager
def moto_server(workdir: Path, env: dict, latency_ms: float = 0.0) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 in its own process, with the benchmark's bucket: yields its endpoint."""
    script = workdir / "s3_server.py"
    script.write_text(S3_SERVER_SCRIPT)
    log = open(workdir / "logs" / "s3_server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, str(script), str(latency_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
    )
    try:
        endpoint = process.stdout.readline().strip()  # type: ignore[union-attr]  # '' if the server died
        if not endpoint.startswith("http://"):
            raise SystemExit(f"moto's S3 server did not start; see {log.name}")
        s3_client(endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def upload(endpoint: str, models: list[Path]) -> list[str]:
    """Every file of each model put under s3://S3_BUCKET/<model name>/: the models' URLs."""
    import time

    client = s3_client(endpoint)
    started = time.perf_counter()
    for model in models:
        for path in sorted(model.iterdir()):
            client.upload_file(str(path), S3_BUCKET, f"{model.name}/{path.name}")
    print(f"uploaded {len(models)} models to moto in {time.perf_counter() - started:.1f} s", flush=True)
    return [f"s3://{S3_BUCKET}/{model.name}" for model in models]


def s3_cases(workdir: Path, models: list[Path], urls: list[str], endpoint: str, concurrencies: list[int]) -> list[Case]:
    outs = workdir / "outputs"
    fetch = workdir / "s3_fetch.py"
    fetch.write_text(S3_FETCH_SCRIPT)
    objects = [
        f"{url.removeprefix('s3://')}/{path.name}" for url, model in zip(urls, models) for path in input_files([model])
    ]
    options = json.dumps({"endpoint_url": endpoint})
    baselines = [
        Case(
            f"s3-{how}",
            [sys.executable, str(fetch), how, endpoint, str(outs / f"s3-{how}"), *objects],
            outs / f"s3-{how}",
            what,
        )
        for how, what in [
            ("download", "s3fs get of every shard object to local files"),
            ("read", "s3fs cat_ranges of every shard object in 8 MB ranges, into memory"),
        ]
    ]
    soups = [
        Case(
            f"s3-soup c={n}",
            [
                _tool("splice"),
                "soup",
                *urls,
                "--out",
                str(outs / "s3-soup"),
                "--storage-options",
                options,
                "--max-concurrency",
                str(n),
                "--quiet",
                "--force",
                "--device",
                "cpu",
            ],
            outs / "s3-soup",
            f"uniform soup of A, B, C read from S3, {n} requests in flight",
        )
        for n in concurrencies
    ]
    return [*baselines, *soups]


def input_files(models: list[Path]) -> list[Path]:
    return [path for model in models for path in sorted(model.glob("*.safetensors"))]


def write_config(workdir: Path, models: list[Path], method: str, dtype: str) -> Path:
    """A mergekit config file for `method` over A, B, C (linear: weights 1/3; the others as METHODS says)."""
    config = workdir / f"{method}-{dtype}.yml"
    a, *others = models
    if method == "linear":
        listed = "".join(f"  - model: {m}\n    parameters:\n      weight: {1 / 3!r}\n" for m in models)
        config.write_text(f"merge_method: linear\nmodels:\n{listed}dtype: {dtype}\n")
        return config
    if method == "slerp":
        config.write_text(
            f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {others[0]}\n"
            f"parameters:\n  t: 0.5\ndtype: {dtype}\n"
        )
        return config
    listed = f"  - model: {a}\n"
    for model, parameters in zip(others, METHODS[method].values()):
        listed += f"  - model: {model}\n    parameters:\n"
        listed += "".join(f"      {key}: {value}\n" for key, value in parameters.items())
    config.write_text(f"merge_method: {method}\nbase_model: {a}\nmodels:\n{listed}dtype: {dtype}\n")
    return config


def build_cases(workdir: Path, models: list[Path], device: str, dtype: str) -> list[Case]:
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    floor = workdir / "raw_floor.py"
    floor.write_text(RAW_FLOOR_SCRIPT)
    splice = [_tool("splice")]
    on_device = ["--quiet", "--force", "--device", device]
    mergekit_flags = ["--lazy-unpickle", "--quiet", *(["--cuda"] if device == "cuda" else [])]
    a, b, _ = models
    linear_config = write_config(workdir, models, "linear", dtype)
    soup = Case(
        "splice-soup",
        [*splice, "soup", *map(str, models), "--out", str(outs / "splice-soup"), *on_device],
        outs / "splice-soup",
        "uniform soup of A, B, C",
    )
    cases = [
        Case(
            "raw-floor",
            [sys.executable, str(floor), *map(str, models), str(outs / "raw-floor")],
            outs / "raw-floor",
            "read A, B, C once + write A's bytes",
        ),
        soup,
        written_direct(soup),
        Case(
            "mergekit-linear",
            [_tool("mergekit-yaml"), str(linear_config), str(outs / "mergekit-linear")] + mergekit_flags,
            outs / "mergekit-linear",
            f"linear, weights 1/3, {dtype}",
        ),
        linear := Case(
            "splice-linear",
            [*splice, "merge", str(linear_config), "--out", str(outs / "splice-linear"), *on_device],
            outs / "splice-linear",
            f"linear, weights 1/3, {dtype}: mergekit-linear's config through splice merge",
        ),
        written_direct(linear),
    ]
    for method in METHODS:
        config = str(write_config(workdir, models, method, dtype))
        cases.append(
            Case(
                f"splice-{method}",
                [*splice, "merge", config, "--out", str(outs / f"splice-{method}"), *on_device],
                outs / f"splice-{method}",
                f"{method} ({config})",
            )
        )
        cases.append(written_direct(cases[-1]))
        cases.append(
            Case(
                f"mergekit-{method}",
                [_tool("mergekit-yaml"), config, str(outs / f"mergekit-{method}"), *mergekit_flags],
                outs / f"mergekit-{method}",
                f"{method} ({config})",
            )
        )
    lora = workdir / "lora-patch"
    if not lora.is_dir() or lora.stat().st_mtime < (a / "config.json").stat().st_mtime:  # made for these models
        save_lora(a, workdir / "lora-registry", lora)
    cases += [
        Case(
            "splice-lora-apply",
            [*splice, "patch", "apply", str(lora), "--base", str(a), "--out", str(outs / "lora-apply"), *on_device],
            outs / "lora-apply",
            "rank-16 LoRA on every attention and MLP matrix of A",
        ),
        Case(
            "splice-port",
            [*splice, "port", str(lora), "--to", str(b), "--from", str(a), "--out", str(outs / "port"), *on_device],
            outs / "port",
            "the LoRA made on A, ported onto B",
        ),
    ]
    return cases


def written_direct(case: Case) -> Case:
    """`case` with SPLICE_DIRECT_WRITE=1 (its output written around the page cache: splice.tensors.direct_write),
    named NAME-direct, its output beside the plain case's."""
    assert case.out is not None
    out = case.out.with_name(f"{case.out.name}-direct")
    argv = [str(out) if part == str(case.out) else part for part in case.argv]
    return Case(f"{case.name}-direct", ["env", "SPLICE_DIRECT_WRITE=1", *argv], out, f"{case.what}, written direct")


def reference_for(name: str) -> str | None:
    """The mergekit case a splice case is compared with."""
    name = name.removesuffix("-direct")
    if name in ("splice-soup", "splice-linear"):
        return "mergekit-linear"
    method = name.removeprefix("splice-")
    return f"mergekit-{method}" if method in METHODS else None


def run_mode(
    mode: str, cases: list[Case], files: list[Path], workdir: Path, env: dict, repeats: int, quiet_wait: float = 0.0
) -> list[Run]:
    runs = []
    if mode in ("warm", "s3"):  # untimed: the first case (the raw floor reads every input byte) fills the page cache
        runs.append(measure(cases[0], -1, workdir, env))
    for index in range(repeats):
        for case in cases:
            if mode == "cold":
                evicted(files)
            run = measure(case, index, workdir, env, quiet_wait)
            runs.append(run)
            if case.out is not None:  # every case meets the same page cache: the inputs, no earlier case's output
                shutil.rmtree(case.out, ignore_errors=True)
            print(
                f"  [{mode}] {case.name:<16} {run.wall_s:7.2f} s  peak RSS {run.peak_rss_mb:6.0f} MB  "
                f"cpu {run.cpu_s:6.1f} s  other load {run.other_load or 0:.2f}",
                flush=True,
            )
    return runs


def per_round_ratios(runs: list[Run], name: str, reference: str) -> list[float]:
    """Each round's wall of `name` over the same round's wall of `reference`: a slow spell of the machine (this
    VM's writes into fresh memory swing 15x) lands on both sides of a ratio taken within a round."""
    walls = {run.round: run.wall_s for run in runs if run.case == name and run.round >= 0}
    references = {run.round: run.wall_s for run in runs if run.case == reference and run.round >= 0}
    return [walls[i] / references[i] for i in sorted(walls) if i in references]


def gpu_name() -> str:
    """The GPU `--device cuda` runs on; the benchmark stops here when there is none (splice would refuse later)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch on this machine")
    return torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--spec", choices=sorted(SPECS), default="bf16", help="bf16: 3 x 1.6 GB; fp32: 3 x 340 MB")
    parser.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold", "s3"])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where splice computes (`splice --device`) and whether mergekit-yaml gets --cuda; the raw floor reads "
        "and writes on the host either way",
    )
    parser.add_argument("--profile", action="store_true", help="where the soup's and ties' time goes (one process)")
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, help="before each timed run, wait up to S seconds for a quiet machine"
    )
    parser.add_argument(
        "--concurrencies", nargs="+", type=int, default=S3_CONCURRENCIES, help="s3 mode: --max-concurrency values"
    )
    parser.add_argument(
        "--s3-latency-ms", type=float, default=0.0, help="s3 mode: the server waits this long before each object GET"
    )
    args = parser.parse_args(argv)
    gpu = gpu_name() if args.device == "cuda" else None
    workdir = args.workdir.resolve() / args.spec
    prepare_workdir(workdir)
    spec = SPECS[args.spec]
    models = build_models(workdir / "models", spec=spec)
    files = input_files(models)
    read_gb = sum(path.stat().st_size for path in files) / 1e9
    dtype = "bfloat16" if spec.get("dtype") == "bfloat16" else "float32"
    cases = [c for c in build_cases(workdir, models, args.device, dtype) if not args.only or c.name in args.only]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    for mode in args.modes:
        if mode == "s3":
            env_s3 = s3_environment(env)
            with moto_server(workdir, env_s3, args.s3_latency_ms) as endpoint:
                urls = upload(endpoint, models)
                local = [case for case in cases if case.name == "raw-floor"]
                mode_cases = local + s3_cases(workdir, models, urls, endpoint, args.concurrencies)
                runs = run_mode(mode, mode_cases, files, workdir, env_s3, args.repeats, args.quiet_wait)
            shutil.rmtree(workdir / "outputs" / "s3-download", ignore_errors=True)  # 4.8 GB of downloaded shards
        else:
            mode_cases = cases
            runs = run_mode(mode, cases, files, workdir, env, args.repeats, args.quiet_wait)
        rows = results[mode] = summarize(runs, [case.name for case in mode_cases])
        for name, row in rows.items():
            row["read_gb_per_s"] = read_gb / row["wall_s"]
            for reference in ("raw-floor", reference_for(name)):
                if reference in rows and reference != name:
                    row[f"wall / {reference}"] = row["wall_s"] / rows[reference]["wall_s"]
                    row[f"per round / {reference}"] = per_round_ratios(runs, name, reference)
            for reference in ("s3-download", "s3-read"):
                if reference in rows and name.startswith("s3-soup"):
                    row[f"throughput / {reference}"] = rows[reference]["wall_s"] / row["wall_s"]
    result = {
        "machine": machine_info(),
        "splice_source": splice_fingerprint(),
        "input_gb": read_gb,
        "spec": spec,
        "device": args.device,
        "gpu": gpu,
        "s3_latency_ms": args.s3_latency_ms if "s3" in args.modes else None,
        "modes": results,
    }
    if args.profile:
        from throughput_profile import profile_runs

        result["profile"] = profile_runs(models, workdir, write_config(workdir, models, "ties", dtype))
    path = workdir / f"results-{args.device}{'-s3' if 's3' in args.modes else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ninputs: 3 x {read_gb / 3:.2f} GB {dtype}, {len(files)} shard files, device {args.device} {gpu or ''}")
    for mode, rows in results.items():
        for name, row in rows.items():
            ratios = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith(("wall / ", "throughput / ")))
            rounds = row.get("per round / raw-floor")
            if rounds and len(rounds) > 1:
                ratios += f"  (per round / raw-floor: {', '.join(f'{r:.2f}' for r in rounds)})"
            print(
                f"{mode:<5} {name:<18} {row['wall_s']:7.2f} s  {row['read_gb_per_s']:5.2f} GB/s  "
                f"RSS {row['peak_rss_mb']:6.0f} MB  cpu {row['cpu_s']:6.1f} s  {ratios}"
            )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
