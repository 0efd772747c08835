"""examples/datamerge_digits.py --quick, run in-process on one seed: the fine-tunes beat the pretrained model on their
own tasks; every merged model reloads in transformers and scores what the report says; the merges are the methods
they name (averaging, task arithmetic, and Fisher and RegMean from the statistics each fine-tune was given, computed
here in numpy from the stored files); the statistics' cost is what is on disk; the report's files hold the numbers
and are not replaced without `force`."""

from __future__ import annotations

import json
from pathlib import Path

import datamerge_digits as study
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from splice.errors import OutputExistsError

SEED = 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("datamerge-digits")
    report, work = root / "report", root / "work"
    results = study.main(["--report", str(report), "--workdir", str(work), "--quick", "--seeds", str(SEED)])
    return results, report, work / f"seed-{SEED}"


def tensors(directory: Path) -> dict[str, np.ndarray]:
    return {name: t.double().numpy() for name, t in load_file(directory / "model.safetensors").items()}


def stored_statistics(directory: Path) -> tuple[dict[str, np.ndarray], dict]:
    stored = {name: t.double().numpy() for name, t in load_file(directory / "tensors.safetensors").items()}
    return stored, json.loads((directory / "patch.json").read_text())["settings"]


def fine_tunes(work: Path) -> list[dict[str, np.ndarray]]:
    return [tensors(work / f"fine-tuned-{task}") for task in study.TASKS]


def test_the_splits_are_disjoint_and_every_task_sees_the_same_images():
    parts = study._split(SEED)
    assert {name: len(part.y) for name, part in parts.items()} == {
        "pretrain": 719,
        "train": 647,
        "val": 162,
        "test": 269,
    }
    rows = {name: {tuple(image.flatten().tolist()) for image in part.x} for name, part in parts.items()}
    assert sum(len(r) for r in rows.values()) == len(set().union(*rows.values())) == 1797  # no image in two parts
    for task in study.TASKS:
        x, y = study.task_split(task, "train", SEED)
        assert torch.equal(y, parts["train"].y) and not torch.equal(x, parts["train"].x)


def test_every_fine_tune_beats_the_pretrained_model_on_its_own_task(run):
    results, _, _ = run
    models = results["runs"][0]["models"]
    for task in study.TASKS:
        assert models[f"fine-tuned {task}"]["test"][task] > models["pretrained"]["test"][task], task


def test_merged_models_reload_in_transformers_and_score_what_the_report_says(run):
    results, _, work = run
    merges = results["runs"][0]["merges"]
    assert list(merges) == list(study.METHODS) == results["methods"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study scores: the same sums, so the same argmax
    try:
        for method, merge in merges.items():
            model = transformers.ViTForImageClassification.from_pretrained(merge["directory"]).eval()
            assert Path(merge["directory"]).parent == work
            for task in study.TASKS:
                x, y = study.task_split(task, "test", SEED)
                with torch.no_grad():
                    correct = int((model(pixel_values=x).logits.argmax(-1) == y).sum())
                assert correct == round(results["runs"][0]["models"][method]["test"][task] * len(y)), (method, task)
    finally:
        torch.set_num_threads(threads)


def test_averaging_and_task_arithmetic_are_what_they_name(run):
    results, _, work = run
    merges = results["runs"][0]["merges"]
    tuned, base = fine_tunes(work), tensors(work / "pretrained")
    averaged = tensors(Path(merges["averaging"]["directory"]))
    lam = merges["task arithmetic"]["lambda"]
    assert lam in study.QUICK.task_arithmetic_lambdas
    assert merges["task arithmetic"]["val_by_lambda"][f"{lam:g}"] == max(
        merges["task arithmetic"]["val_by_lambda"].values()
    )
    arithmetic = tensors(Path(merges["task arithmetic"]["directory"]))
    for name in base:
        np.testing.assert_allclose(averaged[name], np.mean([t[name] for t in tuned], 0), atol=1e-6)
        expected = base[name] + lam * sum(t[name] - base[name] for t in tuned)
        np.testing.assert_allclose(arithmetic[name], expected, atol=1e-6)


def test_fisher_and_regmean_use_each_fine_tunes_own_statistics(run):
    """Fisher: sum_i (F_i + eps) theta_i / sum_i (F_i + eps); RegMean: W = (sum_i W_i G~_i)(sum_i G~_i)^-1 for every
    layer with Grams, the average elsewhere; each fine-tune with the statistics of its own task's data."""
    results, _, work = run
    merges, statistics = results["runs"][0]["merges"], results["runs"][0]["statistics"]
    tuned = fine_tunes(work)
    fishers = [stored_statistics(Path(statistics["fisher"][task]["path"]))[0] for task in study.TASKS]
    grams = [stored_statistics(Path(statistics["gram"][task]["path"])) for task in study.TASKS]
    fisher_merge = tensors(Path(merges["Fisher"]["directory"]))
    regmean_merge = tensors(Path(merges["RegMean"]["directory"]))
    alpha, epsilon = study.QUICK.regmean_alpha, 1e-6  # epsilon: splice's default, which the study keeps
    solved = 0
    for name in tuned[0]:
        weights = [f[name] + epsilon for f in fishers]
        expected = sum(w * t[name] for w, t in zip(weights, tuned)) / sum(weights)
        np.testing.assert_allclose(fisher_merge[name], expected, rtol=1e-5, atol=1e-6)
        keys = [settings.get("shared", {}).get(name, name) for _, settings in grams]
        if keys[0] not in grams[0][0]:
            np.testing.assert_allclose(regmean_merge[name], np.mean([t[name] for t in tuned], 0), atol=1e-6)
            continue
        shrunk = [alpha * g[k] + (1 - alpha) * np.diag(np.diag(g[k])) for (g, _), k in zip(grams, keys)]
        right = sum(t[name] @ s for t, s in zip(tuned, shrunk))
        expected = np.linalg.solve(sum(shrunk), right.T).T
        np.testing.assert_allclose(regmean_merge[name], expected, rtol=1e-4, atol=1e-5)
        solved += 1
    assert solved == 2 * 6 + 1  # per layer q, k, v (one shared Gram), attention output, intermediate, output; head


def test_regmean_plusplus_averages_what_lies_outside_the_blocks(run):
    """RegMean++ solves the blocks' linear layers from activations through the merged model; the embeddings, the
    final norm and the head take the plain average (splice's documented choice), and it does solve the blocks."""
    results, _, work = run
    merge = tensors(Path(results["runs"][0]["merges"]["RegMean++"]["directory"]))
    tuned = fine_tunes(work)
    outside = [name for name in merge if ".encoder.layer." not in name]
    assert "classifier.weight" in outside and "vit.embeddings.position_embeddings" in outside
    for name in outside:
        np.testing.assert_allclose(merge[name], np.mean([t[name] for t in tuned], 0), atol=1e-6)
    query = "vit.encoder.layer.1.attention.attention.query.weight"
    assert np.abs(merge[query] - np.mean([t[query] for t in tuned], 0)).max() > 1e-3


def test_the_statistics_cost_is_what_is_on_disk(run):
    results, _, _ = run
    statistics = results["runs"][0]["statistics"]
    assert set(statistics) == {"gram", "fisher"}
    for kind, per_task in statistics.items():
        assert set(per_task) == set(study.TASKS)
        for cost in per_task.values():
            files = [p for p in Path(cost["path"]).rglob("*") if p.is_file()]
            assert cost["bytes"] == sum(p.stat().st_size for p in files) > cost["tensor_bytes"] > 0
            assert cost["seconds"] >= cost["pass_seconds"] > 0
            stored, settings = stored_statistics(Path(cost["path"]))
            assert cost["tensor_bytes"] == sum(t.size for t in stored.values()) * (8 if kind == "gram" else 4)
            assert settings["samples"] == study.QUICK.stats_samples
    summary = results["summary"]["statistics"]["gram"]["bytes_per_model"]
    assert summary["per_seed"] == [c["bytes"] for c in statistics["gram"].values()]


def test_the_report_files_hold_the_numbers(run):
    results, report, _ = run
    on_disk = json.loads((report / study.JSON_NAME).read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (report / study.PNG_NAME).read_bytes().startswith(b"\x89PNG")
    accuracy = on_disk["summary"]["accuracy"]
    models = on_disk["runs"][0]["models"]
    for name in models:
        for task in study.TASKS:
            assert accuracy[name][task]["per_seed"] == [models[name]["test"][task]]
            assert accuracy[name][task]["mean"] == models[name]["test"][task]
        assert accuracy[name]["average"]["mean"] == pytest.approx(
            np.mean([models[name]["test"][t] for t in study.TASKS])
        )
    ordering = on_disk["summary"]["ordering"]
    assert sorted(ordering) == sorted(on_disk["methods"])
    averages = [accuracy[m]["average"]["mean"] for m in ordering]
    assert averages == sorted(averages, reverse=True)


def test_an_existing_report_or_workdir_is_refused_without_force(run, tmp_path):
    _, report, work = run
    with pytest.raises(OutputExistsError, match="already exists"):
        study.run_study(report, [SEED], study.QUICK, workdir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(OutputExistsError, match="workdir"):
        study.run_study(tmp_path / "report", [SEED], study.QUICK, workdir=work.parent)
    assert not (tmp_path / "report").exists()
