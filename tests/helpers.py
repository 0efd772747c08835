"""Independent readers for checking outputs: safetensors' own loader, not splice's."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import splice
from splice.cli.app import main as cli_main
from splice.errors import SpliceError
from splice.merge.recipe import parse_recipe


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, read with safetensors itself."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`splice ARGS` in this process through the real entry point: (exit code, stdout, stderr)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    sigint = signal.getsignal(signal.SIGINT)  # main() ignores Ctrl-C once a command is done
    monkeypatch.setattr(sys, "argv", ["splice", *map(str, args)])
    capsys.readouterr()
    try:
        cli_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
        signal.signal(signal.SIGINT, sigint)
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_output(actual: Path, expected: Path) -> None:
    """Same files; every tensor bit-identical (dtype, shape, values); every file byte-identical."""
    actual_files = sorted(p.name for p in actual.iterdir())
    expected_files = sorted(p.name for p in expected.iterdir())
    assert actual_files == expected_files
    shards = [name for name in expected_files if name.endswith(".safetensors")]
    assert shards, f"no safetensors written in {expected}"
    for name in shards:
        got, want = load_file(actual / name), load_file(expected / name)
        assert list(got) == list(want), name
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype, key
            assert got[key].shape == tensor.shape, key
            assert torch.equal(got[key], tensor), key
    for name in expected_files:
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name


def header_layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(8 + header length, {tensor: (absolute start, absolute end)}) parsed straight from the file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data_start = 8 + header_len
    spans = {
        name: (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }
    return data_start, spans


@dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    status: int = 0
    length: int = 0


@dataclass
class RequestLog:
    """WSGI middleware recording every request and the body bytes the server sent back."""

    app: object
    entries: list[Request] = field(default_factory=list)

    def __call__(self, environ, start_response):
        entry = Request(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            environ.get("HTTP_RANGE"),
        )

        def recording_start_response(status, headers, exc_info=None):
            entry.status = int(status.split()[0])
            return start_response(status, headers, exc_info)

        body = self.app(environ, recording_start_response)

        def counted():
            try:
                for chunk in body:
                    entry.length += len(chunk)
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()
                self.entries.append(entry)

        return counted()

    def clear(self) -> None:
        self.entries.clear()


@contextlib.contextmanager
def moto_s3_server(home: Path, bucket: str, middleware: Callable) -> Iterator[tuple[str, dict[str, str], object]]:
    """moto's S3 server on 127.0.0.1 with one bucket: yields (endpoint, the AWS environment it set, the
    `middleware(app)` every request passes through). Skips the test if s3fs, boto3 or moto are missing or
    the server cannot start."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # no stray profile or config from the machine: only what this sets
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3", "FSSPEC_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        # start() would wait forever if the bind failed: give it a deadline instead
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout=30)
        if starter.is_alive() or server._server is None:
            pytest.skip("moto's S3 server could not start on 127.0.0.1")
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        wrapped = middleware(server._server.app)
        server._server.app = wrapped  # werkzeug's server looks the app up on every request
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield endpoint, env, wrapped
        finally:
            server.stop()


def upload_model(client, bucket: str, model_dir: Path, prefix: str) -> str:
    """Every file of `model_dir` uploaded under s3://bucket/prefix/<its name>/ (a boto3 client); that URL."""
    for path in model_dir.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{model_dir.name}/{path.name}")
    return f"s3://{bucket}/{prefix}/{model_dir.name}"


def wait_for_marker(process, marker: Path, seconds: float = 90) -> None:
    """Wait until a subprocess has touched `marker` (it is mid-run, ready for a signal); fail if it ends first
    or never gets there."""
    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert process.poll() is None, f"the run ended before it could be signalled: {process.communicate()}"
        assert time.monotonic() < deadline, f"the run never touched {marker.name}"
        time.sleep(0.02)


def run_mergekit(recipe: Path, out: Path, *flags: str) -> None:
    """mergekit-yaml's own command on a config, offline (the peer splice's merges are compared to), run in this
    process: its imports are most of a subprocess's 5 s, and are paid once per test session."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        mergekit_yaml([str(recipe), str(out), "--lazy-unpickle", "--quiet", *flags], standalone_mode=False)


def merge_refused(recipe: dict, out: Path, *needles: str) -> None:
    """`splice.merge` refuses `recipe` in one line holding every needle, with nothing written at `out` and no staging
    left beside it."""
    with pytest.raises(SpliceError) as caught:
        splice.merge(parse_recipe(recipe), out)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind
