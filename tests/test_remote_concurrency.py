"""Remote reads in several concurrent ranged requests, against moto's S3 server on loopback.

The server sits behind a WSGI middleware that holds each ranged GET a moment (so requests that are concurrent overlap),
counts the requests in flight, and answers chosen ranged GETs with an error. botocore's own retries are off
(AWS_MAX_ATTEMPTS=1) and s3fs does not retry these errors, so every retry the server sees is splice's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import splice
from splice.tensors import ranged

from conftest import perturbed, save, tiny_model
from helpers import RequestLog, assert_same_output, header_layout, moto_s3_server, run_cli, upload_model

BUCKET = "splice-concurrency"
HOLD_S = 0.05  # each ranged GET is held this long, so requests in flight at once overlap at the server


@dataclass
class Refusal:
    """Answer `status` with S3's error `code` to GETs of one byte range of one object, `times` times (None: always)."""

    path_end: str
    range: str
    status: int
    code: str
    times: int | None = None

    def body(self) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>injected {self.code}</Message><RequestId>test</RequestId></Error>"
        ).encode()


@dataclass
class Server(RequestLog):
    """moto behind a recorder (RequestLog) that also holds ranged GETs, counts them in flight and refuses some."""

    refusals: list[Refusal] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ, start_response):
        ranged_get = environ["REQUEST_METHOD"] == "GET" and environ.get("HTTP_RANGE")
        if not ranged_get:
            return super().__call__(environ, start_response)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(HOLD_S)
            refusal = self._refusal(environ["PATH_INFO"], environ["HTTP_RANGE"])
            if refusal is None:
                return super().__call__(environ, start_response)
            body = refusal.body()
            start_response(
                f"{refusal.status} Refused", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            )
            self.entries.append(self._entry(environ, refusal.status))
            return [body]
        finally:
            with self.lock:
                self.in_flight -= 1

    def _refusal(self, path: str, byte_range: str) -> Refusal | None:
        with self.lock:
            for refusal in self.refusals:
                if path.endswith(refusal.path_end) and byte_range == refusal.range and refusal.times != 0:
                    if refusal.times is not None:
                        refusal.times -= 1
                    return refusal
        return None

    @staticmethod
    def _entry(environ, status: int):
        from helpers import Request

        entry = Request(
            environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", ""), environ["HTTP_RANGE"]
        )
        entry.status = status
        return entry

    def reset(self) -> None:
        self.entries.clear()
        self.refusals.clear()
        self.most_in_flight = 0

    def gets(self, path_end: str, byte_range: str) -> list[int]:
        """The statuses of the GETs of one range of one object, in order."""
        return [
            e.status for e in self.entries if e.method == "GET" and e.path.endswith(path_end) and e.range == byte_range
        ]


@dataclass
class Store:
    endpoint: str
    env: dict[str, str]
    server: Server
    client: object

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def upload(self, model_dir: Path) -> str:
        return upload_model(self.client, BUCKET, model_dir, uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    boto3 = pytest.importorskip("boto3")
    s3fs = pytest.importorskip("s3fs")
    with moto_s3_server(tmp_path_factory.mktemp("aws-home"), BUCKET, Server) as (endpoint, env, server):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(
                "AWS_MAX_ATTEMPTS", "1"
            )  # botocore retries nothing: what the server sees twice, splice asked twice
            s3fs.S3FileSystem.clear_instance_cache()
            yield Store(endpoint, {**env, "AWS_MAX_ATTEMPTS": "1"}, server, boto3.client("s3", endpoint_url=endpoint))
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """A sharded tiny Llama and a perturbed copy of it, saved locally."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_model("llama", 0)
    return [save(base, root / "llama-0", True), save(perturbed(base, 1), root / "llama-1", True)]


@pytest.fixture(scope="module")
def local_soup(models, tmp_path_factory) -> Path:
    return splice.soup(models, tmp_path_factory.mktemp("local") / "soup", device="cpu").out


@pytest.fixture(scope="module")
def urls(store, models) -> list[str]:
    return [store.upload(model) for model in models]


@pytest.fixture
def server(store) -> Server:
    store.server.reset()
    yield store.server
    store.server.reset()


def spans(model: Path) -> list[tuple[str, int, int]]:
    """(shard file, start, end) of every tensor of a local model."""
    return [
        (shard.name, *span)
        for shard in sorted(model.glob("*.safetensors"))
        for span in header_layout(shard)[1].values()
    ]


def largest_tensor(model: Path) -> tuple[str, str]:
    """(the object's path end, the Range header) of the largest tensor of `model` as its upload is named."""
    shard, start, end = max(spans(model), key=lambda span: span[2] - span[1])
    return f"/{model.name}/{shard}", f"bytes={start}-{end - 1}"


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


# -- several requests in flight, the same bytes --------------------------------------------------


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_soup_from_s3_is_bit_identical_with_requests_in_flight_bounded(
    max_concurrency, store, server, urls, models, local_soup, tmp_path
):
    splice.soup(urls, tmp_path / "out", device="cpu", storage_options=store.options, max_concurrency=max_concurrency)

    assert_same_output(tmp_path / "out", local_soup)
    assert server.most_in_flight == max_concurrency


def test_large_ranges_are_fetched_in_parts_into_place(store, server, urls, models, local_soup, tmp_path, monkeypatch):
    """A range larger than PART_BYTES is requested in parts that tile it, several at once, each written where it
    belongs: the output is still bit for bit the local soup's."""
    part = 1000
    monkeypatch.setattr(ranged, "PART_BYTES", part)
    splice.soup(urls, tmp_path / "out", device="cpu", storage_options=store.options, max_concurrency=3)

    assert_same_output(tmp_path / "out", local_soup)
    assert server.most_in_flight == 3
    split = 0
    for model in models:
        for shard, start, end in spans(model):
            requested = sorted(
                tuple(int(x) for x in e.range.removeprefix("bytes=").split("-"))
                for e in server.entries
                if e.method == "GET"
                and e.path.endswith(f"/{model.name}/{shard}")
                and e.range is not None
                and start <= int(e.range.removeprefix("bytes=").split("-")[0]) < end
            )
            expected = [(at, min(at + part, end) - 1) for at in range(start, end, part)]
            assert requested == expected, (model.name, shard, start, end)
            split += len(expected) > 1
    assert split > 0, "no tensor was larger than a part"


# -- failures --------------------------------------------------------------------------------------


def test_transient_failures_are_retried_and_the_output_is_exact(store, server, urls, models, local_soup, tmp_path):
    targets = [largest_tensor(model) for model in models]
    server.refusals += [Refusal(path, byte_range, 503, "ServiceUnavailable", times=2) for path, byte_range in targets]

    splice.soup(urls, tmp_path / "out", device="cpu", storage_options=store.options)

    assert_same_output(tmp_path / "out", local_soup)
    for path, byte_range in targets:
        assert server.gets(path, byte_range) == [503, 503, 206]


@pytest.mark.parametrize("status, code", [(404, "NoSuchKey"), (403, "AccessDenied")])
def test_failures_that_cannot_pass_are_not_retried(status, code, store, server, urls, models, tmp_path):
    path, byte_range = largest_tensor(models[1])
    server.refusals.append(Refusal(path, byte_range, status, code))

    with pytest.raises(splice.CheckpointError) as caught:
        splice.soup(urls, tmp_path / "out", device="cpu", storage_options=store.options)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{urls[1]}/{path.rsplit('/', 1)[1]}: cannot read tensor "), message
    assert f"injected {code}" in message
    assert server.gets(path, byte_range) == [status]
    nothing_written(tmp_path / "out")
    assert not [t for t in threading.enumerate() if t.name.startswith(("splice-fetch", "splice-read-ahead"))]


def test_cli_request_that_keeps_failing_is_one_line_and_writes_nothing(store, server, urls, models, tmp_path):
    """Through a real `splice` process: the range is asked for ATTEMPTS times, then one line naming the file, the
    tensor and the server's reason, exit 2 as for other read errors, and nothing at --out."""
    path, byte_range = largest_tensor(models[0])
    server.refusals.append(Refusal(path, byte_range, 503, "ServiceUnavailable"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(store.env, PYTHONPATH=str(Path(splice.__file__).parents[1]), COLUMNS="300")
    out = tmp_path / "out"
    args = ["soup", *urls, "--out", str(out), "--device", "cpu", "--quiet", "--max-concurrency", "2"]

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "splice", *args, "--storage-options", json.dumps(store.options)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    tensor = next(
        name
        for name, span in header_layout(models[0] / path.rsplit("/", 1)[1])[1].items()
        if f"bytes={span[0]}-{span[1] - 1}" == byte_range
    )
    assert lines[0].startswith(f"error: {urls[0]}/{path.rsplit('/', 1)[1]}: cannot read tensor {tensor}: "), lines
    assert f"injected ServiceUnavailable ({ranged.ATTEMPTS} attempts over " in lines[0]
    assert server.gets(path, byte_range) == [503] * ranged.ATTEMPTS
    assert time.monotonic() - started < 60
    nothing_written(out)


# -- the option ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -2])
def test_max_concurrency_below_one_is_refused(value, models, tmp_path, monkeypatch, capsys):
    with pytest.raises(splice.SpliceError, match=f"`max_concurrency={value}` is not a number of requests"):
        splice.soup(models, tmp_path / "out", max_concurrency=value)
    code, _, err = run_cli(
        ["soup", *models, "--out", tmp_path / "out", "--max-concurrency", value], monkeypatch, capsys
    )
    assert code == 2
    assert err.strip() == f"error: --max-concurrency {value} is not a number of requests: give 1 or more"
    nothing_written(tmp_path / "out")
