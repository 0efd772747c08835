"""`splice deploy REF... --base B --out DIR`."""

from __future__ import annotations

from typing import Annotated

import typer

from splice.cli import render
from splice.cli.options import OldBase, Out, RegistryURL, Shared, shared_options


@shared_options()
def deploy_command(
    refs: Annotated[
        list[str], typer.Argument(help="Registry refs (name, name@3, name@prod, name@sha256:...), applied in order.")
    ],
    base: Annotated[str, typer.Option("--base", help="The base model to deploy onto.")],
    out: Out,
    registry: RegistryURL = None,
    allow_base_drift: Annotated[
        bool, typer.Option("--allow-base-drift", help="Deploy even if the base differs from the patches'.")
    ] = False,
    port: Annotated[
        bool,
        typer.Option(
            "--port", help="Port each patch onto the base first (PortLLM), with a drift report beside the output."
        ),
    ] = False,
    old_base: OldBase = None,
    *,
    shared: Shared,
) -> None:
    """Resolve patch refs in the registry, check them against the base, apply them streamed, and record
    which versions the deployed model carries (in its weights' metadata and deployment.json)."""
    from splice.workflows.deploy import deploy

    record, report = deploy(
        refs,
        base,
        out,
        registry=registry,
        allow_base_drift=allow_base_drift,
        port=port,
        old_base=old_base,
        run=shared.run,
    )
    render.warn(record.warnings)
    if shared.as_json:
        render.print_json({"deployment": record, "stream": report})
    elif not shared.quiet:
        render.console.print(render.deployment_table(f"deployed onto {base} -> {out}", record))
        render.console.print(render.stream_report_table("deployed model", report))
