"""What identifies a model's files: one digest for a model card's inputs and for a cached stage's key.

A digest is the sha256 of a description of the files, not of their bytes: each regular file of the model directory
with its size and modification time, and every tensor with its name, dtype, shape, shard and byte offsets (as its
safetensors header gives them; `Checkpoint.open` has parsed those already). Why not the bytes: a multi-stage recipe
digests every input on every run to know what it may reuse, and hashing a 15 GB model would read all of it each
time, the very I/O the cache is there to save; a hash recorded beside a file would need the same size and time
check to know that it still holds. What this gives: any file written again gets a new modification time, so a
changed model gets a new digest, and so does a stage splice computes again; a copy that keeps times (`rsync -a`,
`cp -p`) keeps it. What it cannot see: a file rewritten in place with the same size and its modification time set
back, or within the filesystem's timestamp resolution. Remote files are told by what the store keeps for that
(ETag, last-modified time, generation); a file on a store that keeps none is hashed whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

from splice.errors import CheckpointError, first_line
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import dtype_name
from splice.tensors.views import DerivedCheckpoint

# what fsspec backends report that changes when a file is written again (s3, gcs, azure, http, memory, hf)
_REMOTE_IDENTITY = (
    "mtime",
    "LastModified",
    "last_modified",
    "ETag",
    "etag",
    "updated",
    "generation",
    "md5Hash",
    "content_md5",
    "created",
    "blob_id",
    "lfs",
)


def checkpoint_digest(checkpoint: Checkpoint) -> str:
    """The hex sha256 that identifies `checkpoint`'s files as they are now (see the module's docstring)."""
    text = json.dumps(_description(checkpoint), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _description(checkpoint: Checkpoint) -> dict[str, Any]:
    tensors = [
        [info.name, dtype_name(info.dtype), list(info.shape), info.shard, info.start, info.end]
        for info in checkpoint.tensors.values()
    ]
    if isinstance(checkpoint, DerivedCheckpoint):
        derived = sorted(name for name in checkpoint.derived)
        return {
            "inner": _description(checkpoint.inner),
            "derived": derived,
            "tensors": tensors,
            "derived_from": [_description(source) for source in checkpoint.derived_from],
        }
    try:
        files = _local_files(checkpoint) if checkpoint.is_local else _remote_files(checkpoint)
    except OSError as exc:
        raise CheckpointError(f"cannot list the files of {checkpoint.location}: {first_line(exc)}") from exc
    return {"files": files, "tensors": tensors}


def _local_files(checkpoint: Checkpoint) -> dict[str, list[int]]:
    """name -> [size, modification time in ns] of each regular file (a link followed: a Hub cache's blobs)."""
    files = {}
    for name in checkpoint.files():
        try:
            found = os.stat(os.path.join(checkpoint.root, name))
        except FileNotFoundError:  # a dangling link
            continue
        if stat.S_ISREG(found.st_mode):
            files[name] = [found.st_size, found.st_mtime_ns]
    return files


def _remote_files(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    files = {}
    for info in checkpoint.fs.ls(checkpoint.root, detail=True):
        if info.get("type") != "file":
            continue
        name = os.path.basename(str(info["name"]).rstrip("/"))
        kept = {key: info[key] for key in _REMOTE_IDENTITY if info.get(key) is not None}
        if not kept:
            kept = {"sha256": _hash_whole(checkpoint, str(info["name"]))}
        files[name] = {"size": info.get("size"), **kept}
    return files


def _hash_whole(checkpoint: Checkpoint, path: str) -> str:
    digest = hashlib.sha256()
    with checkpoint.fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
