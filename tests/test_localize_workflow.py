"""Skill localization on a live model (splice.localize, `splice patch extract --kind mask --localize`): the stored
patch is the graft, exactly; zero steps give the magnitude mask; the region has the requested size; the recorded
scores are what transformers gets from the applied patch; the head is carried or not; bad input is refused in one
line before anything is written, and Ctrl-C publishes nothing."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from test_cli_exits import interrupted, refused_in_one_line, run

import splice
from splice.errors import OutputExistsError, PatchError, SpliceError
from splice.registry.store import Registry
from splice.workflows.deploy import deploy

from conftest import perturbed, save, tiny_model

HOOK = textwrap.dedent("""
    import torch
    from pathlib import Path

    def task():
        ids = torch.randint(1, 64, (96, 10), generator=torch.Generator().manual_seed(7))
        labels = (ids[:, 0] % 3).long()
        return {"train": {"input_ids": ids[:64], "labels": labels[:64]},
                "test": {"input_ids": ids[64:], "labels": labels[64:]}}

    def no_test():
        return {"train": task()["train"]}
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT classifier and a 'fine-tune' of it (seeded noise on every tensor, larger on the first layer), and
    the task's data hook."""
    root = tmp_path_factory.mktemp("localize")
    base = tiny_model("bert", 0)
    tuned = perturbed(base, 1, 0.02)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if ".layer.0." in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    (root / "hook.py").write_text(HOOK)
    return save(base, root / "base", False), save(tuned, root / "tuned", False), f"{root / 'hook.py'}:task"


def _task(hook: str) -> dict:
    from splice.hooks import load_callable

    return load_callable(hook)()


def _unpacked(packed: np.ndarray, shape) -> np.ndarray:
    count = int(np.prod(shape))
    return np.unpackbits(packed, bitorder="little")[:count].reshape(shape).astype(bool)


def _layer_names(state: dict) -> list[str]:
    return [name for name in state if ".layer." in name]


def test_the_stored_patch_applied_is_the_graft_and_its_scores_are_the_applied_models(models, tmp_path):
    base, tuned, hook = models
    outcome = splice.localize(base, tuned, hook, density=0.05, steps=4, out=tmp_path / "region", device="cpu")
    applied = tmp_path / "applied"
    splice.apply_patches([tmp_path / "region"], base, applied)
    pre, ft = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    stored = load_file(tmp_path / "region" / "tensors.safetensors")
    got = load_file(applied / "model.safetensors")
    shapes = outcome.patch.meta.settings["shapes"]
    head = {"classifier.weight", "classifier.bias"}
    selected = 0
    for name, value in pre.items():
        if name in shapes:
            mask = _unpacked(stored[name + ".mask"], shapes[name])
            assert (name in head) == bool(mask.all()), name
            if name not in head:
                assert name in _layer_names(pre)
                selected += int(mask.sum())
            expected = value + mask.astype(np.float32) * (ft[name] - value)  # theta_pre + gamma (theta_ft - theta_pre)
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    eligible = sum(pre[name].size for name in _layer_names(pre) if not np.array_equal(pre[name], ft[name]))
    assert selected == outcome.selected == round(0.05 * eligible) and outcome.eligible == eligible
    assert set(outcome.carried) == head

    test = _task(hook)["test"]
    for model_dir, scored in ((applied, "learned_graft"), (tuned, "fine_tuned"), (base, "pretrained")):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            probabilities = model(input_ids=test["input_ids"]).logits.softmax(-1).numpy().astype(np.float64)
        confidence, predicted = probabilities.max(1), probabilities.argmax(1)
        correct = predicted == test["labels"].numpy()
        ece = 0.0
        for low in range(15):
            inside = (confidence > low / 15) & (confidence <= (low + 1) / 15)
            if inside.any():
                ece += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
        metrics = outcome.patch.meta.metrics
        assert metrics[f"{scored}_accuracy"] == pytest.approx(correct.mean(), abs=1e-6), scored
        assert metrics[f"{scored}_ece"] == pytest.approx(ece, abs=1e-5), scored
        assert outcome.scores[scored].accuracy == metrics[f"{scored}_accuracy"]
    assert outcome.losses[outcome.best_step] == min(outcome.losses)

    registry = Registry.init(str(tmp_path / "registry"))  # the registry keeps it and deploy applies it, as any patch
    registry.push("region", outcome.patch, alias="prod")
    record, _ = deploy(["region@prod"], base, tmp_path / "deployed", registry=registry, device="cpu")
    assert record.patches[0].kind == "mask" and record.patches[0].base_check == "verified"
    deployed = load_file(tmp_path / "deployed" / "model.safetensors")
    for name, value in got.items():
        np.testing.assert_array_equal(deployed[name], value, err_msg=name)


def test_with_zero_steps_the_region_is_the_magnitude_mask_and_the_head_can_stay_pretrained(models):
    base, tuned, hook = models
    outcome = splice.localize(base, tuned, hook, density=0.01, steps=0, head="pretrained", device="cpu")
    pre, ft = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    names = [name for name in _layer_names(pre) if not np.array_equal(pre[name], ft[name])]
    magnitudes = np.concatenate([np.abs(ft[name].astype(np.float32) - pre[name]).reshape(-1) for name in names])
    k = round(0.01 * magnitudes.size)
    threshold = np.sort(magnitudes)[::-1][k - 1]
    assert (magnitudes >= threshold).sum() == k  # no ties at the threshold in this seeded change
    stored = outcome.patch.tensors
    shapes = outcome.patch.meta.settings["shapes"]
    assert outcome.carried == [] and not {"classifier.weight", "classifier.bias"} & set(shapes)
    for name in names:
        expected = np.abs(ft[name].astype(np.float32) - pre[name]) >= threshold
        got = _unpacked(stored[name + ".mask"].numpy(), shapes[name]) if name in shapes else np.zeros_like(expected)
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert outcome.best_step == 0 and len(outcome.losses) == 1
    metrics = outcome.patch.meta.metrics
    assert metrics["learned_graft_accuracy"] == metrics["magnitude_graft_accuracy"]
    assert outcome.patch.meta.settings["localized"]["head"] == "pretrained"


def test_a_bounded_candidate_set_holds_the_region_and_the_patch_is_still_the_graft(models, tmp_path):
    """With `candidates=3` the region is learned among the 3k layer entries the fine-tune changed most (found in one
    streamed pass): it lies among them, has k entries, and the patch applied is still the graft, exactly."""
    base, tuned, hook = models
    outcome = splice.localize(base, tuned, hook, density=0.002, steps=3, candidates=3, out=tmp_path / "r", device="cpu")
    pre, ft = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    names = [name for name in _layer_names(pre) if not np.array_equal(pre[name], ft[name])]
    magnitudes = np.concatenate([np.abs(ft[name].astype(np.float32) - pre[name]).reshape(-1) for name in names])
    k = round(0.002 * magnitudes.size)
    threshold = np.sort(magnitudes)[::-1][3 * k - 1]
    shapes = outcome.patch.meta.settings["shapes"]
    selected = 0
    splice.apply_patches([tmp_path / "r"], base, tmp_path / "applied")
    got = load_file(tmp_path / "applied" / "model.safetensors")
    for name in names:
        mask = _unpacked(outcome.patch.tensors[name + ".mask"].numpy(), shapes[name]) if name in shapes else None
        if mask is None:
            continue
        change = ft[name].astype(np.float32) - pre[name]
        assert (np.abs(change[mask]) >= threshold).all(), name  # every entry among the candidates
        selected += int(mask.sum())
        np.testing.assert_array_equal(got[name], pre[name] + mask.astype(np.float32) * change, err_msg=name)
    assert selected == k == outcome.selected
    assert outcome.patch.meta.settings["localized"]["candidates"] == 3


def test_bad_input_is_refused_before_anything_is_written(models, tmp_path, make_models):
    base, tuned, hook = models
    out = tmp_path / "out"
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(PatchError, match=r"`density` must be in \(0, 1\]"):
            splice.localize(base, tuned, hook, density=density, out=out)
    with pytest.raises(SpliceError, match="must return {'train': batch, 'test': batch}"):
        splice.localize(base, tuned, hook.replace(":task", ":no_test"), density=0.01, out=out)
    other = save(tiny_model("vit", 0), tmp_path / "vit", False)
    with pytest.raises(SpliceError):
        splice.localize(base, other, hook, density=0.01, out=out)
    with pytest.raises(PatchError, match="changed nothing inside the model's layers"):
        splice.localize(base, base, hook, density=0.01, out=out)
    with pytest.raises(PatchError, match="`candidates` must be >= 1"):
        splice.localize(base, tuned, hook, density=0.01, candidates=0.5, out=out)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(OutputExistsError):
        splice.localize(base, tuned, hook, density=0.01, out=out)


def test_the_command_line_learns_a_patch_every_command_reads_and_refuses_bad_input(models, tmp_path):
    base, tuned, hook = models
    patch = tmp_path / "region"
    args = ["patch", "extract", "--base", base, "--tuned", tuned, "--kind", "mask", "--localize", "--data", hook]
    result = run(*map(str, [*args, "--density", "0.02", "--steps", "2", "--candidates", "0", "--out", patch]))
    assert result.returncode == 0, result.stderr
    localized = json.loads((patch / "patch.json").read_text())["settings"]["localized"]
    assert localized["candidates"] is None and localized["steps"] == 2  # 0: every changed entry
    assert "localized mask patch" in result.stdout and "learned graft" in result.stdout
    assert "warning: " in result.stderr and "are not in the localized patch" in result.stderr  # the embeddings too
    shown = run("inspect", str(patch))
    assert shown.returncode == 0 and "a learned skill region:" in shown.stdout, shown.stderr
    metrics = json.loads((patch / "patch.json").read_text())["metrics"]
    assert re.search(rf"learned_graft_accuracy +│ {metrics['learned_graft_accuracy']:.6g} ", shown.stdout)
    applied = run("patch", "apply", str(patch), "--base", str(base), "--out", str(tmp_path / "applied"))
    assert applied.returncode == 0, applied.stderr

    hookless = hook.replace(":task", ":no_test")
    cases = {
        (*args[:-2], "--density", "0.01", "--out", tmp_path / "a"): "--localize needs --data",
        (*args, "--out", tmp_path / "a"): "--localize needs --density",
        (*args, "--density", "0", "--out", tmp_path / "a"): "--density must be in (0, 1]",
        (*args, "--density", "0.01", "--steps", "-1", "--out", tmp_path / "a"): "--steps must be >= 0",
        (*args, "--density", "0.01", "--head", "old", "--out", tmp_path / "a"): "--head must be one of",
        (*args[:-1], hookless, "--density", "0.01", "--out", tmp_path / "a"): "'test': batch",
        (*args, "--density", "0.01", "--mask-only", "--out", tmp_path / "a"): "leave out --mask-scope",
    }
    other = save(tiny_model("vit", 0), tmp_path / "vit", False)
    shaped = [*args[:5], other, *args[6:]]
    cases[(*shaped, "--density", "0.01", "--out", tmp_path / "a")] = "vit"
    plain = [*args[:8], "--density", "0.01", "--steps", "3", "--data", hook, "--out", tmp_path / "a"]
    cases[tuple(plain)] = "--data, --steps go with --localize"
    lora = [*args[:7], "lora", *args[8:]]
    cases[(*lora, "--density", "0.01", "--out", tmp_path / "b")] = "give --kind mask, not --kind lora"
    refused_in_one_line(cases, tmp_path)


def test_ctrl_c_while_localizing_exits_130_and_publishes_nothing(models, tmp_path):
    base, tuned, hook = models
    out = tmp_path / "outputs" / "region"
    out.parent.mkdir()
    args = [
        *("patch", "extract", "--base", base, "--tuned", tuned, "--kind", "mask", "--localize", "--data", hook),
        *("--density", "0.02", "--out", out, "--device", "cpu", "--quiet"),
    ]
    result = interrupted(tmp_path, list(map(str, args)), out)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    assert "Traceback" not in result.stderr
