"""`splice demo`: the whole soup workflow on tiny models it builds, in a workspace it cleans up."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from splice.cli import render
from splice.cli.flags import with_flags


def show_demo(keep: Path | None = None) -> None:
    """Run the demo (splice.demo.run) and show what it found."""
    from splice.demo.run import INGREDIENTS, run_demo
    from splice.demo.soups import best_ingredient

    console = render.console
    console.rule("[bold]splice demo: model soups")
    console.print(
        f"Pretraining a tiny ViT on part of scikit-learn's digits, then fine-tuning {INGREDIENTS} "
        "copies of it with different learning rates, seeds and augmentations..."
    )
    demo = run_demo(keep, progress=render.RichProgress)
    summary, results = demo.soup_summary, demo.soups
    console.print(
        render.table(
            "what a soup holds (splice inspect)",
            ["architecture", "tensors", "parameters", "LayerNorm modules", "size"],
            [
                [
                    summary.architecture,
                    summary.tensors,
                    f"{summary.parameters:,}",
                    len(summary.norm_modules),
                    render.human_bytes(summary.nbytes),
                ]
            ],
        )
    )
    console.print(soup_study_table(results))
    best = best_ingredient(results)
    greedy, uniform = results["greedy_soup"], results["uniform_soup"]
    console.print(
        f"Greedy soup kept {greedy['kept']} of {INGREDIENTS} ingredients: held-out {greedy['val']:.2%} "
        f"vs the best ingredient's {best['val']:.2%}; test {greedy['test']:.2%} vs {best['test']:.2%}."
    )
    console.print(f"Uniform soup: held-out {uniform['val']:.2%}, test {uniform['test']:.2%}.")
    show_patch_study(demo.patches)
    console.print(f"Took {demo.seconds:.1f} s.")
    if demo.kept_in is None:
        console.print("Nothing was left behind: the workspace was a temporary directory and is gone.")
    else:
        console.print(
            f"Wrote to {keep}: base/, {INGREDIENTS} ingredient-*/ directories, uniform-soup/, greedy-soup/, "
            "patches/ (the LoRA + LayerNorm fine-tune, registry/, deployed/)."
        )


def show_patch_study(patches: dict) -> None:
    console = render.console
    console.rule("[bold]splice demo: patches, the registry and deployment")
    console.print(
        "Fine-tuned only rank-4 LoRA updates of the attention query/value weights and the LayerNorms, "
        "then extracted both patches and pushed them to a registry (alias prod):"
    )
    console.print(
        render.table(
            "registry",
            ["version", "kind", "parameters", "content digest"],
            [[p["ref"], p["kind"], f"{p['parameters']:,}", p["digest"][:23]] for p in patches["patches"]],
        )
    )
    record = patches["record"]
    console.print(render.deployment_table("splice deploy digits-ln@prod digits-lora@prod --base base/", record))
    accuracy = patches["accuracy"]
    console.print(
        f"Test accuracy: base {accuracy['base']:.2%}, LoRA + LayerNorm fine-tune "
        f"{accuracy['fine-tune']:.2%}, deployed {accuracy['deployed']:.2%}; the deployed model's logits "
        f"differ from the fine-tune's by at most {patches['max_logit_difference']:.1e} on the "
        f"{patches['probe_count']} test digits."
    )
    verdict = "and nothing was written" if not patches["wrote_refused_output"] else "BUT an output was written"
    console.print(f"Deploying onto a different base (a soup ingredient) was refused, {verdict}:")
    console.print(f"  error: {with_flags(patches['refusal'])}", highlight=False, soft_wrap=True)


def soup_study_table(results: dict) -> Table:
    table = Table(title=f"model soups on digits (seed {results['seed']})", box=box.SIMPLE_HEAD)
    for column in ("model", "lr", "noise", "shift", "held-out", "test", "greedy"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    pct = "{:.2%}".format
    base = results["base"]
    table.add_row("base (shared init)", "", "", "", pct(base["val"]), pct(base["test"]), "", style="dim")
    for index, item in enumerate(results["ingredients"]):
        table.add_row(
            f"ingredient {index:02d}",
            f"{item['lr']:g}",
            f"{item['noise']:g}",
            str(item["shift"]),
            pct(item["val"]),
            pct(item["test"]),
            "kept" if item["in_greedy_soup"] else "",
        )
    table.add_section()
    uniform, greedy = results["uniform_soup"], results["greedy_soup"]
    table.add_row(
        f"uniform soup of {len(results['ingredients'])}",
        "",
        "",
        "",
        pct(uniform["val"]),
        pct(uniform["test"]),
        "",
        style="bold",
    )
    table.add_row(
        f"greedy soup of {greedy['kept']}", "", "", "", pct(greedy["val"]), pct(greedy["test"]), "", style="bold"
    )
    return table
