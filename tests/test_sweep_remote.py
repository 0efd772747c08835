"""A sweep whose inputs are on S3 (moto's server on 127.0.0.1), read by the pool's workers with the sweep's storage
options: every trial scores what the same sweep scores on local copies of the same models, and the best model is
the same, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import yaml

import splice

from conftest import perturbed, save, tiny_model
from helpers import load_dir, moto_s3_server

BUCKET = "sweep-inputs"
HOOK = """
def score(state, model_dir):
    return -sum(float(t.double().abs().sum()) for t in state.values() if t.is_floating_point())
"""


def _passthrough(app):
    return app


def _sweep(directory: Path, base: str, first: str, second: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hook.py").write_text(HOOK)
    sweep = {
        "recipe": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": first, "parameters": {"weight": 1.0, "density": {"search": "choice", "values": [0.3, 0.7]}}},
                {"model": second, "parameters": {"weight": {"search": "choice", "values": [0.5, 1.0]}, "density": 0.5}},
            ],
        },
        "search": {"method": "grid"},
        "evaluate": {"hook": "hook.py:score"},
        "out": "out",
    }
    path = directory / "sweep.yml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_a_sweep_over_s3_inputs_scores_what_the_same_sweep_scores_on_local_copies(tmp_path: Path) -> None:
    base = tiny_model("llama", 0)
    local = {"base": base, "first": perturbed(base, 1), "second": perturbed(base, 2)}
    paths = {name: save(model, tmp_path / "models" / name, False) for name, model in local.items()}
    with moto_s3_server(tmp_path / "aws-home", BUCKET, _passthrough) as (endpoint, _env, _app):
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        urls = {}
        for name, path in paths.items():
            for file in path.iterdir():
                client.upload_file(str(file), BUCKET, f"models/{name}/{file.name}")
            urls[name] = f"s3://{BUCKET}/models/{name}"
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        remote = splice.sweep(
            _sweep(tmp_path / "remote", urls["base"], urls["first"], urls["second"]),
            workers=2,
            run=splice.RunOptions(device="cpu", storage_options=options),
        )
    on_disk = splice.sweep(
        _sweep(tmp_path / "local", *(str(paths[n]) for n in ("base", "first", "second"))),
        workers=2,
        run=splice.RunOptions(device="cpu"),
    )
    assert [(t.values, t.score) for t in remote.trials] == [(t.values, t.score) for t in on_disk.trials]
    assert all(t.score is not None for t in remote.trials) and len(remote.trials) == 4
    remote_best, local_best = (
        load_dir(tmp_path / "remote" / "out" / "best"),
        load_dir(tmp_path / "local" / "out" / "best"),
    )
    assert remote_best.keys() == local_best.keys()
    assert all((remote_best[k] == local_best[k]).all() for k in local_best)
    recorded = json.loads((tmp_path / "remote" / "out" / "sweep_results.json").read_text())
    assert recorded["best"]["number"] == on_disk.best.number
    assert yaml.safe_load((tmp_path / "remote" / "out" / "best_recipe.yaml").read_text())["base_model"] == urls["base"]
