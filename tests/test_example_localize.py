"""examples/localize_digits.py --quick, run in-process on one seed: the grafts' recorded scores are what transformers
gets from `splice patch apply` of the stored patch (and, for the magnitude graft, from the top entries computed here
in numpy); the learned regions have exactly the requested sizes; the overlaps are the Jaccard indices of the stored
masks, recomputed in numpy; merged models score what the report says; the report's files hold the numbers and are
not replaced without `force`."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import localize_digits as study
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from splice.errors import OutputExistsError

from helpers import run_cli

SEED = 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("localize-digits")
    report, work = root / "report", root / "work"
    results = study.main(["--report", str(report), "--workdir", str(work), "--quick", "--seeds", str(SEED)])
    return results, report, work / f"seed-{SEED}"


def tensors(directory: Path) -> dict[str, np.ndarray]:
    return load_file(directory / "model.safetensors")


def stored_region(patch: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every mask of a stored patch, unpacked here (bits little-endian, eight a byte), and the tensors it carries."""
    settings = json.loads((patch / "patch.json").read_text())["settings"]
    stored = load_file(patch / "tensors.safetensors")
    masks = {}
    for name, shape in settings["shapes"].items():
        bits = np.unpackbits(stored[name + ".mask"], bitorder="little")[: int(np.prod(shape))]
        masks[name] = bits.reshape(shape).astype(bool)
    return masks, settings["localized"]["carried"]


def layer_names(state: dict[str, np.ndarray]) -> list[str]:
    return [name for name in state if ".encoder.layer." in name]


def magnitude_masks(pre: dict[str, np.ndarray], ft: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The top k entries of |theta_ft - theta_pre| over the layers' changed tensors, with no tie at the threshold."""
    names = [name for name in layer_names(pre) if not np.array_equal(pre[name], ft[name])]
    changes = {name: np.abs(ft[name] - pre[name]) for name in names}
    threshold = np.sort(np.concatenate([c.reshape(-1) for c in changes.values()]))[::-1][k - 1]
    masks = {name: change >= threshold for name, change in changes.items()}
    assert sum(int(m.sum()) for m in masks.values()) == k
    return masks


def scores(model_dir: Path, task: str) -> tuple[float, float]:
    """Test accuracy and ECE (15 equal-width bins of the top class's probability) of a saved model, in numpy."""
    model = transformers.ViTForImageClassification.from_pretrained(model_dir).eval()
    x, y = study.datamerge.task_split(task, "test", SEED)
    with torch.no_grad():
        probabilities = model(pixel_values=x).logits.softmax(-1).double().numpy()
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == y.numpy()
    ece = 0.0
    for low in range(15):
        inside = (confidence > low / 15) & (confidence <= (low + 1) / 15)
        if inside.any():
            ece += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(correct.mean()), ece


def save_state(template: Path, state: dict[str, np.ndarray], out: Path) -> Path:
    """A model directory with `template`'s config and the stored tensors `state` (as transformers names them)."""
    out.mkdir()
    shutil.copy(template / "config.json", out / "config.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def localizations(results: dict):
    for regime, run in results["runs"][0]["regimes"].items():
        for head, by_density in run["localizations"].items():
            for density, by_task in by_density.items():
                for task, record in by_task.items():
                    yield regime, head, density, task, record


def test_learned_regions_have_exactly_the_requested_sizes_and_carry_the_head_as_asked(run):
    results, _, work = run
    pre = tensors(work / "pretrained")
    count = 0
    for regime, head, density, task, record in localizations(results):
        ft = tensors(work / regime / f"fine-tuned-{task}")
        eligible = sum(pre[n].size for n in layer_names(pre) if not np.array_equal(pre[n], ft[n]))
        masks, carried = stored_region(Path(record["patch"]))
        region = {name: mask for name, mask in masks.items() if name not in carried}
        assert all(name in layer_names(pre) for name in region)
        assert sum(int(mask.sum()) for mask in region.values()) == round(float(density) * eligible)
        assert record["selected"] == round(float(density) * eligible) and record["eligible"] == eligible
        layers: dict[str, int] = {}
        for name, mask in region.items():  # vit.encoder.layer.<i>.<module>.(weight|bias)
            layer = name.split(".")[3]
            layers[layer] = layers.get(layer, 0) + int(mask.sum())
        assert {k: v for k, v in record["placement"]["layers"].items() if v} == {k: v for k, v in layers.items() if v}
        assert sum(record["placement"]["modules"].values()) == record["selected"]
        if head == "fine-tuned":
            assert carried == ["classifier.bias", "classifier.weight"]
            assert all(masks[name].all() for name in carried)
        else:
            assert carried == [] and not {"classifier.weight", "classifier.bias"} & set(masks)
        count += 1
    assert count == len(study.QUICK.regimes) * len(study.QUICK.heads) * len(study.QUICK.densities) * len(study.TASKS)


def test_the_recorded_scores_are_what_transformers_gets_from_the_applied_patch(run, tmp_path, monkeypatch, capsys):
    """The learned graft: `splice patch apply` of the stored patch; the magnitude graft: the top entries by |change|
    (numpy) grafted onto the pretrained model with the carried head; the fine-tune and the pretrained model as
    saved. Every model scored here by transformers (accuracy and ECE in numpy), the full regime, both heads."""
    results, _, work = run
    pretrained = work / "pretrained"
    pre = tensors(pretrained)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study scores: the same sums, so the same argmax
    try:
        checked = set()
        for regime, head, density, task, record in localizations(results):
            if regime != "full":
                continue
            tuned = work / regime / f"fine-tuned-{task}"
            applied = tmp_path / f"applied-{task}-{density}-{head}"
            code, _, err = run_cli(
                ["patch", "apply", record["patch"], "--base", pretrained, "--out", applied], monkeypatch, capsys
            )
            assert code == 0, err
            recorded = record["scores"]
            accuracy, ece = scores(applied, task)
            assert recorded["learned_graft"]["accuracy"] == pytest.approx(accuracy, abs=1e-6), (task, density, head)
            assert recorded["learned_graft"]["ece"] == pytest.approx(ece, abs=1e-5)

            ft = tensors(tuned)
            grafted = dict(pre)
            for name, mask in magnitude_masks(pre, ft, record["selected"]).items():
                grafted[name] = pre[name] + mask.astype(np.float32) * (ft[name] - pre[name])
            for name in record["carried"]:
                grafted[name] = ft[name]
            magnitude = save_state(pretrained, grafted, tmp_path / f"magnitude-{task}-{density}-{head}")
            accuracy, ece = scores(magnitude, task)
            assert recorded["magnitude_graft"]["accuracy"] == pytest.approx(accuracy, abs=1e-6), (task, density, head)
            assert recorded["magnitude_graft"]["ece"] == pytest.approx(ece, abs=1e-5)

            if task not in checked:
                checked.add(task)
                for model_dir, name in ((tuned, "fine_tuned"), (pretrained, "pretrained")):
                    accuracy, ece = scores(model_dir, task)
                    assert recorded[name]["accuracy"] == pytest.approx(accuracy, abs=1e-6), (task, name)
                    assert recorded[name]["ece"] == pytest.approx(ece, abs=1e-5)
                    assert (
                        results["runs"][0]["regimes"][regime]["references"][name.replace("_", "-")][task]
                        == (recorded[name])
                    )
                floor = dict(pre, **{name: ft[name] for name in ("classifier.weight", "classifier.bias")})
                accuracy, ece = scores(save_state(pretrained, floor, tmp_path / f"head-only-{task}"), task)
                head_only = results["runs"][0]["regimes"][regime]["references"]["head only"][task]
                assert head_only["accuracy"] == pytest.approx(accuracy, abs=1e-6) and head_only["ece"] == pytest.approx(
                    ece, abs=1e-5
                )
        assert checked == set(study.TASKS)
    finally:
        torch.set_num_threads(threads)


def jaccard(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> float:
    shared = sum(int((first[n] & second[n]).sum()) for n in set(first) & set(second))
    union = sum(int(m.sum()) for m in first.values()) + sum(int(m.sum()) for m in second.values()) - shared
    return shared / union


def test_the_overlaps_are_the_jaccard_indices_of_the_stored_masks(run):
    results, _, work = run
    pre = tensors(work / "pretrained")
    for regime, run_ in results["runs"][0]["regimes"].items():
        for head, by_density in run_["localizations"].items():
            for density, by_task in by_density.items():
                learned, magnitude = {}, {}
                for task, record in by_task.items():
                    masks, carried = stored_region(Path(record["patch"]))
                    learned[task] = {name: mask for name, mask in masks.items() if name not in carried}
                    ft = tensors(work / regime / f"fine-tuned-{task}")
                    magnitude[task] = magnitude_masks(pre, ft, record["selected"])
                overlap = run_["overlap"][head][density]
                for first, second in combinations(study.TASKS, 2):
                    pair = f"{first}|{second}"
                    assert overlap["learned"]["pairs"][pair] == jaccard(learned[first], learned[second]), pair
                    assert overlap["magnitude"]["pairs"][pair] == jaccard(magnitude[first], magnitude[second]), pair
                assert overlap["learned"]["mean"] == pytest.approx(np.mean(list(overlap["learned"]["pairs"].values())))
                for task in study.TASKS:
                    assert overlap["learned_vs_magnitude"][task] == jaccard(learned[task], magnitude[task])
                summary = results["summary"][regime]["overlap"][head][density]
                assert summary["learned"]["per_seed"] == [overlap["learned"]["mean"]]
                d = float(density)
                assert overlap["chance"] == pytest.approx(d / (2 - d), rel=0.01)  # the rounded region's density


def test_merged_models_score_what_the_report_says_and_stitch_by_the_rule(run):
    results, _, work = run
    pre = tensors(work / "pretrained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for regime, run_ in results["runs"][0]["regimes"].items():
            merges = run_["merges"]
            assert set(study.BASELINES) <= set(merges)
            assert ("Localize-and-Stitch" in " ".join(merges)) == results["stitch"]
            for method, merge in merges.items():
                model = transformers.ViTForImageClassification.from_pretrained(merge["directory"]).eval()
                for task in study.TASKS:
                    x, y = study.datamerge.task_split(task, "test", SEED)
                    with torch.no_grad():
                        correct = int((model(pixel_values=x).logits.argmax(-1) == y).sum())
                    assert correct == round(merge["test"][task] * len(y)), (regime, method, task)
            tuned = [tensors(work / regime / f"fine-tuned-{task}") for task in study.TASKS]
            averaged = tensors(Path(merges["averaging"]["directory"]))
            for name in pre:
                np.testing.assert_allclose(averaged[name], np.mean([t[name] for t in tuned], 0), atol=1e-6)
            for head, by_density in run_["localizations"].items():
                for density, by_task in by_density.items():
                    name = study.stitch_name(density, head)
                    if name not in merges:
                        continue
                    stitched = tensors(Path(merges[name]["directory"]))
                    regions = [stored_region(Path(by_task[task]["patch"]))[0] for task in study.TASKS]
                    for tensor, value in pre.items():
                        masks = [r.get(tensor, np.zeros(value.shape, bool)) for r in regions]
                        count = np.maximum(sum(m.astype(np.float32) for m in masks), 1)
                        change = sum(m * (t[tensor] - value) for m, t in zip(masks, tuned))
                        np.testing.assert_allclose(stitched[tensor], value + change / count, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_the_report_files_hold_the_numbers(run):
    results, report, _ = run
    on_disk = json.loads((report / study.JSON_NAME).read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (report / study.PNG_NAME).read_bytes().startswith(b"\x89PNG")
    for regime, run_ in on_disk["runs"][0]["regimes"].items():
        summary = on_disk["summary"][regime]
        for head, by_density in run_["localizations"].items():
            for density, by_task in by_density.items():
                rows = summary["grafting"][head][density]["tasks"]
                for task, record in by_task.items():
                    accuracy = record["scores"]["learned_graft"]["accuracy"]
                    assert rows[task]["learned_graft_accuracy"]["per_seed"] == [accuracy]
                    kept = accuracy / record["scores"]["fine_tuned"]["accuracy"]
                    assert rows[task]["learned_graft_kept"]["mean"] == pytest.approx(kept)
                average = np.mean([r["scores"]["magnitude_graft"]["ece"] for r in by_task.values()])
                assert rows["average"]["magnitude_graft_ece"]["mean"] == pytest.approx(average)
        for method, merge in run_["merges"].items():
            expected = np.mean([merge["test"][t] for t in study.TASKS])
            assert summary["merges"][method]["average"]["mean"] == pytest.approx(expected)
    printed = study.table(results)
    assert "| fine-tuned | 0.01 | 669 of 66944 |" in printed  # 1% of the two layers' 66,944 entries


def test_an_existing_report_or_workdir_is_refused_without_force(run, tmp_path):
    _, report, work = run
    before = (report / study.JSON_NAME).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        study.run_study(report, [SEED], study.QUICK, workdir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists() and (report / study.JSON_NAME).read_bytes() == before
    with pytest.raises(OutputExistsError, match="workdir"):
        study.run_study(tmp_path / "report", [SEED], study.QUICK, workdir=work.parent)
    assert not (tmp_path / "report").exists()
