"""`merge_method: localize_stitch` (Localize-and-Stitch) through `splice merge`: with disjoint regions it equals
applying each mask patch in turn (`splice.apply_patches`); with overlapping ones it equals the paper's rule computed
here in numpy, from the tensors and mask bits as safetensors itself reads them; its report's numbers against numpy;
every bad input refused in one line with nothing written; the report as the CLI prints it."""

from __future__ import annotations

import copy
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import splice
from splice.errors import SpliceError
from splice.merge.localize_stitch import TaskRegion, plan_stitch
from splice.merge.recipe import parse_recipe
from splice.sparsify import mask_indices, pack_mask
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import plan_same_name

from conftest import perturbed, save, tiny_model
from helpers import load_dir, merge_refused, run_cli

DENSITY = 0.2  # of all float entries, per fine-tune: regions large enough on a tiny model to overlap


def _split_fine_tunes(model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two fine-tunes changing complementary halves of every parameter: their regions cannot overlap."""
    generator = torch.Generator().manual_seed(seed)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for one, other in zip(first.parameters(), second.parameters()):
            noise = torch.randn(one.shape, generator=generator) * 0.05
            half = torch.rand(one.shape, generator=generator) < 0.5
            one.add_(noise * half)
            other.add_(noise * ~half)
    return first, second


def _frozen_norms(model: torch.nn.Module, pretrained: torch.nn.Module) -> torch.nn.Module:
    """`model` with its LayerNorm parameters the pretrained ones (a fine-tune that froze them): tensors no region
    covers."""
    frozen = {name: value for name, value in pretrained.state_dict().items() if "LayerNorm" in name}
    model.load_state_dict(frozen, strict=False)
    return model


def _mask_patch(base: Path, tuned: Path, out: Path, values: bool = True) -> Path:
    patch = splice.extract_patch(base, tuned, "mask", density=DENSITY, mask_scope="model", mask_values=values)
    patch.save(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The pretrained tiny BERT; two fine-tunes of disjoint changes with their mask patches; three fine-tunes changed
    everywhere but in their LayerNorms with theirs (the second a bare mask)."""
    root = tmp_path_factory.mktemp("stitch")
    pretrained = tiny_model("bert", 0)
    base = save(pretrained, root / "base", False)
    split = [save(m, root / f"half{i}", False) for i, m in enumerate(_split_fine_tunes(pretrained, 5))]
    tuned = [
        save(_frozen_norms(perturbed(pretrained, i + 1, 0.05), pretrained), root / f"task{i}", False) for i in range(3)
    ]
    return {
        "root": root,
        "base": base,
        "split": split,
        "split_masks": [_mask_patch(base, t, root / f"half{i}.mask") for i, t in enumerate(split)],
        "tuned": tuned,
        "masks": [_mask_patch(base, t, root / f"task{i}.mask", values=i != 1) for i, t in enumerate(tuned)],
    }


def _recipe(base: Path, tuned, masks) -> dict:
    return {
        "merge_method": "localize_stitch",
        "base_model": str(base),
        "models": [{"model": str(t), "mask": str(m)} for t, m in zip(tuned, masks)],
    }


def _mask_bits(patch: Path) -> dict[str, np.ndarray]:
    """A mask patch's regions, unpacked here with numpy from the file (entry 8i+j in bit j of byte i)."""
    tensors = load_file(patch / "tensors.safetensors")
    shapes = json.loads((patch / "patch.json").read_text())["settings"]["shapes"]
    return {
        name: np.unpackbits(tensors[name + ".mask"].numpy(), bitorder="little")[: int(np.prod(shape))]
        .astype(bool)
        .reshape(shape)
        for name, shape in shapes.items()
    }


def _flattened(base: Path, masks) -> tuple[list[str], list[np.ndarray]]:
    """The tensors some region covers (in the base's storage order), and each region over all of them together."""
    regions = [_mask_bits(m) for m in masks]
    names = [n for n in load_dir(base) if any(n in r for r in regions)]
    shapes = {n: next(r[n].shape for r in regions if n in r) for n in names}
    return names, [np.concatenate([r.get(n, np.zeros(shapes[n], bool)).reshape(-1) for n in names]) for r in regions]


def _numpy_stitch(base: Path, tuned, masks) -> dict[str, np.ndarray]:
    """theta_pre + sum_i gamma_i * (theta_i - theta_pre) / max(sum_i gamma_i, 1), in fp32, tasks summed in order."""
    pretrained = {name: t.float().numpy() for name, t in load_dir(base).items()}
    states = [{name: t.float().numpy() for name, t in load_dir(t).items()} for t in tuned]
    regions = [_mask_bits(m) for m in masks]
    stitched = {}
    for name, before in pretrained.items():
        total = np.zeros_like(before)
        count = np.zeros(before.shape, np.float32)
        for state, region in zip(states, regions):
            if name in region:
                total = total + np.where(region[name], state[name] - before, np.float32(0))
                count = count + region[name]
        stitched[name] = before + total / np.maximum(count, np.float32(1))
    return stitched


def test_disjoint_regions_equal_applying_each_mask_patch_in_turn(models, tmp_path):
    left, right = (_mask_bits(m) for m in models["split_masks"])
    assert not any((left[n] & right[n]).any() for n in left if n in right)  # the regions are disjoint
    assert set(left) & set(right)  # and share tensors: the kernel adds two tasks' changes to one tensor
    recipe = _recipe(models["base"], models["split"], models["split_masks"])
    report = splice.merge(parse_recipe(recipe), tmp_path / "stitched")
    splice.apply_patches(models["split_masks"], models["base"], tmp_path / "applied")
    stitched, applied = load_dir(tmp_path / "stitched"), load_dir(tmp_path / "applied")
    assert stitched.keys() == applied.keys()
    for name in applied:
        assert torch.equal(stitched[name], applied[name]), name
    stitch = report.method_report
    assert stitch.shared == 0
    assert [o.shared for o in stitch.overlaps] == [0]
    assert stitch.overlaps[0].jaccard == 0.0
    assert [t.unshared_share for t in stitch.tasks] == [1.0, 1.0]
    assert [t.entries for t in stitch.tasks] == [int(sum(g.sum() for g in r.values())) for r in (left, right)]


def test_overlapping_regions_equal_the_rule_computed_in_numpy(models, tmp_path):
    regions = [_mask_bits(m) for m in models["masks"]]
    counts = {n: sum(r[n].astype(int) for r in regions if n in r) for n in regions[0]}
    assert max(int(c.max()) for c in counts.values()) == 3  # entries all three regions cover (and averaged)
    recipe = _recipe(models["base"], models["tuned"], models["masks"])
    splice.merge(parse_recipe(recipe), tmp_path / "stitched")
    stitched = load_dir(tmp_path / "stitched")
    expected = _numpy_stitch(models["base"], models["tuned"], models["masks"])
    assert stitched.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(stitched[name].numpy(), value), name  # exact: the same fp32 operations in order
    pretrained = load_dir(models["base"])
    uncovered = [n for n in pretrained if not any(n in r for r in regions)]
    assert uncovered  # tensors no region covers are the pretrained ones, bit for bit
    assert all(torch.equal(stitched[n], pretrained[n]) for n in uncovered)


def test_bf16_sharded_models_stitch_in_fp32_and_round_once(tmp_path):
    pretrained = tiny_model("bert", 0)
    base = save(pretrained.to(torch.bfloat16), tmp_path / "base", True)
    tuned = [save(perturbed(pretrained, i + 1, 0.05).to(torch.bfloat16), tmp_path / f"t{i}", True) for i in range(2)]
    masks = [_mask_patch(base, t, tmp_path / f"t{i}.mask") for i, t in enumerate(tuned)]  # values: fp32 changes
    splice.merge(parse_recipe(_recipe(base, tuned, masks)), tmp_path / "stitched")
    stitched = load_dir(tmp_path / "stitched")
    for name, value in _numpy_stitch(base, tuned, masks).items():
        assert stitched[name].dtype == torch.bfloat16
        assert torch.equal(stitched[name], torch.from_numpy(value).to(torch.bfloat16)), name


def _task_data(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)

    def batch() -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 64, (12, 7), generator=generator), "labels": torch.arange(12) % 3}

    return {"train": batch(), "test": batch()}


def test_learned_regions_stitch_by_the_rule_and_average_the_heads_they_both_carry(models, tmp_path):
    """Regions learned on data (`splice.localize`): sparse deltas over the layers plus the fine-tune's head carried
    whole, so two tasks' heads are covered by both regions and averaged."""
    masks = []
    for i, tuned in enumerate(models["tuned"][:2]):
        out = tmp_path / f"learned{i}"
        splice.localize(models["base"], tuned, _task_data(i), density=0.05, steps=2, out=out)
        masks.append(out)
    recipe = _recipe(models["base"], models["tuned"][:2], masks)
    report = splice.merge(parse_recipe(recipe), tmp_path / "stitched").method_report
    stitched = load_dir(tmp_path / "stitched")
    for name, value in _numpy_stitch(models["base"], models["tuned"][:2], masks).items():
        assert np.array_equal(stitched[name].numpy(), value), name
    # the heads are stitched (averaged above) but counted apart: the overlaps and shares are the layers' regions'
    head = {"classifier.weight", "classifier.bias"}
    assert not head & {t.name for t in report.tensors}
    assert [task.carried for task in report.tasks] == [sum(stitched[name].numel() for name in head)] * 2
    bits = [{name: m for name, m in _mask_bits(mask).items() if name not in head} for mask in masks]
    for task, region in zip(report.tasks, bits):
        assert task.entries == sum(int(m.sum()) for m in region.values())
    shared = sum(int((bits[0][n] & bits[1][n]).sum()) for n in bits[0] if n in bits[1])
    union = report.tasks[0].entries + report.tasks[1].entries - shared
    assert (report.overlaps[0].shared, report.overlaps[0].jaccard) == (shared, shared / union)
    assert report.shared == shared and report.covered == union


TASK_HOOKS = textwrap.dedent("""
    import torch

    def _task(seed):
        generator = torch.Generator().manual_seed(seed)

        def batch():
            return {"input_ids": torch.randint(0, 64, (12, 7), generator=generator), "labels": torch.arange(12) % 3}

        return {"train": batch(), "test": batch()}

    def first():
        return _task(0)

    def second():
        return _task(1)
""")


def test_regions_learned_from_data_in_the_recipe_are_those_splice_localize_learns(models, tmp_path):
    """Models giving `data:` have their regions learned during the merge with the method's parameters: the merge is
    the stitch of the mask patches `splice.localize` writes with the same settings."""
    (tmp_path / "tasks.py").write_text(TASK_HOOKS)
    tuned = models["tuned"][:2]
    settings = {"density": 0.05, "steps": 2, "head": "pretrained"}
    masks = []
    for i, function in enumerate(("first", "second")):
        hook = f"{tmp_path / 'tasks.py'}:{function}"
        splice.localize(models["base"], tuned[i], hook, **settings, out=tmp_path / f"region{i}")
        masks.append(tmp_path / f"region{i}")
    from_masks = _recipe(models["base"], tuned, masks)
    splice.merge(parse_recipe(from_masks), tmp_path / "from-masks")
    from_data = {
        "merge_method": "localize_stitch",
        "base_model": str(models["base"]),
        "parameters": settings,
        "models": [
            {"model": str(t), "data": f"{tmp_path / 'tasks.py'}:{f}"} for t, f in zip(tuned, ("first", "second"))
        ],
    }
    report = splice.merge(parse_recipe(from_data), tmp_path / "from-data").method_report
    expected, got = load_dir(tmp_path / "from-masks"), load_dir(tmp_path / "from-data")
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert [task.mask for task in report.tasks] == [f"the region learned on {m['data']}" for m in from_data["models"]]
    assert not any(t.name.startswith("classifier.") for t in report.tensors)  # head: pretrained


def test_a_model_given_as_base_plus_adapter_learns_its_region_from_data_as_the_model_itself(models, tmp_path):
    """A recipe's model may be a reference with an adapter applied on the fly (`BASE+PATCH`): the region learned from
    its `data:` is the one learned from the model that reference reads as (the patched checkpoint, not a path)."""
    (tmp_path / "tasks.py").write_text(TASK_HOOKS)
    splice.extract_patch(models["base"], models["tuned"][0], "delta").save(tmp_path / "delta")

    def recipe(model: str) -> dict:
        return {
            "merge_method": "localize_stitch",
            "base_model": str(models["base"]),
            "parameters": {"density": 0.05, "steps": 2},
            "models": [
                {"model": model, "data": f"{tmp_path / 'tasks.py'}:first"},
                {"model": str(models["tuned"][1]), "data": f"{tmp_path / 'tasks.py'}:second"},
            ],
        }

    splice.merge(parse_recipe(recipe(str(models["tuned"][0]))), tmp_path / "from-model")
    splice.merge(parse_recipe(recipe(f"{models['base']}+{tmp_path / 'delta'}")), tmp_path / "from-reference")
    expected, got = load_dir(tmp_path / "from-model"), load_dir(tmp_path / "from-reference")
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_the_report_against_numpy(models, tmp_path):
    recipe = _recipe(models["base"], models["tuned"], models["masks"])
    report = splice.merge(parse_recipe(recipe), tmp_path / "stitched").method_report
    regions = [_mask_bits(m) for m in models["masks"]]
    names, flat = _flattened(models["base"], models["masks"])
    count = sum(g.astype(int) for g in flat)
    assert report.covered == int((count > 0).sum())
    assert report.shared == int((count >= 2).sum())
    assert report.parameters == sum(t.numel() for t in load_dir(models["base"]).values() if t.is_floating_point())
    for task, gamma, model, mask in zip(report.tasks, flat, models["tuned"], models["masks"]):
        assert (task.model, task.mask) == (str(model), str(mask))
        assert task.entries == int(gamma.sum())
        assert task.unshared == int((gamma & (count == 1)).sum())
        assert task.unshared_share == int((gamma & (count == 1)).sum()) / int(gamma.sum())
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert [(o.first, o.second) for o in report.overlaps] == [
        (str(models["tuned"][i]), str(models["tuned"][j])) for i, j in pairs
    ]
    for overlap, (i, j) in zip(report.overlaps, pairs):
        assert overlap.shared == int((flat[i] & flat[j]).sum())
        assert overlap.jaccard == int((flat[i] & flat[j]).sum()) / int((flat[i] | flat[j]).sum())
        assert 0 < overlap.jaccard < 1
    assert [t.name for t in report.tensors] == names
    for tensor in report.tensors:
        assert tensor.entries == tuple(int(r[tensor.name].sum()) if tensor.name in r else 0 for r in regions)
        assert tensor.shared == int((sum(r[tensor.name].astype(int) for r in regions if tensor.name in r) >= 2).sum())


def test_masks_from_the_registry_give_the_same_stitch(models, tmp_path, monkeypatch):
    registry = splice.Registry.init(tmp_path / "registry")
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "registry"))
    recipe = _recipe(models["base"], models["tuned"], models["masks"])
    for i, entry in enumerate(recipe["models"]):
        registry.push(f"region-{i}", entry["mask"])
        entry["mask"] = f"region-{i}@1"
    splice.merge(parse_recipe(recipe), tmp_path / "from-registry")
    splice.merge(parse_recipe(_recipe(models["base"], models["tuned"], models["masks"])), tmp_path / "from-dirs")
    ours, theirs = load_dir(tmp_path / "from-registry"), load_dir(tmp_path / "from-dirs")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    card = (tmp_path / "from-registry" / "README.md").read_text()
    assert f"`region-0@1` | mask | `{registry.resolve('region-0@1').digest}`" in card


# -- bad input: one line, nothing written ---------------------------------------------------------------------------


def test_a_patch_of_another_kind_is_refused(models, tmp_path):
    delta = splice.extract_patch(models["base"], models["tuned"][0], "delta")
    delta.save(tmp_path / "delta")
    recipe = _recipe(models["base"], models["tuned"][:1], [tmp_path / "delta"])
    merge_refused(
        recipe, tmp_path / "out", f"mask: {tmp_path / 'delta'} is a delta patch, not a mask patch", "--kind mask"
    )


def test_a_mask_made_on_another_base_is_refused(models, tmp_path):
    other = save(tiny_model("bert", 7), tmp_path / "other-base", False)
    _mask_patch(other, models["tuned"][0], tmp_path / "elsewhere")
    recipe = _recipe(models["base"], models["tuned"][:1], [tmp_path / "elsewhere"])
    merge_refused(recipe, tmp_path / "out", "mask: ", "is not the base this mask patch was made for")


def test_a_mask_patch_listing_a_tensor_it_holds_no_mask_of_is_refused(models, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(models["masks"][0], damaged)
    manifest = json.loads((damaged / "patch.json").read_text())
    manifest["settings"]["shapes"]["bert.nothing.weight"] = [2]
    (damaged / "patch.json").write_text(json.dumps(manifest))
    recipe = _recipe(models["base"], models["tuned"][:1], [damaged])
    merge_refused(
        recipe, tmp_path / "out", f"mask: {damaged}", "lists bert.nothing.weight but holds no bert.nothing.weight.mask"
    )


def test_values_that_are_not_the_models_change_are_refused_by_tensor(models, tmp_path):
    tuned, masks = models["tuned"], models["masks"]
    recipe = _recipe(models["base"], [tuned[0], tuned[2]], [masks[2], masks[0]])  # each the other's sparse delta
    merge_refused(recipe, tmp_path / "out", "its values for bert.", f"are not {tuned[0]}'s change", "another fine-tune")
    bare = _recipe(models["base"], [tuned[0]], [masks[1]])  # a bare mask carries no values to check: it stitches
    splice.merge(parse_recipe(bare), tmp_path / "bare")
    assert (tmp_path / "bare" / "model.safetensors").is_file()


def test_recipe_mistakes_are_refused_before_anything_is_opened(models, tmp_path):
    recipe = _recipe(models["base"], models["tuned"], models["masks"])
    del recipe["models"][1]["mask"]
    merge_refused(recipe, tmp_path / "out", f"model {models['tuned'][1]} gives no mask: and no data:", "--kind mask")
    both = _recipe(models["base"], models["tuned"], models["masks"])
    both["models"][0]["data"] = "tasks.py:first"
    merge_refused(both, tmp_path / "out", "gives both mask: and data:")
    tuned_up = {**_recipe(models["base"], models["tuned"], models["masks"]), "parameters": {"density": 0.1}}
    merge_refused(tuned_up, tmp_path / "out", "parameters (density) say how a region is learned", "remove them")
    weighted = _recipe(models["base"], models["tuned"], models["masks"])
    weighted["models"][0]["parameters"] = {"weight": 0.5}
    merge_refused(weighted, tmp_path / "out", "unknown parameter 'weight' for localize_stitch (known: density, steps")
    ties = {**_recipe(models["base"], models["tuned"], models["masks"]), "merge_method": "ties"}
    merge_refused(ties, tmp_path / "out", "gives mask:, which only localize_stitch read")
    unbased = _recipe(models["base"], models["tuned"], models["masks"])
    del unbased["base_model"]
    merge_refused(unbased, tmp_path / "out", "localize_stitch needs base_model")
    listed = _recipe(models["base"], [models["base"], *models["tuned"]], [models["masks"][0], *models["masks"]])
    merge_refused(listed, tmp_path / "out", "is listed under models:; localize_stitch stitches")
    exported = {**_recipe(models["base"], models["tuned"], models["masks"]), "compute": "mergekit"}
    merge_refused(exported, tmp_path / "out", "mergekit has no localize_stitch")


@pytest.mark.parametrize("density", [[0.5, 0.05], [{"filter": "attention", "value": 0.5}, {"value": 0.05}]])
def test_a_learning_parameter_varying_by_tensor_is_refused(models, tmp_path, density):
    """A region is learned over the whole model with one density (and one of each setting): a gradient or filtered
    value would otherwise be read at one tensor and silently used for all."""
    learned = {
        "merge_method": "localize_stitch",
        "base_model": str(models["base"]),
        "parameters": {"density": density, "steps": 1},
        "models": [{"model": str(t), "data": "tasks.py:first"} for t in models["tuned"][:2]],
    }
    merge_refused(learned, tmp_path / "out", "localize_stitch takes one value of 'density' for the whole merge")


def test_a_region_unlike_the_models_tensors_is_refused_by_name(models):
    checkpoint = Checkpoint.open(models["base"])
    plan = plan_same_name([checkpoint], None)
    name = "bert.pooler.dense.weight"
    region = TaskRegion("region", {name: pack_mask(torch.ones(16, 8, dtype=torch.bool))}, {name: (16, 8)})
    with pytest.raises(SpliceError, match=rf"region covers {name} as \[16, 8\], but the models' {name} is \[16, 16\]"):
        plan_stitch(plan, 0, [0], [region], ["model"])


@pytest.mark.parametrize("shape", [(1,), (13,), (7, 9), (4, 4, 5)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_mask_indices_are_the_set_entries_in_order_and_ignore_padding(shape, density):
    generator = torch.Generator().manual_seed(len(shape) * 10 + int(density * 100))
    mask = torch.rand(shape, generator=generator) < density
    packed = pack_mask(mask)
    expected = np.flatnonzero(mask.numpy())
    assert np.array_equal(mask_indices(packed, shape).numpy(), expected)
    dirty = packed.clone()
    dirty[-1] |= 0xFF  # every bit of the last byte set, its padding bits too
    last = np.zeros(int(np.prod(shape)), bool)
    last[8 * (dirty.numel() - 1) :] = True
    assert np.array_equal(mask_indices(dirty, shape).numpy(), np.flatnonzero(mask.numpy().reshape(-1) | last))


# -- the command line -----------------------------------------------------------------------------------------------


def test_splice_merge_prints_the_regions(models, tmp_path, monkeypatch, capsys):
    recipe = _recipe(models["base"], models["tuned"], models["masks"])
    (tmp_path / "stitch.yml").write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(["merge", tmp_path / "stitch.yml", "--out", tmp_path / "stitched"], monkeypatch, capsys)
    assert code == 0, err
    _, regions = _flattened(models["base"], models["masks"])
    assert "localize_stitch:" in out
    assert "overlap of the regions" in out
    assert "where the regions fall" in out
    jaccard = int((regions[0] & regions[2]).sum()) / int((regions[0] | regions[2]).sum())
    assert f"{jaccard:.4f}" in out
    written = tmp_path / "stitched"
    assert not (written / "mergekit_config.yml").exists()
    assert (
        "No `mergekit_config.yml` is written: mergekit has no merge method localize_stitch"
        in (written / "README.md").read_text()
    )
    code, out, err = run_cli(
        ["merge", tmp_path / "stitch.yml", "--out", tmp_path / "again", "--json"], monkeypatch, capsys
    )
    assert code == 0, err
    shown = json.loads(out)["method_report"]
    assert [t["entries"] for t in shown["tasks"]] == [int(r.sum()) for r in regions]
    assert shown["overlaps"][1]["jaccard"] == jaccard
