"""Independent readers for checking outputs: safetensors' own loader, not splice's."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
