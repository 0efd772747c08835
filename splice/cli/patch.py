"""`splice patch extract|apply|merge|export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import render
from splice.cli.options import (
    Force,
    Out,
    Quiet,
    RegistryURL,
    Shared,
    StorageOptions,
    parse_storage_options,
    parse_weights,
    shared_options,
)

patch_app = typer.Typer(help="Extract patches from fine-tunes, apply them to base models, merge and export them.")


@patch_app.command("extract")
@shared_options(shard_size=False)
def extract(
    base: Annotated[str, typer.Option("--base", help="The model the fine-tune started from.")],
    tuned: Annotated[str, typer.Option("--tuned", help="The fine-tuned model.")],
    kind: Annotated[str, typer.Option("--kind", help="layernorm, lora, mask or delta.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch directory to write.")],
    rank: Annotated[int | None, typer.Option(help="lora: rank of every matrix (the most, with --energy).")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="lora: per matrix, the smallest rank keeping this share of the delta's energy, e.g. 0.9."),
    ] = None,
    rslora: Annotated[
        bool, typer.Option("--rslora", help="lora: scale by alpha/sqrt(rank) (rank-stabilised).")
    ] = False,
    density: Annotated[float | None, typer.Option(help="mask: share of entries kept, e.g. 0.01.")] = None,
    mask_scope: Annotated[
        str, typer.Option("--mask-scope", help="mask: top-k per 'tensor' or over the whole 'model'.")
    ] = "tensor",
    mask_values: Annotated[
        bool,
        typer.Option(
            "--mask-values/--mask-only",
            help="mask: store the selected delta values (a sparse delta), or the mask alone.",
        ),
    ] = True,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            metavar="PATTERN",
            help="layernorm: also carry the changed tensors this glob names (repeatable; "
            "the changed classification head is carried without it).",
        ),
    ] = None,
    localize: Annotated[
        bool,
        typer.Option(
            "--localize",
            help="mask: learn the region on --data (skill localization) instead of taking the largest changes.",
        ),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="--localize: MODULE:FUNCTION or file.py:FUNCTION returning {'train': batch, 'test': batch}, "
            "labelled batches of model inputs (dicts of tensors with int64 'labels').",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="--localize: learning steps (0: the magnitude mask; default 20).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="--localize: how far a step moves the score with the largest gradient (default 30)."),
    ] = None,
    l1: Annotated[
        float | None, typer.Option(help="--localize: weight of the sparsity penalty on the relaxed mask (default 0).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="--localize: seed of the scores' initialisation (default 0).")
    ] = None,
    candidates: Annotated[
        float | None,
        typer.Option(
            help="--localize: learn the region among this many times its size of the entries the fine-tune changed "
            "most (default 100; 0: among all of them, the most memory)."
        ),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            help="--localize: grafts carry the fine-tune's changed classification head ('fine-tuned') or keep the "
            "pretrained one ('pretrained'; default 'fine-tuned')."
        ),
    ] = None,
    description: Annotated[str, typer.Option(help="Free text stored in patch.json.")] = "",
    *,
    shared: Shared,
) -> None:
    """Extract a patch from a fine-tune: its LayerNorm parameters, a low-rank (LoRA) or sparse (mask)
    approximation of its delta, the whole delta, or (--kind mask --localize) the small region of its change that,
    grafted onto the base, keeps what it learned on --data."""
    from splice.adapters.extract import extract_patch_to

    learning = {"steps": steps, "lr": lr, "l1": l1, "seed": seed, "candidates": candidates, "head": head}
    if localize:
        given: dict[str, Any] = {name: value for name, value in learning.items() if value is not None}
        if candidates == 0:
            given["candidates"] = None  # every changed entry
        _extract_localized(base, tuned, kind, out, data, density, mask_scope, mask_values, given, description, shared)
        return
    stray = [f"--{name}" for name, value in {"data": data, **learning}.items() if value is not None]
    if stray:
        from splice.errors import SpliceError

        raise SpliceError(f"{', '.join(stray)} go with --localize (a mask learned on data); add it or leave them out")
    extracted = extract_patch_to(
        out,
        base,
        tuned,
        kind,
        description=description,
        rank=rank,
        energy=energy,
        rslora=rslora,
        density=density,
        mask_scope=mask_scope,
        mask_values=mask_values,
        include=tuple(include or ()),
        run=shared.run,
    )
    for warning in extracted.warnings:
        render.error_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    patch, size = extracted.patch, extracted.patch.size
    bits = ["mask bits"] if size.mask_bits else []
    if shared.as_json:
        render.print_json({"out": out, **render.jsonable(extracted)})
    elif not shared.quiet:
        render.console.print(
            render.table(
                f"{patch.meta.kind.value} patch -> {out}",
                ["tensors", "parameters", *bits, "targets", "base fingerprint"],
                [
                    [
                        len(patch.tensors),
                        f"{size.values:,}",
                        *([f"{size.mask_bits:,}"] if bits else []),
                        len(patch.meta.targets),
                        patch.meta.base.digest[:19] if patch.meta.base else "none",
                    ]
                ],
            )
        )


def _extract_localized(
    base: str,
    tuned: str,
    kind: str,
    out: Path,
    data: str | None,
    density: float | None,
    mask_scope: str,
    mask_values: bool,
    learning: dict[str, Any],
    description: str,
    shared: Shared,
) -> None:
    from splice.errors import SpliceError
    from splice.workflows.localize import localize

    if kind != "mask":
        raise SpliceError(f"--localize learns a mask patch: give --kind mask, not --kind {kind}")
    if data is None:
        raise SpliceError("--localize needs --data MODULE:FUNCTION returning {'train': batch, 'test': batch}")
    if density is None:
        raise SpliceError("--localize needs --density, the share of the layers' entries in the region (e.g. 0.0001)")
    if mask_scope != "tensor" or not mask_values:
        raise SpliceError(
            "--localize finds one region over the whole model with its values: leave out --mask-scope and --mask-only"
        )
    outcome = localize(
        base,
        tuned,
        data,
        density=density,
        description=description,
        out=out,
        run=shared.run,
        **learning,
    )
    render.warn(outcome.warnings)
    if shared.as_json:
        render.print_json({"out": out, **render.jsonable(outcome)})
    elif not shared.quiet:
        render.console.print(render.localization_table(outcome, out))


@patch_app.command("apply")
@shared_options(shard_size=False)
def apply(
    patches: Annotated[list[str], typer.Argument(help="Patch directories, applied in order.")],
    base: Annotated[str, typer.Option("--base", help="The base model to patch.")],
    out: Out,
    allow_base_drift: Annotated[
        bool, typer.Option("--allow-base-drift", help="Apply even if the base differs from the patch's.")
    ] = False,
    *,
    shared: Shared,
) -> None:
    """Apply patches (splice patch or PEFT adapter directories) to a base model, streamed; deltas, LoRA and
    sparse deltas add, masks multiply, LayerNorm patches replace."""
    from splice.adapters.apply import apply_patches

    report = apply_patches(patches, base, out, allow_base_drift=allow_base_drift, run=shared.run)
    if shared.as_json:
        render.print_json(report)
    elif not shared.quiet:
        render.console.print(render.stream_report_table("patched model", report))


def _parse_parameters(pairs: list[str] | None) -> dict[str, str]:
    """--param lambda=0.8 --param normalize=true as a mapping (values read as the method's types later)."""
    from splice.errors import SpliceError

    parameters: dict[str, str] = {}
    for pair in pairs or []:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise SpliceError(f"--param {pair!r}: give NAME=VALUE, e.g. --param lambda=0.8")
        parameters[key.strip()] = value.strip()
    return parameters


@patch_app.command("merge")
@shared_options(shard_size=False)
def merge(
    patches: Annotated[
        list[str], typer.Argument(help="Patch directories, PEFT adapter directories or registry refs, of one kind.")
    ],
    method: Annotated[
        str, typer.Option("--method", help="linear, task_arithmetic, ties, dare_ties, dare_linear, della, ...")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch directory to write.")],
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weights, one per patch (default 1 each).")
    ] = None,
    density: Annotated[float | None, typer.Option(help="ties, dare, della, ...: share of each change kept.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", metavar="NAME=VALUE", help="Another parameter of the method, e.g. lambda=0.8."),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="lora: re-factor every merged matrix to this rank (default for linear and task_arithmetic: the "
            "factors concatenated, exact, rank = the sum of the ranks)."
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="lora: per matrix, the smallest rank keeping this share of the merged change, e.g. 0.99."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for the random methods (dare_ties, dare_linear, della).")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="The base the patches were made on: needed for layernorm patches; checks every patch."
        ),
    ] = None,
    registry: RegistryURL = None,
    description: Annotated[str, typer.Option(help="Free text stored in patch.json.")] = "",
    *,
    shared: Shared,
) -> None:
    """Merge patches of one kind into one patch with a merge method, without building a model: LoRA patches
    (and PEFT LoRA adapters) into a LoRA patch, layernorm, delta and sparse mask patches into one of their kind."""
    from splice.workflows.patch_merge import merge_patches

    report = merge_patches(
        patches,
        out,
        method,
        weights=parse_weights(weights),
        density=density,
        parameters=_parse_parameters(param),
        rank=rank,
        energy=energy,
        seed=seed,
        base=base,
        registry=registry,
        description=description,
        run=shared.run,
    )
    render.warn(report.warnings)
    if shared.as_json:
        render.print_json(report)
    elif not shared.quiet:
        render.console.print(render.patch_merge_table(report))


@patch_app.command("export")
def export(
    patch: Annotated[str, typer.Argument(help="The patch directory (or PEFT adapter) to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
    peft: Annotated[
        bool, typer.Option("--peft", help="Write a PEFT adapter: LoRA patches as LORA, LayerNorm patches as LN_TUNING.")
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The base model, for transformers' module names (default: the one the patch was extracted from).",
        ),
    ] = None,
    storage_options: StorageOptions = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write a patch in another library's format (PEFT)."""
    from splice.adapters.export import export_peft
    from splice.errors import SpliceError

    if not peft:
        raise SpliceError("choose the format to export to: --peft (a PEFT adapter; LoRA and LayerNorm patches)")
    written = export_peft(patch, out, base=base, force=force, storage_options=parse_storage_options(storage_options))
    if not quiet:
        render.console.print(f"PEFT adapter -> {written}")
