"""Keeping a registry healthy: `gc` (free what no live version uses), `verify` (re-hash everything) and `diff`
(two versions tensor by tensor), with their reports. `Registry.gc/verify/diff` call into this module."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from splice.errors import first_line
from splice.registry.backends import Backend
from splice.registry.layout import (
    GC_DIR,
    blob_digest_of,
    blob_rel,
    located,
    numbers,
    removed_dir,
    temp_writer,
    this_host,
    version_rel,
    versions_dir,
)
from splice.registry.manifest import GcLease, TensorEntry, VersionManifest, parse_model
from splice.registry.refs import RegistryError
from splice.registry.transfer import BlobReader, tensor_from
from splice.tensors.partials import process_alive

LEASE_REFRESH = 30.0  # a running gc rewrites its lease this often (its heartbeat)
LEASE_STALE = 600.0  # a lease not refreshed for this long is a dead gc's (a push stops waiting for it)
LEASE_POLL = (0.05, 1.0)  # a waiting push looks again after the first, backing off to the second (seconds)


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    temps_removed: int = 0
    stale_versions_removed: int = 0  # manifests of removed versions left behind by an interrupted rm
    blobs_kept_live: int = 0
    blobs_kept_young: int = 0  # unreachable, but younger than the grace period (a push may be in flight)
    bad_manifests: list[str] = field(default_factory=list)  # live versions whose manifest does not validate


@dataclass
class BlobProblem:
    digest: str
    path: str
    problem: str  # "missing", "corrupt" or "wrong size"
    detail: str
    versions: list[str] = field(default_factory=list)  # the versions it breaks, as NAME@N
    tensors: list[str] = field(default_factory=list)  # in a damaged pack: the tensors it breaks, "NAME of REF"


@dataclass
class VerifyReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    versions_checked: int = 0
    problems: list[BlobProblem] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)  # one line each
    bad_aliases: list[str] = field(default_factory=list)  # one line each
    repaired: list[str] = field(default_factory=list)  # blobs `verify(repair_from=...)` wrote again

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_manifests and not self.bad_aliases


@dataclass
class TensorDiff:
    name: str
    status: str  # "added", "removed", "changed", "unchanged"
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs_diff: float | None = None
    relative_l2: float | None = None  # ||b - a|| / ||a||


@dataclass
class DiffReport:
    a: str
    b: str
    digest_a: str
    digest_b: str
    meta_changes: list[str]  # PatchMeta fields that differ (creation time aside)
    tensors: list[TensorDiff]

    @property
    def identical(self) -> bool:
        return self.digest_a == self.digest_b


# -- gc ------------------------------------------------------------------------------------------


def check_grace(grace_seconds: float) -> float:
    if not isinstance(grace_seconds, (int, float)) or not math.isfinite(grace_seconds) or grace_seconds < 0:
        raise RegistryError(f"gc grace {grace_seconds!r} is not allowed: give a number of seconds, 0 or more "
                            "(0 removes every unused blob now, even one a push in flight has just written)")
    return float(grace_seconds)


# -- gc and push: leases --------------------------------------------------------------------------


def _lease_stale(lease: GcLease | None, now: float) -> bool:
    """A lease nobody holds: unreadable, a dead process's on this machine, or older than LEASE_STALE."""
    if lease is None or now - lease.alive_at > LEASE_STALE:
        return True
    return lease.host == this_host() and not process_alive(lease.pid)


def _leases(backend: Backend) -> dict[str, GcLease | None]:
    found: dict[str, GcLease | None] = {}
    for entry in backend.listdir(GC_DIR):
        rel = f"{GC_DIR}/{entry}"
        try:
            found[rel] = parse_model(GcLease, backend.read(rel), rel)
        except FileNotFoundError:
            continue  # that gc just finished
        except RegistryError:
            found[rel] = None
    return found


@contextlib.contextmanager
def gc_lease(backend: Backend) -> Iterator[None]:
    """Announce a gc (gc/<uuid>.json) for as long as it runs; stale leases of dead gcs are removed."""
    rel = f"{GC_DIR}/{uuid.uuid4().hex}.json"
    lease = GcLease(host=this_host(), pid=os.getpid(), started=time.time())
    backend.create(rel, (lease.model_dump_json() + "\n").encode())
    done = threading.Event()
    heartbeat = threading.Thread(target=_refresh_lease, args=(backend, rel, lease, done), daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        done.set()
        heartbeat.join()
        backend.delete(rel)
    now = time.time()
    for other, held in _leases(backend).items():
        if _lease_stale(held, now):
            backend.delete(other)


def _refresh_lease(backend: Backend, rel: str, lease: GcLease, done: threading.Event) -> None:
    """Rewrite the lease every LEASE_REFRESH seconds while the gc runs, so a long gc never looks dead to a
    waiting push. A failed rewrite is tried again at the next beat (the lease goes stale only after many)."""
    while not done.wait(LEASE_REFRESH):
        beat = lease.model_copy(update={"refreshed": time.time()})
        with contextlib.suppress(Exception):
            backend.put_many({rel: (beat.model_dump_json() + "\n").encode()})


def wait_for_gcs(backend: Backend) -> None:
    """Wait until every gc running now has finished (or is found dead). A gc that starts later lists the
    manifests after its lease exists, so it sees every version created before this call."""
    waiting = {rel for rel, lease in _leases(backend).items() if not _lease_stale(lease, time.time())}
    pause, longest = LEASE_POLL
    while waiting:
        time.sleep(pause)
        pause = min(longest, pause * 2)
        current = _leases(backend)
        waiting = {rel for rel in waiting if rel in current and not _lease_stale(current[rel], time.time())}


# -- gc ------------------------------------------------------------------------------------------


def _temp_removable(rel: str, mtime: float | None, cutoff: float, grace_seconds: float) -> bool:
    """Older than the grace (any age at grace 0), except that a temp file a live process on this machine is
    writing is in flight: grace 0 leaves it alone (a non-zero grace removes it once it is older)."""
    old = mtime is not None and mtime <= cutoff
    if grace_seconds > 0:
        return old
    writer = temp_writer(rel.rsplit("/", 1)[-1])
    return writer is None or writer[0] != this_host() or not process_alive(writer[1])


def gc(backend: Backend, names: list[str], live_digests: Callable[[], set[str]], grace_seconds: float) -> GcReport:
    """Remove the manifests an interrupted `rm` left, then blobs no live version uses and stale temp files,
    when older than `grace_seconds` (so a push in flight, whose blobs come before its manifest, is left alone).
    `live_digests`: every blob digest a live version may use. Runs under a lease (see `wait_for_gcs`)."""
    report = GcReport()
    with gc_lease(backend):
        for name in names:
            stored = numbers(backend.listdir(versions_dir(name)))
            for version in stored & numbers(backend.listdir(removed_dir(name))):
                backend.delete(version_rel(name, version))
                report.stale_versions_removed += 1
        live = live_digests()
        cutoff = time.time() - grace_seconds
        for rel, size, mtime in backend.walk("blobs"):
            digest = blob_digest_of(rel)
            if digest is None:
                continue  # not a blob name: not ours to remove
            if digest in live:
                report.blobs_kept_live += 1
            elif grace_seconds > 0 and (mtime is None or mtime > cutoff):
                report.blobs_kept_young += 1
            else:
                backend.delete(rel)
                report.blobs_removed += 1
                report.bytes_freed += size
        for rel, _, mtime in backend.walk("tmp"):
            if _temp_removable(rel, mtime, cutoff, grace_seconds):
                backend.delete(rel)
                report.temps_removed += 1
    return report


# -- verify --------------------------------------------------------------------------------------


Use = tuple[str, str, TensorEntry]  # (version ref, tensor name, its entry)


def _versions_of(found: list[Use]) -> list[str]:
    return list(dict.fromkeys(ref for ref, _, _ in found))


def _damaged(backend: Backend, rel: str, using: list[Use]) -> list[Use]:
    """Which tensors does the damage to a blob reach? a blob of its own: all of its users; a pack: those
    whose byte range no longer hashes to their sha256."""
    damaged = [u for u in using if not u[2].packed]
    packed = [u for u in using if u[2].packed and u[2].nbytes]
    ranges = backend.read_ranges([(rel, e.offset, e.offset + e.nbytes) for _, _, e in packed])
    for user, data in zip(packed, ranges):
        entry = user[2]
        if (isinstance(data, BaseException) or len(data) != entry.nbytes
                or hashlib.sha256(data).hexdigest() != entry.digest):
            damaged.append(user)
    return damaged


def _corrupt(backend: Backend, url: str, digest: str, actual: str, using: list[Use]) -> BlobProblem:
    rel = blob_rel(digest)
    damaged = _damaged(backend, rel, using)
    detail = f"its bytes hash to {actual[:12]}..., not its name"
    tensors = [f"{name} of {ref}" for ref, name, entry in damaged if entry.packed]
    if tensors:
        shown = ", ".join(tensors[:4]) + (f" and {len(tensors) - 4} more" if len(tensors) > 4 else "")
        detail += f"; damaged tensors: {shown}"
    elif using and not damaged:
        detail += "; every tensor in it still checks out"
    return BlobProblem(digest, located(url, rel), "corrupt", detail, _versions_of(damaged), tensors)


def _check_blob(backend: Backend, url: str, digest: str, using: list[Use], report: VerifyReport) -> None:
    rel = blob_rel(digest)
    try:
        actual, size = backend.hash_blob(rel)
    except FileNotFoundError as exc:
        report.problems.append(BlobProblem(digest, located(url, rel), "missing", first_line(exc),
                                           _versions_of(using)))
        return
    report.blobs_checked += 1
    report.bytes_checked += size
    wrong_size = [u for u in using if not u[2].packed and u[2].nbytes != size]
    if actual != digest:
        report.problems.append(_corrupt(backend, url, digest, actual, using))
    elif wrong_size:
        report.problems.append(BlobProblem(digest, located(url, rel), "wrong size",
                                           f"{size} bytes, manifests say {wrong_size[0][2].nbytes}",
                                           _versions_of(wrong_size)))


def verify(backend: Backend, url: str, manifests: list[VersionManifest], bad_manifests: list[str]) -> VerifyReport:
    """Re-hash every blob and check every live version's blobs; changes nothing. A damaged pack is reported
    with the tensors in it whose bytes no longer match, and the versions they break."""
    report = VerifyReport(bad_manifests=bad_manifests)
    report.versions_checked = len(manifests) + len(bad_manifests)
    users: dict[str, list[Use]] = {}  # blob digest -> its users
    for manifest in manifests:
        for name, entry in manifest.tensors.items():
            users.setdefault(entry.blob_digest, []).append((manifest.ref, name, entry))
    stored = {digest for digest in (blob_digest_of(rel) for rel, _, _ in backend.walk("blobs")) if digest}
    for digest in sorted(stored):
        _check_blob(backend, url, digest, users.get(digest, []), report)
    for digest in sorted(set(users) - stored):
        report.problems.append(BlobProblem(digest, located(url, blob_rel(digest)), "missing", "no such blob",
                                           _versions_of(users[digest])))
    return report


# -- repair --------------------------------------------------------------------------------------


def _rebuilt(digest: str, entries: list[TensorEntry], source: dict[str, bytes]) -> bytes | None:
    """Blob `digest` rebuilt from a patch's tensor bytes (sha256 -> bytes): a tensor's own blob, or a pack
    laid out again from its members' offsets; None unless the result hashes to `digest`."""
    own = [e for e in entries if not e.packed]
    if own:
        data = source.get(own[0].digest)
    else:
        buf = bytearray(max((e.offset + e.nbytes for e in entries), default=0))
        for entry in entries:
            piece = source.get(entry.digest)
            if piece is None:
                return None
            buf[entry.offset:entry.offset + entry.nbytes] = piece
        data = bytes(buf)
    return data if data is not None and hashlib.sha256(data).hexdigest() == digest else None


def repair(backend: Backend, manifests: list[VersionManifest], report: VerifyReport,
           source: dict[str, bytes]) -> list[str]:
    """Write again every damaged or missing blob a live version uses whose bytes `source` (sha256 -> a
    patch's tensor bytes) can rebuild; the blobs written, as their locations."""
    users: dict[str, list[TensorEntry]] = {}
    for manifest in manifests:
        for entry in manifest.tensors.values():
            users.setdefault(entry.blob_digest, []).append(entry)
    repaired = []
    for problem in report.problems:
        data = _rebuilt(problem.digest, users.get(problem.digest, []), source)
        if data is not None:
            backend.put_many({blob_rel(problem.digest): data})
            repaired.append(problem.path)
    return repaired


# -- diff ----------------------------------------------------------------------------------------


def _compare_values(reader: BlobReader, a: VersionManifest, b: VersionManifest, out: TensorDiff) -> None:
    """max |b - a| and ||b - a|| / ||a|| of a changed tensor of one shape in both versions."""
    ea, eb = a.tensors[out.name], b.tensors[out.name]
    (da,) = reader.read_verified([(out.name, ea)], a.ref)
    (db,) = reader.read_verified([(out.name, eb)], b.ref)
    ta, tb = tensor_from(da, ea).double(), tensor_from(db, eb).double()
    delta = tb - ta
    if delta.numel():
        out.max_abs_diff = float(delta.abs().max())
        norm_a, norm_d = float(ta.norm()), float(delta.norm())
        out.relative_l2 = norm_d / norm_a if norm_a else (0.0 if norm_d == 0 else float("inf"))


def diff(reader: BlobReader, a: VersionManifest, b: VersionManifest) -> DiffReport:
    """Tensor by tensor: added, removed, changed (max |b - a| and ||b - a|| / ||a||) or unchanged."""
    meta_a = a.meta.model_dump(mode="json", exclude={"created"})
    meta_b = b.meta.model_dump(mode="json", exclude={"created"})
    meta_changes = sorted(k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k))
    out = []
    for name in list(a.tensors) + [n for n in b.tensors if n not in a.tensors]:
        ea, eb = a.tensors.get(name), b.tensors.get(name)
        entry = TensorDiff(name, "unchanged", ea.shape if ea else None, eb.shape if eb else None,
                           ea.dtype if ea else None, eb.dtype if eb else None)
        if ea is None:
            entry.status = "added"
        elif eb is None:
            entry.status = "removed"
        elif ea.digest != eb.digest:
            entry.status = "changed"
            if ea.shape == eb.shape:
                _compare_values(reader, a, b, entry)
        out.append(entry)
    return DiffReport(a.ref, b.ref, a.digest, b.digest, meta_changes, out)
