"""The registry under faults (issue 10): no broken version is ever published as a success, on S3 as locally.

Each fault is reproduced against real things -- a local directory, moto's S3 server on 127.0.0.1 through s3fs,
real subprocesses and SIGKILLs -- and then must hold: stale s3fs listings in long-lived clients, gc racing a
push that reuses blobs, same-size damage in place, bad values in patch.json and manifests, a corrupt alias,
a symlinked tmp/, in-flight temp files, bad --grace values and a `pull --force` into the registry itself.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_registry import make_patch

from splice.registry import Registry, RegistryError, backends, leases
from splice.registry.layout import blob_rel
from splice.registry.manifest import TensorEntry, VersionManifest, content_digest
from splice.registry.store import Registry as StoreRegistry

from helpers import moto_s3_server, run_cli

REPO = Path(__file__).resolve().parents[1]
BUCKET = "splice-faults"
LARGE = 1024  # pack_below for the test patches: their 64 x 32 fp32 matrices get blobs of their own


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, AWS environment) of moto's S3 server on 127.0.0.1."""
    with moto_s3_server(tmp_path_factory.mktemp("aws-home"), BUCKET, lambda app: app) as (endpoint, env, _):
        yield endpoint, env


def s3_options(endpoint: str, fresh: bool = True) -> dict:
    """s3fs options; `fresh`: a filesystem object of its own (a separate long-lived client, as another process has)."""
    return {"client_kwargs": {"endpoint_url": endpoint}, **({"skip_instance_cache": True} if fresh else {})}


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(url, storage options) of a new registry location, local or on S3."""
    if request.param == "local":
        return str(tmp_path / "registry"), None
    endpoint, _ = request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", s3_options(endpoint)


def opened(url: str, options: dict | None) -> Registry:
    registry = Registry.open(url, options)
    registry.pack_below = LARGE
    return registry


def intact(registry: Registry, manifest: VersionManifest) -> bool:
    """Does every tensor of a version read back, hash-checked, from its blobs?"""
    try:
        patch = registry.load(manifest.ref)
        for name in patch.tensors:
            patch.tensors[name]
    except RegistryError:
        return False
    return True


def damage_in_place(path: str | Path) -> None:
    """Flip one byte of a local file, keeping its size."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


# -- 1: stale listings in long-lived S3 clients ------------------------------------------------------


def test_long_lived_s3_clients_see_each_others_removals_and_pushes(s3):
    endpoint, _ = s3
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    Registry.init(url, s3_options(endpoint))
    a, b = opened(url, s3_options(endpoint)), opened(url, s3_options(endpoint))  # two filesystem objects
    patch = make_patch(1)
    a.push("x", patch)
    a.gc()
    assert a.verify().ok  # a's filesystem has now listed (and cached) every blob
    b.remove("x@1")
    assert b.gc(grace_seconds=0).blobs_removed > 0
    again = a.push("x", patch)  # the same content: the blobs a's cache still lists are gone
    assert again.stats.blobs_reused == 0
    assert intact(opened(url, s3_options(endpoint)), again.manifest)
    assert opened(url, s3_options(endpoint)).verify().ok

    a.versions("x")  # a lists x's versions; b pushes another
    pushed = b.push("x", make_patch(2)).manifest
    assert a.resolve(f"x@{pushed.version}").digest == pushed.digest
    assert a.resolve("x").version == pushed.version


# -- 2: gc racing a push that reuses blobs ------------------------------------------------------------


def test_a_gc_between_a_reusing_push_and_its_manifest_fails_the_push_not_the_registry(place):
    """A push finds an old unreachable blob and reuses it; a gc (another client, grace 0 as a gc of old
    blobs has on S3) removes it before the manifest is written. The push must not report a success."""
    url, options = place
    Registry.init(url, options)
    pusher, collector = opened(url, options), opened(url, options)
    patch = make_patch(3)
    pusher.push("x", patch)
    pusher.remove("x@1")  # its blobs are unreachable now, and old enough for gc on S3 at any grace

    create = StoreRegistry._create_version

    def gc_first(self, name, body, *claim):
        collector.gc(grace_seconds=0)
        return create(self, name, body, *claim)

    pusher._create_version = gc_first.__get__(pusher)
    with pytest.raises(RegistryError, match="removed by a concurrent `splice registry gc`.*withdrawn: push again"):
        pusher.push("x", patch)
    fresh = opened(url, options)
    assert fresh.latest_version("x") is None  # the broken version was withdrawn
    assert fresh.verify().ok
    assert intact(fresh, opened(url, options).push("x", patch).manifest)  # pushing again works


def test_a_push_waits_for_a_gc_in_flight_before_it_checks_its_blobs(tmp_path):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    backend = registry._backend
    with leases.gc_lease(backend, url):  # a gc is running
        done = threading.Event()
        worker = threading.Thread(target=lambda: (registry.push("x", make_patch(4)), done.set()))
        worker.start()
        assert not done.wait(0.5)  # the push waits for it
    worker.join(10)
    assert done.is_set() and not backend.listdir("gc")


def test_a_dead_gc_lease_does_not_hold_pushes(tmp_path):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from splice.registry.layout import this_host

    lease = {"host": this_host(), "pid": int(dead.stdout), "started": time.time()}
    Path(url, "gc").mkdir()
    Path(url, "gc", "dead.json").write_text(json.dumps(lease))
    started = time.monotonic()
    registry.push("x", make_patch(5))
    assert time.monotonic() - started < 5
    registry.gc()
    assert not Path(url, "gc", "dead.json").exists()  # gc removes a dead gc's lease


def test_a_long_gc_keeps_its_lease_alive_and_a_lease_without_heartbeat_goes_stale(tmp_path, monkeypatch):
    """A gc that runs longer than LEASE_TTL must not look dead to a waiting push (it would let the push settle
    while the gc still deletes the blobs it reuses): its lease is refreshed while it runs."""
    monkeypatch.setattr(leases, "LEASE_REFRESH", 0.05)
    monkeypatch.setattr(leases, "LEASE_TTL", 0.3)
    registry = Registry.init(str(tmp_path / "registry"))
    backend = registry._backend
    with leases.gc_lease(backend, registry.url):  # a gc running for 4 x LEASE_TTL
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            (lease,) = leases.leases(backend, registry.url).values()
            assert leases.held(lease, time.time()), lease
            time.sleep(0.05)
        assert lease.refreshed is not None and lease.refreshed > lease.started
    far = {"host": "another-machine", "pid": 1, "started": time.time() - 1.0}  # no heartbeat, silent for 1 s
    Path(tmp_path / "registry" / "gc" / "silent.json").write_text(json.dumps(far))
    (silent,) = leases.leases(backend, registry.url).values()
    assert not leases.held(silent, time.time())
    began = time.monotonic()
    registry.push("x", make_patch(6))  # does not wait for it
    assert time.monotonic() - began < 5


def test_gc_stops_at_a_manifest_it_cannot_read_at_all(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(12))
    registry.push("y", make_patch(13))
    blobs = sorted(p for p in Path(url, "blobs").rglob("*") if p.is_file())
    Path(url, "patches/x/versions/1.json").write_bytes(b"\x00\xff truncated")
    with pytest.raises(RegistryError, match=r"x@1: its manifest is unreadable.*nothing was removed"):
        registry.gc(grace_seconds=0)
    assert sorted(p for p in Path(url, "blobs").rglob("*") if p.is_file()) == blobs  # x's blobs are all there
    code, out, err = run_cli(["registry", "rm", "x@1", "--registry", url], monkeypatch, capsys)
    assert code == 0, out + err
    assert registry.gc(grace_seconds=0).blobs_removed > 0
    assert registry.verify().ok


# -- 3: same-size damage in place is not reused; verify --repair --from --------------------------------


def test_a_blob_damaged_in_place_is_not_reused_and_repair_writes_it_again(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    Registry.init(url)
    registry = opened(url, None)
    patch = make_patch(6)
    patch_dir = patch.save(tmp_path / "patch")
    first = registry.push("x", patch_dir).manifest
    big = next(e for e in first.tensors.values() if not e.packed)
    pack = next(e for e in first.tensors.values() if e.packed)
    damage_in_place(Path(url, blob_rel(big.digest)))
    damage_in_place(Path(url, blob_rel(pack.blob)))

    code, out, _ = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    assert code == 1 and "corrupt" in out
    again = registry.push("x", patch_dir)  # the same content
    assert again.stats.blobs_written == 2  # the two damaged blobs were written again, not trusted
    assert intact(registry, again.manifest) and intact(registry, first)  # and the re-push repaired the stored blobs

    damage_in_place(Path(url, blob_rel(big.digest)))
    damage_in_place(Path(url, blob_rel(pack.blob)))
    code, out, _ = run_cli(["registry", "verify", "--repair", "--registry", url], monkeypatch, capsys)
    assert code == 2 and "--repair and --from go together" in out + _
    code, out, _ = run_cli(
        ["registry", "verify", "--repair", "--from", patch_dir, "--registry", url], monkeypatch, capsys
    )
    assert code == 0, out
    assert out.count("repaired ") == 2 and "ok:" in out
    assert intact(registry, first) and intact(registry, again.manifest)


def test_same_size_damage_on_s3_is_not_reused(s3):
    endpoint, _ = s3
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    Registry.init(url, s3_options(endpoint))
    registry = opened(url, s3_options(endpoint))
    patch = make_patch(7)
    first = registry.push("x", patch).manifest
    big = next(e for e in first.tensors.values() if not e.packed)
    fs = registry._backend.fs
    path = registry._backend.path(blob_rel(big.digest))
    data = bytearray(fs.cat_file(path))
    data[5] ^= 0xFF
    fs.pipe_file(path, bytes(data))  # same size, other bytes
    again = opened(url, s3_options(endpoint)).push("x", patch).manifest
    assert intact(registry, again)
    report = registry.verify(repair_from=patch)
    assert report.ok


# -- 5: a NaN in patch.json; a manifest that does not validate ---------------------------------------------


def test_a_nan_metric_is_refused_before_any_version_exists(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    patch = make_patch(8)
    patch.meta = patch.meta.model_copy(update={"metrics": {"accuracy": float("nan")}})
    with pytest.raises(RegistryError, match=r"non-finite number at metrics\.accuracy"):
        registry.push("x", patch)
    assert registry.names() == [] and not Path(url, "patches").exists()
    code, out, err = run_cli(["registry", "ls", "--registry", url], monkeypatch, capsys)
    assert code == 0, out + err


def test_a_manifest_that_does_not_validate_is_that_versions_problem(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(9))
    good = registry.push("x", make_patch(10)).manifest
    registry.push("y", make_patch(11))
    bad_file = Path(url, "patches/x/versions/1.json")
    raw = json.loads(bad_file.read_text())
    raw["meta"]["metrics"]["accuracy"] = None  # what a NaN became when it was written
    bad_file.write_text(json.dumps(raw))

    code, out, err = run_cli(["registry", "ls", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "y" in out, out + err
    code, out, err = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "problem: x@1" in out and "metrics.accuracy" in out, out + err
    code, out, _ = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    assert code == 1 and "bad manifest" in out
    report = registry.gc(grace_seconds=0)  # gc runs, keeping what the bad manifest names
    assert report.blobs_removed == 0 and len(report.bad_manifests) == 1
    code, out, err = run_cli(["registry", "rm", "x@1", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "removed x@1" in out, out + err
    assert registry.gc(grace_seconds=0).blobs_removed > 0
    assert registry.verify().ok and intact(registry, good)


# -- 6: a corrupt alias file ---------------------------------------------------------------------------------


def test_a_corrupt_alias_is_reported_and_tag_force_repairs_it(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(12), alias="prod")
    registry.push("x", make_patch(13), alias="dev")
    Path(url, "patches/x/aliases/prod/1.json").write_text("{not json")

    code, out, err = run_cli(["registry", "ls", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "dev=2" in out and "problem: alias prod of x" in out, out + err
    code, out, _ = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    assert code == 1 and "bad alias" in out
    assert any("aliases/prod/1.json is corrupt" in line for line in registry.verify().bad_aliases)
    code, out, err = run_cli(["registry", "tag", "x@2", "prod", "--registry", url], monkeypatch, capsys)
    assert code == 2 and "--force" in out + err
    code, out, err = run_cli(["registry", "tag", "x@2", "prod", "--force", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "generation 2" in out, out + err
    assert registry.resolve("x@prod").version == 2
    code, out, _ = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    assert code == 0, out


# -- 7: the manifest schema --------------------------------------------------------------------------------


def test_the_dtype_table_agrees_with_the_safetensors_one():
    from splice.registry.manifest import DTYPE_ITEMSIZES
    from splice.tensors.safetensors import SAFETENSORS_DTYPES, dtype_itemsize

    assert DTYPE_ITEMSIZES == {code: dtype_itemsize(dtype) for code, dtype in SAFETENSORS_DTYPES.items()}


@pytest.mark.parametrize(
    "change, says",
    [
        ({"dtype": "XYZ"}, "dtype 'XYZ' is not one splice .* knows .* needs a newer splice"),
        ({"nbytes": 10**15}, "nbytes: Input should be less than or equal to"),
        ({"shape": [-1], "nbytes": 0}, r"shape\.0: Input should be greater than or equal to 0"),
        ({"shape": [3, 3]}, r"shape \[3, 3\] of F32 is 36 bytes"),
    ],
)
def test_a_manifest_with_a_bad_tensor_entry_is_refused_before_any_read(tmp_path, monkeypatch, capsys, change, says):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    manifest = registry.push("x", make_patch(14)).manifest
    name = next(n for n, e in manifest.tensors.items() if e.dtype == "F32")
    raw = json.loads(Path(url, "patches/x/versions/1.json").read_text())
    raw["tensors"][name].update(change)
    entries = {n: TensorEntry.model_construct(**{"blob": None, "offset": 0, **e}) for n, e in raw["tensors"].items()}
    raw["digest"] = content_digest(manifest.meta, entries)  # consistent: only the schema can refuse it
    Path(url, "patches/x/versions/1.json").write_text(json.dumps(raw))

    code, out, err = run_cli(
        ["registry", "pull", "x@1", "--out", tmp_path / "out", "--registry", url], monkeypatch, capsys
    )
    assert code == 2 and "Traceback" not in out + err
    assert len((out + err).strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    report = registry.verify()
    assert not report.ok and len(report.bad_manifests) == 1
    assert re.search(says, report.bad_manifests[0]), report.bad_manifests[0]


# -- 9, 10, 11: temp files, links, grace values ----------------------------------------------------------


HOLD_TEMP = textwrap.dedent("""
    import sys, time
    from splice.registry import Registry
    tmp, fd = Registry.open(sys.argv[1])._backend.new_temp()
    print(tmp, flush=True)
    time.sleep(60)
""")


def test_gc_at_grace_0_leaves_a_live_process_temp_file_and_removes_a_dead_ones(tmp_path):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_TEMP, url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        temp = Path(holder.stdout.readline().strip())
        assert temp.exists()
        assert registry.gc(grace_seconds=0).temps_removed == 0 and temp.exists()  # in flight
    finally:
        holder.kill()
        holder.wait(10)
    assert registry.gc(grace_seconds=0).temps_removed == 1 and not temp.exists()  # its writer is dead


def test_a_temp_file_removed_under_a_create_says_so(tmp_path, monkeypatch):
    registry = Registry.init(tmp_path / "registry")
    write = backends.LocalBackend._write_tmp

    def vanishing(self, data, sync=False):
        tmp = write(self, data, sync)
        os.unlink(tmp)  # what a gc --grace 0 elsewhere did
        return tmp

    monkeypatch.setattr(backends.LocalBackend, "_write_tmp", vanishing)
    with pytest.raises(RegistryError, match="its temp file .* was removed before it could be linked") as caught:
        registry._backend.create("patches/x/versions/1.json", b"{}")
    assert "cannot hard-link" not in str(caught.value)


def test_gc_never_follows_a_symlinked_tmp_out_of_the_registry(tmp_path, monkeypatch, capsys):
    url = tmp_path / "registry"
    Registry.init(url)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work")
    if (url / "tmp").exists():
        (url / "tmp").rmdir()
    (url / "tmp").symlink_to(outside)
    code, out, err = run_cli(["registry", "gc", "--grace", "0", "--registry", url], monkeypatch, capsys)
    assert code == 2 and "symbolic link" in out + err
    assert (outside / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("grace", ["nan", "-1", "inf"])
def test_gc_refuses_a_grace_that_is_not_a_number_of_seconds(tmp_path, monkeypatch, capsys, grace):
    url = tmp_path / "registry"
    registry = Registry.init(url)
    registry.push("x", make_patch(15))
    registry.remove("x@1")
    code, out, err = run_cli(["registry", "gc", "--grace", grace, "--registry", url], monkeypatch, capsys)
    assert code == 2 and "gc grace" in out + err and "0 or more" in out + err
    assert registry.gc(grace_seconds=0).blobs_removed > 0  # nothing was removed by the refused run


# -- pull --force into the registry ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["registry", "inside", "parent"])
def test_pull_never_writes_over_its_registry(tmp_path, monkeypatch, capsys, where):
    url = tmp_path / "reg"
    registry = Registry.init(url)
    registry.push("x", make_patch(16))
    out = {"registry": url, "inside": url / "blobs", "parent": tmp_path}[where]
    code, stdout, stderr = run_cli(
        ["registry", "pull", "x@1", "--out", out, "--force", "--registry", url], monkeypatch, capsys
    )
    assert code == 2 and "registry" in stdout + stderr, stdout + stderr
    assert registry.verify().ok and intact(registry, registry.resolve("x@1"))


# -- the fault rounds: concurrent pushers and gcs, SIGKILLs --------------------------------------------------

FIGURES: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


PUSHERS, GCS, ROUNDS = 3, 2, 2


@pytest.mark.parametrize("grace", [0, 3600])
@pytest.mark.parametrize("clients", ["long-lived", "fresh"])
def test_concurrent_pushers_and_gcs_publish_no_broken_version(place, grace, clients):
    """Rounds of pushers pushing the same content (so they reuse each other's blobs, and blobs an rm made
    unreachable the round before) while gcs run; every push that reports a success must read back whole."""
    url, options = place
    Registry.init(url, options)
    keep = [opened(url, options) for _ in range(PUSHERS + GCS)]
    client = (lambda i: keep[i]) if clients == "long-lived" else (lambda i: opened(url, options))
    patches = [make_patch(20 + i) for i in range(2)]
    published, failed, broken = [], [], []
    deadline = time.monotonic() + 180  # a hang detector: CI's 2 cores run these rounds slowly
    for round_ in range(ROUNDS):
        done: list[VersionManifest] = []

        def push(i: int, patch=patches[round_ % 2], done=done) -> None:
            try:
                done.append(client(i).push("x", patch).manifest)
            except RegistryError as exc:
                failed.append(str(exc))

        def collect(i: int) -> None:
            for _ in range(2):
                client(i).gc(grace_seconds=grace)

        workers = [threading.Thread(target=push, args=(i,)) for i in range(PUSHERS)]
        workers += [threading.Thread(target=collect, args=(PUSHERS + i,)) for i in range(GCS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(1.0, deadline - time.monotonic()))
        assert not any(w.is_alive() for w in workers), "a pusher or gc hung"
        check = opened(url, options)  # a client of its own: what anyone reading the registry now sees
        broken += [m.ref for m in done if not intact(check, m)]
        published += done
        assert check.verify().ok, check.verify()
        for manifest in done:
            check.remove(manifest.ref)  # unreachable blobs for the next round to reuse
        _count("rounds")
        _count("pushers", PUSHERS)
        _count("gcs", GCS)
    assert all("withdrawn: push again" in line for line in failed), failed
    assert broken == [], broken
    _count("published", len(published))
    _count("pushes failed cleanly", len(failed))
    print(f"\nfault figures so far: {FIGURES}, broken versions published: {len(broken)}")


KILL_ROUNDS = 3
KILLED_PUSH = textwrap.dedent("""
    import json, sys
    from splice.registry import Registry
    registry = Registry.open(sys.argv[1], json.loads(sys.argv[2]))
    registry.pack_below = 1024
    print("ready", flush=True)
    for _ in range(50):
        registry.push("x", sys.argv[3])
""")


def test_sigkilled_pushers_leave_no_broken_version(place, tmp_path, request):
    url, options = place
    registry = Registry.init(url, options)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if options:
        env.update(request.getfixturevalue("s3")[1])
    patch_dirs = [str(make_patch(30 + i, big=3).save(tmp_path / f"p{i}")) for i in range(2)]
    rng = random.Random(10)
    kills = 0
    for round_ in range(KILL_ROUNDS):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", KILLED_PUSH, url, json.dumps(options), patch_dirs[i % 2]],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(3)
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        check = opened(url, options)
        assert all(intact(check, m) for m in (check.versions("x") if check.latest_version("x") else []))
        assert check.verify().ok, check.verify()
        check.gc(grace_seconds=0 if round_ % 2 else 3600)
        assert check.verify().ok
    assert kills > 0
    _count("kills", kills)
    _count("kill rounds", KILL_ROUNDS)
    print(f"\nfault figures so far: {FIGURES}")
    assert math.isfinite(registry.gc().bytes_freed)


class ConflictingS3:
    """Stands in for S3 where moto cannot: the first `conflicts` conditional puts of a key answer 409
    ConditionalRequestConflict (another conditional put of the key is in flight), as real S3 does."""

    def __init__(self, conflicts: int, then_exists: bool):
        self.conflicts, self.then_exists, self.puts, self.stored = conflicts, then_exists, 0, {}

    def pipe_file(self, path, data, mode="overwrite"):
        assert mode == "create"
        self.puts += 1
        if self.puts <= self.conflicts:
            raise OSError(
                errno.EIO,
                "An error occurred (ConditionalRequestConflict) when calling the PutObject "
                "operation: A conflicting conditional operation is currently in progress",
            )
        if self.then_exists:
            raise FileExistsError(path)
        self.stored[path] = data


@pytest.mark.parametrize("then_exists", [False, True])
def test_an_s3_conditional_write_conflict_is_retried_until_the_key_settles(then_exists):
    from splice.registry.backends import S3Backend

    fs = ConflictingS3(conflicts=3, then_exists=then_exists)
    backend = S3Backend(fs, "bucket/reg")
    assert backend.create("patches/x/versions/1.json", b"{}") is (not then_exists)
    assert fs.puts == 4
    assert fs.stored == ({} if then_exists else {"bucket/reg/patches/x/versions/1.json": b"{}"})
    stuck = ConflictingS3(conflicts=100, then_exists=False)
    with pytest.raises(OSError, match="ConditionalRequestConflict"):
        S3Backend(stuck, "bucket/reg").create("patches/x/versions/1.json", b"{}")
    assert stuck.puts == S3Backend.conflict_retries + 1


# -- issue 16, item 8: what gc and show read from files ----------------------------------------------------


def test_gc_on_a_manifest_nested_too_deep_is_one_line_and_removes_nothing(tmp_path, monkeypatch, capsys):
    from splice.cli import render

    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(40))
    blobs = sorted(p for p in Path(url, "blobs").rglob("*") if p.is_file())
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    Path(url, "patches/x/versions/1.json").write_text(deep)
    monkeypatch.setattr(render.console, "width", 400)
    corrupt = f"{url}/patches/x/versions/1.json is corrupt: not valid JSON"
    for args, expected, says in (
        (["registry", "gc", "--grace", "0"], 2, "x@1: its manifest is unreadable"),
        (["registry", "show", "x@1"], 2, corrupt),
        (["registry", "verify"], 1, corrupt),
        (["registry", "ls", "x"], 0, f"problem: x@1: {corrupt}"),
    ):
        code, out, err = run_cli([*args, "--registry", url], monkeypatch, capsys)
        assert "Traceback" not in err and "Recursion" not in out + err, (args, err)
        assert code == expected and says in out + err, (args, code, out, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and out == "", err
    assert sorted(p for p in Path(url, "blobs").rglob("*") if p.is_file()) == blobs  # gc removed nothing


def test_show_survives_a_directory_among_health_records_and_prints_what_files_say_as_plain_text(
    tmp_path, monkeypatch, capsys
):
    from splice.cli import render
    from splice.registry.health import HealthRecord

    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    pushed = registry.push("x", make_patch(41), message="[bold]msg[/bold] \x1b[31mred").manifest
    hostile = "[bold red]PWNED[/] \x1b[2J\x1b]0;title\x07 [link=file:///etc/passwd]x[/link]"
    registry.record_health(
        HealthRecord(event="deploy", version=1, digest=pushed.digest, base=hostile, base_check="verified"), "x"
    )
    Path(url, "patches/x/health/x.json").mkdir()  # a directory named like a record
    monkeypatch.setattr(render.console, "width", 400)
    code, out, err = run_cli(["registry", "show", "x@1", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
    shown = "".join(out.split())
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "[boldred]PWNED[/]" in shown and "\\x1b[2J\\x1b]0;title\\x07" in shown, out
    assert "[link=file:///etc/passwd]x[/link]" in shown
    assert "[bold]msg[/bold]\\x1b[31mred" in shown
    (warning,) = err.strip().splitlines()
    assert warning.startswith("warning: ") and "x.json is not a readable file" in warning, err
    code, out, _ = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "[bold]msg[/bold]\\x1b[31mred" in "".join(out.split())


def test_gc_withdraws_a_version_whose_pending_marker_is_a_directory(tmp_path, monkeypatch, capsys):
    """`ls NAME` says gc withdraws a version whose pending marker cannot be read; a directory standing where the
    marker should be made every gc fail instead (the marker was unlinked as a file)."""
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(43))
    Path(url, "patches/x/pending/2.json").mkdir(parents=True)
    code, out, err = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "`spliceregistrygc`withdrawsit" in "".join((out + err).split()), out + err
    code, out, err = run_cli(["registry", "gc", "--grace", "0", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
    assert not Path(url, "patches/x/pending/2.json").exists() and Path(url, "patches/x/removed/2.json").is_file()
    assert Registry.open(url).push("x", make_patch(44)).manifest.version == 3  # 2 is never handed out again
    code, out, err = run_cli(["registry", "gc", "--grace", "0", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
