"""Learned grafting masks (skill localization) on tensors: the region's exact size, the magnitude mask at zero steps,
and a planted task whose few decisive weights the learned mask finds where the magnitude mask does not."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.localize import Candidates, graft, learn_graft_mask, region_size
from splice.errors import PatchError
from splice.sparsify import top_k_over

PLANTED = [(0, 1), (0, 5), (1, 3), (1, 7)]
INERT = [(0, 40), (1, 41), (0, 42), (1, 43), (0, 50), (1, 51), (0, 52), (1, 53)]


def planted_task():
    """A linear classifier on 64 features of which only the first 32 ever carry data. The fine-tune's change: four
    decisive entries on live features (+-1), small noise everywhere, and eight larger (3.0) entries on dead features,
    which change nothing the data can see: the magnitude mask takes those, the task needs the four."""
    generator = torch.Generator().manual_seed(0)
    pretrained = {"w": torch.randn(2, 64, generator=generator) * 0.1}
    change = torch.randn(2, 64, generator=generator) * 0.02
    for i, j in PLANTED:
        change[i, j] = 1.0 if i == 0 else -1.0
    for i, j in INERT:
        change[i, j] = 3.0
    x = torch.zeros(256, 64)
    x[:, :32] = torch.randn(256, 32, generator=generator)
    y = (x @ (pretrained["w"] + change).T).argmax(1)

    def loss(parameters):
        return torch.nn.functional.cross_entropy(x @ parameters["w"].T, y)

    return pretrained, {"w": change}, loss


def _entries(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in mask.nonzero().tolist()}


def test_the_learned_mask_finds_the_planted_weights_the_magnitude_mask_misses():
    pretrained, changes, loss = planted_task()
    density = len(PLANTED) / 128
    learned = learn_graft_mask(pretrained, changes, lambda p: [loss(p)], density=density, steps=5, l1=1.0)
    magnitude = top_k_over({"w": changes["w"].abs()}, len(PLANTED))
    assert _entries(learned.masks["w"]) == set(PLANTED)
    assert not _entries(magnitude["w"]) & set(PLANTED)
    fine_tuned = float(loss({"w": pretrained["w"] + changes["w"]}))
    grafted = float(loss(graft(pretrained, changes, learned.masks)))
    assert grafted == pytest.approx(learned.losses[learned.best_step]) == pytest.approx(min(learned.losses))
    assert grafted < fine_tuned + 0.01 < float(loss(graft(pretrained, changes, magnitude)))
    assert learned.losses[0] == pytest.approx(float(loss(graft(pretrained, changes, magnitude))))


def test_with_zero_steps_the_learned_mask_is_the_magnitude_mask_over_every_tensor():
    generator = torch.Generator().manual_seed(3)
    changes = {"a": torch.randn(7, 5, generator=generator), "b": torch.randn(11, generator=generator)}
    pretrained = {name: torch.zeros_like(change) for name, change in changes.items()}
    for density in (0.01, 0.2, 0.5, 1.0):
        learned = learn_graft_mask(
            pretrained, changes, lambda p: [p["a"].sum() + p["b"].sum()], density=density, steps=0
        )
        k = max(1, round(density * 46))
        assert learned.selected == k == sum(int(m.sum()) for m in learned.masks.values())
        magnitudes = torch.cat([changes["a"].abs().reshape(-1), changes["b"].abs()])
        threshold = magnitudes.sort(descending=True).values[k - 1]
        for name, change in changes.items():
            assert torch.equal(learned.masks[name], change.abs() >= threshold)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_learned_region_has_exactly_the_requested_size(steps):
    generator = torch.Generator().manual_seed(5)
    changes = {"a": torch.randn(6, 6, generator=generator), "b": torch.zeros(10)}  # zeros: ties everywhere in b
    pretrained = {name: torch.randn(change.shape, generator=generator) for name, change in changes.items()}
    learned = learn_graft_mask(
        pretrained, changes, lambda p: [(p["a"] ** 2).sum() + p["b"].sum()], density=0.25, steps=steps, l1=0.5
    )
    assert sum(int(m.sum()) for m in learned.masks.values()) == learned.selected == round(0.25 * 46)
    assert len(learned.losses) == steps + 1


def test_top_k_over_breaks_ties_in_order():
    masks = top_k_over({"a": torch.ones(3), "b": torch.ones(2)}, 4)
    assert masks["a"].tolist() == [True, True, True] and masks["b"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("density", "steps", "needle"),
    [(0.0, 1, "`density` must be in (0, 1]"), (1.5, 1, "`density` must be in (0, 1]"), (0.1, -1, "`steps` must be")],
)
def test_bad_arguments_are_one_line(density, steps, needle):
    with pytest.raises(PatchError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        learn_graft_mask(
            {"w": torch.zeros(3)}, {"w": torch.ones(3)}, lambda p: [p["w"].sum()], density=density, steps=steps
        )
    assert region_size({"w": torch.ones(10)}, 0.01) == 1


def test_a_loss_given_in_parts_learns_the_region_of_the_whole_loss():
    """The live model's loss comes one batch of examples at a time (each part differentiated before the next is
    computed): the steps, and so the region and its losses, are those of the loss in one piece."""
    pretrained, changes, _ = planted_task()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 64, generator=generator)
    y = (x @ (pretrained["w"] + changes["w"]).T).argmax(1)

    def whole(parameters):
        return [torch.nn.functional.cross_entropy(x @ parameters["w"].T, y)]

    def in_parts(parameters):
        for start in range(0, 96, 40):  # parts of 40, 40 and 16 examples, weighted by their share
            part = slice(start, start + 40)
            yield torch.nn.functional.cross_entropy(x[part] @ parameters["w"].T, y[part]) * (len(y[part]) / 96)

    one = learn_graft_mask(pretrained, changes, whole, density=0.05, steps=4)
    parts = learn_graft_mask(pretrained, changes, in_parts, density=0.05, steps=4)
    assert torch.equal(one.masks["w"], parts.masks["w"])
    assert parts.losses == pytest.approx(one.losses, rel=1e-5)
    assert len(set(one.losses)) > 1  # the steps moved the region


def test_candidates_covering_every_entry_learn_the_dense_region_and_fewer_bound_it():
    """A region learned among candidate entries (their flat indices and the change there) is the dense one when the
    candidates are every entry, and lies among them when they are fewer."""
    pretrained, changes, loss = planted_task()
    one_part = lambda p: [loss(p)]  # noqa: E731
    dense = learn_graft_mask(pretrained, changes, one_part, density=0.05, steps=4)
    everywhere = Candidates.where(changes["w"], torch.ones(2, 64, dtype=torch.bool))
    indexed = learn_graft_mask(pretrained, {"w": everywhere}, one_part, density=0.05, steps=4)
    assert torch.equal(dense.masks["w"], indexed.masks["w"]) and dense.losses == indexed.losses
    k = round(0.05 * 128)
    top = top_k_over({"w": changes["w"].abs()}, 2 * k)["w"]
    bounded = learn_graft_mask(pretrained, {"w": Candidates.where(changes["w"], top)}, one_part, density=0.05, steps=4)
    assert int(bounded.masks["w"].sum()) == k and not (bounded.masks["w"] & ~top).any()
    assert torch.equal(bounded.on_candidates["w"], bounded.masks["w"].reshape(-1)[top.reshape(-1)])
    with pytest.raises(PatchError, match="larger than the 3 candidate entries"):
        learn_graft_mask(
            pretrained,
            {"w": Candidates.where(changes["w"], top_k_over({"w": top.float()}, 3)["w"])},
            one_part,
            density=0.05,
        )
