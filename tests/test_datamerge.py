"""RegMean and Fisher merges through `splice merge`, against an independent in-memory implementation written here:
tensors read with safetensors itself, statistics read from the artifact's file, the closed forms computed in numpy
(fp64). Also: the statistics artifact (CLI, inspect, registry), and every bad input refused in one line with nothing
written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import splice
from splice import collect_stats
from splice.errors import SpliceError
from splice.merge.recipe import parse_recipe

from conftest import model_class, perturbed, save, tiny_model
from helpers import load_dir, merge_refused, run_cli

DATA_HOOK = """
import torch

def batch():
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (8, 10), generator=generator)
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[5, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}
"""


def _batch(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Each task model's own inputs (different seeds: different data, as tasks have)."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.rand(8, 1, 8, 8, generator=generator)}
    ids = torch.randint(0, 64, (8, 10), generator=generator)
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[seed % 8, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert", "vit"])
def task_models(request, tmp_path_factory):
    """(arch, root, [(model dir, gram dir, fisher dir)] for three task models fine-tuned from one base)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"datamerge-{arch}")
    base = tiny_model(arch, 0)
    tasks = []
    for i in range(3):
        model_dir = save(perturbed(base, i + 1, 0.05), root / f"task{i}", False)
        batch = _batch(arch, i)
        gram = collect_stats(model_dir, batch, kind="gram", out=root / f"task{i}.gram").out
        fisher = collect_stats(model_dir, batch, kind="fisher", out=root / f"task{i}.fisher").out
        tasks.append((model_dir, gram, fisher))
    return arch, root, tasks


def _stored(directory: Path) -> tuple[dict[str, np.ndarray], dict]:
    tensors = {name: t.double().numpy() for name, t in load_file(directory / "tensors.safetensors").items()}
    return tensors, json.loads((directory / "patch.json").read_text())["settings"]


def _independent_regmean(tasks, alpha: float) -> dict[str, np.ndarray]:
    states = [{n: t.double().numpy() for n, t in load_dir(model).items()} for model, _, _ in tasks]
    stats = [_stored(gram) for _, gram, _ in tasks]
    merged = {}
    for name in states[0]:
        grams = []
        for tensors, settings in stats:
            key = settings.get("shared", {}).get(name, name)
            if key in tensors:
                grams.append((tensors[key], name in settings.get("transposed", [])))
        if not grams:
            merged[name] = sum(state[name] for state in states) / len(states)
            continue
        shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g, _ in grams]
        transposed = grams[0][1]
        weights = [state[name].T if transposed else state[name] for state in states]  # out x in
        solution = sum(w @ g for w, g in zip(weights, shrunk)) @ np.linalg.inv(sum(shrunk))
        merged[name] = solution.T if transposed else solution
    return merged


def _recipe(method: str, tasks, statistic: int, parameters: dict | None = None) -> dict:
    models = [{"model": str(task[0]), "stats": str(task[statistic])} for task in tasks]
    return {"merge_method": method, "models": models, "parameters": parameters or {}}


def test_regmean_equals_an_independent_closed_form_and_reloads(task_models, tmp_path):
    arch, _, tasks = task_models
    report = splice.merge(parse_recipe(_recipe("regmean", tasks, 1)), tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    expected = _independent_regmean(tasks, alpha=0.9)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        np.testing.assert_allclose(tensor.double().numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    linear = {n for n, t in expected.items() if t.ndim == 2 and "wte" not in n and "embed" not in n}
    assert report.method_report.rules["regmean"] == len(_stored(tasks[0][1])[0]) + len(
        _stored(tasks[0][1])[1].get("shared", {})
    )
    assert report.method_report.rules["regmean"] + report.method_report.rules["fallback"] == len(merged)
    assert {s.tensor for s in report.method_report.solves} <= linear
    assert not report.method_report.pseudo_inverse_layers
    independent = tmp_path / "independent"  # the expected tensors as a model directory of their own
    independent.mkdir()
    save_file(
        {n: torch.from_numpy(t).float().contiguous() for n, t in expected.items()}, independent / "model.safetensors"
    )
    (independent / "config.json").write_text((tmp_path / "out" / "config.json").read_text())
    model, reference = (model_class(arch).from_pretrained(d).eval() for d in (tmp_path / "out", independent))
    batch = _batch(arch, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-5)


def test_regmean_without_shrinkage_is_least_squares_over_every_models_inputs(task_models, tmp_path):
    _, _, tasks = task_models
    splice.merge(parse_recipe(_recipe("regmean", tasks, 1, {"alpha": 1.0})), tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    expected = _independent_regmean(tasks, alpha=1.0)
    for name, tensor in merged.items():
        np.testing.assert_allclose(tensor.double().numpy(), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_fisher_equals_the_weighted_formula(task_models, tmp_path):
    _, _, tasks = task_models
    weights, epsilon = [1.0, 2.0, 0.5], 1e-4
    recipe = _recipe("fisher", tasks, 2, {"epsilon": epsilon})
    for entry, weight in zip(recipe["models"], weights):
        entry["parameters"] = {"weight": weight}
    report = splice.merge(parse_recipe(recipe), tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    states = [load_dir(model) for model, _, _ in tasks]
    fishers = [_stored(fisher)[0] for _, _, fisher in tasks]
    for name, tensor in merged.items():
        numerator = sum(w * (f[name] + epsilon) * s[name].double().numpy() for w, f, s in zip(weights, fishers, states))
        denominator = sum(w * (f[name] + epsilon) for w, f in zip(weights, fishers))
        np.testing.assert_allclose(tensor.double().numpy(), numerator / denominator, rtol=1e-6, atol=1e-7)
    assert report.method_report.rules == {"fisher": len(fishers[0])}


def test_fisher_with_equal_fishers_is_the_weighted_average(task_models, tmp_path):
    _, _, tasks = task_models
    shared = tasks[0][2]
    recipe = _recipe("fisher", tasks, 2)
    for entry, (model, _, _) in zip(recipe["models"], tasks):  # each model's Fisher made equal to task 0's
        copy = tmp_path / f"{Path(model).name}.fisher"
        copy.mkdir()
        tensors = load_file(shared / "tensors.safetensors")
        save_file(tensors, copy / "tensors.safetensors", {"format": "pt"})
        manifest = json.loads((Path(str(entry["stats"])) / "patch.json").read_text())
        (copy / "patch.json").write_text(json.dumps(manifest))
        entry["stats"] = str(copy)
    splice.merge(parse_recipe(recipe), tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    states = [load_dir(model) for model, _, _ in tasks]
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, sum(s[name] for s in states) / 3, rtol=1e-6, atol=1e-7)


def test_fallback_base_takes_the_base_models_tensors(task_models, tmp_path):
    _, _, tasks = task_models
    recipe = _recipe("regmean", tasks, 1, {"fallback": "base"})
    recipe["base_model"] = str(tasks[0][0])
    splice.merge(parse_recipe(recipe), tmp_path / "out")
    merged, base = load_dir(tmp_path / "out"), load_dir(tasks[0][0])
    expected = _independent_regmean(tasks, 0.9)  # the solved weights are RegMean's whatever the fallback
    gram_names = set(_stored(tasks[0][1])[0]) | set(_stored(tasks[0][1])[1].get("shared", {}))
    for name, tensor in merged.items():
        if name in gram_names:
            np.testing.assert_allclose(tensor.double().numpy(), expected[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(tensor, base[name]), name


def test_statistics_from_the_registry_give_the_same_merge(task_models, tmp_path, monkeypatch):
    _, _, tasks = task_models
    registry = splice.Registry.init(tmp_path / "registry")
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "registry"))
    recipe = _recipe("regmean", tasks, 1)
    for i, (entry, (_, gram, _)) in enumerate(zip(recipe["models"], tasks)):
        registry.push(f"grams-{i}", gram)
        entry["stats"] = f"grams-{i}@1"
    splice.merge(parse_recipe(recipe), tmp_path / "from-registry")
    splice.merge(parse_recipe(_recipe("regmean", tasks, 1)), tmp_path / "from-directories")
    ours, theirs = load_dir(tmp_path / "from-registry"), load_dir(tmp_path / "from-directories")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    card = (tmp_path / "from-registry" / "README.md").read_text()
    assert f"`grams-0@1` | statistics | `{registry.resolve('grams-0@1').digest}`" in card


# -- bad input: one line, nothing written ---------------------------------------------------------------------------


def _tampered(source: Path, target: Path, change) -> Path:
    """A copy of a statistics directory whose tensors `change` rewrote (its manifest kept as it was)."""
    target.mkdir()
    tensors = load_file(source / "tensors.safetensors")
    change(tensors)
    save_file(tensors, target / "tensors.safetensors", {"format": "pt"})
    (target / "patch.json").write_text((source / "patch.json").read_text())
    return target


def test_statistics_of_another_model_are_refused(task_models, tmp_path):
    _, _, tasks = task_models
    recipe = _recipe("regmean", tasks, 1)
    recipe["models"][1]["stats"] = str(tasks[0][1])
    merge_refused(recipe, tmp_path / "out", f"were collected on another model than {tasks[1][0]}")


def test_a_model_without_statistics_is_refused_before_anything_is_opened(task_models, tmp_path):
    _, _, tasks = task_models
    recipe = _recipe("fisher", tasks, 2)
    del recipe["models"][2]["stats"]
    merge_refused(recipe, tmp_path / "out", f"model {tasks[2][0]} gives no stats:", "--kind fisher")


def test_statistics_of_the_wrong_kind_are_refused(task_models, tmp_path):
    _, _, tasks = task_models
    merge_refused(_recipe("regmean", tasks, 2), tmp_path / "out", "holds fisher statistics; this merge needs gram")


def test_a_statistic_of_the_wrong_shape_is_refused_by_name(task_models, tmp_path):
    _, _, tasks = task_models
    name = next(iter(_stored(tasks[1][1])[0]))

    def shrink(tensors):
        tensors[name] = tensors[name][:-1, :-1].contiguous()

    recipe = _recipe("regmean", tasks, 1)
    recipe["models"][1]["stats"] = str(_tampered(tasks[1][1], tmp_path / "bad", shrink))
    merge_refused(recipe, tmp_path / "out", "has shape [15, 15], but the model's tensor", "needs [16, 16]")


def test_nan_in_a_statistic_is_refused(task_models, tmp_path):
    _, _, tasks = task_models
    name = next(iter(_stored(tasks[2][1])[0]))

    def poison(tensors):
        tensors[name][0, 0] = math.nan

    recipe = _recipe("regmean", tasks, 1)
    recipe["models"][2]["stats"] = str(_tampered(tasks[2][1], tmp_path / "bad", poison))
    merge_refused(recipe, tmp_path / "out", f"{tmp_path / 'bad'}: the statistic for ", " holds NaN or Inf")


def _without_feature_zero(tensors):
    """Feature 0 never seen: its Gram row and column 0, so every model's system is singular there."""
    for gram in tensors.values():
        gram[0, :] = 0
        gram[:, 0] = 0


def test_a_singular_system_without_shrinkage_is_refused(task_models, tmp_path):
    _, _, tasks = task_models
    recipe = _recipe("regmean", tasks, 1, {"alpha": 1})
    for i, entry in enumerate(recipe["models"]):
        entry["stats"] = str(_tampered(tasks[i][1], tmp_path / f"singular{i}", _without_feature_zero))
    merge_refused(recipe, tmp_path / "out", "is singular", "alpha below 1")


def test_an_ill_conditioned_system_with_shrinkage_is_solved_anchored_on_the_mean_and_reported(task_models, tmp_path):
    _, _, tasks = task_models
    recipe = _recipe("regmean", tasks, 1)
    grams = []
    for i, entry in enumerate(recipe["models"]):
        entry["stats"] = str(_tampered(tasks[i][1], tmp_path / f"singular{i}", _without_feature_zero))
        grams.append(_stored(Path(entry["stats"]))[0])
    report = splice.merge(parse_recipe(recipe), tmp_path / "out")
    solved = set(_stored(tasks[0][1])[0]) | set(_stored(tasks[0][1])[1].get("shared", {}))
    assert set(report.method_report.pseudo_inverse_layers) == solved
    merged, states = load_dir(tmp_path / "out"), [load_dir(model) for model, _, _ in tasks]
    settings = _stored(tasks[0][1])[1]
    for name in sorted(solved):
        transposed = name in settings.get("transposed", [])
        weights = [s[name].double().numpy() for s in states]
        weights = [w.T if transposed else w for w in weights]
        key = settings.get("shared", {}).get(name, name)
        shrunk = [0.9 * g[key] + 0.1 * np.diag(np.diag(g[key])) for g in grams]
        system, mean = sum(shrunk), sum(weights) / len(weights)
        right = sum(w @ g for w, g in zip(weights, shrunk))
        expected = mean + (right - mean @ system) @ np.linalg.pinv(system, hermitian=True)
        result = merged[name].double().numpy()
        result = result.T if transposed else result  # out x in
        np.testing.assert_allclose(result, expected, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(result[:, 0], mean[:, 0], atol=1e-5, err_msg=name)  # the unseen feature: the mean


def test_stats_on_a_data_free_method_and_data_methods_with_slices_are_refused(task_models):
    _, _, tasks = task_models
    recipe = _recipe("linear", tasks, 1)
    with pytest.raises(SpliceError, match="gives stats:, which only regmean and fisher read"):
        parse_recipe(recipe)
    sliced = {
        "merge_method": "regmean",
        "slices": [{"sources": [{"model": str(tasks[0][0]), "layer_range": [0, 2]}]}],
    }
    with pytest.raises(SpliceError, match="regmean merges the models: of a recipe, not slices:"):
        parse_recipe(sliced)
    with pytest.raises(SpliceError, match="mergekit has no fisher"):
        parse_recipe({**_recipe("fisher", tasks, 2), "compute": "mergekit"})
    with pytest.raises(SpliceError, match="fallback: base takes tensors without statistics from base_model"):
        parse_recipe(_recipe("fisher", tasks, 2, {"fallback": "base"}))


def test_an_output_inside_a_statistics_directory_is_refused(task_models, tmp_path):
    _, _, tasks = task_models
    merge_refused(_recipe("regmean", tasks, 1), Path(tasks[0][1]) / "out", "inside")


# -- the artifact: CLI, inspect, what cannot be done with it --------------------------------------------------------


def test_stats_collect_and_inspect_through_the_cli(tmp_path, monkeypatch, capsys):
    model = save(tiny_model("gpt2", 0), tmp_path / "model", False)
    (tmp_path / "hook.py").write_text(DATA_HOOK)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        ["stats", "collect", model, "--data", "hook.py:batch", "--kind", "gram", "--out", tmp_path / "grams"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "gram statistics" in out
    settings = json.loads((tmp_path / "grams" / "patch.json").read_text())["settings"]
    assert settings["samples"] == 8
    assert settings["data"] == "hook.py:batch"
    assert set(settings["tokens"].values()) == {8 * 10 - 4 - 7}  # the padding of samples 1 and 5 left out
    code, out, err = run_cli(["inspect", tmp_path / "grams", "--json"], monkeypatch, capsys)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["kind"] == "stats"
    assert shown["settings"].startswith("gram over 8 samples, 69 tokens")  # each of the 8 layers saw the 69
    assert {t["name"]: t["shape"] for t in shown["tensors"]}["transformer.h.0.mlp.c_proj.weight"] == [64, 64]
    code, _, err = run_cli(
        ["stats", "collect", model, "--data", "hook.py:batch", "--kind", "gram", "--out", tmp_path / "grams"],
        monkeypatch,
        capsys,
    )
    assert code != 0
    assert "already exists" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(
        ["patch", "apply", tmp_path / "grams", "--base", model, "--out", tmp_path / "applied"], monkeypatch, capsys
    )
    assert code != 0
    assert "not a change to the model" in err
    assert not (tmp_path / "applied").exists()


def test_stats_collect_pushes_to_the_registry(tmp_path):
    model = save(tiny_model("llama", 0), tmp_path / "model", False)
    registry = splice.Registry.init(tmp_path / "registry")
    outcome = collect_stats(model, _batch("llama", 0), kind="fisher", push="llama-fisher", registry=registry)
    assert outcome.pushed is not None and outcome.pushed.ref == "llama-fisher@1"
    stored = registry.load("llama-fisher@1")
    assert stored.meta.kind.value == "stats"
    for name, tensor in outcome.patch.tensors.items():
        assert torch.equal(stored.tensors[name], tensor)


def test_the_models_tensors_are_hashed_again_only_when_its_files_changed(task_models, tmp_path, monkeypatch):
    """While a model's files are as they were at collection (its digest: sizes, times, headers), its statistics are
    known to be its own without hashing its tensors; once they change, the tensors are compared: the same values
    pass, and the refusal of other values is test_statistics_of_another_model_are_refused."""
    import os

    import splice.workflows.stats as stats_module

    _, _, tasks = task_models
    compared = []
    real = stats_module.compare_base
    monkeypatch.setattr(
        stats_module, "compare_base", lambda base, model: compared.append(model.location) or real(base, model)
    )
    splice.merge(parse_recipe(_recipe("regmean", tasks, 1)), tmp_path / "unchanged")
    assert compared == []
    weights = Path(tasks[1][0]) / "model.safetensors"
    before = os.stat(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # written again, same bytes
    try:
        splice.merge(parse_recipe(_recipe("regmean", tasks, 1)), tmp_path / "touched")
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert compared == [str(tasks[1][0])]
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_dir(tmp_path / "unchanged").values(), load_dir(tmp_path / "touched").values())
    )
