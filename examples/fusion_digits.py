"""OT fusion of transformers on a small real task: pairs of ViTs trained from different seeds on scikit-learn's
8x8 digits, fused (Imfeld et al., "Transformer Fusion with Optimal Transport", ICLR 2024).

For each seed pair: both parents, plain weight averaging (vanilla fusion), OT fusion with activation alignment
(200 training images) and with weight alignment, each with EMD and with Sinkhorn (reg chosen on held-out
accuracy from 0.02 ... 0.2), and beyond the paper activation alignment with one map for the residual stream and
whole heads (`--residual stream --heads whole --qk shared`), scored one-shot and after a short fine-tune (10% of
the parents' steps, same optimizer settings). Then a 2x wider parent fused into the narrow anchor
(heterogeneous fusion).

    python examples/fusion_digits.py [--pairs 3] [--quick] [--workdir DIR]

Prints tables and writes every number to examples/_out/fusion_digits.json (examples/_out/fusion_digits_quick.json
with --quick). Seeds are fixed and torch runs on one thread, so a rerun gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fusion_study import (
    QUICK,
    StudyConfig,
    diagnostics_table,
    grid_table,
    hetero_table,
    run_fusion_study,
    study_table,
)
from rich.console import Console

OUT_DIR = Path(__file__).resolve().parent / "_out"


def show(results: dict, console: Console) -> None:
    console.print(study_table(results))
    console.print(grid_table(results))
    console.print(diagnostics_table(results))
    hetero = hetero_table(results)
    if hetero is not None:
        console.print(hetero)
    claims, config = results["summary"]["claims"], results["config"]
    pairs = claims["pairs"]
    console.print(
        f"parents: hidden {config['hidden']}, MLP {config['intermediate']}, {config['heads']} heads, "
        f"{config['layers']} layers, patch {config['patch']} ({config['parent_params']:,} parameters); "
        f"{config['steps']} steps, lr {config['lr']:g} (wide parent {config['wide_lr']:g}); "
        f"fine-tune {config['finetune_steps']} steps at lr {config['lr']:g}"
    )
    console.print(f"split sizes: {results['split_sizes']}")
    if not claims["parents_at_target"]:
        console.print(f"[yellow]not every parent reached {config['target']:.0%} test accuracy[/yellow]")
    console.print(
        f"OT (acts) one-shot above vanilla in {claims['ot_above_vanilla_one_shot']}/{pairs} pairs; "
        f"Sinkhorn above EMD one-shot in {claims['sinkhorn_above_emd_one_shot']}/{pairs}; "
        f"OT acts Sinkhorn + fine-tune above both parents in "
        f"{claims['ot_acts_sinkhorn_ft_above_both_parents']}/{pairs} "
        f"(EMD + fine-tune: {claims['ot_acts_emd_ft_above_both_parents']}/{pairs})"
    )
    if "ot_coherent_above_paper_one_shot_emd" in claims:
        console.print(
            f"stream map + whole heads (EMD) one-shot above the paper's EMD maps in "
            f"{claims['ot_coherent_above_paper_one_shot_emd']}/{pairs} pairs; + fine-tune above both "
            f"parents in {claims['ot_coherent_emd_ft_above_both_parents']}/{pairs}"
        )
    console.print(f"took {results['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help="seed pairs of parents (default 3; 1 with --quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about a minute: 1 pair, 500 training steps, Sinkhorn regs 0.04 and "
        "0.08, activation alignment only (parents may miss 95%%)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary directory)")
    args = parser.parse_args()
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 3)
    if pairs < 1:
        parser.error("--pairs must be at least 1")
    config = QUICK if args.quick else StudyConfig()
    console = Console()
    if not console.is_terminal:  # piped or redirected: wide enough for the tables instead of 80 columns
        console = Console(width=150)

    def log(line: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {line}", highlight=False)

    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="splice-fusion-digits-") as workdir:
            results = run_fusion_study(Path(workdir), pairs, config, log)
    else:
        results = run_fusion_study(args.workdir, pairs, config, log)
    show(results, console)
    out = OUT_DIR / ("fusion_digits_quick.json" if args.quick else "fusion_digits.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
