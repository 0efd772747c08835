"""The per-tensor math of RegMean and Fisher merging against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.errors import SpliceError
from splice.merge.stats.solve import WeightLayout, condition_number, fisher_average, regmean


def inputs(seed: int, rows: int, features: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, features))


def test_regmean_without_shrinkage_is_least_squares_over_all_inputs():
    """alpha = 1: the merged W minimises sum_i ||X_i W^T - X_i W_i^T||^2, i.e. lstsq over the stacked inputs."""
    rng = np.random.default_rng(0)
    xs = [inputs(i, 40 + 7 * i, 6) for i in range(3)]
    ws = [rng.normal(size=(5, 6)) for _ in range(3)]
    stacked_x = np.vstack(xs)
    stacked_y = np.vstack([x @ w.T for x, w in zip(xs, ws)])
    expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0].T
    solved = regmean([torch.tensor(w) for w in ws], [torch.tensor(x.T @ x) for x in xs], alpha=1.0)
    np.testing.assert_allclose(solved.weight.numpy(), expected, rtol=0, atol=1e-10)
    assert not solved.pseudo_inverse and solved.condition > 1


def test_regmean_with_shrinkage_equals_the_formula():
    rng = np.random.default_rng(1)
    xs = [inputs(10 + i, 30, 4) for i in range(2)]
    ws = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2)]
    alpha = 0.9
    shrunk = [alpha * (x.T @ x) + (1 - alpha) * np.diag(np.diag(x.T @ x)) for x in xs]
    expected = np.linalg.solve(sum(shrunk), sum(w.astype(np.float64) @ g for w, g in zip(ws, shrunk)).T).T
    grams = [torch.tensor(x.T @ x, dtype=torch.float32) for x in xs]
    solved = regmean([torch.tensor(w) for w in ws], grams, alpha=alpha)
    assert solved.weight.dtype == torch.float32
    np.testing.assert_allclose(solved.weight.numpy(), expected, rtol=0, atol=1e-5)


def test_regmean_of_linear_models_fitted_on_disjoint_data_is_the_fit_on_all_of_it():
    """Each model is the least-squares fit of its own data (no bias); with alpha = 1 their RegMean merge is the fit
    on the union of the data: X_i^T X_i W_i^T = X_i^T Y_i at each optimum."""
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(2, 5))
    xs = [inputs(20 + i, 25, 5) for i in range(4)]
    ys = [x @ truth.T + 0.3 * rng.normal(size=(25, 2)) for x in xs]
    fits = [np.linalg.lstsq(x, y, rcond=None)[0].T for x, y in zip(xs, ys)]
    everything = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    solved = regmean([torch.tensor(w) for w in fits], [torch.tensor(x.T @ x) for x in xs], alpha=1.0)
    np.testing.assert_allclose(solved.weight.numpy(), everything, rtol=0, atol=1e-10)
    assert not np.allclose(np.mean(fits, axis=0), everything, atol=1e-3)  # plain averaging does not get there


def test_conv1d_layout_is_the_transposed_problem():
    rng = np.random.default_rng(3)
    xs = [inputs(30 + i, 20, 4) for i in range(2)]
    ws = [rng.normal(size=(3, 4)) for _ in range(2)]
    grams = [torch.tensor(x.T @ x) for x in xs]
    linear = regmean([torch.tensor(w) for w in ws], grams, alpha=0.5)
    conv1d = regmean([torch.tensor(w.T) for w in ws], grams, alpha=0.5, layout=WeightLayout.in_out)
    torch.testing.assert_close(conv1d.weight, linear.weight.T, rtol=0, atol=1e-12)


def test_a_singular_system_is_solved_by_the_pseudo_inverse_anchored_on_the_mean_and_reported():
    """A feature no input ever uses (a zero column) makes sum G singular even with shrinkage: the data fix W on the
    used features (the least-squares part, by the pseudo-inverse) and nothing of its unused column, which keeps the
    models' mean (the bare pseudo-inverse would zero it)."""
    xs = [inputs(40 + i, 10, 4) for i in range(2)]
    for x in xs:
        x[:, 3] = 0.0
    ws = [np.random.default_rng(5 + i).normal(size=(2, 4)) for i in range(2)]
    solved = regmean([torch.tensor(w) for w in ws], [torch.tensor(x.T @ x) for x in xs], alpha=0.9)
    assert solved.pseudo_inverse
    shrunk = [0.9 * (x.T @ x) + 0.1 * np.diag(np.diag(x.T @ x)) for x in xs]
    system, right, mean = sum(shrunk), sum(w @ g for w, g in zip(ws, shrunk)), sum(ws) / 2
    expected = mean + (right - mean @ system) @ np.linalg.pinv(system)
    np.testing.assert_allclose(solved.weight.numpy(), expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(solved.weight.numpy()[:, 3], mean[:, 3], rtol=0, atol=1e-12)
    used = slice(0, 3)  # on the used features: the least-squares solution of the reduced system
    reduced = right[:, used] @ np.linalg.inv(system[used, used])
    np.testing.assert_allclose(solved.weight.numpy()[:, used], reduced, rtol=0, atol=1e-8)


def test_the_reported_condition_number_is_numpys_and_the_shrunk_system_the_formulas():
    """The condition number comes from the eigenvalues of the symmetric system (not an SVD): it must equal numpy's
    2-norm cond; a singular system's is infinite."""
    xs = [inputs(50 + i, 40, 6) * np.array([1e-3, 0.1, 1, 1, 10, 100]) for i in range(3)]
    ws = [np.random.default_rng(60 + i).normal(size=(5, 6)) for i in range(3)]
    solved = regmean([torch.tensor(w) for w in ws], [torch.tensor(x.T @ x) for x in xs], alpha=0.7)
    system = sum(0.7 * (x.T @ x) + 0.3 * np.diag(np.diag(x.T @ x)) for x in xs)
    assert solved.condition == pytest.approx(np.linalg.cond(system), rel=1e-6)
    assert solved.condition > 1e6  # spread enough for a wrong formula to show
    singular = np.diag([1.0, 2.0, 0.0])
    assert condition_number(torch.tensor(singular)) == np.inf == np.linalg.cond(singular)
    assert condition_number(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])) == np.inf


def test_a_solve_leaves_its_inputs_as_they_were():
    """The sums are accumulated in place: into buffers of their own, never into a model's fp64 weight or Gram."""
    xs = [inputs(70 + i, 12, 4) for i in range(3)]
    for x in xs:
        x[:, 3] = 0.0  # singular: the solve reads the models' mean as well
    weights = [torch.tensor(np.random.default_rng(80 + i).normal(size=(2, 4))) for i in range(3)]
    grams = [torch.tensor(x.T @ x) for x in xs]
    before = [t.clone() for t in weights + grams]
    regmean(weights, grams, alpha=0.8)
    for tensor, copy in zip(weights + grams, before):
        assert torch.equal(tensor, copy)


def test_fisher_average_equals_the_weighted_formula_and_equal_fishers_average():
    rng = np.random.default_rng(6)
    thetas = [rng.normal(size=(3, 5)) for _ in range(3)]
    fishers = [rng.uniform(0, 2, size=(3, 5)) for _ in range(3)]
    weights, epsilon = [1.0, 0.5, 2.0], 1e-3
    scaled = [w * (f + epsilon) for w, f in zip(weights, fishers)]
    expected = sum(s * t for s, t in zip(scaled, thetas)) / sum(scaled)
    ours = fisher_average([torch.tensor(t) for t in thetas], [torch.tensor(f) for f in fishers], weights, epsilon)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)
    same = [torch.tensor(fishers[0])] * 3
    torch.testing.assert_close(
        fisher_average([torch.tensor(t) for t in thetas], same), torch.tensor(np.mean(thetas, axis=0))
    )


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: regmean([torch.zeros(2, 3)], [torch.zeros(2, 2)]), "does not fit a weight of shape [2, 3]"),
        (lambda: regmean([torch.zeros(2, 3)], [torch.eye(3)], alpha=1.5), "alpha must be in [0, 1]"),
        (lambda: fisher_average([torch.zeros(2)], [torch.zeros(2)], epsilon=0.0), "some entries have no weight"),
        (lambda: fisher_average([torch.zeros(2)], [torch.zeros(3)]), "a Fisher diagonal of shape [3]"),
    ],
)
def test_bad_statistics_are_one_line(call, needle):
    with pytest.raises(SpliceError) as caught:
        call()
    assert needle in str(caught.value) and "\n" not in str(caught.value)
