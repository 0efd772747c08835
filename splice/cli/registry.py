"""`splice registry init|push|pull|ls|show|tag|diff|rm|gc|verify`: each parses, makes one library call on the
opened registry, and renders. The commands that only move bytes import neither torch nor transformers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from splice.cli import render
from splice.cli.options import Force, Json, Quiet, RegistryURL, StorageOptions, parse_storage_options
from splice.cli.render import show as _print

if TYPE_CHECKING:
    import datetime

    from rich.table import Table

    from splice.registry import Registry
    from splice.workflows.listing import VersionDetails

registry_app = typer.Typer(help="A versioned patch registry on any fsspec location (local by default).")

RefArg = Annotated[
    str,
    typer.Argument(help="NAME, NAME@VERSION, NAME@ALIAS or NAME@sha256:DIGEST (or a short digest, as `ls` prints it)."),
]


def _open(registry: str | None, storage_options: str | None) -> Registry:
    from splice.registry import Registry

    return Registry.open(registry, parse_storage_options(storage_options))


def _short(digest: str) -> str:
    return digest[:19]


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@registry_app.command("init")
def init(registry: RegistryURL = None, storage_options: StorageOptions = None, quiet: Quiet = False) -> None:
    """Create a registry at --registry (idempotent)."""
    from splice.registry import Registry

    opened = Registry.init(registry, parse_storage_options(storage_options))
    _print(
        f"registry at {opened.url} (format {opened.info.format_version}, versions created exclusively by "
        f"{opened.info.exclusive_create or 'unknown'})",
        quiet,
    )


@registry_app.command("push")
def push(
    name: Annotated[str, typer.Argument(help="Patch name: lowercase letters, digits, '.', '_', '-'.")],
    patch_dir: Annotated[str, typer.Argument(help="A splice patch directory or a PEFT adapter directory.")],
    alias: Annotated[str | None, typer.Option("--alias", help="Point this alias at the new version.")] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Stored with the version.")] = "",
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="The model the patch was made on (needed for a PEFT adapter, which records no base)."
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="The most seconds to wait for running `registry gc`s before giving up (0 to 3600)."
        ),
    ] = 300,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Store a patch as the next version of NAME (published only once its blobs are confirmed)."""
    from splice.errors import Interrupted
    from splice.workflows.publish import publish_patch

    try:
        pushed = publish_patch(
            _open(registry, storage_options), name, patch_dir, alias=alias, message=message, base=base, wait=wait
        )
    except Interrupted as exc:
        render.interrupted(str(exc))
    manifest, stats = pushed.manifest, pushed.stats
    if as_json:
        render.print_json({**render.jsonable(manifest), "push_stats": stats})
        return
    _print(f"pushed {manifest.ref} ({manifest.digest})", quiet)
    _print(
        render.table(
            "",
            ["kind", "tensors", "size", "new blob bytes", "reused blob bytes", "alias"],
            [
                [
                    manifest.meta.kind.value,
                    len(manifest.tensors),
                    render.human_bytes(manifest.nbytes),
                    f"{stats.bytes_written:,}",
                    f"{stats.bytes_reused:,}",
                    alias or "",
                ]
            ],
        ),
        quiet,
    )


@registry_app.command("pull")
def pull(
    ref: RefArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch directory to write (must not exist, or --force).")],
    force: Force = False,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    quiet: Quiet = False,
) -> None:
    """Write a version as a splice patch directory, every blob hash-checked."""
    manifest = _open(registry, storage_options).pull_version(ref, out, force=force)
    _print(f"pulled {manifest.ref} ({manifest.digest}) -> {out}", quiet)


def _names_table(opened: Registry) -> tuple[Table, list[str]]:
    from splice.workflows.listing import summarize_names

    summary = summarize_names(opened)
    rows: list[list[object]] = [
        [
            s.name,
            "" if s.latest is None else s.latest,
            s.versions,
            ", ".join(f"{a}={r.version}" for a, r in s.aliases.items()),
        ]
        for s in summary
    ]
    problems = [line for s in summary for line in s.problems]
    return render.table(f"registry {opened.url}", ["name", "latest", "versions", "aliases"], rows), problems


def _versions_table(opened: Registry, name: str) -> tuple[Table, list[str]]:
    from splice.workflows.listing import list_versions

    rows = []
    listed, problems = list_versions(opened, name)
    for manifest, pointing in listed:
        rows.append(
            [
                manifest.version,
                _short(manifest.digest),
                manifest.meta.kind.value,
                len(manifest.tensors),
                render.human_bytes(manifest.nbytes),
                _when(manifest.pushed_at),
                ", ".join(pointing),
                manifest.message,
            ]
        )
    return render.table(
        f"{name} in {opened.url}",
        ["version", "digest", "kind", "tensors", "size", "pushed", "aliases", "message"],
        rows,
    ), problems


def _listing_json(opened: Registry, name: str | None) -> dict:
    """`ls --json`: every name's summary, or one name's versions (each manifest with the aliases pointing at it)."""
    from splice.workflows.listing import list_versions, summarize_names

    if name is None:
        return {"registry": opened.url, "names": summarize_names(opened)}
    listed, problems = list_versions(opened, name)
    return {
        "registry": opened.url,
        "name": name,
        "problems": problems,
        "versions": [{**render.jsonable(manifest), "aliases": pointing} for manifest, pointing in listed],
    }


@registry_app.command("ls")
def ls(
    name: Annotated[str | None, typer.Argument(help="List this name's versions instead of all names.")] = None,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Patch names with their latest version and aliases, or the versions of one name."""
    opened = _open(registry, storage_options)
    if as_json:
        render.print_json(_listing_json(opened, name))
        return
    table, problems = _names_table(opened) if name is None else _versions_table(opened, name)
    _print(table)
    for line in problems:
        _print(f"problem: {line}")


def _version_rows(details: VersionDetails) -> list[list[object]]:
    from splice.adapters.patch import describe_settings

    manifest, meta, size = details.manifest, details.manifest.meta, details.manifest.size
    base = (
        f"{meta.base.digest} ({len(meta.base.tensors)} base tensors touched, {len(meta.base.context)} others sampled)"
        if meta.base
        else "none (made elsewhere, e.g. PEFT: checked by shape only)"
    )
    targets = ", ".join(meta.targets[:4]) + (f", ... ({len(meta.targets)} in all)" if len(meta.targets) > 4 else "")
    mask_bits: list[list[object]] = [["mask bits", f"{size.mask_bits:,}"]] if size.mask_bits else []
    return [
        ["version", manifest.ref],
        ["digest", manifest.digest],
        ["kind", meta.kind.value],
        ["base fingerprint", base],
        ["size", f"{manifest.nbytes:,} bytes ({render.human_bytes(manifest.nbytes)})"],
        ["parameters", f"{size.values:,}"],
        *mask_bits,
        ["tensors", len(manifest.tensors)],
        ["targets", targets],
        ["lineage", ", ".join(meta.lineage) or "none"],
        ["metrics", ", ".join(f"{k}={v:.6g}" for k, v in meta.metrics.items()) or "none"],
        ["tags", ", ".join(meta.tags) or "none"],
        ["description", meta.description or ""],
        ["settings", describe_settings(meta)],
        ["created", _when(meta.created)],
        ["pushed", _when(manifest.pushed_at)],
        ["message", manifest.message],
        ["aliases", ", ".join(details.pointing) or "none"],
    ]


@registry_app.command("show")
def show(
    ref: RefArg, registry: RegistryURL = None, storage_options: StorageOptions = None, as_json: Json = False
) -> None:
    """Everything about one version: kind, base fingerprint, size, lineage, metrics, aliases and their history,
    and every base the name's versions were deployed or ported onto (with drift figures and scores)."""
    from splice.workflows.listing import version_details

    details = version_details(_open(registry, storage_options), ref)
    if as_json:
        render.print_json(details)
        return
    _print(render.table(f"{details.manifest.ref}", ["field", "value"], _version_rows(details)))
    history: list[list[object]] = [
        [alias, record.generation, record.version, _when(record.moved_at), "current" if record is records[-1] else ""]
        for alias, records in details.history.items()
        for record in records
    ]
    if history:
        _print(
            render.table(
                f"aliases of {details.manifest.name} (history)",
                ["alias", "generation", "version", "moved", ""],
                history,
            )
        )
    if details.health:
        _print(render.health_table(details.manifest.name, details.health))
    render.warn(details.health_problems)


@registry_app.command("tag")
def tag(
    ref: RefArg,
    alias: Annotated[str, typer.Argument(help="Alias to point at REF's version, e.g. prod or task-3.")],
    force: Annotated[
        bool, typer.Option("--force", help="Move an alias whose current file is damaged (repairs it).")
    ] = False,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    quiet: Quiet = False,
) -> None:
    """Point an alias at a version (compare-and-swap: a concurrent move makes this fail, not vanish)."""
    from splice.registry import check_alias, parse_ref

    check_alias(alias)  # a bad alias is refused before the registry is opened
    record = _open(registry, storage_options).tag(ref, alias, force=force)
    _print(
        f"alias {alias} of {parse_ref(ref).name} -> version {record.version} (generation {record.generation})", quiet
    )


@registry_app.command("diff")
def diff(
    ref_a: RefArg,
    ref_b: RefArg,
    factors: Annotated[
        bool,
        typer.Option(
            "--factors", help="Two LoRA versions: also compare their factors tensor by tensor (shapes, values)."
        ),
    ] = False,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Compare two versions tensor by tensor; two LoRA versions by their effective updates (scale * B @ A) per
    base tensor."""
    report = _open(registry, storage_options).diff(ref_a, ref_b, factors=factors)
    if as_json:
        render.print_json(report)
        return
    if report.identical:
        _print(f"{report.a} and {report.b} are identical ({report.digest_a})")
        return
    if report.updates is not None:
        _print(
            render.table(
                f"{report.a} -> {report.b}: effective updates U = scale * B @ A per base tensor",
                ["tensor", "status", "rank", "||U_a||", "||U_b||", "||U_b - U_a|| / ||U_a||", "cosine"],
                [
                    [
                        u.name,
                        u.status,
                        f"{_rank(u.rank_a)} -> {_rank(u.rank_b)}",
                        _number(u.norm_a),
                        _number(u.norm_b),
                        _number(u.relative),
                        "" if u.cosine is None else f"{u.cosine:+.4f}",
                    ]
                    for u in report.updates
                ],
            )
        )
    if report.tensors:
        rows = [
            [
                t.name,
                t.status,
                "" if t.shape_a is None else list(t.shape_a),
                "" if t.shape_b is None else list(t.shape_b),
                _number(t.max_abs_diff),
                _number(t.relative_l2),
            ]
            for t in report.tensors
        ]
        title = f"{report.a} -> {report.b}" + (
            " (tensors other than LoRA factors)" if report.updates is not None and not factors else ""
        )
        _print(
            render.table(
                title, ["tensor", "status", f"shape {report.a}", f"shape {report.b}", "max |diff|", "relative L2"], rows
            )
        )
    listed = report.updates if report.updates is not None else report.tensors
    counts = {s: sum(t.status == s for t in listed) for s in ("added", "removed", "changed", "unchanged")}
    meta = f"; meta differs in {', '.join(report.meta_changes)}" if report.meta_changes else ""
    what = "updates: " if report.updates is not None else ""
    _print(what + ", ".join(f"{n} {s}" for s, n in counts.items()) + meta)


def _rank(rank: int | None) -> str:
    return "-" if rank is None else str(rank)


@registry_app.command("rm")
def rm(ref: RefArg, registry: RegistryURL = None, storage_options: StorageOptions = None, quiet: Quiet = False) -> None:
    """Remove a version (its number is never reused; `gc` frees its blobs)."""
    removed = _open(registry, storage_options).remove(ref)
    note = f"; aliases still pointing at it: {', '.join(removed.pointing)}" if removed.pointing else ""
    _print(f"removed {removed.ref} ({removed.digest or 'a manifest that did not validate'}){note}", quiet)


@registry_app.command("gc")
def gc(
    grace: Annotated[float, typer.Option("--grace", help="Only remove files older than this many seconds.")] = 3600,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Remove blobs no live version uses, and stale temp files, older than the grace period."""
    report = _open(registry, storage_options).gc(grace_seconds=grace)
    if as_json:
        render.print_json(report)
        return
    _print(
        render.table(
            "gc",
            ["blobs removed", "bytes freed", "temp files removed", "blobs in use", "unused but young"],
            [
                [
                    report.blobs_removed,
                    f"{report.bytes_freed:,}",
                    report.temps_removed,
                    report.blobs_kept_live,
                    report.blobs_kept_young,
                ]
            ],
        ),
        quiet,
    )
    for line in report.bad_manifests:
        _print(f"kept every blob named by a version whose manifest does not validate: {line}")
    for line in report.pending_withdrawn + report.pending_completed + report.leases_removed:
        _print(line, quiet)
    for line in report.pending_kept:
        _print(f"kept: {line}", quiet)


@registry_app.command("verify")
def verify(
    repair: Annotated[
        bool, typer.Option("--repair", help="Write damaged or missing blobs again, from --from.")
    ] = False,
    source: Annotated[
        str | None,
        typer.Option(
            "--from", help="With --repair: a patch directory holding the damaged tensors (e.g. the one pushed)."
        ),
    ] = None,
    registry: RegistryURL = None,
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Re-hash every blob and check every version's blobs and every alias; exit 1 if anything is wrong."""
    from splice.registry import RegistryError

    if repair != (source is not None):
        raise RegistryError(
            "--repair and --from go together: `splice registry verify --repair --from PATCH_DIR` "
            "writes damaged blobs again from that patch"
        )
    report = _open(registry, storage_options).verify(repair_from=source)
    if as_json:
        render.print_json(report)
        if not report.ok:
            raise SystemExit(1)
        return
    for path in report.repaired:
        _print(f"repaired {path}")
    for line in report.pending:
        _print(f"note: {line}")
    if report.ok:
        versions = f"{report.versions_checked} version{'s' if report.versions_checked != 1 else ''}"
        _print(f"ok: {report.blobs_checked} blobs ({report.bytes_checked:,} bytes) and {versions} verified")
        return
    rows = [[p.problem, p.path, p.detail, ", ".join(p.versions) or "none"] for p in report.problems]
    rows += [["bad manifest", line, "", ""] for line in report.bad_manifests]
    rows += [["bad alias", line, "", ""] for line in report.bad_aliases]
    _print(render.table("registry verify: problems", ["problem", "blob", "detail", "versions broken"], rows))
    raise SystemExit(1)  # not typer.Exit: main() runs click with standalone_mode=False, which swallows its code
