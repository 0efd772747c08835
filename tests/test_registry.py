"""The patch registry on a local directory, memory:// and a real S3 API (moto's server on 127.0.0.1, via s3fs).

Round trips are bit-identical, identical content is stored once (large tensors blob by blob, small ones in
packs), every tensor read is hash-checked (a damaged pack is pinned on the tensors it breaks), versions
are created exclusively (numbers never reused, also across processes), aliases move by compare-and-swap,
a killed push leaves no visible version, and every user error is one line that changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

import splice
from splice.adapters.fingerprint import TensorFingerprint, fingerprint_base, tensor_sha256
from splice.adapters.lazy import LazyTensors
from splice.adapters.meta import BaseFingerprint
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta
from splice.registry import AliasConflict, RefError, Registry, RegistryError, store
from splice.registry.layout import blob_rel
from splice.tensors.checkpoint import Checkpoint
from splice.workflows.publish import publish_patch

from conftest import perturbed, save, tiny_model
from helpers import moto_s3_server, run_cli

REPO = Path(__file__).resolve().parents[1]
BUCKET = "splice-registry"


# -- patches built in memory -----------------------------------------------------------------------


def fake_base(names_shapes: dict[str, tuple[int, ...]]) -> BaseFingerprint:
    return BaseFingerprint.of(
        [
            TensorFingerprint(name=n, shape=s, dtype="float32", sha256=f"{i:064x}", norm=1.0)
            for i, (n, s) in enumerate(names_shapes.items())
        ]
    )


def make_patch(
    seed: int,
    kind: PatchKind = PatchKind.delta,
    big: int = 2,
    small: int = 3,
    extra: dict[str, torch.Tensor] | None = None,
) -> Patch:
    """A patch with a few matrix-sized and LN-sized fp32 tensors, plus bf16, int64, bool and empty ones."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(big):
        tensors[f"layers.{i}.mlp.weight"] = torch.randn(64, 32, generator=generator)
    for i in range(small):
        tensors[f"layers.{i}.norm.weight"] = torch.randn(32, generator=generator)
    tensors["head.bias"] = torch.randn(7, generator=generator).to(torch.bfloat16)
    tensors["index"] = torch.randint(0, 1000, (5,), generator=generator, dtype=torch.int64)
    tensors["mask"] = torch.rand(9, generator=generator) > 0.5
    tensors["empty"] = torch.empty(0, 4)
    tensors.update(extra or {})
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    meta = PatchMeta(
        kind=kind,
        targets=sorted(tensors),
        base=fake_base(shapes),
        lineage=["tiny-bert"],
        metrics={"accuracy": 0.5 + seed / 100},
        description=f"seed {seed}",
        tags=["test"],
    )
    return Patch(tensors, meta)


def assert_same_tensors(got, want) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert tuple(got[name].shape) == tuple(tensor.shape), name
        assert torch.equal(got[name], tensor), name


# -- the three backends ----------------------------------------------------------------------------


@dataclass
class RequestLog:
    """WSGI middleware recording (method, path) of every request moto serves."""

    app: object
    entries: list[tuple[str, str]] = field(default_factory=list)
    ranges: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header or "")

    def __call__(self, environ, start_response):
        self.entries.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        self.ranges.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE", "")))
        return self.app(environ, start_response)


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    log: RequestLog

    @property
    def options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with moto_s3_server(tmp_path_factory.mktemp("aws-home"), BUCKET, RequestLog) as (endpoint, env, log):
        yield S3Server(endpoint, env, log)


@dataclass
class Where:
    kind: str
    url: str
    options: dict | None
    log: RequestLog | None = None

    @property
    def fs_root(self):
        fs, root = fsspec.core.url_to_fs(self.url, **(self.options or {}))
        return fs, root.rstrip("/")

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the registry, with its bytes."""
        fs, root = self.fs_root
        fs.invalidate_cache()
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return {}
        return {p[len(root) + 1 :]: fs.cat_file(p) for p in found}

    def write(self, rel: str, data: bytes) -> None:
        fs, root = self.fs_root
        fs.pipe_file(f"{root}/{rel}", data)

    def read(self, rel: str) -> bytes:
        fs, root = self.fs_root
        return fs.cat_file(f"{root}/{rel}")


@pytest.fixture(params=["local", "memory", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        yield Where("local", str(tmp_path / "registry"), None)
    elif request.param == "memory":
        root = f"registry-{uuid.uuid4().hex[:8]}"
        yield Where("memory", f"memory://{root}", None)
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{root}"):
            fs.rm(f"/{root}", recursive=True)
    else:
        server = request.getfixturevalue("s3_server")
        yield Where("s3", f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", server.options, server.log)


@pytest.fixture
def registry(where) -> Registry:
    return Registry.init(where.url, where.options)


LARGE = 1024  # a pack_below under which the test patches' 64 x 32 fp32 matrices get blobs of their own


def stored_bytes(where: Where, entry) -> bytes:
    """A tensor's bytes as stored: its own blob, or its range of a pack."""
    return where.read(blob_rel(entry.blob_digest))[entry.offset : entry.offset + entry.nbytes]


# -- round trips and refs --------------------------------------------------------------------------


def test_push_pull_round_trip_is_bit_identical(registry, where, tmp_path):
    patch = make_patch(0)
    patch_dir = patch.save(tmp_path / "patch")

    manifest = registry.push("ln-task", patch_dir, message="first").manifest

    assert (manifest.name, manifest.version, manifest.message) == ("ln-task", 1, "first")
    assert manifest.digest.startswith("sha256:") and len(manifest.digest) == 71
    assert {n: e.digest for n, e in manifest.tensors.items()} == {n: tensor_sha256(t) for n, t in patch.tensors.items()}
    assert manifest.tensors["head.bias"].dtype == "BF16" and manifest.tensors["mask"].dtype == "BOOL"
    assert manifest.nbytes == sum(t.numel() * t.element_size() for t in patch.tensors.values())
    out = registry.pull("ln-task", tmp_path / "pulled")
    assert out == tmp_path / "pulled"
    assert sorted(p.name for p in out.iterdir()) == ["patch.json", "tensors.safetensors"]
    # byte for byte what Patch.save wrote: same header, same tensor bytes, same manifest
    assert (out / "tensors.safetensors").read_bytes() == (patch_dir / "tensors.safetensors").read_bytes()
    assert (out / "patch.json").read_bytes() == (patch_dir / "patch.json").read_bytes()
    assert_same_tensors(load_file(out / "tensors.safetensors"), patch.tensors)
    assert Patch.load(out).meta == patch.meta
    # every tensor is stored as its raw bytes: these small ones all in one pack, named by its own sha256
    packs = {entry.blob for entry in manifest.tensors.values()}
    assert len(packs) == 1 and None not in packs
    (pack,) = packs
    assert hashlib.sha256(where.read(blob_rel(pack))).hexdigest() == pack
    for name, tensor in patch.tensors.items():
        raw = stored_bytes(where, manifest.tensors[name])
        assert raw == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
    assert [k for k in where.snapshot() if k.startswith("blobs/")] == [blob_rel(pack)]


def test_large_tensors_get_blobs_of_their_own(registry, where, tmp_path):
    registry.pack_below = LARGE
    patch = make_patch(0)
    pushed = registry.push("own", patch.save(tmp_path / "patch"))
    manifest = pushed.manifest
    for name, tensor in patch.tensors.items():
        entry = manifest.tensors[name]
        assert entry.packed == (entry.nbytes < LARGE), name
        if not entry.packed:  # a blob of its own: the tensor's raw bytes, named by their sha256
            raw = where.read(blob_rel(tensor_sha256(tensor)))
            assert raw == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
        assert stored_bytes(where, entry) == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert pushed.stats.blobs_written == 3  # two matrices and one pack
    assert (registry.pull("own", tmp_path / "out") / "tensors.safetensors").read_bytes() == (
        tmp_path / "patch" / "tensors.safetensors"
    ).read_bytes()


def test_a_patch_object_round_trips_and_loads_lazily(registry, tmp_path):
    patch = make_patch(1)
    registry.push("obj", patch)
    loaded = registry.load("obj")
    assert loaded.shapes == {n: tuple(t.shape) for n, t in patch.tensors.items()}
    assert hasattr(loaded.tensors, "shapes") and isinstance(loaded.tensors, LazyTensors)
    assert loaded.meta == patch.meta
    assert loaded.num_parameters == patch.num_parameters
    assert_same_tensors({n: loaded.tensors[n] for n in loaded.tensors}, patch.tensors)
    loaded.tensors["layers.0.mlp.weight"].add_(1)  # tensors handed out are writable copies
    with pytest.raises(KeyError):
        loaded.tensors["nope"]


def test_extracted_layernorm_patch_round_trips(registry, tmp_path):
    from splice.adapters.extract import extract_patch

    base = tiny_model("bert", 0)
    base_dir, tuned_dir = save(base, tmp_path / "base", False), save(perturbed(base, 1), tmp_path / "tuned", False)
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    patch_dir = patch.save(tmp_path / "ln")

    manifest = registry.push("bert-ln", patch_dir).manifest
    out = registry.pull("bert-ln@1", tmp_path / "pulled")

    assert manifest.meta.kind is PatchKind.layernorm
    assert manifest.meta.base == patch.meta.base
    assert (out / "tensors.safetensors").read_bytes() == (patch_dir / "tensors.safetensors").read_bytes()
    assert (out / "patch.json").read_bytes() == (patch_dir / "patch.json").read_bytes()


def test_every_ref_form_resolves(registry):
    first = registry.push("task", make_patch(0), alias="prod").manifest
    second = registry.push("task", make_patch(1)).manifest
    third = registry.push("task", make_patch(2), alias="task-3").manifest

    assert registry.resolve("task").version == 3
    assert registry.resolve("task@2").digest == second.digest
    assert registry.resolve("task@prod").version == 1
    assert registry.resolve("task@task-3").version == 3
    assert registry.resolve(f"task@{second.digest}").version == 2
    assert registry.resolve(f"task@{first.digest}").meta.model_dump(exclude={"created"}) == make_patch(
        0
    ).meta.model_dump(exclude={"created"})
    assert [m.version for m in registry.versions("task")] == [1, 2, 3]
    assert registry.names() == ["task"]
    assert {a: r.version for a, r in registry.aliases("task").items()} == {"prod": 1, "task-3": 3}
    assert third.ref == "task@3"


@pytest.mark.parametrize("pack_below", [LARGE, store.PACK_BELOW])
def test_identical_content_writes_no_new_blob_bytes(registry, where, pack_below):
    registry.pack_below = pack_below
    patch = make_patch(0)
    first = registry.push("dup", patch)
    blobs_before = {k: v for k, v in where.snapshot().items() if k.startswith("blobs/")}

    again = Patch(dict(patch.tensors), patch.meta.model_copy(update={"created": patch.meta.created.replace(year=2001)}))
    second = registry.push("dup", again)

    assert first.stats.bytes_written == first.manifest.nbytes
    assert first.stats.blobs_written == len({e.blob_digest for e in first.manifest.tensors.values()})
    assert first.stats.blobs_written == (3 if pack_below == LARGE else 1)  # 2 matrices + 1 pack, or 1 pack
    assert second.stats.bytes_written == 0
    assert second.stats.blobs_written == 0
    assert second.stats.bytes_reused == first.manifest.nbytes
    assert second.manifest.version == 2
    assert second.manifest.digest == first.manifest.digest  # the content digest ignores the creation time
    assert {k: v for k, v in where.snapshot().items() if k.startswith("blobs/")} == blobs_before
    # a patch that shares one large tensor with it writes only the other blobs; small tensors dedup pack by pack
    shared = make_patch(5, extra={"layers.0.mlp.weight": patch.tensors["layers.0.mlp.weight"]})
    third = registry.push("other", shared)
    if pack_below == LARGE:
        assert third.stats.bytes_reused == 64 * 32 * 4  # the shared matrix
        assert third.stats.bytes_written == third.manifest.nbytes - 64 * 32 * 4
    else:
        assert third.stats.bytes_reused == 0 and third.stats.bytes_written == third.manifest.nbytes


@pytest.mark.parametrize("wanted", ["layers.2.norm.weight", "layers.1.mlp.weight"])
def test_load_reads_only_the_byte_ranges_looked_up(registry, where, monkeypatch, wanted):
    """A packed tensor is one range read of its pack, exactly its bytes; a large one reads only its own blob."""
    registry.pack_below = LARGE
    patch = make_patch(3, big=4, small=6)
    manifest = registry.push("bank", patch).manifest
    entry = manifest.tensors[wanted]
    assert entry.packed == (wanted == "layers.2.norm.weight")
    loaded = registry.load("bank@1")
    reads: list[tuple[str, int, int]] = []  # (path, first byte, end) of every blob read
    if where.kind == "s3":
        where.log.ranges.clear()
        value = loaded.tensors[wanted]
        for method, path, header in where.log.ranges:
            if method == "GET" and "/blobs/" in path:
                first, _, last = header.removeprefix("bytes=").partition("-")
                reads.append((path, int(first), int(last) + 1))
    elif where.kind == "local":
        opened: dict[int, str] = {}
        original_open, original_preadv = os.open, os.preadv

        def spy_open(path, *args, **kwargs):
            fd = original_open(path, *args, **kwargs)
            opened[fd] = str(path)
            return fd

        def spy_preadv(fd, buffers, offset, *args):
            got = original_preadv(fd, buffers, offset, *args)
            reads.append((opened.get(fd, "?"), offset, offset + got))
            return got

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "preadv", spy_preadv)
        value = loaded.tensors[wanted]
        monkeypatch.undo()
    else:
        fs = fsspec.filesystem("memory")
        for method in ("cat_file", "cat_ranges", "cat", "open"):
            original = getattr(type(fs), method)

            def spy(self, path, *args, _original=original, _method=method, **kwargs):
                if _method == "cat_file":
                    reads.append((path, kwargs.get("start") or 0, kwargs.get("end")))
                else:
                    reads.append((str(path), -1, -1))
                return _original(self, path, *args, **kwargs)

            monkeypatch.setattr(type(fs), method, spy)
        value = loaded.tensors[wanted]
        monkeypatch.undo()
    reads = [r for r in reads if "/blobs/" in r[0]]
    assert torch.equal(value, patch.tensors[wanted])
    assert len({path for path, _, _ in reads}) == 1 and reads[0][0].endswith(blob_rel(entry.blob_digest)), reads
    first, end = min(r[1] for r in reads), max(r[2] for r in reads)
    if entry.packed:
        assert (first, end) == (entry.offset, entry.offset + entry.nbytes)  # just its range of the pack
    else:
        assert first == 0 and end <= entry.nbytes + 1  # its own blob (and one byte past, to catch a long one)


# -- integrity -------------------------------------------------------------------------------------


def test_a_flipped_byte_is_caught_everywhere_and_nothing_changes(registry, where, tmp_path):
    registry.pack_below = LARGE  # the victim has a blob of its own, which both versions use
    patch = make_patch(0)
    registry.push("flip", patch)
    registry.push("flip", make_patch(0, extra={"more": torch.ones(3)}))  # version 2 shares the blob too
    victim = "layers.1.mlp.weight"
    rel = blob_rel(tensor_sha256(patch.tensors[victim]))
    raw = bytearray(where.read(rel))
    raw[100] ^= 0x01
    where.write(rel, bytes(raw))
    before = where.snapshot()

    with pytest.raises(RegistryError) as caught:
        registry.pull("flip@1", tmp_path / "pulls" / "out")
    message = str(caught.value)
    assert "\n" not in message
    assert rel in message and f"tensor {victim} of flip@1" in message and "corrupt" in message
    assert list((tmp_path / "pulls").iterdir()) == []  # no output, no staging directory left behind

    loaded = registry.load("flip@1")
    assert torch.equal(loaded.tensors["layers.0.mlp.weight"], patch.tensors["layers.0.mlp.weight"])
    with pytest.raises(RegistryError, match="corrupt"):
        loaded.tensors[victim]

    report = registry.verify()
    assert not report.ok
    assert [(p.problem, p.digest, p.versions) for p in report.problems] == [
        ("corrupt", tensor_sha256(patch.tensors[victim]), ["flip@1", "flip@2"])
    ]
    assert report.versions_checked == 2
    assert where.snapshot() == before  # verify changed nothing, neither did the failed pull


def test_a_flipped_byte_inside_a_pack_is_pinned_on_its_tensor_and_versions(registry, where, tmp_path):
    patch = make_patch(0)
    first = registry.push("pk", patch).manifest
    registry.push("pk", make_patch(0))  # version 2: the same small tensors, so the same pack
    third = registry.push("pk", make_patch(0, extra={"more": torch.ones(3)})).manifest  # another pack
    victim = "layers.1.norm.weight"
    entry = first.tensors[victim]
    assert entry.packed and third.tensors[victim].blob != entry.blob
    rel = blob_rel(entry.blob)
    raw = bytearray(where.read(rel))
    raw[entry.offset + 5] ^= 0x01
    where.write(rel, bytes(raw))
    before = where.snapshot()

    with pytest.raises(RegistryError) as caught:
        registry.pull("pk@2", tmp_path / "pulls" / "out")
    message = str(caught.value)
    assert "\n" not in message and "corrupt" in message
    assert rel in message and f"tensor {victim} of pk@2, bytes {entry.offset}..{entry.offset + entry.nbytes}" in message
    assert list((tmp_path / "pulls").iterdir()) == []

    loaded = registry.load("pk@1")  # the pack's other tensors still read fine: each is checked on its own
    for name in patch.tensors:
        if name == victim:
            with pytest.raises(RegistryError, match=f"tensor {victim} of pk@1.*corrupt"):
                loaded.tensors[name]
        else:
            assert torch.equal(loaded.tensors[name], patch.tensors[name]), name
    registry.pull("pk@3", tmp_path / "ok")  # version 3 does not use that pack

    report = registry.verify()
    assert [(p.problem, p.digest, p.versions, p.tensors) for p in report.problems] == [
        ("corrupt", entry.blob, ["pk@1", "pk@2"], [f"{victim} of pk@1", f"{victim} of pk@2"])
    ]
    assert f"damaged tensors: {victim} of pk@1" in report.problems[0].detail
    assert where.snapshot() == before  # verify changed nothing, neither did the failed pull

    fixed = registry.push("pk", patch).manifest  # the pack is the wrong bytes, not the wrong size: a re-push can't tell
    assert fixed.tensors[victim].blob == entry.blob


def test_a_repeated_push_with_packs_writes_nothing_and_moves_few_requests(registry, where):
    patch = make_patch(0, small=40)  # 47 tensors, all small
    if where.kind == "s3":
        where.log.entries.clear()
    first = registry.push("many", patch)
    if where.kind == "s3":
        puts = [p for m, p in where.log.entries if m == "PUT" and "/blobs/" in p]
        heads = [p for m, p in where.log.entries if m == "HEAD" and "/blobs/" in p]
        assert len(puts) == 1 and len(heads) <= 2, where.log.entries  # one pack, not 47 blobs
        where.log.entries.clear()
    again = registry.push("many", patch)
    if where.kind == "s3":
        assert not [p for m, p in where.log.entries if m == "PUT" and "/blobs/" in p]
    assert first.stats.blobs_written == 1 and first.stats.bytes_written == first.manifest.nbytes
    assert again.stats.bytes_written == 0 and again.stats.blobs_written == 0
    assert again.stats.bytes_reused == first.manifest.nbytes and again.manifest.digest == first.manifest.digest
    assert {e.blob for e in again.manifest.tensors.values()} == {e.blob for e in first.manifest.tensors.values()}


def test_a_format_1_registry_is_read_and_written_as_format_1(where, tmp_path):
    """Format 1 (every tensor its own blob) stays readable and writable, without packs, so an older splice
    can still read it; a pack-less manifest is written exactly as format 1 wrote it."""
    registry = Registry.init(where.url, where.options)
    marker = json.loads(where.read("registry.json"))
    assert marker["format_version"] == 2
    where.write("registry.json", json.dumps({**marker, "format_version": 1}).encode())
    old = Registry.open(where.url, where.options)
    assert old.info.format_version == 1 and old.pack_below == 0
    patch = make_patch(0)
    manifest = old.push("legacy", patch).manifest
    raw = json.loads(where.read("patches/legacy/versions/1.json"))
    assert raw["format_version"] == 1
    assert all(set(e) == {"digest", "dtype", "shape", "nbytes"} for e in raw["tensors"].values())
    assert all(not e.packed and e.digest == tensor_sha256(patch.tensors[n]) for n, e in manifest.tensors.items())
    assert_same_tensors(dict(old.load("legacy").tensors.items()), patch.tensors)
    packed = registry.push("new", patch).manifest  # the content digest does not depend on how tensors are stored
    assert packed.digest == manifest.digest and any(e.packed for e in packed.tensors.values())
    assert old.verify().ok


def test_a_missing_blob_and_a_tampered_manifest_are_reported(registry, where, tmp_path):
    patch = make_patch(0)
    manifest = registry.push("gone", patch).manifest
    rel = blob_rel(manifest.tensors["layers.0.norm.weight"].blob_digest)  # the pack
    fs, root = where.fs_root
    fs.rm_file(f"{root}/{rel}")

    with pytest.raises(RegistryError, match="is missing"):
        registry.pull("gone", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = registry.verify()
    assert [(p.problem, p.versions) for p in report.problems] == [("missing", ["gone@1"])]

    manifest = json.loads(where.read("patches/gone/versions/1.json"))
    manifest["meta"]["metrics"]["accuracy"] = 0.99
    where.write("patches/gone/versions/1.json", json.dumps(manifest).encode())
    with pytest.raises(RegistryError, match="does not match its digest"):
        registry.resolve("gone@1")
    assert any("does not match its digest" in line for line in registry.verify().bad_manifests)


@pytest.mark.parametrize("pack_below", [LARGE, store.PACK_BELOW])
def test_a_truncated_blob_is_rewritten_by_the_next_push_of_that_content(registry, where, pack_below):
    registry.pack_below = pack_below
    patch = make_patch(0)
    manifest = registry.push("trunc", patch).manifest
    rel = blob_rel(manifest.tensors["layers.0.mlp.weight"].blob_digest)  # its own blob, or the pack
    size = len(where.read(rel))
    assert size == (64 * 32 * 4 if pack_below == LARGE else manifest.nbytes)
    where.write(rel, where.read(rel)[:10])
    assert not registry.verify().ok

    again = registry.push("trunc", patch)

    assert again.stats.blobs_written == 1 and again.stats.bytes_written == size
    assert registry.verify().ok


# -- aliases ---------------------------------------------------------------------------------------


def test_alias_moves_are_compare_and_swap(registry):
    for seed in range(3):
        registry.push("cas", make_patch(seed))
    first = registry.tag("cas", "prod", 1)
    assert (first.generation, first.version) == (1, 1)

    winner = registry.tag("cas", "prod", 2, expect_generation=1)
    with pytest.raises(AliasConflict) as caught:
        registry.tag("cas", "prod", 3, expect_generation=1)

    assert (winner.generation, winner.version) == (2, 2)
    assert str(caught.value) == ("alias prod of cas was moved by someone else (now version 2); re-run to move it again")
    assert registry.resolve("cas@prod").version == 2
    assert [(r.generation, r.version) for r in registry.alias_history("cas", "prod")] == [(1, 1), (2, 2)]
    with pytest.raises(AliasConflict, match="now unset"):
        registry.tag("cas", "new", 1, expect_generation=3)


def test_racing_alias_moves_from_one_generation_have_one_winner(registry):
    for seed in range(2):
        registry.push("race", make_patch(seed))
    registry.tag("race", "prod", 1)
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def move(target: int) -> None:
        barrier.wait()
        try:
            registry.tag("race", "prod", target, expect_generation=1)
            outcomes.append("won")
        except AliasConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=move, args=(1 + i % 2,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["won"]
    assert [r.generation for r in registry.alias_history("race", "prod")] == [1, 2]


# -- removal and gc --------------------------------------------------------------------------------


@pytest.mark.parametrize("pack_below", [LARGE, store.PACK_BELOW])
def test_removed_versions_are_never_reused_and_gc_frees_only_their_own_blobs(registry, where, pack_below):
    registry.pack_below = pack_below  # 16 x 16 fp32 is 1024 bytes: a blob of its own, or in each version's pack
    shared = torch.full((16, 16), 3.0)
    registry.push("rm", make_patch(0, extra={"shared": shared}))
    doomed = make_patch(1, extra={"shared": shared})
    registry.push("rm", doomed, alias="prod")
    registry.push("rm", make_patch(2, extra={"shared": shared}))

    digests = {v: {e.blob_digest for e in registry.resolve(f"rm@{v}").tensors.values()} for v in (1, 2, 3)}
    removed = registry.remove("rm@2")
    assert removed.version == 2
    with pytest.raises(RegistryError) as caught:
        registry.resolve("rm@2")
    assert str(caught.value) == "rm@2 was removed; its number is not reused"
    with pytest.raises(RegistryError, match="alias prod of rm points to version 2: rm@2 was removed"):
        registry.resolve("rm@prod")
    assert registry.resolve("rm").version == 3

    registry.remove("rm")  # the latest: its number is not handed out again either
    assert registry.push("rm", make_patch(3, extra={"shared": shared})).manifest.version == 4
    assert [m.version for m in registry.versions("rm")] == [1, 4]

    young = registry.gc()  # default grace: an hour; everything here is younger
    assert young.blobs_removed == 0 and young.blobs_kept_young > 0
    report = registry.gc(grace_seconds=0)
    digests[4] = {e.blob_digest for e in registry.resolve("rm@4").tensors.values()}
    unique = (digests[2] | digests[3]) - digests[1] - digests[4]
    blobs_left = {k.rsplit("/", 1)[-1] for k in where.snapshot() if k.startswith("blobs/")}
    assert len(unique) == (6 if pack_below == LARGE else 2)  # 2 matrices and a pack each, or a pack each
    if pack_below == LARGE:
        own = {tensor_sha256(t) for t in doomed.tensors.values() if t.numel() * t.element_size() >= LARGE}
        assert own - digests[1] <= unique
        assert tensor_sha256(shared) in blobs_left  # shared blobs (the 16x16 matrix, the empty tensor) stay
    assert unique.isdisjoint(blobs_left)
    assert blobs_left == digests[1] | digests[4]
    assert report.blobs_removed == len(unique)
    assert registry.verify().ok
    assert_same_tensors(dict(registry.load("rm@1").tensors.items()), make_patch(0, extra={"shared": shared}).tensors)


# -- bad input -------------------------------------------------------------------------------------


BAD_NAMES = [
    "../x",
    "/abs",
    "A",
    "a/b",
    "..",
    "",
    ".",
    "-a",
    ".hidden",
    "a b",
    "x" * 101,
    "a\nb",
    "a@b",
    "é",
    "a\\b",
    "C:x",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_changes(name, tmp_path):
    registry = Registry.init(tmp_path / "registry")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RefError) as caught:
        registry.push(name, make_patch(0))
    assert "\n" not in str(caught.value)
    assert ("lowercase letters, digits" in str(caught.value)) or "is empty" in str(caught.value)
    if "@" not in name:  # "a@b" is a fine reference (alias b of a), just not a name
        with pytest.raises(RefError):
            registry.resolve(name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "alias, match",
    [
        ("123", "all digits"),
        ("7", "all digits"),
        ("sha256", "reserved"),
        ("Prod", "not allowed"),
        ("../prod", "not allowed"),
        ("", "empty"),
    ],
)
def test_bad_aliases_are_refused_before_anything_is_written(alias, match, tmp_path):
    registry = Registry.init(tmp_path / "registry")
    registry.push("x", make_patch(0))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RefError, match=match):
        registry.push("x", make_patch(1), alias=alias)
    with pytest.raises(RefError, match=match):
        registry.tag("x", alias, 1)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "ref, message",
    [
        ("nothing", "no patch named nothing in registry"),
        ("known@9", "known has no version 9 (latest is 2)"),
        ("known@staging", "known has no alias staging (aliases: prod)"),
        ("known@sha256:" + "0" * 64, "known has no version with content digest sha256:" + "0" * 64),
        ("known@0", "versions are numbers from 1"),
        ("known@01", "without leading zeros"),
        ("known@", "ends with '@'"),
        ("known@sha256:ABC", "64 lowercase hex digits"),
    ],
)
def test_unknown_refs_are_one_line_errors(ref, message, where):
    registry = Registry.init(where.url, where.options)
    registry.push("known", make_patch(0), alias="prod")
    registry.push("known", make_patch(1))
    before = where.snapshot()
    with pytest.raises(RegistryError) as caught:
        registry.resolve(ref)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert where.snapshot() == before


def test_a_location_without_init_is_refused(where):
    with pytest.raises(RegistryError) as caught:
        Registry.open(where.url, where.options)
    assert (
        str(caught.value) == f"no registry at {where.url}: create one with `splice registry init --registry "
        f"{where.url}`"
    )
    assert where.snapshot() == {}


def test_init_is_idempotent_and_refuses_a_non_empty_location(where, tmp_path):
    first = Registry.init(where.url, where.options)
    first.push("a", make_patch(0))
    again = Registry.init(where.url, where.options)
    assert again.resolve("a").version == 1
    assert json.loads(where.read("registry.json"))["format"] == "splice-registry"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError, match="exists and is not empty"):
        Registry.init(occupied)
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]


def test_default_location_and_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLICE_REGISTRY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    registry = Registry.init()
    assert registry.url == str(tmp_path / "home" / ".cache" / "splice" / "registry")
    assert (tmp_path / "home" / ".cache" / "splice" / "registry" / "registry.json").is_file()
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "elsewhere"))
    with pytest.raises(RegistryError, match="no registry at"):
        Registry.open()
    assert Registry.init().url == str(tmp_path / "elsewhere")


def test_a_filesystem_without_exclusive_create_is_refused_for_writes():
    memory = fsspec.filesystem("memory")
    with pytest.raises(RegistryError, match="cannot create files exclusively on DirFileSystem"):
        Registry.init("dir://reg", {"path": f"/dir-{uuid.uuid4().hex[:6]}", "fs": memory})


def test_patches_without_a_base_record_need_base_and_get_fingerprinted(registry, tmp_path):
    base_dir = save(tiny_model("bert", 0), tmp_path / "base", False)
    with Checkpoint.open(base_dir) as base:
        names = [n for n in base.tensors if n.endswith("LayerNorm.weight")]
        tensors = {n: base.read(n) + 0.5 for n in names}
        expected = fingerprint_base(base, names)
    peft_like = Patch(tensors, PatchMeta(kind=PatchKind.layernorm, targets=names, base=None))

    with pytest.raises(RegistryError, match="pass `base=MODEL_DIR`"):
        registry.push("nobase", peft_like)
    with pytest.raises(RegistryError, match="pass `base=MODEL_DIR`"):
        publish_patch(registry, "nobase", peft_like)
    assert registry.names() == []

    manifest = publish_patch(registry, "nobase", peft_like, base=str(base_dir)).manifest
    assert manifest.meta.base == expected
    assert registry.load("nobase").meta.base.digest == expected.digest
    other_dir = save(perturbed(tiny_model("bert", 0), 3), tmp_path / "other", False)
    with pytest.raises(PatchError, match="is not the base this layernorm patch was made for"):
        publish_patch(registry, "nobase", registry.load("nobase"), base=str(other_dir))
    assert [m.version for m in registry.versions("nobase")] == [1]

    # the older form, Registry.push(base=...), still fingerprints (and checks) the base it is given
    assert registry.push("oldform", peft_like, base=str(base_dir)).manifest.meta.base == expected
    with pytest.raises(PatchError, match="is not the base this layernorm patch was made for"):
        registry.push("oldform", registry.load("oldform"), base=str(other_dir))
    assert [m.version for m in registry.versions("oldform")] == [1]


def test_pickles_are_never_unpickled(registry, tmp_path):
    """A patch directory holding a pickle instead of safetensors is refused; the pickle never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    patch_dir = tmp_path / "evil"
    patch_dir.mkdir()
    (patch_dir / "patch.json").write_text(make_patch(0).meta.model_dump_json())
    for name in ("tensors.bin", "pytorch_model.bin", "adapter_model.bin"):
        torch.save({"w": Exploit()}, patch_dir / name)
    with pytest.raises(splice.SpliceError):
        registry.push("evil", patch_dir)
    (patch_dir / "tensors.safetensors").write_bytes((patch_dir / "tensors.bin").read_bytes())
    with pytest.raises(splice.SpliceError):
        registry.push("evil", patch_dir)
    assert not marker.exists()
    assert registry.names() == []


# -- crashes and concurrency (separate processes) ---------------------------------------------------


CRASH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from splice.registry import store
    url, options, patch_dir, where = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    registry = store.Registry.open(url, options)
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "before-manifest":   # every blob written, the manifest not yet
        store.Registry._create_version = die
    else:                            # in the middle of writing a blob: its temp file is complete, not renamed
        os.replace = die
    registry.push("crash", patch_dir)
    print("not killed")
""")


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


@pytest.mark.parametrize(
    "kind, point", [("local", "before-manifest"), ("local", "mid-blob"), ("s3", "before-manifest")]
)
def test_a_killed_push_leaves_no_version_and_gc_cleans_up(kind, point, tmp_path, request):
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        where = Where("s3", f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", server.options)
        env = server.env
    else:
        where, env = Where("local", str(tmp_path / "registry"), None), {}
    registry = Registry.init(where.url, where.options)
    registry.push("crash", make_patch(0))
    patch_dir = make_patch(1, big=3).save(tmp_path / "patch")
    before = where.snapshot()

    result = run_script(CRASH_SCRIPT, where.url, json.dumps(where.options), str(patch_dir), point, env=env)

    assert result.returncode == -9, result.stdout + result.stderr
    after = where.snapshot()
    new_files = sorted(set(after) - set(before))
    assert new_files, "the killed push wrote nothing at all; the test did not reach its crash point"
    assert all(f.startswith(("blobs/", "tmp/")) for f in new_files), new_files
    if point == "mid-blob":
        assert any(f.startswith("tmp/") for f in new_files)
    assert [m.version for m in registry.versions("crash")] == [1]
    assert registry.resolve("crash").version == 1
    assert registry.verify().ok

    kept = registry.gc()  # within the grace period: a push in flight looks just like this
    assert kept.blobs_removed == 0 and kept.temps_removed == 0
    assert where.snapshot() == after
    swept = registry.gc(grace_seconds=0)
    assert swept.blobs_removed == sum(f.startswith("blobs/") for f in new_files)
    assert swept.temps_removed == sum(f.startswith("tmp/") for f in new_files)
    assert where.snapshot() == before
    assert registry.push("crash", patch_dir).manifest.version == 2


PUSH_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from splice.registry import Registry
    from splice.adapters.patch import Patch
    seed, go, targets = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    registries = [Registry.open(url, options) for url, options in targets]
    patch = Patch.load(sys.argv[4])
    open(f"{go}.ready-{seed}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    pushed = [registry.push("shared", patch, message=f"seed {seed}").manifest for registry in registries]
    print(json.dumps([manifest.version for manifest in pushed]))
""")


@pytest.fixture(scope="module")
def concurrent_pushes(tmp_path_factory, request):
    """8 processes push to one local registry (and one on S3) at the same moment."""
    root = tmp_path_factory.mktemp("concurrent")
    targets = [Where("local", str(root / "registry"), None)]
    env = {}
    try:
        server = request.getfixturevalue("s3_server")
        targets.append(Where("s3", f"s3://{BUCKET}/concurrent-{uuid.uuid4().hex[:6]}", server.options))
        env = server.env
    except pytest.skip.Exception:
        pass
    for target in targets:
        Registry.init(target.url, target.options)
    patch_dirs = [make_patch(seed).save(root / f"patch-{seed}") for seed in range(8)]
    go = root / "go"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUSH_SCRIPT,
                str(seed),
                str(go),
                json.dumps([[t.url, t.options] for t in targets]),
                str(patch_dirs[seed]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        )
        for seed in range(8)
    ]
    deadline = time.monotonic() + 150
    while len(list(root.glob("go.ready-*"))) < 8 and time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.02)
    go.write_text("go")  # every process is ready: they all push at once
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return targets, results


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_pushes_from_8_processes_get_distinct_versions(kind, concurrent_pushes):
    targets, results = concurrent_pushes
    index = [t.kind for t in targets].index(kind) if kind in [t.kind for t in targets] else None
    if index is None:
        pytest.skip("no S3 server")
    target = targets[index]
    versions = [r[index] for r in results]
    assert sorted(versions) == list(range(1, 9))
    registry = Registry.open(target.url, target.options)
    for seed, version in enumerate(versions):
        manifest = registry.resolve(f"shared@{version}")
        assert manifest.message == f"seed {seed}"
        assert_same_tensors(dict(registry.load(f"shared@{version}").tensors.items()), make_patch(seed).tensors)
    assert registry.verify().ok


# -- diff ------------------------------------------------------------------------------------------


def test_diff_reports_tensor_by_tensor(registry):
    a = make_patch(0)
    b_tensors = dict(a.tensors)
    b_tensors["layers.0.mlp.weight"] = a.tensors["layers.0.mlp.weight"] * 1.5
    del b_tensors["layers.2.norm.weight"]
    b_tensors["new.bias"] = torch.ones(4)
    registry.push("d", a)
    registry.push("d", Patch(b_tensors, a.meta.model_copy(update={"description": "b"})))
    registry.push("d", a)

    report = registry.diff("d@1", "d@2")
    same = registry.diff("d@1", "d@3")

    statuses = {t.name: t.status for t in report.tensors}
    assert statuses["layers.0.mlp.weight"] == "changed"
    assert statuses["layers.2.norm.weight"] == "removed"
    assert statuses["new.bias"] == "added"
    assert statuses["layers.1.mlp.weight"] == "unchanged"
    changed = next(t for t in report.tensors if t.name == "layers.0.mlp.weight")
    weight = a.tensors["layers.0.mlp.weight"].double()
    assert changed.max_abs_diff == pytest.approx(float((weight * 0.5).abs().max()))
    assert changed.relative_l2 == pytest.approx(0.5)
    assert report.meta_changes == ["description"]
    assert not report.identical
    assert same.identical and {t.status for t in same.tensors} == {"unchanged"}


# -- the command line ------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    registry_dir = tmp_path / "registry"
    monkeypatch.setenv("SPLICE_REGISTRY", str(registry_dir))
    p0 = make_patch(0).save(tmp_path / "p0")
    p1 = make_patch(1).save(tmp_path / "p1")

    code, out, err = run_cli(["registry", "init"], monkeypatch, capsys)
    assert code == 0, err
    assert f"registry at {registry_dir}" in out
    code, out, err = run_cli(["registry", "push", "task", p0, "--alias", "prod", "-m", "first"], monkeypatch, capsys)
    assert code == 0, err
    assert "pushed task@1" in out
    digest1 = Registry.open(registry_dir).resolve("task@1").digest
    assert digest1 in out.replace("\n", "")
    code, out, err = run_cli(["registry", "push", "task", p1, "--registry", registry_dir], monkeypatch, capsys)
    assert code == 0 and "pushed task@2" in out, err
    code, out, err = run_cli(["registry", "push", "task", p0], monkeypatch, capsys)
    assert code == 0 and "pushed task@3" in out, err
    assert " 0 " in out  # no new blob bytes

    code, out, err = run_cli(["registry", "ls"], monkeypatch, capsys)
    assert code == 0, err
    assert "task" in out and "prod=1" in out
    code, out, err = run_cli(["registry", "ls", "task"], monkeypatch, capsys)
    assert code == 0 and "first" in out, err
    code, out, err = run_cli(["registry", "show", "task@prod"], monkeypatch, capsys)
    assert code == 0, err
    for text in (
        "task@1",
        "delta",
        "accuracy=0.5",
        "tiny-bert",
        "seed 0",
        "prod",
        "current",
        f"{make_patch(0).meta.base.digest[:30]}",
        "base tensors touched",
    ):
        assert text in out.replace("\n", ""), text

    code, out, err = run_cli(["registry", "tag", "task@2", "prod"], monkeypatch, capsys)
    assert code == 0 and "alias prod of task -> version 2 (generation 2)" in out, err
    code, out, err = run_cli(["registry", "pull", "task@prod", "--out", tmp_path / "pulled"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "pulled" / "tensors.safetensors").read_bytes() == (p1 / "tensors.safetensors").read_bytes()
    code, out, err = run_cli(["registry", "diff", "task@1", "task@3"], monkeypatch, capsys)
    assert code == 0 and "identical" in out, err
    code, out, err = run_cli(["registry", "diff", "task@1", "task@2"], monkeypatch, capsys)
    assert code == 0, err
    assert "0 added, 0 removed, 8 changed, 1 unchanged; meta differs in description, metrics" in out

    code, out, err = run_cli(["registry", "rm", "task@2"], monkeypatch, capsys)
    assert code == 0 and "removed task@2" in out and "aliases still pointing at it: prod" in out, err
    code, out, err = run_cli(["registry", "gc", "--grace", "0"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["registry", "verify"], monkeypatch, capsys)
    assert code == 0 and out.startswith("ok:"), err

    blob = next(p for p in (registry_dir / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 100)
    raw = bytearray(blob.read_bytes())
    raw[0] ^= 0xFF
    blob.write_bytes(bytes(raw))
    code, out, err = run_cli(["registry", "verify"], monkeypatch, capsys)
    assert code == 1
    assert "corrupt" in out and "task@1" in out.replace("\n", "")


@pytest.mark.parametrize(
    "args, message",
    [
        (["registry", "pull", "ghost", "--out", "OUT"], "no patch named ghost"),
        (["registry", "show", "../etc"], "patch name '../etc' is not allowed"),
        (["registry", "push", "Bad", "PATCH"], "patch name 'Bad' is not allowed"),
        (["registry", "tag", "task", "42"], "all digits"),
        (["registry", "show", "task@7"], "task has no version 7 (latest is 1)"),
        (["registry", "ls", "--storage-options", "{bad"], "--storage-options is not valid JSON"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(args, message, tmp_path, monkeypatch, capsys):
    registry_dir = tmp_path / "registry"
    monkeypatch.setenv("SPLICE_REGISTRY", str(registry_dir))
    Registry.init(registry_dir).push("task", make_patch(0))
    before = {p: p.read_bytes() for p in registry_dir.rglob("*") if p.is_file()}
    args = [
        str(tmp_path / "out") if a == "OUT" else str(make_patch(0).save(tmp_path / "p")) if a == "PATCH" else a
        for a in args
    ]
    code, out, err = run_cli(args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, out + err
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert {p: p.read_bytes() for p in registry_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "out").exists()


def test_cli_without_init_tells_the_user_to_run_init(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "nothing"))
    code, _, err = run_cli(["registry", "ls"], monkeypatch, capsys)
    assert code == 2
    assert (
        err.strip() == f"error: no registry at {tmp_path / 'nothing'}: create one with `splice registry init "
        f"--registry {tmp_path / 'nothing'}`"
    )
    assert not (tmp_path / "nothing").exists()


def test_cli_against_s3_with_storage_options(s3_server, tmp_path, monkeypatch, capsys):
    url = f"s3://{BUCKET}/cli-{uuid.uuid4().hex[:6]}"
    options = json.dumps(s3_server.options)
    patch_dir = make_patch(0).save(tmp_path / "p")
    for command in (
        ["registry", "init"],
        ["registry", "push", "s3task", patch_dir, "--alias", "prod"],
        ["registry", "pull", "s3task@prod", "--out", tmp_path / "out"],
        ["registry", "verify"],
    ):
        code, out, err = run_cli([*command, "--registry", url, "--storage-options", options], monkeypatch, capsys)
        assert code == 0, err
    assert (tmp_path / "out" / "tensors.safetensors").read_bytes() == (patch_dir / "tensors.safetensors").read_bytes()


def test_blob_digest_is_sha256_of_raw_bytes():
    tensor = torch.arange(10, dtype=torch.float32)
    assert tensor_sha256(tensor) == hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def _independent_updates(patch_dir: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A per base tensor, from the patch files read with safetensors and json (not splice)."""
    from safetensors.torch import load_file

    tensors = load_file(patch_dir / "tensors.safetensors")
    settings = json.loads((patch_dir / "patch.json").read_text())["settings"]
    updates = {}
    for name in tensors:
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            a, b = tensors[name].double(), tensors[module + ".lora_B"].double()
            rank = a.shape[0]
            scale = settings["alpha"][module] / (rank**0.5 if settings.get("rslora") else rank)
            updates[module + ".weight"] = scale * b @ a
            updates[module + ".weight"].rank = rank
    return updates


def test_diff_of_two_lora_versions_compares_their_effective_updates(make_models, tmp_path, monkeypatch, capsys):
    from splice.adapters.extract import extract_patch
    from splice.cli import render

    base, first, second = make_models("bert", 3)
    url = str(tmp_path / "registry")
    store = Registry.init(url)
    dirs = [
        extract_patch(base, tuned, "lora", rank=rank).save(tmp_path / f"lora{rank}")
        for tuned, rank in ((first, 2), (second, 4))
    ]
    for patch_dir in dirs:
        store.push("l", patch_dir)
    ua, ub = (_independent_updates(Path(d)) for d in dirs)
    report = store.diff("l@1", "l@2")
    assert [u.name for u in report.updates] == list(ua) and list(ua) == list(ub)
    for update in report.updates:
        a, b = ua[update.name], ub[update.name]
        assert (update.status, update.rank_a, update.rank_b) == ("changed", a.rank, b.rank)
        assert update.norm_a == pytest.approx(float(a.norm()), rel=1e-12)
        assert update.norm_b == pytest.approx(float(b.norm()), rel=1e-12)
        assert update.relative == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-10)
        cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        assert update.cosine == pytest.approx(cosine, rel=1e-10, abs=1e-12)
    assert not any(t.name.endswith((".lora_A", ".lora_B")) for t in report.tensors)
    itself = store.diff("l@1", "l@1")
    assert itself.identical

    monkeypatch.setattr(render.console, "width", 250)
    code, out, err = run_cli(["registry", "diff", "l@1", "l@2", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
    assert "lora_A" not in out and "lora_B" not in out
    assert f"updates: 0 added, 0 removed, {len(ua)} changed, 0 unchanged" in out
    lines = out.splitlines()
    for update in report.updates:  # one row per base tensor, every number column filled
        (row,) = [line for line in lines if f" {update.name} " in line]
        assert f"{update.relative:.4g}" in row and f"{update.cosine:+.4f}" in row, row
        assert f"{update.rank_a} -> {update.rank_b}" in row, row
    assert len(lines) < len(ua) + 12
    code, out, err = run_cli(["registry", "diff", "l@1", "l@2", "--factors", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "lora_A" in out and "lora_B" in out
