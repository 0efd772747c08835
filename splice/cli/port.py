"""`splice port PATCH_OR_REF --to NEW_BASE (--out DIR | --as-patch DIR | --push NAME)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import render
from splice.cli.options import OldBase, RegistryURL, Shared, shared_options


@shared_options()
def port_command(
    patch: Annotated[
        str,
        typer.Argument(
            help="A patch directory, a PEFT adapter directory, or a registry ref (name, name@3, name@prod)."
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="The evolved base model to port the patch onto.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the new base with the ported patch applied here.")
    ] = None,
    as_patch: Annotated[
        Path | None,
        typer.Option("--as-patch", help="Write the ported patch (fingerprinted against the new base) here."),
    ] = None,
    push: Annotated[
        str | None, typer.Option("--push", help="Push the ported patch as the next version of this registry name.")
    ] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="With --push: point this alias at it.")] = None,
    message: Annotated[
        str, typer.Option("--message", "-m", help="With --push: the version's message (default: its lineage line).")
    ] = "",
    old_base: OldBase = None,
    scale: Annotated[float, typer.Option("--scale", help="Multiply the patch's update by this.")] = 1.0,
    evaluate: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="MODULE:FUNCTION scoring a state dict: run on the old base with the patch (with --from) "
            "and on the new base with the ported patch.",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report", help="Also write port_report.json and .png into this directory (--force replaces them)."
        ),
    ] = None,
    registry: RegistryURL = None,
    *,
    shared: Shared,
) -> None:
    """Port a patch made on an old base onto an evolved base, training-free (PortLLM): the patch's update is
    added to the new base's tensors. A drift report (table, port_report.json and .png beside the output) says
    how far the base moved where the patch acts; nothing is published before it and every check."""
    from splice.workflows.port import port

    outcome = port(
        patch,
        to,
        out,
        as_patch=as_patch,
        push=push,
        alias=alias,
        message=message,
        old_base=old_base,
        scale=scale,
        registry=registry,
        evaluate=evaluate,
        report_dir=report,
        run=shared.run,
    )
    render.warn(outcome.warnings)
    if shared.as_json:
        render.print_json(outcome)
        return
    if shared.quiet:
        return
    for table in render.drift_tables(outcome.drift):
        render.console.print(table)
    done = [
        f"ported model -> {out}" if out else "",
        f"ported patch -> {as_patch}" if as_patch else "",
        f"pushed {outcome.pushed.ref} ({outcome.pushed.digest[:19]})" if outcome.pushed else "",
    ]
    if outcome.score_after is not None:
        before = f"{outcome.score_before:.4g} -> " if outcome.score_before is not None else ""
        done.append(f"score {before}{outcome.score_after:.4g}")
    render.console.print("; ".join(d for d in done if d), highlight=False)
