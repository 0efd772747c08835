"""The `Registry`: versioned patches on any fsspec location: content-addressed blobs, immutable version
manifests, aliases moved by compare-and-swap (see splice.registry.layout for where each lives).

Every write is atomic: a blob or manifest is either absent or complete. A push writes its blobs first, then a
pending marker and its manifest, and publishes the version by removing the marker once its blobs are confirmed,
so a push that dies at any step leaves no published version: only unreachable blobs, and at most a pending
version that no listing, resolution, pull or deploy sees and that `gc` withdraws once its push is over.
Version manifests and alias moves are created with an exclusive create (a hard link locally, an
in-process lock for memory://, a conditional put `If-None-Match: *` on S3); a filesystem that offers none of
these is refused for writing rather than risk handing out a version number twice.

gc and push (the protocol that keeps a reused blob from vanishing under a push, on every backend):

1. A push writes or reuses its blobs. It reuses a stored blob only after checking its bytes (Backend.holds), and
   makes a reused one young again where the store allows it cheaply (gc's grace then protects it).
2. It takes the next version number by exclusively creating its pending marker (`pending/<n>.json`: host, pid,
   expiry), then creates its manifest; the version is not published while the marker exists.
3. It waits for every gc whose lease (`gc/<uuid>.json`) it sees, until each is finished or over (its expiry, at
   most LEASE_TTL after its gc's last heartbeat, has passed; or its process on this machine is gone), for at
   most `wait` seconds (then the push fails, naming the lease).
4. Then it checks that every blob the manifest names is stored (asking the store, past any listing cache). If
   one is gone, a gc removed it between steps 1 and 3. Only if all are there does it decide to publish, by
   exclusively creating the version's decision file (`decided/<n>.json`), which a gc withdrawing the version
   races to create too: whoever is second follows the first. Then it removes its pending marker: the version is
   published. Any failure or Ctrl-C before the decision withdraws the version (tombstone, manifest, marker, in
   that order); a SIGKILL leaves it pending, and gc withdraws it once its push is over, or completes it if its
   push had decided to publish.
5. A gc creates its lease before it lists the manifests (live and pending) and removes it when it is done. A gc
   that starts after step 2 therefore keeps the new version's blobs; one that started before is waited for.

Readers list a name's manifests, then its pending markers, then its tombstones: a manifest seen is either still
pending when the markers are listed, or already published or tombstoned. A registry written before pending
markers existed has none, so every version in it reads as published.

Every listing and existence check the registry relies on asks the store itself, never fsspec's listing cache
(a long-lived process would otherwise miss what other processes wrote or removed).

How tensor bytes move (packs, verified reads) is splice.registry.transfer; gc, verify and diff are
splice.registry.maintenance. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from splice.errors import Interrupted, SpliceError, first_line
from splice.progress import note_published
from splice.registry import maintenance
from splice.registry.backends import Backend, LocalBackend, backend_for, storage_errors
from splice.registry.health import HealthRecord, read_records, write_record
from splice.registry.layout import (
    PACK_BELOW,
    REGISTRY_FILE,
    alias_rel,
    aliases_dir,
    blob_rel,
    default_location,
    located,
    numbers,
    pending_dir,
    pending_rel,
    removed_dir,
    removed_rel,
    version_rel,
    versions_dir,
)
from splice.registry.leases import DEFAULT_WAIT, PUBLISH_MARGIN, PendingPush, check_wait, pending_claim, wait_for_gcs
from splice.registry.maintenance import (
    DiffReport,
    GcReport,
    VerifyReport,
    decide,
    pending_versions,
    withdraw,
    withdraw_pending,
)
from splice.registry.manifest import (
    MANIFEST_FORMAT_VERSION,
    REGISTRY_FORMAT,
    REGISTRY_FORMAT_VERSION,
    AliasRecord,
    PushStats,
    RegistryInfo,
    VersionManifest,
    check_finite,
    content_digest,
    now,
    parse_model,
)
from splice.registry.refs import Ref, RegistryError, check_alias, check_name, parse_ref
from splice.registry.transfer import BlobReader, RegistryTensors, TensorPusher


def _loaded(patch: Patch | str | os.PathLike) -> Patch:
    """A Patch as given, or loaded from a splice patch directory."""
    from splice.adapters.patch import Patch

    return patch if isinstance(patch, Patch) else Patch.load(patch)


def _with_base_record(patch: Patch | str | os.PathLike, base: str | os.PathLike) -> Patch:
    """The patch with a fingerprint of `base` where it records none (checked against `base` where it does)."""
    from splice.adapters.compose import with_base_record
    from splice.tensors.checkpoint import Checkpoint

    with Checkpoint.open(base) as checkpoint:
        return with_base_record(_loaded(patch), checkpoint)


def _source_bytes(patch: Patch | str | os.PathLike) -> dict[str, bytes]:
    """sha256 -> raw bytes of every tensor of a patch (what `verify(repair_from=...)` can write again)."""
    import hashlib

    from splice.registry.transfer import TensorSource

    loaded = _loaded(patch)
    source = TensorSource(loaded)
    found = {}
    for name in loaded.tensors:
        data = bytes(source.read_all(source.open(name)))
        found[hashlib.sha256(data).hexdigest()] = data
    return found


if TYPE_CHECKING:
    from pydantic import BaseModel

    from splice.adapters.patch import Patch


class AliasConflict(RegistryError):
    """An alias was moved by someone else between reading it and moving it."""


class AliasTable(dict[str, AliasRecord]):
    """A name's aliases: alias -> its current move; `problems`: a line for each alias whose current file does not
    validate (left out of the table)."""

    def __init__(self, current: dict[str, AliasRecord], problems: list[str]):
        super().__init__(current)
        self.problems = problems

    def pointing_at(self, version: int) -> list[str]:
        """The aliases pointing at `version`."""
        return [alias for alias, record in self.items() if record.version == version]


@dataclass
class PushResult:
    """What `Registry.push` stored: the published version, and the blob bytes the push wrote and reused."""

    manifest: VersionManifest
    stats: PushStats


@dataclass
class RemovedVersion:
    """What `Registry.remove` removed: the version, its content digest (None: its manifest did not validate), and
    the aliases of its name left pointing at it."""

    name: str
    version: int
    digest: str | None
    pointing: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Registry:
    """A patch registry at `url` (a local directory or any fsspec URL). Open one with `Registry.open`,
    create one with `Registry.init`."""

    def __init__(self, url: str, backend: Backend, info: RegistryInfo):
        self.url = url
        self._backend = backend
        self._reader = BlobReader(backend, url)
        self.info = info
        # format 1 registries stay format 1 (every tensor its own blob), so an older splice can still read them
        self.pack_below = PACK_BELOW if info.format_version >= 2 else 0

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def _connect(url: str | os.PathLike | None, storage_options: dict | None) -> tuple[str, Backend]:
        location = os.fspath(url) if url is not None else default_location()
        if not location:
            raise RegistryError("registry location is empty: give `registry=URL` or set SPLICE_REGISTRY")
        try:
            fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as exc:
            raise RegistryError(f"cannot open registry {location}: {first_line(exc)}") from None
        return location, backend_for(fs, root.rstrip("/") or root)

    @classmethod
    def open(cls, url: str | os.PathLike | None = None, storage_options: dict | None = None) -> Registry:
        """An existing registry (made by `init`); `url` defaults to $SPLICE_REGISTRY or ~/.cache/splice/registry."""
        location, backend = cls._connect(url, storage_options)
        try:
            raw = backend.read(REGISTRY_FILE)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise RegistryError(
                f"no registry at {location}: create one with `splice registry init --registry {location}`"
            ) from None
        except Exception as exc:
            raise RegistryError(f"cannot open registry {location}: {first_line(exc)}") from exc
        info = parse_model(RegistryInfo, raw, f"{location}/{REGISTRY_FILE}")
        if info.format != REGISTRY_FORMAT:
            raise RegistryError(f"{location}/{REGISTRY_FILE} is not a splice registry marker (format {info.format!r})")
        if info.format_version > REGISTRY_FORMAT_VERSION:
            raise RegistryError(
                f"registry {location} has format {info.format_version}, newer than this splice "
                f"({REGISTRY_FORMAT_VERSION}); upgrade splice"
            )
        return cls(location, backend, info)

    @classmethod
    def init(cls, url: str | os.PathLike | None = None, storage_options: dict | None = None) -> Registry:
        """Create a registry (an empty directory or a new prefix); opening it if it already exists."""
        location, backend = cls._connect(url, storage_options)
        try:
            with contextlib.suppress(RegistryError):
                if backend.sizes([REGISTRY_FILE])[0] is not None:
                    return cls.open(location, storage_options)
            if not backend.exclusive:
                raise RegistryError(cls._no_exclusive_message(location, backend))
            if not backend.is_empty():
                raise RegistryError(f"{location} exists and is not empty; a registry needs a new or empty location")
            backend.check_exclusive_create(location)
            info = RegistryInfo(exclusive_create=backend.exclusive)
            backend.create(REGISTRY_FILE, (info.model_dump_json(indent=2) + "\n").encode())
        except SpliceError:
            raise
        except Exception as exc:
            raise RegistryError(f"cannot create registry {location}: {first_line(exc)}") from exc
        return cls.open(location, storage_options)

    @staticmethod
    def _no_exclusive_message(location: str, backend: Backend) -> str:
        return (
            f"registry {location}: splice cannot create files exclusively on {type(backend.fs).__name__}, "
            "so version numbers could be handed out twice; it writes registries only to local directories, "
            "memory:// and S3"
        )

    def _require_writable(self) -> None:
        if not self._backend.exclusive:
            raise RegistryError(self._no_exclusive_message(self.url, self._backend))

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # -- reading manifests -----------------------------------------------------------------------

    def _read_json(self, cls: type[BaseModel], rel: str) -> Any:
        return parse_model(cls, self._backend.read(rel), located(self.url, rel))

    def _read_manifest(self, name: str, version: int) -> VersionManifest:
        rel = version_rel(name, version)
        where = located(self.url, rel)
        manifest: VersionManifest = self._read_json(VersionManifest, rel)
        if manifest.name != name or manifest.version != version:
            raise RegistryError(f"{where} is corrupt: it describes {manifest.ref}")
        if manifest.format_version > MANIFEST_FORMAT_VERSION:
            raise RegistryError(
                f"{where} has manifest format {manifest.format_version}, newer than "
                f"this splice ({MANIFEST_FORMAT_VERSION}); upgrade splice"
            )
        if manifest.computed_digest() != manifest.digest:
            raise RegistryError(f"{where} is corrupt: its content does not match its digest {manifest.digest}")
        return manifest

    def _numbers(self, name: str) -> tuple[set[int], set[int], set[int]]:
        """(versions with a manifest, pending versions, removed versions) of a name, listed in that order (see
        the module docstring: a version published or withdrawn meanwhile is never taken for a live one)."""
        stored = numbers(self._backend.listdir(versions_dir(name)))
        pending = numbers(self._backend.listdir(pending_dir(name)))
        removed = numbers(self._backend.listdir(removed_dir(name)))
        return stored, pending, removed

    def _version_numbers(self, name: str) -> tuple[set[int], set[int]]:
        """(live versions, removed versions) of a name; a pending version is neither."""
        stored, pending, removed = self._numbers(name)
        return stored - pending - removed, removed

    def _require_name(self, name: str) -> tuple[set[int], set[int]]:
        live, removed = self._version_numbers(name)
        if not live and not removed:
            raise RegistryError(f"no patch named {name} in registry {self.url}; `splice registry ls` lists them")
        return live, removed

    def _version(self, name: str, version: int) -> VersionManifest:
        """A published version's manifest (read before its pending marker and tombstone are looked for)."""
        manifest: VersionManifest | RegistryError | None
        try:
            manifest = self._read_manifest(name, version)
        except FileNotFoundError:
            manifest = None
        except RegistryError as exc:
            manifest = exc
        # asked one after the other: a store answers a batch in any order (see the module docstring for why)
        pending = self._backend.sizes([pending_rel(name, version)])[0]
        removed = self._backend.sizes([removed_rel(name, version)])[0]
        if removed is not None:
            raise RegistryError(f"{name}@{version} was removed; its number is not reused")
        if pending is not None:
            raise RegistryError(
                f"{name}@{version} is not published: its push has not confirmed its blobs (a push "
                "in flight, or one that was interrupted; `splice registry gc` withdraws it once "
                "that push is over)"
            )
        if isinstance(manifest, RegistryError):
            raise manifest
        if manifest is None:
            live, _ = self._require_name(name)
            span = f"latest is {max(live)}" if live else "every version was removed"
            raise RegistryError(f"{name} has no version {version} ({span})")
        return manifest

    def _by_digest(self, name: str, live: set[int], digest: str) -> VersionManifest:
        """The newest version whose content digest is `digest` or starts with it (a short digest as `ls`
        prints it); a prefix that fits versions of different content is refused, naming them."""
        found: dict[str, list[VersionManifest]] = {}
        for version in sorted(live, reverse=True):
            manifest = self._read_manifest(name, version)
            if manifest.digest.startswith(digest):
                found.setdefault(manifest.digest, []).append(manifest)
        if not found:
            raise RegistryError(f"{name} has no version with content digest {digest}")
        if len(found) > 1:
            matches = ", ".join(f"{m.ref} ({m.digest[:19]})" for ms in found.values() for m in ms)
            raise RegistryError(f"digest {digest} of {name} is ambiguous: it fits {matches}; give more hex digits")
        return next(iter(found.values()))[0]

    @storage_errors
    def resolve(self, ref: str | Ref) -> VersionManifest:
        """The version a reference names: `name` (latest), `name@3`, `name@prod`, `name@sha256:...` (the whole
        digest or a unique prefix of at least 8 hex digits)."""
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        name = parsed.name
        if parsed.version is not None:
            return self._version(name, parsed.version)
        if parsed.alias is not None:
            record = self._alias_current(name, parsed.alias)
            if record is None:
                self._require_name(name)
                known = sorted(self.aliases(name))
                raise RegistryError(f"{name} has no alias {parsed.alias} (aliases: {', '.join(known) or 'none'})")
            try:
                return self._version(name, record.version)
            except RegistryError as exc:
                raise RegistryError(
                    f"alias {parsed.alias} of {name} points to version {record.version}: {exc}; "
                    "move it with `splice registry tag`"
                ) from None
        live, _ = self._require_name(name)
        if parsed.digest is not None:
            return self._by_digest(name, live, parsed.digest)
        if not live:
            raise RegistryError(f"{name}: every version was removed")
        return self._read_manifest(name, max(live))

    @storage_errors
    def names(self) -> list[str]:
        """Every patch name with at least one version, live or removed."""
        return sorted(n for n in self._backend.listdir("patches") if not n.startswith("."))

    @storage_errors
    def versions(self, name: str) -> list[VersionManifest]:
        """The live versions of a name, oldest first (a RegistryError if one's manifest does not validate)."""
        check_name(name)
        live, _ = self._require_name(name)
        return [self._read_manifest(name, v) for v in sorted(live)]

    @storage_errors
    def scan_versions(self, name: str) -> tuple[list[VersionManifest], list[str]]:
        """The live versions of a name whose manifests validate, oldest first; and a line for each of its pending
        versions and each live version whose manifest does not validate (which `versions` refuses instead)."""
        check_name(name)
        problems = [p.line for p in pending_versions(self._backend, self.url, name)]
        live = self._version_numbers(name)[0] if problems else self._require_name(name)[0]
        manifests = []
        for version, manifest in self._read_live(name, live):
            if isinstance(manifest, RegistryError):
                problems.append(f"{name}@{version}: {manifest}")
            else:
                manifests.append(manifest)
        return manifests, problems

    @storage_errors
    def version_numbers(self, name: str) -> list[int]:
        """The live version numbers of a name, oldest first, from listings alone (no manifest is read)."""
        return sorted(self._version_numbers(check_name(name))[0])

    def latest_version(self, name: str) -> int | None:
        return max(self.version_numbers(name), default=None)

    def _read_live(self, name: str, live: set[int]) -> Iterator[tuple[int, VersionManifest | RegistryError]]:
        """(version, its manifest, or the error saying why it does not validate) for each live version, oldest
        first; a version removed since `live` was listed is left out."""
        for version in sorted(live):
            try:
                yield version, self._read_manifest(name, version)
            except FileNotFoundError:
                continue
            except RegistryError as exc:
                yield version, exc

    @storage_errors
    def record_health(self, record: HealthRecord, name: str) -> None:
        """Keep a deployment or port of `name@record.version` in the name's health history."""
        self._require_writable()
        self._version(check_name(name), record.version)
        write_record(self._backend, name, record)

    @storage_errors
    def health(self, name: str) -> tuple[list[HealthRecord], list[str]]:
        """Every deployment and port recorded for a name's versions, oldest first (and unreadable records)."""
        return read_records(self._backend, self.url, check_name(name))

    # -- aliases -----------------------------------------------------------------------------------

    def _alias_generations(self, name: str, alias: str) -> set[int]:
        return numbers(self._backend.listdir(aliases_dir(name, alias)))

    def _alias_current(self, name: str, alias: str) -> AliasRecord | None:
        generations = self._alias_generations(name, alias)
        if not generations:
            return None
        rel = alias_rel(name, alias, max(generations))
        record: AliasRecord = self._read_json(AliasRecord, rel)
        if record.alias != alias or record.generation != max(generations):
            raise RegistryError(
                f"{located(self.url, rel)} is corrupt: it describes generation {record.generation} "
                f"of alias {record.alias}"
            )
        return record

    @storage_errors
    def aliases(self, name: str) -> AliasTable:
        """alias -> its current move (an alias whose current file does not validate is left out, with a line in
        the table's `problems`)."""
        check_name(name)
        found: dict[str, AliasRecord] = {}
        problems: list[str] = []
        for alias in sorted(self._backend.listdir(aliases_dir(name))):
            try:
                record = self._alias_current(name, alias)
            except FileNotFoundError:
                continue
            except RegistryError as exc:
                problems.append(
                    f"alias {alias} of {name}: {exc}; repair it with `splice registry tag "
                    f"{name}@VERSION {alias} --force`"
                )
                continue
            if record is not None:
                found[alias] = record
        return AliasTable(found, problems)

    @storage_errors
    def alias_history(self, name: str, alias: str) -> list[AliasRecord]:
        """Every move of an alias, oldest first."""
        check_name(name)
        check_alias(alias)
        return [
            self._read_json(AliasRecord, alias_rel(name, alias, g))
            for g in sorted(self._alias_generations(name, alias))
        ]

    @storage_errors
    def tag(
        self,
        name: str | Ref,
        alias: str,
        version: int | None = None,
        *,
        expect_generation: int | None = None,
        force: bool = False,
    ) -> AliasRecord:
        """Point `alias` at a version by compare-and-swap: read generation g, exclusively create g+1. The version
        is `version` of the patch `name`, or without `version` the one `name` names as a reference (`name@3`,
        `name@prod`, `name@sha256:...`; a bare name: the latest). `expect_generation`: the generation the caller
        last saw (0: the alias does not exist yet); a move from any other generation, or one that loses a race,
        raises AliasConflict. `force`: move an alias whose current file does not validate (the new generation
        repairs it; the damaged one stays as history)."""
        self._require_writable()
        ref = name if version is None else Ref(check_name(str(name) if isinstance(name, Ref) else name), int(version))
        check_alias(alias)
        manifest: VersionManifest = self.resolve(ref)
        name = manifest.name
        try:
            current = self._alias_current(name, alias)
        except RegistryError as exc:
            if not force:
                raise RegistryError(
                    f"{exc}; `splice registry tag {name}@{manifest.version} {alias} --force` "
                    "(tag(..., force=True)) writes a new move over it"
                ) from None
            current = None
        generation = current.generation if current else max(self._alias_generations(name, alias), default=0)
        if expect_generation is not None and expect_generation != generation:
            raise self._conflict(name, alias, current)
        if expect_generation is not None:
            generation = expect_generation
        record = AliasRecord(alias=alias, generation=generation + 1, version=manifest.version, digest=manifest.digest)
        if not self._backend.create(
            alias_rel(name, alias, record.generation), (record.model_dump_json(indent=2) + "\n").encode()
        ):
            raise self._conflict(name, alias, self._alias_current(name, alias))
        note_published(f"alias {name}@{alias} -> {manifest.ref}")
        return record

    @staticmethod
    def _conflict(name: str, alias: str, current: AliasRecord | None) -> AliasConflict:
        now_at = f"now version {current.version}" if current else "now unset"
        return AliasConflict(f"alias {alias} of {name} was moved by someone else ({now_at}); re-run to move it again")

    # -- push ---------------------------------------------------------------------------------------

    @storage_errors
    def push(
        self,
        name: str,
        patch: Patch | str | os.PathLike,
        *,
        alias: str | None = None,
        message: str = "",
        wait: float = DEFAULT_WAIT,
        base: str | os.PathLike | None = None,
    ) -> PushResult:
        """Store a patch (a Patch or a splice patch directory) that records its base as the next version of `name`.
        Blobs are written first, then the version's pending marker and manifest; the version is published only
        once its blobs are confirmed, so a push that fails, is interrupted or dies publishes nothing. `wait`: the
        most seconds to wait for running gcs (then the push fails, naming the gc's lease). A patch without a
        record of its base (a PEFT adapter) is published with splice.workflows.publish.publish_patch, which
        fingerprints the base it is given; `base` here is the older form of that, kept for callers that use it."""
        self.check_push(name, alias, wait)
        started = time.perf_counter()
        loaded = _loaded(patch) if base is None else _with_base_record(patch, base)
        meta = loaded.meta
        if meta.base is None:  # `base` is publish_patch's: it fingerprints the base before it pushes
            raise RegistryError(
                "this patch has no record of the base model it was made on (a PEFT adapter?); pass "
                "`base=MODEL_DIR` so the registry can fingerprint the base tensors it touches"
            )
        check_finite(meta.model_dump(mode="python"), "the patch's patch.json")
        table, stats = TensorPusher(self._backend, self.pack_below).push(loaded)
        digest = content_digest(meta, table)
        pushed_at = now()
        manifest_format = MANIFEST_FORMAT_VERSION if any(e.packed for e in table.values()) else 1

        def body(version: int) -> bytes:
            return VersionManifest(
                format_version=manifest_format,
                name=name,
                version=version,
                digest=digest,
                meta=meta,
                tensors=table,
                pushed_at=pushed_at,
                message=message,
            ).to_json()

        # validated before the version exists; only the version number, which cannot make it invalid, is added
        checked = parse_model(VersionManifest, body(1), f"the manifest of this push of {name}")
        claim = pending_claim(wait)
        claimed: list[int] = []
        try:
            manifest = checked.model_copy(update={"version": self._create_version(name, body, claim, claimed)})
            self._settle(manifest, claim, wait)
        except BaseException as exc:  # Ctrl-C (or anything else) before the version is published: it never is
            published = [v for v in claimed if not withdraw_pending(self._backend, self.url, name, v, digest)]
            if published:  # stopped after it decided to publish: the version is complete, and published
                ref = f"{name}@{published[0]}"
                kept = f"{ref} was published"
                if isinstance(exc, KeyboardInterrupt):
                    raise Interrupted(kept if alias is None else _alias_not_moved(ref, alias)) from None
                raise RegistryError(f"{kept}, but the push then failed ({first_line(exc)})") from None
            if claimed and isinstance(exc, RegistryError):
                raise RegistryError(f"{exc}; {name}@{claimed[0]} was withdrawn: push again") from None
            raise
        stats.seconds = time.perf_counter() - started
        if alias is not None:
            self._move_pushed_alias(manifest, alias)
        return PushResult(manifest, stats)

    def _move_pushed_alias(self, manifest: VersionManifest, alias: str) -> None:
        """Point `alias` at a version just published; a failure or Ctrl-C says the version is kept."""
        try:
            self.tag(manifest.name, alias, manifest.version)
        except RegistryError as exc:
            raise RegistryError(f"pushed {manifest.ref}, but did not move alias {alias}: {exc}") from None
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                current = self._alias_current(manifest.name, alias)
                if current is not None and current.version == manifest.version:
                    raise Interrupted(f"{manifest.ref} was published and alias {alias} moved to it") from None
            raise Interrupted(_alias_not_moved(manifest.ref, alias)) from None

    def check_push(self, name: str, alias: str | None = None, wait: float = DEFAULT_WAIT) -> None:
        """Refuse a push before any work: a registry that cannot create versions exclusively, a bad name, alias
        or wait."""
        self._require_writable()
        check_name(name)
        if alias is not None:
            check_alias(alias)
        check_wait(wait)

    def _settle(self, manifest: VersionManifest, claim: PendingPush, wait: float) -> None:
        """After a version's manifest is created: wait for the gcs running now, check that every blob it names is
        stored, decide to publish it (see `maintenance.decide`), then remove its pending marker. A RegistryError if
        a blob is gone (a gc removed it in the meantime), a gc's lease is still held after `wait`, the push outlived
        its marker's expiry, or a gc decided first to withdraw it.
        A gc that starts after the wait lists the manifests after its lease exists, so it keeps these blobs."""
        wait_for_gcs(self._backend, self.url, wait)
        missing = self.missing_blobs(manifest)
        if missing:
            raise RegistryError(
                f"push of {manifest.ref} failed: blob {located(self.url, blob_rel(missing[0]))} "
                f"{'and ' + str(len(missing) - 1) + ' more ' if len(missing) > 1 else ''}was "
                "removed by a concurrent `splice registry gc` before the version was complete"
            )
        if time.time() > claim.expiry() - PUBLISH_MARGIN:
            raise RegistryError(
                f"push of {manifest.ref} took longer than its pending marker allows (a gc may "
                "take it for an interrupted push)"
            )
        if decide(self._backend, self.url, manifest.name, manifest.version, "published") != "published":
            raise RegistryError(
                f"push of {manifest.ref} failed: a `splice registry gc` withdrew it as an "
                "interrupted push before it was published"
            )
        self._backend.delete(pending_rel(manifest.name, manifest.version))  # published
        note_published(manifest.ref)

    @storage_errors
    def missing_blobs(self, manifest: VersionManifest) -> list[str]:
        """The digests of the blobs a version names that are not stored (asking the store itself)."""
        digests = sorted({entry.blob_digest for entry in manifest.tensors.values()})
        return [d for d, size in zip(digests, self._backend.sizes([blob_rel(d) for d in digests])) if size is None]

    def _create_version(self, name: str, body: Callable[[int], bytes], claim: PendingPush, claimed: list[int]) -> int:
        """Take the next version number by exclusively creating its pending marker (added to `claimed` at once,
        for the caller to withdraw on any failure), then create its manifest; on a conflict take the next number
        and retry. A number once claimed is never handed out again."""
        marker = (claim.model_dump_json() + "\n").encode()
        floor = 0
        for attempt in range(1000):
            stored, pending, removed = self._numbers(name)
            version = max(max(stored | pending | removed, default=0), floor) + 1
            floor = version  # taken by this attempt or someone else: never tried again, even if a listing lags
            if self._backend.create(pending_rel(name, version), marker):
                claimed.append(version)
                manifest = body(version)
                created = self._backend.create(version_rel(name, version), manifest)
                if created or self._own_manifest(name, version, manifest):
                    return version
                # a splice from before pending markers created this manifest (it writes none): leave it published
                claimed.remove(version)
                self._backend.delete(pending_rel(name, version))
            time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
        raise RegistryError(
            f"could not take a version number for {name} after 1000 attempts; too many concurrent pushes"
        )

    def _own_manifest(self, name: str, version: int, manifest: bytes) -> bool:
        """Whether the manifest that stood in the way is this push's own: an S3 put that timed out but was
        applied, retried, answers 412 to its own first write."""
        try:
            return self._backend.read(version_rel(name, version)) == manifest
        except OSError:
            return False

    # -- reading tensors ---------------------------------------------------------------------------

    @storage_errors
    def load(self, ref: str | Ref) -> Patch:
        """The patch a reference names; its tensors are read (and hash-checked) only when looked up."""
        from splice.adapters.patch import Patch

        manifest = self.resolve(ref)
        return Patch(RegistryTensors(self._reader, manifest), manifest.meta.model_copy(deep=True))

    def pull(self, ref: str | Ref, out: str | os.PathLike, force: bool = False) -> Path:
        """`pull_version`, returning `out` as a Path."""
        self.pull_version(ref, out, force)
        return Path(out)

    @storage_errors
    def pull_version(self, ref: str | Ref, out: str | os.PathLike, force: bool = False) -> VersionManifest:
        """Write the version a reference names as a splice patch directory (patch.json + tensors.safetensors,
        byte for byte what `Patch.save` writes), every tensor hash-checked before the directory appears at
        `out`; nothing appears there unless all of them are right. Returns the version written."""
        from splice.adapters.patch import write_patch_dir
        from splice.tensors.safetensors import SAFETENSORS_DTYPES, OutputTensor
        from splice.tensors.writer import ensure_output_free

        own_directory = [self._backend.root] if isinstance(self._backend, LocalBackend) else []
        ensure_output_free(out, force, protected=own_directory, what="the registry")
        manifest = self.resolve(ref)
        specs = [
            OutputTensor(name, SAFETENSORS_DTYPES[entry.dtype], tuple(entry.shape))
            for name, entry in manifest.tensors.items()
        ]
        write_patch_dir(
            out,
            manifest.meta,
            specs,
            lambda handle, offsets: self._reader.fetch_into(manifest, handle.fileno(), offsets),
            force,
        )
        return manifest

    # -- removal and maintenance -----------------------------------------------------------------

    @storage_errors
    def remove(self, ref: str | Ref) -> RemovedVersion:
        """Remove the version a reference names; its number is never handed out again. Its blobs stay until
        `gc` finds no other version uses them. A version whose manifest does not validate can be removed by
        number (`name@N`). Says which of the name's aliases are left pointing at it."""
        self._require_writable()
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        digest: str | None
        try:
            manifest = self.resolve(parsed)
            name, version, digest = manifest.name, manifest.version, manifest.digest
        except RegistryError:
            if parsed.version is None or not self._unreadable(parsed.name, parsed.version):
                raise
            name, version, digest = parsed.name, parsed.version, None
        withdraw(self._backend, name, version, digest or "")
        return RemovedVersion(name, version, digest, self.aliases(name).pointing_at(version))

    def _unreadable(self, name: str, version: int) -> bool:
        """Is name@version a live version whose manifest is there but does not validate?"""
        live, _ = self._version_numbers(name)
        return version in live and self._backend.sizes([version_rel(name, version)])[0] is not None

    def _live_manifests(
        self, bad: list[str], keep: set[str] | None = None, pending: bool = False
    ) -> list[VersionManifest]:
        """Every live version's manifest (and every pending one's, with `pending`); one that does not validate
        goes to `bad` (one line), and every blob digest its raw text names to `keep` (gc frees none of them)."""
        manifests = []
        for name in self.names():
            stored, waiting, removed = self._numbers(name)
            versions = stored - removed - (set() if pending else waiting)
            for version, manifest in self._read_live(name, versions):
                if not isinstance(manifest, RegistryError):
                    manifests.append(manifest)
                    continue
                bad.append(str(manifest))
                if keep is not None:
                    keep |= maintenance.digests_named(self._backend, name, version)
        return manifests

    @storage_errors
    def gc(self, grace_seconds: float = 3600) -> GcReport:
        """Remove blobs no live version uses, and stale temp files, when older than `grace_seconds`
        (so a push in flight, whose blobs are written before its manifest, is left alone). A live version whose
        manifest does not validate keeps every blob its text names, and is listed in the report."""
        self._require_writable()
        grace = maintenance.check_grace(grace_seconds)
        bad: list[str] = []

        def live_digests() -> set[str]:  # a pending version's push may still publish it: its blobs are kept too
            keep: set[str] = set()
            manifests = self._live_manifests(bad, keep, pending=True)
            return keep | {entry.blob_digest for m in manifests for entry in m.tensors.values()}

        report = maintenance.gc(self._backend, self.url, self.names(), live_digests, grace)
        report.bad_manifests = bad
        return report

    @storage_errors
    def verify(self, repair_from: Patch | str | os.PathLike | None = None) -> VerifyReport:
        """Re-hash every blob, check every live version's manifest and blobs and every alias; changes nothing,
        unless `repair_from` (a patch: a Patch or a patch directory, e.g. the one a damaged version was pushed
        from) is given: then every damaged or missing blob whose bytes that patch holds is written again, and
        the registry verified once more. A damaged pack is reported with the tensors in it whose bytes no
        longer match, and the versions they break."""
        report = self._verify_once()
        if repair_from is None or report.ok:
            return report
        self._require_writable()
        repaired = maintenance.repair(self._backend, self._live_manifests([]), report, _source_bytes(repair_from))
        again = self._verify_once()
        again.repaired = repaired
        return again

    def _verify_once(self) -> VerifyReport:
        bad: list[str] = []
        manifests = self._live_manifests(bad)
        report = maintenance.verify(self._backend, self.url, manifests, bad)
        for name in self.names():
            report.bad_aliases += self.aliases(name).problems
            report.pending += [p.line for p in pending_versions(self._backend, self.url, name)]
        return report

    @storage_errors
    def diff(self, ref_a: str | Ref, ref_b: str | Ref, factors: bool = False) -> DiffReport:
        """Tensor by tensor: added, removed, changed (max |b - a| and ||b - a|| / ||a||) or unchanged; two LoRA
        versions by their effective updates per base tensor (their factors too with `factors`)."""
        return maintenance.diff(self._reader, self.resolve(ref_a), self.resolve(ref_b), factors)


def open_registry(registry: Registry | str | os.PathLike | None, storage_options: dict | None = None) -> Registry:
    """A Registry as given, or opened from its location (default: $SPLICE_REGISTRY or ~/.cache/splice/registry)."""
    return registry if isinstance(registry, Registry) else Registry.open(registry, storage_options)


def _alias_not_moved(ref: str, alias: str) -> str:
    """What a Ctrl-C after `ref` was published, before its alias moved, leaves to the user."""
    return f"{ref} was published, but alias {alias} was not moved: `splice registry tag {ref} {alias}` moves it"
