"""`splice patch extract|apply`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import render
from splice.cli.options import Device, Force, Out, Quiet

patch_app = typer.Typer(no_args_is_help=True, help="Extract patches from fine-tunes and apply them to base models.")


@patch_app.command("extract")
def extract(
    base: Annotated[str, typer.Option("--base", help="The model the fine-tune started from.")],
    tuned: Annotated[str, typer.Option("--tuned", help="The fine-tuned model.")],
    kind: Annotated[str, typer.Option("--kind", help="layernorm or delta (lora and mask are coming).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch directory to write.")],
    description: Annotated[str, typer.Option(help="Free text stored in patch.json.")] = "",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Extract a patch: the tuned model's LayerNorm parameters, or its whole delta from the base."""
    from splice.adapters.extract import extract_patch
    from splice.tensors.writer import ensure_output_free

    ensure_output_free(out, force)
    patch = extract_patch(base, tuned, kind, description=description)
    patch.save(out, force=force)
    if not quiet:
        render.console.print(render.table(f"{patch.meta.kind.value} patch -> {out}",
                                          ["tensors", "parameters", "targets", "base digest"],
                                          [[len(patch.tensors), f"{patch.num_parameters:,}", len(patch.meta.targets),
                                            patch.meta.base.digest[:19]]]))


@patch_app.command("apply")
def apply(
    patches: Annotated[list[str], typer.Argument(help="Patch directories, applied in order.")],
    base: Annotated[str, typer.Option("--base", help="The base model to patch.")],
    out: Out,
    allow_base_drift: Annotated[bool, typer.Option("--allow-base-drift",
                                                   help="Apply even if the base differs from the patch's.")] = False,
    device: Device = "auto",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Apply patches to a base model, streamed; deltas add, LayerNorm patches replace."""
    from splice.adapters.apply import apply_patches

    report = apply_patches(patches, base, out, allow_base_drift=allow_base_drift, device=device, force=force,
                           progress=render.RichProgress(quiet))
    if not quiet:
        render.console.print(render.stream_report_table("patched model", report))
