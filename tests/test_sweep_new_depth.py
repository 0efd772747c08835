"""A sweep's candidates that change the model's shape (a `slices:` recipe stacking more layers) reach the evaluation
hook with a model directory whose config is the candidate's: a hook that builds the model from that config and loads
the candidate's tensors into it strictly scores every candidate, the score the same merge written to disk gets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

import splice

from helpers import load_dir

# Builds the model from model_dir's config (transformers), loads the candidate strictly, scores its logits on fixed
# tokens; logs the depth and the directory it was given.
HOOK = """
import json

import torch
import transformers


def logits_score(state, model_dir):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    tokens = torch.arange(12).reshape(2, 6) % config.vocab_size
    with torch.no_grad():
        return float(model(input_ids=tokens).logits.double().square().mean()), config.num_hidden_layers


def score(state, model_dir, *, calls):
    value, depth = logits_score(state, model_dir)
    with open(calls, "a") as log:
        log.write(json.dumps({"depth": depth, "model_dir": model_dir, "score": value}) + "\\n")
    return value
"""

WEIGHTS = [0.25, 0.75]


def recipe(first: Path, second: Path, weight) -> dict:
    """Three layers from two-layer models: both layers of a linear merge, then its second layer again."""
    sources = [{"model": str(first)}, {"model": str(second), "parameters": {"weight": 0.5}}]
    return {
        "merge_method": "linear",
        "parameters": {"weight": weight},
        "slices": [
            {"sources": [{**source, "layer_range": [0, 2]} for source in sources]},
            {"sources": [{**source, "layer_range": [1, 2]} for source in sources]},
        ],
    }


def test_a_sliced_candidate_is_scored_with_its_new_depth(make_models, tmp_path):
    _, first, second = make_models("llama", 3)
    hook, calls = tmp_path / "hook.py", tmp_path / "calls.jsonl"
    hook.write_text(HOOK)
    sweep_file = tmp_path / "sweep.yml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "recipe": recipe(first, second, {"search": "choice", "values": WEIGHTS}),
                "search": {"method": "grid"},
                "evaluate": {"hook": f"{hook}:score", "args": {"calls": str(calls)}},
                "keep": "best",
            }
        )
    )
    report = splice.sweep(sweep_file, out=tmp_path / "out", workers=1, run=splice.RunOptions(device="cpu"))

    assert [t.error for t in report.trials] == [None, None]
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [entry["depth"] for entry in logged] == [3, 3]
    assert all(not Path(entry["model_dir"]).exists() for entry in logged)  # a scratch directory, removed after

    spec = importlib.util.spec_from_file_location("depth_hook", hook)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for weight in WEIGHTS:  # each candidate merged to disk on its own and scored from the written model
        path = tmp_path / f"w{weight}.yml"
        path.write_text(yaml.safe_dump(recipe(first, second, weight)))
        splice.merge(path, tmp_path / f"w{weight}", device="cpu")
        expected, depth = module.logits_score(load_dir(tmp_path / f"w{weight}"), str(tmp_path / f"w{weight}"))
        (trial,) = [t for t in report.trials if t.values == {"parameters.weight": weight}]
        assert depth == 3 and trial.score == expected
    assert report.trials[0].score != report.trials[1].score
