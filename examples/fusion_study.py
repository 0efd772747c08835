"""OT fusion on the digits task, end to end (Imfeld et al., "Transformer Fusion with Optimal Transport",
ICLR 2024): pairs of small ViTs trained from different seeds, fused by plain weight averaging and by optimal
transport (EMD, and Sinkhorn with its regularisation chosen on held-out data), each scored one-shot and after
a short fine-tune; plus a 2x wider parent fused into a narrower anchor. Used by `examples/fusion_digits.py`.

Data: scikit-learn's digits split as in `splice.demo.digits` (seed 0); the fusion study trains on the
union of its pretrain and finetune parts (1258 images), chooses on its held-out part (270) and reports on its
test part (269). Everything is seeded and runs torch on one thread, so a rerun repeats every number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich import box
from rich.table import Table
from transformers import ViTConfig, ViTForImageClassification

from splice.arch.quiet import quiet_transformers
from splice.demo import digits
from splice.merge.fusion import fuse
from splice.merge.soup import soup

SINKHORN_REGS = (0.02, 0.04, 0.06, 0.08, 0.12, 0.2)
# Method-key spelling of fuse's align="activations" / "weights"; "coherent" is activation alignment with one map for
# the residual stream and whole heads (residual="stream", heads="whole", qk="shared"; beyond the paper), whose EMD
# maps keep the second model's function exactly.
ALIGNMENTS = ("acts", "weights", "coherent")
COHERENT = {"residual": "stream", "heads": "whole", "qk": "shared"}

# Method keys, in table order. "<key>_ft" is the same model after the short fine-tune.
PARENTS = ("parent_a", "parent_b")
METHODS = (
    "parent_a",
    "parent_b",
    "vanilla",
    "ot_acts_emd",
    "ot_acts_sinkhorn",
    "ot_weights_emd",
    "ot_weights_sinkhorn",
    "ot_coherent_emd",
    "ot_coherent_sinkhorn",
)
HETERO_METHODS = ("hetero_emd", "hetero_sinkhorn", "hetero_coherent_emd")  # a wide parent into the narrow anchor
LABELS = {
    "parent_a": "parent A (anchor)",
    "parent_b": "parent B",
    "vanilla": "vanilla fusion (weight average)",
    "ot_acts_emd": "OT acts, EMD",
    "ot_acts_sinkhorn": "OT acts, Sinkhorn (reg on val)",
    "ot_weights_emd": "OT weights, EMD",
    "ot_weights_sinkhorn": "OT weights, Sinkhorn (reg on val)",
    "ot_coherent_emd": "OT acts, stream map + whole heads, EMD",
    "ot_coherent_sinkhorn": "OT acts, stream map + whole heads, Sinkhorn (reg on val)",
    "hetero_emd": "wide -> narrow, OT acts EMD",
    "hetero_sinkhorn": "wide -> narrow, OT acts Sinkhorn (reg on val)",
    "hetero_coherent_emd": "wide -> narrow, OT acts, stream map + whole heads, EMD",
}


@dataclass(frozen=True)
class StudyConfig:
    """Model widths, parents' training and the fusion settings of the study (the defaults are the example's)."""

    hidden: int = 64  # narrow parents: hidden size, MLP width, heads, depth, patch size (8x8 inputs)
    intermediate: int = 128
    heads: int = 4
    layers: int = 2
    patch: int = 2
    wide_factor: int = 2  # the heterogeneous case's wide parent: hidden size and MLP width times this
    wide_lr: float = 1e-3  # its peak learning rate (at 2e-3 one of the three wide parents stayed at 94.8%)
    steps: int = 1000  # parents' training: AdamW with cosine decay, batch 64, weight decay 0.01
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    finetune_fraction: float = 0.1  # the short fine-tune: this share of the parents' steps, same settings
    samples: int = 200  # training images whose activations align the neurons
    regs: tuple[float, ...] = SINKHORN_REGS  # Sinkhorn grid, the best chosen on held-out accuracy
    alignments: tuple[str, ...] = ALIGNMENTS
    hetero: bool = True
    ablations: bool = True  # residual and Q/K policies of the activation-aligned Sinkhorn fusion, one-shot
    split_seed: int = 0
    target: float = 0.95  # the test accuracy every parent should reach

    @property
    def finetune_steps(self) -> int:
        return max(1, round(self.steps * self.finetune_fraction))

    def vit_config(self, wide: bool = False) -> ViTConfig:
        factor = self.wide_factor if wide else 1
        return ViTConfig(
            image_size=digits.IMAGE_SIZE,
            patch_size=self.patch,
            num_channels=1,
            hidden_size=self.hidden * factor,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate * factor,
            num_labels=digits.NUM_LABELS,
        )


QUICK = StudyConfig(steps=500, regs=(0.04, 0.08), alignments=("acts",), ablations=False)


@dataclass(frozen=True)
class Data:
    train: digits.Split
    val: digits.Split
    test: digits.Split


def load_data(seed: int = 0) -> Data:
    """The digits split of `digits.load_digits_splits(seed)`, its pretrain and finetune parts joined for training."""
    splits = digits.load_digits_splits(seed)
    train = digits.Split(
        torch.cat([splits.pretrain.x, splits.finetune.x]), torch.cat([splits.pretrain.y, splits.finetune.y])
    )
    return Data(train, splits.val, splits.test)


def pair_seeds(index: int) -> dict[str, int]:
    """Init and data-order seeds of pair `index`: parents 2i+1 and 2i+2, the wide parent 1001+i, the untrained
    control model 2001+i, and the fine-tune's batch order 501+i (shared by every model of the pair, so all see
    the same batches)."""
    return {
        "parent_a": 2 * index + 1,
        "parent_b": 2 * index + 2,
        "wide": 1001 + index,
        "untrained": 2001 + index,
        "finetune": 501 + index,
    }


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_parent(config: StudyConfig, data: Data, seed: int, out_dir: Path, wide: bool = False) -> Path:
    """A fresh ViT initialised with `seed`, trained `config.steps` steps on the training split, saved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config.vit_config(wide))
    digits.train(
        model,
        data.train,
        lr=config.wide_lr if wide else config.lr,
        steps=config.steps,
        seed=seed,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
    )
    with quiet_transformers():
        model.save_pretrained(out_dir)
    return out_dir


def finetune(config: StudyConfig, data: Data, model_dir: Path, out_dir: Path, seed: int) -> Path:
    """The short fine-tune: `config.finetune_steps` steps with the parents' optimizer settings (AdamW, the same
    peak learning rate, cosine decay over the fine-tune, batch size, weight decay) on the training split."""
    model = digits.load_model(model_dir)
    digits.train(
        model,
        data.train,
        lr=config.lr,
        steps=config.finetune_steps,
        seed=seed,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
    )
    with quiet_transformers():
        model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def evaluate(model_dir: Path, data: Data) -> dict:
    """Held-out and test accuracy of the saved model, the held-out loss (a tie-break) and its parameter count."""
    model = digits.load_model(model_dir)
    with digits.one_thread():
        val_loss = F.cross_entropy(model(pixel_values=data.val.x).logits, data.val.y).item()
    return {
        "val": digits.accuracy(model, *data.val),
        "test": digits.accuracy(model, *data.test),
        "val_loss": val_loss,
        "params": parameter_count(model),
        "dir": str(model_dir),
    }


def _best(grid: list[dict]) -> dict:
    """Highest held-out accuracy; ties go to the lower held-out loss."""
    return max(grid, key=lambda item: (item["val"], -item["val_loss"]))


@torch.no_grad()
def aligned_alone(fused_dir: Path, anchor_dir: Path, data: Data) -> dict:
    """Accuracy of the aligned second model by itself, before averaging: 2 * fused - anchor (fusion of two
    models is (anchor + aligned) / 2). It shows how much of the second model's function survives the alignment;
    an exact permutation would keep all of it."""
    model, anchor = digits.load_model(fused_dir), digits.load_model(anchor_dir).state_dict()
    model.load_state_dict({name: 2 * tensor - anchor[name] for name, tensor in model.state_dict().items()})
    return {"val": digits.accuracy(model, *data.val), "test": digits.accuracy(model, *data.test)}


def _fuse_scored(models: list[Path], out_dir: Path, splits: Data, log: Callable[[str], None], options: dict) -> dict:
    started = time.perf_counter()
    report = fuse(models, out_dir, force=True, device="cpu", **options)
    seconds = time.perf_counter() - started
    scores = evaluate(out_dir, splits)
    reg = options.get("reg") if options.get("solver") == "sinkhorn" else None
    alone = aligned_alone(out_dir, models[0], splits)
    log(
        f"  fused {out_dir.name}: held-out {scores['val']:.2%}, test {scores['test']:.2%} "
        f"(aligned model alone: test {alone['test']:.2%}; {seconds:.1f} s)"
    )
    return {
        **scores,
        "reg": reg,
        "fuse_seconds": seconds,
        "aligned_model_alone": alone,
        "mean_permutation_closeness": statistics.fmean(m.permutation_closeness for m in report.maps),
    }


def _fuse_methods(
    models: list[Path],
    directory: Path,
    prefix: str,
    data: Data,
    config: StudyConfig,
    align: str,
    log: Callable[[str], None],
) -> tuple[dict, dict, list[dict]]:
    """(EMD result, best Sinkhorn result, the Sinkhorn grid) for one alignment."""
    options = {"align": "weights" if align == "weights" else "activations"}
    if align == "coherent":
        options |= COHERENT
    if align != "weights":
        options |= {"data": {"pixel_values": data.train.x[: config.samples]}, "samples": config.samples}
    emd = _fuse_scored(models, directory / f"{prefix}-emd", data, log, {**options, "solver": "emd"})
    grid = [
        _fuse_scored(
            models, directory / f"{prefix}-sinkhorn-{reg:g}", data, log, {**options, "solver": "sinkhorn", "reg": reg}
        )
        for reg in config.regs
    ]
    return emd, _best(grid), grid


def run_pair(
    index: int, workdir: Path, config: StudyConfig, data: Data, log: Callable[[str], None] = lambda line: None
) -> dict:
    """Train one pair of parents (and a wide parent), fuse them every way, fine-tune, score everything."""
    started = time.perf_counter()
    seeds = pair_seeds(index)
    directory = workdir / f"pair-{index}"
    one_shot: dict[str, dict] = {}
    for name in PARENTS:
        train_parent(config, data, seeds[name], directory / name)
        one_shot[name] = evaluate(directory / name, data)
        log(
            f"pair {index}: {name} (seed {seeds[name]}): held-out {one_shot[name]['val']:.2%}, "
            f"test {one_shot[name]['test']:.2%}"
        )
    trained = time.perf_counter()
    parents = [directory / "parent_a", directory / "parent_b"]  # the first is the anchor

    soup(parents, directory / "vanilla", device="cpu", force=True)
    one_shot["vanilla"] = evaluate(directory / "vanilla", data)
    log(f"  vanilla fusion: held-out {one_shot['vanilla']['val']:.2%}, test {one_shot['vanilla']['test']:.2%}")
    grids: dict[str, list[dict]] = {}
    for align in config.alignments:
        emd, best, grids[align] = _fuse_methods(parents, directory, f"ot-{align}", data, config, align, log)
        one_shot[f"ot_{align}_emd"], one_shot[f"ot_{align}_sinkhorn"] = emd, best
    ablations, control = [], {}
    if config.ablations and "acts" in config.alignments:
        ablations = run_ablations(parents, directory, one_shot["ot_acts_sinkhorn"]["reg"], config, data, log)
        control = run_control(
            parents[0], directory, seeds["untrained"], one_shot["ot_acts_sinkhorn"]["reg"], config, data, log
        )
    fused = time.perf_counter()

    tuned = {}
    for name, scores in one_shot.items():
        tuned[name] = evaluate(
            finetune(config, data, Path(scores["dir"]), directory / f"{name}+ft", seeds["finetune"]), data
        )
    log(
        f"  after the {config.finetune_steps}-step fine-tune: "
        + ", ".join(f"{name} {tuned[name]['test']:.2%}" for name in tuned)
    )

    result = {
        "index": index,
        "seeds": seeds,
        "one_shot": one_shot,
        "finetuned": tuned,
        "sinkhorn_grid": grids,
        "best_reg": {align: one_shot[f"ot_{align}_sinkhorn"]["reg"] for align in config.alignments},
        "ablations": ablations,
        "control": control,
    }
    if config.hetero:
        result["hetero"] = run_hetero(directory, parents[0], seeds, config, data, log)
    result["seconds"] = {
        "train_parents": trained - started,
        "fuse": fused - trained,
        "total": time.perf_counter() - started,
    }
    return result


ABLATIONS = tuple((residual, qk) for residual in ("average", "skip", "branch") for qk in ("separate", "shared"))


def run_ablations(
    parents: list[Path], directory: Path, reg: float, config: StudyConfig, data: Data, log: Callable[[str], None]
) -> list[dict]:
    """One-shot activation-aligned Sinkhorn fusion (the pair's chosen reg) under every residual policy and Q/K
    policy of `fuse`; ("average", "separate") is the main setting, fused again here for a complete grid."""
    options = {
        "align": "activations",
        "data": {"pixel_values": data.train.x[: config.samples]},
        "samples": config.samples,
        "solver": "sinkhorn",
        "reg": reg,
    }
    return [
        {
            "residual": residual,
            "qk": qk,
            **_fuse_scored(
                parents, directory / f"ablation-{residual}-{qk}", data, log, {**options, "residual": residual, "qk": qk}
            ),
        }
        for residual, qk in ABLATIONS
    ]


def run_control(
    anchor: Path, directory: Path, seed: int, reg: float, config: StudyConfig, data: Data, log: Callable[[str], None]
) -> dict:
    """The anchor fused (activations, EMD and Sinkhorn at the pair's reg) with an *untrained* model of its shape:
    how much of a one-shot fusion's accuracy the anchor's half brings by itself."""
    untrained = directory / "untrained"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config.vit_config())
    with quiet_transformers():
        model.save_pretrained(untrained)
    options = {
        "align": "activations",
        "data": {"pixel_values": data.train.x[: config.samples]},
        "samples": config.samples,
    }
    return {
        "control_emd": _fuse_scored(
            [anchor, untrained], directory / "control-emd", data, log, {**options, "solver": "emd"}
        ),
        "control_sinkhorn": _fuse_scored(
            [anchor, untrained],
            directory / "control-sinkhorn",
            data,
            log,
            {**options, "solver": "sinkhorn", "reg": reg},
        ),
    }


def run_hetero(
    directory: Path, anchor: Path, seeds: dict[str, int], config: StudyConfig, data: Data, log: Callable[[str], None]
) -> dict:
    """A wide parent (hidden size and MLP width times `wide_factor`) fused into the narrow anchor."""
    started = time.perf_counter()
    wide = train_parent(config, data, seeds["wide"], directory / "wide", wide=True)
    trained = time.perf_counter()
    scores = {"wide": evaluate(wide, data), "anchor": evaluate(anchor, data)}
    log(
        f"  wide parent (seed {seeds['wide']}, {scores['wide']['params']:,} parameters): "
        f"held-out {scores['wide']['val']:.2%}, test {scores['wide']['test']:.2%}"
    )
    emd, best, grid = _fuse_methods([anchor, wide], directory, "hetero", data, config, "acts", log)
    one_shot = {"hetero_emd": emd, "hetero_sinkhorn": best}
    if "coherent" in config.alignments:
        options = {
            "align": "activations",
            "data": {"pixel_values": data.train.x[: config.samples]},
            "samples": config.samples,
            "solver": "emd",
            **COHERENT,
        }
        one_shot["hetero_coherent_emd"] = _fuse_scored(
            [anchor, wide], directory / "hetero-coherent-emd", data, log, options
        )
    tuned = {
        name: evaluate(finetune(config, data, Path(item["dir"]), directory / f"{name}+ft", seeds["finetune"]), data)
        for name, item in one_shot.items()
    }
    return {
        "parents": scores,
        "one_shot": one_shot,
        "finetuned": tuned,
        "sinkhorn_grid": grid,
        "best_reg": best["reg"],
        "seconds": {"train_wide": trained - started, "total": time.perf_counter() - started},
    }


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize(pairs: list[dict], config: StudyConfig) -> dict:
    """Mean and sample std (n-1) over pairs of every method's accuracy, one-shot and fine-tuned."""
    summary: dict[str, dict] = {}
    groups = [(pair["one_shot"], pair["finetuned"]) for pair in pairs]
    hetero = [(pair["hetero"]["one_shot"], pair["hetero"]["finetuned"]) for pair in pairs if "hetero" in pair]
    for rows in (groups, hetero):
        if not rows:
            continue
        for name in rows[0][0]:
            summary[name] = {
                stage: {split: _stats([row[i][name][split] for row in rows]) for split in ("val", "test")}
                for i, stage in enumerate(("one_shot", "finetuned"))
            }
    if hetero:
        summary["wide_parent"] = {
            "one_shot": {
                split: _stats([p["hetero"]["parents"]["wide"][split] for p in pairs]) for split in ("val", "test")
            }
        }
    grid = {}
    for align in config.alignments:
        grid[align] = [
            {
                "reg": reg,
                **{split: _stats([p["sinkhorn_grid"][align][i][split] for p in pairs]) for split in ("val", "test")},
            }
            for i, reg in enumerate(config.regs)
        ]
    if hetero:
        grid["hetero"] = [
            {
                "reg": reg,
                **{split: _stats([p["hetero"]["sinkhorn_grid"][i][split] for p in pairs]) for split in ("val", "test")},
            }
            for i, reg in enumerate(config.regs)
        ]
    alone = {}
    for rows in (groups, hetero):
        for name in rows[0][0] if rows else ():
            if "aligned_model_alone" in rows[0][0][name]:
                alone[name] = {
                    split: _stats([row[0][name]["aligned_model_alone"][split] for row in rows])
                    for split in ("val", "test")
                }
    control = {}
    if pairs[0].get("control"):
        control = {
            name: {split: _stats([p["control"][name][split] for p in pairs]) for split in ("val", "test")}
            for name in pairs[0]["control"]
        }
    ablations = []
    if pairs[0].get("ablations"):
        for i, item in enumerate(pairs[0]["ablations"]):
            ablations.append(
                {
                    "residual": item["residual"],
                    "qk": item["qk"],
                    **{split: _stats([p["ablations"][i][split] for p in pairs]) for split in ("val", "test")},
                    "aligned_model_alone": _stats([p["ablations"][i]["aligned_model_alone"]["test"] for p in pairs]),
                }
            )
    best_parent = [max(p["one_shot"][name]["test"] for name in PARENTS) for p in pairs]
    claims = {
        "pairs": len(pairs),
        "parents_at_target": all(p["one_shot"][name]["test"] >= config.target for p in pairs for name in PARENTS),
        "best_parent_test": _stats(best_parent),
        "ot_acts_sinkhorn_ft_above_both_parents": sum(
            p["finetuned"]["ot_acts_sinkhorn"]["test"] > b for p, b in zip(pairs, best_parent)
        ),
        "ot_acts_emd_ft_above_both_parents": sum(
            p["finetuned"]["ot_acts_emd"]["test"] > b for p, b in zip(pairs, best_parent)
        ),
        "sinkhorn_above_emd_one_shot": sum(
            p["one_shot"]["ot_acts_sinkhorn"]["test"] > p["one_shot"]["ot_acts_emd"]["test"] for p in pairs
        ),
        "ot_above_vanilla_one_shot": sum(
            min(p["one_shot"]["ot_acts_emd"]["test"], p["one_shot"]["ot_acts_sinkhorn"]["test"])
            > p["one_shot"]["vanilla"]["test"]
            for p in pairs
        ),
    }
    if "ot_coherent_emd" in pairs[0]["one_shot"]:
        claims["ot_coherent_emd_ft_above_both_parents"] = sum(
            p["finetuned"]["ot_coherent_emd"]["test"] > b for p, b in zip(pairs, best_parent)
        )
        claims["ot_coherent_above_paper_one_shot_emd"] = sum(
            p["one_shot"]["ot_coherent_emd"]["test"] > p["one_shot"]["ot_acts_emd"]["test"] for p in pairs
        )
    return {
        "methods": summary,
        "sinkhorn_grid": grid,
        "aligned_model_alone": alone,
        "ablations": ablations,
        "control": control,
        "claims": claims,
    }


def run_fusion_study(
    workdir: Path, pairs: int = 3, config: StudyConfig = StudyConfig(), log: Callable[[str], None] = lambda line: None
) -> dict:
    """The whole study under `workdir`: `pairs` pairs of parents, every fusion, fine-tunes, the summary."""
    import ot
    import transformers

    started = time.perf_counter()
    workdir = Path(workdir)
    data = load_data(config.split_seed)
    with digits.one_thread():
        results = [run_pair(index, workdir, config, data, log) for index in range(pairs)]
    return {
        "config": {
            **asdict(config),
            "finetune_steps": config.finetune_steps,
            "parent_params": parameter_count(ViTForImageClassification(config.vit_config())),
            "wide_params": parameter_count(ViTForImageClassification(config.vit_config(wide=True))),
        },
        "split_sizes": {"train": len(data.train.y), "val": len(data.val.y), "test": len(data.test.y)},
        "pairs": results,
        "summary": summarize(results, config),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "pot": ot.__version__},
        "seconds": time.perf_counter() - started,
    }


# -- tables ---------------------------------------------------------------------------------------------------------


def _pm(stats: dict) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _each(stats: dict) -> str:
    return " ".join(f"{100 * v:.1f}" for v in stats["values"])


def study_table(results: dict) -> Table:
    """Mean ± std (over pairs) of test accuracy, one-shot and after the short fine-tune, and the per-pair values."""
    summary, config = results["summary"], results["config"]
    pairs = summary["claims"]["pairs"]
    table = Table(
        title=f"OT fusion on digits: test accuracy %, mean ± std over {pairs} seed pair(s)", box=box.SIMPLE_HEAD
    )
    for column in (
        "model",
        "one-shot",
        "per pair",
        f"+ {config['finetune_steps']}-step fine-tune",
        "per pair",
        "held-out one-shot",
    ):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    methods = summary["methods"]
    for name in (*METHODS, "wide_parent", *HETERO_METHODS):
        if name not in methods:
            continue
        if name == "hetero_emd" or name == "vanilla":
            table.add_section()
        item = methods[name]
        tuned = item.get("finetuned")
        label = LABELS.get(name, "wide parent (2x hidden and MLP)")
        table.add_row(
            label,
            _pm(item["one_shot"]["test"]),
            _each(item["one_shot"]["test"]),
            _pm(tuned["test"]) if tuned else "",
            _each(tuned["test"]) if tuned else "",
            _pm(item["one_shot"]["val"]),
            style="bold" if name.startswith("ot_") and name.endswith("sinkhorn") else None,
        )
    return table


def grid_table(results: dict) -> Table:
    """One-shot accuracy of every Sinkhorn reg (mean over pairs), and how often each was chosen."""
    grid = results["summary"]["sinkhorn_grid"]
    pairs = results["pairs"]
    table = Table(
        title="Sinkhorn reg grid: one-shot accuracy %, mean over pairs (held-out / test)", box=box.SIMPLE_HEAD
    )
    table.add_column("alignment")
    for column in ("EMD", *(f"reg {row['reg']:g}" for row in next(iter(grid.values())))):
        table.add_column(column, justify="right", no_wrap=True)
    for align, rows in grid.items():
        if align == "hetero":
            emd = [p["hetero"]["one_shot"]["hetero_emd"] for p in pairs]
            chosen = [p["hetero"]["best_reg"] for p in pairs]
            label = "acts, wide -> narrow"
        else:
            emd = [p["one_shot"][f"ot_{align}_emd"] for p in pairs]
            chosen = [p["best_reg"][align] for p in pairs]
            label = {"acts": "activations", "coherent": "acts, stream map + whole heads"}.get(align, align)
        val, test = (100 * statistics.fmean(e[split] for e in emd) for split in ("val", "test"))
        cells = [f"{val:.1f} / {test:.1f}"]
        for row in rows:
            mark = "*" * chosen.count(row["reg"])
            cells.append(f"{100 * row['val']['mean']:.1f} / {100 * row['test']['mean']:.1f}{mark}")
        table.add_row(label, *cells)
    table.caption = "* once per pair that chose this reg (best held-out accuracy, ties to the lower held-out loss)"
    return table


def diagnostics_table(results: dict) -> Table | None:
    """What alignment alone keeps of the second model, and the residual / Q/K policy ablation (one-shot)."""
    summary = results["summary"]
    table = Table(title="diagnostics: test accuracy %, one-shot, mean ± std over pairs", box=box.SIMPLE_HEAD)
    for column in ("fusion", "fused (average)", "aligned 2nd model alone"):
        table.add_column(column, justify="left" if column == "fusion" else "right", no_wrap=True)
    methods = summary["methods"]
    for name, alone in summary["aligned_model_alone"].items():
        table.add_row(LABELS[name], _pm(methods[name]["one_shot"]["test"]), _pm(alone["test"]))
    labels = {
        "control_emd": "control: anchor + UNTRAINED model, OT acts EMD",
        "control_sinkhorn": "control: anchor + UNTRAINED model, OT acts Sinkhorn (pair's reg)",
    }
    for name, item in summary["control"].items():
        table.add_row(labels[name], _pm(item["test"]), "", style="dim")
    if summary["ablations"]:
        table.add_section()
        for item in summary["ablations"]:
            main = " (main setting)" if (item["residual"], item["qk"]) == ("average", "separate") else ""
            table.add_row(
                f"acts Sinkhorn, residual {item['residual']}, Q/K {item['qk']}{main}",
                _pm(item["test"]),
                _pm(item["aligned_model_alone"]),
            )
    return table


def hetero_table(results: dict) -> Table | None:
    pairs = [p for p in results["pairs"] if "hetero" in p]
    if not pairs:
        return None
    first = pairs[0]["hetero"]
    table = Table(title="heterogeneous fusion: parameter counts", box=box.SIMPLE_HEAD)
    table.add_column("model")
    table.add_column("hidden / MLP", justify="right")
    table.add_column("parameters", justify="right")
    config = results["config"]
    wide = config["wide_factor"]
    table.add_row(
        "wide parent",
        f"{config['hidden'] * wide} / {config['intermediate'] * wide}",
        f"{first['parents']['wide']['params']:,}",
    )
    table.add_row(
        "narrow anchor", f"{config['hidden']} / {config['intermediate']}", f"{first['parents']['anchor']['params']:,}"
    )
    table.add_row(
        "fused (anchor's shape)",
        f"{config['hidden']} / {config['intermediate']}",
        f"{first['one_shot']['hetero_sinkhorn']['params']:,}",
    )
    return table
