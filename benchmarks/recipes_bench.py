"""Benchmark: the rest of mergekit's config language, splice next to mergekit on the same configs.

Inputs: the ~340 MB fp32 Llamas of merge_vs_mergekit.py (hidden 1024, 4 layers, vocab 16384, 4 shards).

  frankenmerge     passthrough slices A[0,2) B[1,3) A[2,4): a model 1.5x as deep (6 layers)
                   splice merge frank.yml   vs   mergekit-yaml frank.yml
  union-tokenizer  linear A' + B' with tokenizer_source: union, where A' and B' are A and B with real `tokenizers`
                   word-level vocabularies (16384 tokens each, 15872 shared at shuffled ids, 512 their own)
                   splice merge union.yml   vs   mergekit-yaml union.yml
  three-stage      task_arithmetic(A; B, C) -> s1; slerp(s1, B) -> s2; linear(s2, C) -> final, one multi-document
                   file (task arithmetic, not ties: ties' threshold tie-breaks, measured in merge_vs_mergekit.py,
                   would blur the comparison of the outputs through two more stages)
                   splice merge multi.yml   vs   mergekit-multi multi.yml -I DIR --out-path OUT
  rerun-edited     the three-stage file again with only the last stage's weights edited
                   splice (reuses s1 and s2 by their content digest)   vs   mergekit-multi --lazy (reuses them
                   because the directories exist; it would also reuse them had s1's recipe been edited); splice's
                   --json report says which stages ran and how many bytes each read

The union tokenizer's new tokens get ids in an order mergekit does not fix (a hash order: it differs between runs),
so that output is compared token by token: each token's embedding and head rows, found through each output's own
tokenizer.json.

Each run in its own subprocess (wall, peak RSS); one warm-up, then --repeats rounds, medians; outputs compared.
Not run in CI. Usage:  .venv/bin/python benchmarks/recipes_bench.py [--repeats 3] [--cases frankenmerge,...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_mergekit import (  # noqa: E402  (a sibling script, not a package)
    DEFAULT_WORKDIR,
    MODEL_SPEC,
    Case,
    _tool,
    build_models,
    compare,
    machine_info,
    measure,
    prepare_workdir,
    summarize,
)

VOCAB = MODEL_SPEC["vocab_size"]
OWN_TOKENS = 512
TARGETS = [("wall", "wall_s", 0.5), ("peak RSS", "peak_rss_mb", 0.6)]


def with_tokenizer(model: Path, out: Path, seed: int) -> Path:
    """`model`'s weights (hard links) with a word-level vocabulary of VOCAB tokens: VOCAB - OWN_TOKENS shared ones
    in a seeded order, then OWN_TOKENS of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in model.iterdir():
        os.link(item, out / item.name)
    shared = [f"w{i}" for i in range(VOCAB - OWN_TOKENS)]
    random.Random(seed).shuffle(shared)
    words = ["<unk>", *shared[: VOCAB - OWN_TOKENS - 1], *(f"own{seed}_{i}" for i in range(OWN_TOKENS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(out)
    return out


def write_configs(workdir: Path, a: Path, b: Path, c: Path, a_tok: Path, b_tok: Path) -> dict[str, Path]:
    configs = workdir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    texts = {
        "frank.yml": f"""merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 3]}}]
  - sources: [{{model: {a}, layer_range: [2, 4]}}]
""",
        "union.yml": f"""merge_method: linear
dtype: float32
tokenizer_source: union
models:
  - {{model: {a_tok}, parameters: {{weight: 0.5}}}}
  - {{model: {b_tok}, parameters: {{weight: 0.5}}}}
""",
    }
    stages = [
        f"""name: s1
merge_method: task_arithmetic
base_model: {a}
dtype: float32
models:
  - {{model: {b}, parameters: {{weight: 0.5}}}}
  - {{model: {c}, parameters: {{weight: 0.5}}}}
""",
        f"""name: s2
merge_method: slerp
base_model: s1
dtype: float32
models: [{{model: s1}}, {{model: {b}}}]
parameters: {{t: 0.3}}
""",
    ]
    for name, weight in (("multi.yml", 0.6), ("multi-edited.yml", 0.7)):
        final = f"""merge_method: linear
dtype: float32
models:
  - {{model: s2, parameters: {{weight: {weight}}}}}
  - {{model: {c}, parameters: {{weight: {1 - weight:.1f}}}}}
"""
        texts[name] = "---\n".join([*stages, final])
    for name, text in texts.items():
        (configs / name).write_text(text)
    return {name: configs / name for name in texts}


def token_rows(model: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """A model's vocabulary (token -> id, from its tokenizer.json) and its embedding and head tensors."""
    from safetensors import safe_open

    data = json.loads((model / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
    tensors = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # safe_open handles are not iterable
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    tensors[name] = handle.get_tensor(name)
    return vocab, tensors


def compare_by_token(left: Path, right: Path) -> dict:
    """Both outputs' embedding and head rows token by token: the same tokens, and each token's rows equal."""
    (left_vocab, left_rows), (right_vocab, right_rows) = token_rows(left), token_rows(right)
    if set(left_vocab) != set(right_vocab):
        return {"ok": False, "error": f"vocabularies differ: {len(set(left_vocab) ^ set(right_vocab))} tokens"}
    tokens = sorted(left_vocab)
    import torch

    worst = 0.0
    for name in left_rows:
        ours = left_rows[name][torch.tensor([left_vocab[t] for t in tokens])]
        theirs = right_rows[name][torch.tensor([right_vocab[t] for t in tokens])]
        worst = max(worst, float((ours.double() - theirs.double()).abs().max()))
    moved = sum(left_vocab[t] != right_vocab[t] for t in tokens)
    return {"ok": worst <= 1e-6, "tokens": len(tokens), "max_abs_diff": worst, "tokens_at_other_ids": moved}


def cases(workdir: Path, configs: dict[str, Path], wanted: set[str]) -> list[Case]:
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    splice, mergekit, multi = _tool("splice"), _tool("mergekit-yaml"), _tool("mergekit-multi")
    quiet = ["--quiet", "--force"]
    found = []
    for key, config in (("frankenmerge", "frank.yml"), ("union-tokenizer", "union.yml")):
        if key in wanted:
            found += [
                Case(
                    f"splice {key}",
                    [splice, "merge", str(configs[config]), "--out", str(outs / f"splice-{key}"), *quiet],
                    outs / f"splice-{key}",
                    config,
                ),
                Case(
                    f"mergekit {key}",
                    [mergekit, str(configs[config]), str(outs / f"mergekit-{key}"), "--lazy-unpickle", "--quiet"],
                    outs / f"mergekit-{key}",
                    config,
                ),
            ]
    if "three-stage" in wanted:
        found += [
            Case(
                "splice three-stage",
                [
                    splice,
                    "merge",
                    str(configs["multi.yml"]),
                    "--out",
                    str(outs / "splice-multi"),
                    "--intermediate-dir",
                    str(outs / "splice-stages"),
                    *quiet,
                ],
                outs / "splice-multi",
                "multi.yml, no cached stage",
            ),
            Case(
                "mergekit three-stage",
                [
                    multi,
                    str(configs["multi.yml"]),
                    "-I",
                    str(outs / "mergekit-stages"),
                    "--out-path",
                    str(outs / "mergekit-multi"),
                    "--no-lazy",
                ],
                outs / "mergekit-multi",
                "multi.yml",
            ),
        ]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="frankenmerge,union-tokenizer,three-stage")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    a, b, c = build_models(workdir / "models")
    a_tok = with_tokenizer(a, workdir / "models" / "model_a_tok", seed=1)
    b_tok = with_tokenizer(b, workdir / "models" / "model_b_tok", seed=2)
    configs = write_configs(workdir, a, b, c, a_tok, b_tok)
    wanted = set(args.cases.split(","))
    chosen = cases(workdir, configs, wanted)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    runs = []
    for round_index in range(-1, args.repeats):
        for case in chosen:
            if case.name == "splice three-stage":
                shutil.rmtree(workdir / "outputs" / "splice-stages", ignore_errors=True)
            if case.name == "mergekit three-stage":
                shutil.rmtree(workdir / "outputs" / "mergekit-stages", ignore_errors=True)
            runs.append(measure(case, round_index, workdir, env))
            print(f"{case.name:28s} round {round_index:2d}: {runs[-1].wall_s:6.2f} s, {runs[-1].peak_rss_mb:6.0f} MB")
    summary = summarize(runs, [case.name for case in chosen])
    rerun = rerun_after_edit(workdir, configs, env, args.repeats) if wanted & {"three-stage", "rerun-edited"} else {}
    ratios = []
    for key in ("frankenmerge", "union-tokenizer", "three-stage"):
        ours, theirs = summary.get(f"splice {key}"), summary.get(f"mergekit {key}")
        if ours and theirs:
            for label, metric, target in TARGETS:
                value = ours[metric] / theirs[metric]
                ratios.append({"name": f"{key} {label}", "value": value, "target": target, "met": value <= target})
    outs = workdir / "outputs"
    verification = {
        key: compare(outs / f"splice-{name}", outs / f"mergekit-{name}")
        for key, name in (("frankenmerge", "frankenmerge"), ("three-stage", "multi"))
        if (outs / f"splice-{name}").is_dir() and (outs / f"mergekit-{name}").is_dir()
    }
    if (outs / "splice-union-tokenizer").is_dir() and (outs / "mergekit-union-tokenizer").is_dir():
        verification["union-tokenizer"] = compare_by_token(
            outs / "splice-union-tokenizer", outs / "mergekit-union-tokenizer"
        )
    report = {
        "machine": machine_info(),
        "summary": summary,
        "ratios": ratios,
        "rerun_after_edit": rerun,
        "verification": verification,
    }
    print(json.dumps({k: report[k] for k in ("summary", "ratios", "rerun_after_edit", "verification")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def rerun_after_edit(workdir: Path, configs: dict[str, Path], env: dict[str, str], repeats: int) -> dict:
    """The three-stage file with only its last stage edited, run over the stages the first run left: splice
    recomputes the last stage only (its report says which stages ran and what was read); mergekit-multi --lazy
    reuses the directories."""
    outs = workdir / "outputs"
    splice, multi = _tool("splice"), _tool("mergekit-multi")
    edited = configs["multi-edited.yml"]
    chosen = [
        Case(
            "splice rerun, last stage edited",
            [
                splice,
                "merge",
                str(edited),
                "--out",
                str(outs / "splice-edited"),
                "--intermediate-dir",
                str(outs / "splice-stages"),
                "--force",
                "--json",
            ],
            outs / "splice-edited",
            "multi-edited.yml",
        ),
        Case(
            "mergekit rerun --lazy, last stage edited",
            [
                multi,
                str(edited),
                "-I",
                str(outs / "mergekit-stages"),
                "--out-path",
                str(outs / "mergekit-edited"),
                "--lazy",
            ],
            outs / "mergekit-edited",
            "multi-edited.yml",
        ),
    ]
    runs = [measure(case, r, workdir, env) for r in range(repeats) for case in chosen]
    summary = summarize(runs, [case.name for case in chosen])
    log = workdir / "logs" / f"{chosen[0].name.replace(' ', '_').replace(',', '')}.round{repeats - 1}.log"
    text = log.read_text()
    report = json.loads(text[text.index("{\n") : text.rindex("}") + 1])
    summary["splice stages"] = [
        {"stage": s["name"], "status": s["status"], "bytes_read": (s.get("report") or {}).get("bytes_read", 0)}
        for s in report["stages"]
    ]
    edited = compare(outs / "splice-edited", outs / "mergekit-edited")
    summary["splice vs mergekit --lazy after the edit"] = edited
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
