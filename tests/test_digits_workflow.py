"""The digits workflow: real data, real training, and greedy soups scored through `make_scorer`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import splice
from splice.demo import digits


def test_splits_partition_the_dataset_and_repeat_for_a_seed():
    splits = digits.load_digits_splits(seed=0)
    parts = [splits.pretrain, splits.finetune, splits.val, splits.test]
    assert sum(len(part.y) for part in parts) == 1797
    for part in parts:
        assert part.x.shape == (len(part.y), 1, 8, 8) and part.x.dtype == torch.float32
        assert 0.0 <= part.x.min() and part.x.max() <= 1.0
        assert set(part.y.tolist()) == set(range(10))

    # Every image (with its duplicates) lands in exactly one split.
    everything = torch.cat([torch.cat([p.x.flatten(1), p.y[:, None].float()], 1) for p in parts])
    full = digits.load_digits_splits(seed=1)
    full_rows = torch.cat(
        [
            torch.cat([p.x.flatten(1), p.y[:, None].float()], 1)
            for p in (full.pretrain, full.finetune, full.val, full.test)
        ]
    )
    assert torch.equal(
        torch.unique(everything, dim=0, return_counts=True)[1], torch.unique(full_rows, dim=0, return_counts=True)[1]
    )

    again = digits.load_digits_splits(seed=0)
    assert torch.equal(again.val.x, splits.val.x) and torch.equal(again.test.y, splits.test.y)
    assert not torch.equal(full.val.y, splits.val.y)


def test_augment_shifts_by_at_most_the_given_pixels():
    x = digits.load_digits_splits().val.x[:32]
    shifted = digits.augment(x, torch.Generator().manual_seed(0), shift=1)
    padded = F.pad(x, (1, 1, 1, 1))
    candidates = torch.stack([padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)], 1)
    assert (candidates == shifted[:, None]).flatten(2).all(-1).any(1).all()
    noisy = digits.augment(x, torch.Generator().manual_seed(0), noise=0.1)
    assert noisy.shape == x.shape and not torch.equal(noisy, x) and 0.0 <= noisy.min() and noisy.max() <= 1.0


def test_training_lowers_loss_raises_accuracy_and_repeats():
    splits = digits.load_digits_splits()
    model = digits.new_model(seed=0)
    before = digits.accuracy(model, *splits.val)
    losses = digits.train(model, splits.pretrain, lr=3e-3, steps=100, seed=0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert digits.accuracy(model, *splits.val) > before + 0.3

    augmented = digits.Augmentation(noise=0.1, shift=1)
    first = digits.train(digits.new_model(seed=0), splits.pretrain, lr=3e-3, steps=5, seed=7, augmentation=augmented)
    second = digits.train(digits.new_model(seed=0), splits.pretrain, lr=3e-3, steps=5, seed=7, augmentation=augmented)
    assert first == second


def test_scorer_on_the_saved_state_dict_equals_accuracy_of_the_loaded_model(tmp_path):
    splits = digits.load_digits_splits()
    model = digits.new_model(seed=0)
    digits.train(model, splits.pretrain, lr=3e-3, steps=20)
    model.save_pretrained(tmp_path / "trained")
    digits.new_model(seed=1).save_pretrained(tmp_path / "untrained")

    score = digits.make_scorer(*splits.val, tmp_path / "trained")
    for name in ("trained", "untrained"):
        on_disk = load_file(tmp_path / name / "model.safetensors")
        expected = digits.accuracy(digits.load_model(tmp_path / name), *splits.val)
        assert score(on_disk) == expected
        assert digits.accuracy(on_disk, *splits.val, model_dir=tmp_path / "trained") == expected
    assert score(model.state_dict()) == digits.accuracy(model, *splits.val)

    names = digits.checkpoint_names(model)
    assert set(names) == set(load_file(tmp_path / "trained" / "model.safetensors"))
    assert set(names.values()) == set(model.state_dict())


def test_greedy_soup_is_no_worse_than_its_best_ingredient_and_reloads(tmp_path):
    base_dir, ingredient_dirs, splits = digits.prepare_ingredients(tmp_path / "work", count=4)
    assert len(ingredient_dirs) == 4 and len({d.name for d in ingredient_dirs}) == 4
    held_out = [digits.accuracy(digits.load_model(d), *splits.val) for d in ingredient_dirs]

    report = splice.greedy_soup(
        ingredient_dirs, tmp_path / "greedy", digits.make_scorer(*splits.val, base_dir), device="cpu"
    )
    assert report.best_ingredient.score == max(held_out)
    assert report.soup_score >= max(held_out)
    reloaded = digits.ViTForImageClassification.from_pretrained(tmp_path / "greedy")
    assert digits.accuracy(reloaded, *splits.val) == report.soup_score
