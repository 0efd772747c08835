"""Where things live under a registry's root, and the sizes that decide how tensors are stored.

Layout (registry format 2; see splice.registry.manifest for the file formats)::

    registry.json                                   format marker (written once, by `init`)
    blobs/sha256/<2 hex>/<64 hex>                   immutable blobs, named by the sha256 of their bytes:
                                                      - a large tensor's raw bytes (one blob per tensor), or
                                                      - a pack: the raw bytes of small tensors, concatenated
    patches/<name>/versions/<n>.json                immutable manifests, created exclusively (numbers never reused)
    patches/<name>/removed/<n>.json                 tombstones: version n was removed; n is never handed out again
    patches/<name>/pending/<n>.json                 version n is not published yet: created before its manifest,
                                                      removed once its blobs are confirmed (absent: published,
                                                      as every version written before pending markers existed)
    patches/<name>/aliases/<alias>/<generation>.json  alias moves; the highest generation is the alias's value
    tmp/<host>.<pid>.<uuid>.tmp                     local temp files (renamed or linked into place); gc removes those
                                                      of dead processes on its host at once, others after the grace
    gc/<uuid>.json                                  leases: a gc in progress (see splice.registry.store, "gc and push")

The registry never follows a symbolic link out of itself: a link where one of these directories should be is
refused, not followed.
"""

from __future__ import annotations

import os
import re
import socket
import uuid

ENV_VAR = "SPLICE_REGISTRY"
DEFAULT_LOCATION = "~/.cache/splice/registry"
REGISTRY_FILE = "registry.json"
PACK_BELOW = 1 << 20  # format 2: tensors smaller than this are packed into shared blobs
PACK_BYTES = 32 << 20  # at most this many bytes of small tensors in one pack
SMALL_READ = 1 << 20  # remote reads smaller than this travel in batches (one cat_ranges)
BATCH_BYTES = 8 << 20  # at most this many bytes of small reads in one batch
BATCH_COUNT = 256  # at most this many small reads or puts in one batch
IO_CHUNK = 1 << 20  # local reads and writes go in pieces of this size (much faster here than huge ones)


GC_DIR = "gc"
_TEMP = re.compile(r"(?P<host>[A-Za-z0-9_-]{1,64})\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{32}\.tmp")


def this_host() -> str:
    """This machine's name as temp files carry it (letters, digits, '-' and '_' only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def temp_name() -> str:
    """A new temp file's name: the host and process writing it, so gc can tell a dead writer's leftovers."""
    return f"{this_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that wrote a temp file, or None for a name that does not say (older splice)."""
    found = _TEMP.fullmatch(name)
    return (found["host"], int(found["pid"])) if found else None


def default_location() -> str:
    """$SPLICE_REGISTRY, or ~/.cache/splice/registry."""
    return os.environ.get(ENV_VAR) or os.path.expanduser(DEFAULT_LOCATION)


def blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest[:2]}/{digest}"


def blob_digest_of(rel: str) -> str | None:
    """The digest a blob path names, or None for a file under blobs/ that is not a blob."""
    digest = rel.rsplit("/", 1)[-1]
    return digest if rel == blob_rel(digest) else None


def versions_dir(name: str) -> str:
    return f"patches/{name}/versions"


def removed_dir(name: str) -> str:
    return f"patches/{name}/removed"


def aliases_dir(name: str, alias: str | None = None) -> str:
    return f"patches/{name}/aliases" if alias is None else f"patches/{name}/aliases/{alias}"


def pending_dir(name: str) -> str:
    return f"patches/{name}/pending"


def pending_rel(name: str, version: int) -> str:
    return f"{pending_dir(name)}/{version}.json"


def decision_rel(name: str, version: int) -> str:
    return f"patches/{name}/decided/{version}.json"


def version_rel(name: str, version: int) -> str:
    return f"{versions_dir(name)}/{version}.json"


def removed_rel(name: str, version: int) -> str:
    return f"{removed_dir(name)}/{version}.json"


def alias_rel(name: str, alias: str, generation: int) -> str:
    return f"{aliases_dir(name, alias)}/{generation}.json"


def numbers(entries: list[str]) -> set[int]:
    """{n} for the `<n>.json` entries of a versions/removed/alias directory."""
    found = set()
    for entry in entries:
        stem, dot, ext = entry.partition(".")
        if dot and ext == "json" and stem.isascii() and stem.isdigit() and not stem.startswith("0"):
            found.add(int(stem))
    return found


def located(url: str, rel: str) -> str:
    """A registry file's full location, for messages."""
    return f"{url.rstrip('/')}/{rel}"
