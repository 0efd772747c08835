"""Reading models over fsspec: the in-memory filesystem and a real S3 API (moto's server on loopback).

A soup read remotely must be bit-identical to the same soup read from local directories, and the
remote reads must be ranged: a safetensors file is never fetched whole, each request covers one
header or one tensor, and no more bytes cross the wire than the files hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

import splice

from conftest import perturbed, save, tiny_model
from helpers import RequestLog, assert_same_output, header_layout, moto_s3_server, run_cli, upload_model

REPO = Path(__file__).resolve().parents[1]
BUCKET = "splice-models"

# Two model families, one saved whole and one split into several shards.
FAMILIES = {"bert": ("bert", False), "llama-sharded": ("llama", True)}


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, list[Path]]:
    """Per family: a base model and a perturbed fine-tune of it, saved locally."""
    root = tmp_path_factory.mktemp("remote-models")
    built = {}
    for family, (arch, sharded) in FAMILIES.items():
        base = tiny_model(arch, 0)
        dirs = [save(base, root / f"{family}-0", sharded), save(perturbed(base, 1), root / f"{family}-1", sharded)]
        if sharded:
            assert (dirs[0] / "model.safetensors.index.json").exists()
            assert len(list(dirs[0].glob("*.safetensors"))) > 1
        else:
            assert [p.name for p in dirs[0].glob("*.safetensors")] == ["model.safetensors"]
        built[family] = dirs
    return built


@pytest.fixture(scope="module")
def local_soups(families, tmp_path_factory) -> dict[str, Path]:
    """The reference: each family's soup read from local directories."""
    root = tmp_path_factory.mktemp("local-soups")
    return {family: splice.soup(dirs, root / family, device="cpu").out for family, dirs in families.items()}


# -- fsspec memory:// ----------------------------------------------------------------------------


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = f"/splice-test-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def copy_to_memory(fs, root: str, model_dir: Path) -> str:
    for path in model_dir.iterdir():
        fs.pipe(f"{root}/{model_dir.name}/{path.name}", path.read_bytes())
    return f"memory://{root.lstrip('/')}/{model_dir.name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_soup_is_bit_identical_to_local(family, families, local_soups, memory_root, tmp_path):
    fs, root = memory_root
    urls = [copy_to_memory(fs, root, d) for d in families[family]]
    assert all(url.startswith("memory://") for url in urls)

    report = splice.soup(urls, tmp_path / "out", device="cpu")

    assert report.out == tmp_path / "out"
    assert_same_output(tmp_path / "out", local_soups[family])


def test_memory_reads_are_ranged(families, memory_root, tmp_path, monkeypatch):
    """Every read of a safetensors file through fsspec names a byte range of one header or one tensor."""
    fs, root = memory_root
    urls = [copy_to_memory(fs, root, d) for d in families["llama-sharded"]]
    calls: list[tuple[str, int | None, int | None]] = []
    original = type(fs).cat_file

    def spy(self, path, start=None, end=None, **kwargs):
        calls.append((str(path), start, end))
        return original(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", spy)
    splice.soup(urls, tmp_path / "out", device="cpu")

    shard_calls = [c for c in calls if c[0].endswith(".safetensors")]
    assert shard_calls
    for model_dir in families["llama-sharded"]:
        for shard in model_dir.glob("*.safetensors"):
            data_start, spans = header_layout(shard)
            allowed = {(0, 8), (8, data_start)} | set(spans.values())
            requested = [(s, e) for p, s, e in shard_calls if p.endswith(f"{model_dir.name}/{shard.name}")]
            assert requested, f"{shard} never read"
            for start, end in requested:
                assert start is not None and end is not None, f"{shard} read whole"
                assert (start, end) in allowed, f"{shard}: request {start}-{end} is no header and no tensor"
            assert len(requested) == len(set(requested)), f"{shard}: a range was read twice"


def test_memory_and_local_inputs_mix(families, local_soups, memory_root, tmp_path):
    fs, root = memory_root
    local, remote = families["bert"]
    splice.soup([local, copy_to_memory(fs, root, remote)], tmp_path / "out", device="cpu")
    assert_same_output(tmp_path / "out", local_soups["bert"])


# -- a real S3 API: moto's server on loopback ----------------------------------------------------


@dataclass
class S3:
    endpoint: str
    client: object
    log: RequestLog
    env: dict[str, str]

    def upload(self, model_dir: Path, prefix: str) -> str:
        return upload_model(self.client, BUCKET, model_dir, prefix)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    boto3 = pytest.importorskip("boto3")
    with moto_s3_server(tmp_path_factory.mktemp("aws-home"), BUCKET, RequestLog) as (endpoint, env, log):
        yield S3(endpoint, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"), log, env)


def check_ranged_reads(log: RequestLog, model_dirs: list[Path]) -> None:
    """No safetensors object fetched whole; each GET is one header or one tensor; total <= files' sizes."""
    gets = [e for e in log.entries if e.method == "GET" and e.path.endswith(".safetensors")]
    assert gets, "no safetensors object was read over S3"
    total_file_bytes = 0
    for model_dir in model_dirs:
        for shard in sorted(model_dir.glob("*.safetensors")):
            total_file_bytes += shard.stat().st_size
            data_start, spans = header_layout(shard)
            allowed = {(0, 8), (8, data_start)} | set(spans.values())
            bound = max([data_start] + [end - start for start, end in spans.values()])
            requests = [e for e in gets if e.path.endswith(f"/{model_dir.name}/{shard.name}")]
            assert requests, f"{shard.name} of {model_dir.name} was never read"
            for request in requests:
                assert request.range is not None, f"{model_dir.name}/{shard.name} was downloaded whole"
                assert request.range.startswith("bytes="), request.range
                first, last = (int(x) for x in request.range.removeprefix("bytes=").split("-"))
                assert request.status == 206, request
                assert request.length == last - first + 1, request
                assert request.length <= bound, f"{request}: larger than any header or tensor of {shard.name}"
                assert (first, last + 1) in allowed, f"{request}: not a header nor a tensor of {shard.name}"
            ranges = [r.range for r in requests]
            assert len(ranges) == len(set(ranges)), f"{model_dir.name}/{shard.name}: a range was read twice"
    assert sum(e.length for e in gets) <= total_file_bytes
    # Whole-object GETs are only small JSON side files (index, config), never weights.
    whole = {
        e.path.rsplit("/", 1)[-1]
        for e in log.entries
        if e.method == "GET" and e.range is None and e.path.count("/") > 1
    }
    assert whole <= {"config.json", "model.safetensors.index.json", "generation_config.json"}, whole


@pytest.mark.parametrize(
    "family, options",
    [
        ("bert", "client_kwargs"),
        ("llama-sharded", "endpoint_url"),
        ("llama-sharded", "client_kwargs"),
    ],
)
def test_s3_soup_is_bit_identical_and_ranged(family, options, s3, families, local_soups, tmp_path):
    storage_options = (
        {"client_kwargs": {"endpoint_url": s3.endpoint}}
        if options == "client_kwargs"
        else {"endpoint_url": s3.endpoint}
    )
    prefix = uuid.uuid4().hex[:8]
    urls = [s3.upload(d, prefix) for d in families[family]]
    s3.log.clear()

    report = splice.soup(urls, tmp_path / "out", device="cpu", storage_options=storage_options)

    assert report.out == tmp_path / "out"
    assert_same_output(tmp_path / "out", local_soups[family])
    check_ranged_reads(s3.log, families[family])


def test_s3_missing_model_is_a_clear_error(s3, tmp_path):
    with pytest.raises(splice.CheckpointError, match="not found"):
        splice.soup(
            [f"s3://{BUCKET}/nothing-here/a", f"s3://{BUCKET}/nothing-here/b"],
            tmp_path / "out",
            device="cpu",
            storage_options={"endpoint_url": s3.endpoint},
        )
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def without_endpoint_variables(environ) -> dict[str, str]:
    return {
        key: value
        for key, value in environ.items()
        if key not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "FSSPEC_S3")
    }


def test_cli_soup_from_s3_with_fsspec_endpoint_variable(s3, families, local_soups, tmp_path):
    """fsspec's FSSPEC_S3_ENDPOINT_URL points the CLI at a custom endpoint without any flag."""
    prefix = uuid.uuid4().hex[:8]
    urls = [s3.upload(d, prefix) for d in families["bert"]]
    env = without_endpoint_variables(os.environ)
    env.update(s3.env, FSSPEC_S3_ENDPOINT_URL=s3.endpoint)
    s3.log.clear()

    result = subprocess.run(
        [sys.executable, "-m", "splice", "soup", *urls, "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert_same_output(tmp_path / "out", local_soups["bert"])
    check_ranged_reads(s3.log, families["bert"])


@pytest.fixture
def fresh_s3fs(s3, monkeypatch):
    """An environment with no endpoint variables and no cached S3 filesystem (the CLI path builds its own)."""
    import s3fs

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "FSSPEC_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_cli_soup_from_s3_with_botocore_endpoint_variable(fresh_s3fs, s3, families, local_soups, tmp_path, capsys):
    """botocore's AWS_ENDPOINT_URL works too (read when s3fs creates its client)."""
    prefix = uuid.uuid4().hex[:8]
    urls = [s3.upload(d, prefix) for d in families["bert"]]
    fresh_s3fs.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s3.log.clear()

    code, _, err = run_cli(
        ["soup", *urls, "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"], fresh_s3fs, capsys
    )

    assert code == 0, err
    assert_same_output(tmp_path / "out", local_soups["bert"])
    check_ranged_reads(s3.log, families["bert"])


def test_cli_soup_from_s3_with_storage_options_flag(fresh_s3fs, s3, families, local_soups, tmp_path, capsys):
    """--storage-options hands fsspec its keyword arguments as JSON (no environment variables set)."""
    prefix = uuid.uuid4().hex[:8]
    urls = [s3.upload(d, prefix) for d in families["bert"]]
    for key, value in s3.env.items():
        fresh_s3fs.setenv(key, value)
    options = json.dumps({"endpoint_url": s3.endpoint})
    code, _, err = run_cli(
        ["soup", *urls, "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "--storage-options", options],
        fresh_s3fs,
        capsys,
    )
    assert code == 0, err
    assert_same_output(tmp_path / "out", local_soups["bert"])
    code, out, err = run_cli(["inspect", urls[0], "--storage-options", options], fresh_s3fs, capsys)
    assert code == 0, err
    assert "bert.encoder.layer.0.output.LayerNorm" in out


def test_cli_unreachable_s3_endpoint_is_a_one_line_error(fresh_s3fs, tmp_path, capsys):
    """An S3 URL whose endpoint refuses connections: exit 2, one line naming the model, nothing written."""
    fresh_s3fs.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a closed loopback port: fails at once
    model = f"s3://{BUCKET}/unreachable/a"

    code, _, err = run_cli(
        ["soup", model, f"s3://{BUCKET}/unreachable/b", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"],
        fresh_s3fs,
        capsys,
    )

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert model in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["s3://bucket/out", "memory://out"])
def test_remote_output_is_refused_before_any_work(out, families, tmp_path, monkeypatch):
    """--out must be a local directory: a URL is refused, and nothing is created in the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(splice.SpliceError, match="local directory"):
        splice.soup(families["bert"], out, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_cli_remote_output_is_refused(families, tmp_path, monkeypatch, capsys):
    """The CLI parses --out as a path (s3://b/out becomes s3:/b/out); it must still be refused as a URL."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        ["soup", *families["bert"], "--out", "s3://bucket/out", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "local directory" in lines[0], err
    assert list(tmp_path.iterdir()) == []
