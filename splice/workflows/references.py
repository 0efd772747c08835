"""Model references resolved as mergekit configs write them, and opened.

A reference (`splice.merge.reference_syntax`) names a model and, after `+`, an adapter applied to it on the fly.
Each part is, in this order (mergekit's: a local path wins):
- a URL (s3://, hf://, ...), opened through fsspec; `hf://` reads the Hub through huggingface_hub's filesystem,
  so it is refused at once when huggingface_hub is offline (`HF_HUB_OFFLINE=1`);
- a local path, as written (a revision after it is refused: a directory has none);
- a Hub repo id (`org/name`, `org/name@revision`), read from the local Hugging Face cache (`HF_HUB_CACHE`, else
  `HF_HOME`/hub), never downloaded;
- else a path that does not exist, which opening reports.
A reference that is itself an existing local path (a directory named `a+b`) is that path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splice.adapters.on_read import patched_checkpoint
from splice.errors import CheckpointError, PatchError, SpliceError
from splice.merge.reference_syntax import URL, PathAt, parse_reference
from splice.tensors.checkpoint import Checkpoint, recorded_location, split_location

HUB_SCHEME = "hf://"


@dataclass(frozen=True)
class ResolvedReference:
    written: str  # as the recipe writes it
    model: str  # a local directory (a snapshot in the Hugging Face cache, for a repo id) or a URL
    adapter: str | None  # the same, of the adapter applied on the fly
    reads: tuple[str, ...]  # what an output must not overlap (for a repo id: its whole folder in the cache)


def resolve_reference(text: str) -> ResolvedReference:
    """Where a reference's model and adapter are; a repo id that is not in the cache is a one-line error."""
    if os.path.exists(text):
        return ResolvedReference(text, text, None, (text,))
    parts = parse_reference(text)
    model, model_reads = _locate(parts.model, text, "model")
    if parts.adapter is None:
        return ResolvedReference(text, model, None, (model_reads,))
    adapter, adapter_reads = _locate(parts.adapter, text, "adapter")
    return ResolvedReference(text, model, adapter, (model_reads, adapter_reads))


def reference_locations(references: Sequence[str]) -> list[str]:
    """Every location the references read: what an output must not overlap."""
    return [location for reference in references for location in resolve_reference(reference).reads]


def model_location(reference: str) -> str:
    """Where the reference's model is: the directory whose config and tokenizer a merge of it writes."""
    return resolve_reference(reference).model


def recorded_reference(reference: str) -> str:
    """A reference as a record keeps it (`recorded_location` of each local part), so it means the same model to
    another working directory."""
    if os.path.exists(reference):
        return recorded_location(reference)
    parts = parse_reference(reference)
    kept = [parts.model, *([parts.adapter] if parts.adapter is not None else [])]
    return "+".join(
        recorded_location(str(part)) if not URL.match(part.path) and os.path.exists(str(part)) else str(part)
        for part in kept
    )


def recorded_statistics(reference: str) -> str:
    """A `stats:` (or a `mask:`) as a record keeps it: a local directory absolute; a URL or a registry ref as is."""
    return recorded_location(reference) if "://" not in reference and os.path.exists(reference) else reference


def recorded_hook(hook: str) -> str:
    """A `data:` hook as a record keeps it: path/to/file.py:FUNCTION with the file absolute; MODULE:FUNCTION as
    written."""
    module, sep, function = hook.rpartition(":")
    if sep and os.path.isfile(module):
        return f"{recorded_location(module)}:{function}"
    return hook


def open_reference(reference: str, storage_options: dict | None = None) -> Checkpoint:
    """The model a reference names, with its adapter applied on the fly (streamed: nothing is merged ahead)."""
    resolved = resolve_reference(reference)
    if resolved.adapter is not None:
        _check_adapter_exists(resolved.adapter, storage_options, reference)
    model = Checkpoint.open(resolved.model, storage_options)
    if resolved.adapter is None:
        return model
    try:
        return patched_checkpoint(model, resolved.adapter, storage_options, location=reference)
    except SpliceError as exc:
        model.close()
        raise PatchError(f"model {reference}: {exc}") from None


def open_model_references(references: Sequence[str], storage_options: dict | None = None) -> list[Checkpoint]:
    """Each model reference of a recipe opened, in order."""
    if not references:
        raise SpliceError("no models given")
    return [open_reference(reference, storage_options) for reference in references]


def _check_adapter_exists(adapter: str, storage_options: dict | None, reference: str) -> None:
    fs, root = split_location(adapter, storage_options)
    if not fs.exists(root):
        raise PatchError(
            f"model {reference}: adapter {adapter} not found; after '+' give a PEFT adapter directory or a splice patch"
        )


def _locate(part: PathAt, reference: str, role: str) -> tuple[str, str]:
    """(where one part of a reference is, what an output must not overlap there)."""
    if URL.match(part.path):
        if part.path.startswith(HUB_SCHEME):
            _refuse_offline_hub(part.path, reference)
        return part.path, part.path
    if part.revision is not None and os.path.exists(str(part)):  # a local path with an `@` in it
        return str(part), str(part)
    if os.path.exists(part.path):
        if part.revision is not None:
            raise _error(
                role,
                f"model {reference}: {part.path} is a local directory, which has no revision {part.revision}; "
                f"write {part.path} to read it, or move it away to read the cached Hub repo of that name",
            )
        return part.path, part.path
    if not _is_repo_id(part.path):
        return part.path, part.path  # opening it says it is not there
    snapshot = _cached_snapshot(part, reference, role)
    return snapshot, str(Path(snapshot).parent.parent)  # models--org--name: its blobs are what the snapshot holds


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(part: PathAt, reference: str, role: str) -> str:
    """The snapshot directory of a repo id at its revision (default main) in the local Hugging Face cache."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    repo, revision = part.path, part.revision or constants.DEFAULT_REVISION
    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except errors.LocalEntryNotFoundError as exc:
        cache = Path(constants.HF_HUB_CACHE)
        folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
        if not folder.is_dir():
            what = (
                f"{repo} (revision {revision}) is not a local directory, and not in the Hugging Face cache at {cache}"
            )
        elif type(exc).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 2 knows a download was cut short
            what = f"revision {revision} of {repo} is only partly in the Hugging Face cache at {cache}"
        else:
            refs = folder / "refs"
            cached = sorted(ref.name for ref in refs.iterdir()) if refs.is_dir() else []
            held = f" (it holds {', '.join(cached)})" if cached else ""
            what = f"revision {revision} of {repo} is not in the Hugging Face cache at {cache}{held}"
        get = f"hf download {repo}{'' if part.revision is None else f' --revision {revision}'}"
        raise _error(
            role, f"model {reference}: {what}; get it with `{get}` (splice reads the cache, it never downloads)"
        ) from None


def _refuse_offline_hub(url: str, reference: str) -> None:
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        repo = url[len(HUB_SCHEME) :]
        raise CheckpointError(
            f"model {reference}: {url} reads the Hugging Face Hub, and huggingface_hub is offline (HF_HUB_OFFLINE); "
            f"for a model in the local cache write its repo id ({repo}), or go online"
        )


def _error(role: str, message: str) -> SpliceError:
    return PatchError(message) if role == "adapter" else CheckpointError(message)
