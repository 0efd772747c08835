"""Keeping a registry healthy: `gc` (free what no live version uses), `verify` (re-hash everything) and `diff`
(two versions tensor by tensor), with their reports. `Registry.gc/verify/diff` call into this module."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splice.adapters.meta import PatchKind
from splice.errors import first_line
from splice.registry.backends import Backend
from splice.registry.layout import (
    blob_digest_of,
    blob_rel,
    decision_rel,
    located,
    numbers,
    pending_dir,
    pending_rel,
    removed_dir,
    removed_rel,
    temp_writer,
    this_host,
    version_rel,
    versions_dir,
)
from splice.registry.leases import PendingPush, gc_lease, pending_over, read_claim
from splice.registry.manifest import (
    Decision,
    Outcome,
    TensorEntry,
    Tombstone,
    VersionManifest,
    load_json,
    parse_model,
)
from splice.registry.refs import RegistryError
from splice.registry.transfer import BlobReader, tensor_from
from splice.tensors.partials import process_alive


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    temps_removed: int = 0
    stale_versions_removed: int = 0  # manifests of removed versions left behind by an interrupted rm
    blobs_kept_live: int = 0
    blobs_kept_young: int = 0  # unreachable, but younger than the grace period (a push may be in flight)
    bad_manifests: list[str] = field(default_factory=list)  # live versions whose manifest does not validate
    pending_withdrawn: list[str] = field(default_factory=list)  # unpublished versions whose push is over
    pending_completed: list[str] = field(default_factory=list)  # pushes killed after they decided to publish
    pending_kept: list[str] = field(default_factory=list)  # unpublished versions whose push may still publish
    leases_removed: list[str] = field(default_factory=list)  # gc leases expired or not valid


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
    pending: list[str] = field(default_factory=list)  # unpublished versions (a push in flight or interrupted)

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
    tensors: list[TensorDiff]  # of two LoRA versions: without their factors, unless asked for
    updates: list | None = None  # of two LoRA versions: splice.registry.update_diff.UpdateDiff per base tensor

    @property
    def identical(self) -> bool:
        return self.digest_a == self.digest_b


# -- gc ------------------------------------------------------------------------------------------


def check_grace(grace_seconds: float) -> float:
    if not isinstance(grace_seconds, (int, float)) or not math.isfinite(grace_seconds) or grace_seconds < 0:
        raise RegistryError(
            f"gc grace {grace_seconds!r} is not allowed: give a number of seconds, 0 or more "
            "(0 removes every unused blob now, even one a push in flight has just written)"
        )
    return float(grace_seconds)


# -- versions not published: withdrawal, pending pushes ------------------------------------------------


def withdraw(backend: Backend, name: str, version: int, digest: str) -> None:
    """Remove a version: a tombstone first (from then on it is removed, whatever happens next; its number is never
    handed out again), then its manifest, then its pending marker (removed last: a version whose marker is gone
    and that has no tombstone reads as published)."""
    tombstone = Tombstone(version=version, digest=digest)
    backend.create(removed_rel(name, version), (tombstone.model_dump_json(indent=2) + "\n").encode())
    backend.delete(version_rel(name, version))
    backend.remove_entry(pending_rel(name, version))  # even a directory standing where the marker should be


def decide(backend: Backend, url: str, name: str, version: int, outcome: Outcome) -> Outcome:
    """Settle what becomes of pending version `version`: its push (publishing) and any gc or the push itself
    (withdrawing) race to create one decision file exclusively; the first wins and everyone reads the winner's
    outcome, so a push never reports a version published that a gc withdraws. The file read back, not this call's
    create, says who won (an S3 put retried after a timeout answers 412 to its own first write). A decision file
    that cannot be read counts as withdrawn: nothing is published unless it plainly says so."""
    rel = decision_rel(name, version)
    backend.create(rel, (Decision(outcome=outcome).model_dump_json() + "\n").encode())
    try:
        return parse_model(Decision, backend.read_small(rel, url), located(url, rel)).outcome
    except (FileNotFoundError, RegistryError):
        return "withdrawn"


def withdraw_pending(backend: Backend, url: str, name: str, version: int, digest: str) -> bool:
    """Withdraw a version that is not published yet, unless its push already decided to publish it: then finish
    that (remove its pending marker) and return False."""
    if decide(backend, url, name, version, "withdrawn") == "published":
        backend.remove_entry(pending_rel(name, version))
        return False
    withdraw(backend, name, version, digest)
    return True


@dataclass
class PendingVersion:
    """A version whose push has not confirmed its blobs: not published, listed by nothing but gc and verify."""

    name: str
    version: int
    over: str | None  # why its push is over (gc withdraws it); None while it may still publish
    holder: str = ""  # "host H, pid P, since T" where the marker says

    @property
    def line(self) -> str:
        ref = f"{self.name}@{self.version}"
        if self.over is None:
            return f"{ref} is not published yet: its push is in flight ({self.holder})"
        return f"{ref} is not published: its push is over ({self.over}); `splice registry gc` withdraws it"


def pending_versions(backend: Backend, url: str, name: str) -> list[PendingVersion]:
    """The versions of `name` whose pending marker is still there, oldest first."""
    now, found = time.time(), []
    for version in sorted(numbers(backend.listdir(pending_dir(name)))):
        try:
            claim = read_claim(backend, PendingPush, pending_rel(name, version), url)
        except FileNotFoundError:
            continue  # published (or withdrawn) just now
        except RegistryError as exc:
            found.append(PendingVersion(name, version, str(exc)))
            continue
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(claim.started))
        found.append(
            PendingVersion(
                name, version, pending_over(claim, now), f"host {claim.host}, pid {claim.pid}, since {since} UTC"
            )
        )
    return found


# -- gc ------------------------------------------------------------------------------------------


def digests_named(backend: Backend, name: str, version: int) -> set[str]:
    """The blob digests a manifest that does not validate still names; gc stops at one it cannot read at
    all (not JSON, or naming no blob), since it cannot tell which blobs that version needs."""
    try:
        raw = backend.read(version_rel(name, version))
    except FileNotFoundError:
        return set()
    try:
        load_json(raw, version_rel(name, version))
    except RegistryError:
        raw = b""
    named = set(re.findall(r"[0-9a-f]{64}", raw.decode("utf-8", "replace")))
    if not named:
        raise RegistryError(
            f"{name}@{version}: its manifest is unreadable, so gc cannot tell which blobs it "
            f"uses; nothing was removed: restore it, or `splice registry rm {name}@{version}`, "
            f"then gc again"
        )
    return named


def _temp_removable(rel: str, mtime: float | None, cutoff: float, grace_seconds: float) -> bool:
    """Older than the grace (any age at grace 0), except that a temp file a live process on this machine is
    writing is in flight: grace 0 leaves it alone (a non-zero grace removes it once it is older)."""
    old = mtime is not None and mtime <= cutoff
    if grace_seconds > 0:
        return old
    writer = temp_writer(rel.rsplit("/", 1)[-1])
    return writer is None or writer[0] != this_host() or not process_alive(writer[1])


def gc(
    backend: Backend, url: str, names: list[str], live_digests: Callable[[], set[str]], grace_seconds: float
) -> GcReport:
    """Withdraw the unpublished versions whose push is over, remove the manifests an interrupted `rm` left, then
    blobs no live version uses and stale temp files, when older than `grace_seconds` (so a push in flight, whose
    blobs come before its manifest, is left alone). `live_digests`: every blob digest a live or pending version
    may use. Runs under a lease (see splice.registry.leases.wait_for_gcs)."""
    report = GcReport()
    with gc_lease(backend, url) as leases_removed:
        for name in names:
            for pending in pending_versions(backend, url, name):
                if pending.over is None:
                    report.pending_kept.append(pending.line)
                    continue
                if withdraw_pending(backend, url, name, pending.version, ""):
                    report.pending_withdrawn.append(
                        f"withdrew {name}@{pending.version}: its push is over ({pending.over})"
                    )
                else:
                    report.pending_completed.append(
                        f"published {name}@{pending.version}: its push had confirmed its "
                        "blobs and decided to publish it before it stopped"
                    )
            removed = numbers(backend.listdir(removed_dir(name)))
            for version in numbers(backend.listdir(versions_dir(name))) & removed:
                backend.delete(version_rel(name, version))
                report.stale_versions_removed += 1
            for version in numbers(backend.listdir(pending_dir(name))) & removed:
                backend.remove_entry(pending_rel(name, version))  # a withdrawal that stopped half-way
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
    report.leases_removed = leases_removed
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
        if (
            isinstance(data, BaseException)
            or len(data) != entry.nbytes
            or hashlib.sha256(data).hexdigest() != entry.digest
        ):
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
        report.problems.append(BlobProblem(digest, located(url, rel), "missing", first_line(exc), _versions_of(using)))
        return
    report.blobs_checked += 1
    report.bytes_checked += size
    wrong_size = [u for u in using if not u[2].packed and u[2].nbytes != size]
    if actual != digest:
        report.problems.append(_corrupt(backend, url, digest, actual, using))
    elif wrong_size:
        report.problems.append(
            BlobProblem(
                digest,
                located(url, rel),
                "wrong size",
                f"{size} bytes, manifests say {wrong_size[0][2].nbytes}",
                _versions_of(wrong_size),
            )
        )


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
        report.problems.append(
            BlobProblem(digest, located(url, blob_rel(digest)), "missing", "no such blob", _versions_of(users[digest]))
        )
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
            buf[entry.offset : entry.offset + entry.nbytes] = piece
        data = bytes(buf)
    return data if data is not None and hashlib.sha256(data).hexdigest() == digest else None


def repair(
    backend: Backend, manifests: list[VersionManifest], report: VerifyReport, source: dict[str, bytes]
) -> list[str]:
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


def diff(reader: BlobReader, a: VersionManifest, b: VersionManifest, factors: bool = False) -> DiffReport:
    """Tensor by tensor: added, removed, changed (max |b - a| and ||b - a|| / ||a||) or unchanged. Two LoRA
    versions are compared by their effective updates per base tensor (`updates`); their factors are compared
    tensor by tensor only with `factors`."""
    meta_a = a.meta.model_dump(mode="json", exclude={"created"})
    meta_b = b.meta.model_dump(mode="json", exclude={"created"})
    meta_changes = sorted(k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k))
    updates, skip = None, set()
    if a.meta.kind == b.meta.kind == PatchKind.lora and a.digest != b.digest:
        from splice.adapters.patch import Patch
        from splice.registry.transfer import RegistryTensors
        from splice.registry.update_diff import diff_updates, factor_names

        patch_a = Patch(RegistryTensors(reader, a), a.meta.model_copy(deep=True))
        patch_b = Patch(RegistryTensors(reader, b), b.meta.model_copy(deep=True))
        updates = diff_updates(patch_a, patch_b)
        skip = set() if factors else factor_names(patch_a) | factor_names(patch_b)
    out = []
    for name in [n for n in list(a.tensors) + [n for n in b.tensors if n not in a.tensors] if n not in skip]:
        ea, eb = a.tensors.get(name), b.tensors.get(name)
        entry = TensorDiff(
            name,
            "unchanged",
            ea.shape if ea else None,
            eb.shape if eb else None,
            ea.dtype if ea else None,
            eb.dtype if eb else None,
        )
        if ea is None:
            entry.status = "added"
        elif eb is None:
            entry.status = "removed"
        elif ea.digest != eb.digest:
            entry.status = "changed"
            if ea.shape == eb.shape:
                _compare_values(reader, a, b, entry)
        out.append(entry)
    return DiffReport(a.ref, b.ref, a.digest, b.digest, meta_changes, out, updates)
