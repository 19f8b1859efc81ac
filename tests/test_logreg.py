"""The many-shot logistic-regression probe against scikit-learn's lbfgs run to convergence on the same grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mokd.errors import UserError
from mokd_eval.logreg import LAMBDA_GRID, fit_logreg, logreg_objective, logreg_probe
from mokd_eval.metrics import map11, mean_per_class_accuracy, top1

GRID = LAMBDA_GRID[::6]  # 8 of the 45 values, 1e-6 ... 1e4.5
TOL = 1e-7


def mixture(n: int, dim: int, classes: int, seed: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with non-negative-ish features, like pooled CNN features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * spread
    y = rng.integers(0, classes, n)
    return (means[y] + rng.normal(size=(n, dim)) + 2.0).astype(np.float32), y


def split(seed: int = 0, classes: int = 5):
    x, y = mixture(750, 12, classes, seed)
    return (x[:300], y[:300]), (x[300:450], y[300:450]), (x[450:], y[450:])


class sklearn_fit:
    """scikit-learn's lbfgs to convergence, on centred features: the same optimum (the intercept is not
    penalised, so it absorbs the shift; mapped back below), reached in a fraction of the iterations."""

    def __init__(self, x, y, lam, centre: bool = True):
        x = x.astype(np.float64)
        mean = x.mean(0) if centre else np.zeros(x.shape[1])
        clf = LogisticRegression(C=1 / lam, tol=1e-10, max_iter=100000).fit(x - mean, y)
        self.coef_, self.intercept_ = clf.coef_, clf.intercept_ - clf.coef_ @ mean
        self.classes_ = clf.classes_

    def decision_function(self, x):
        d = x.astype(np.float64) @ self.coef_.T + self.intercept_
        return d[:, 0] if d.shape[1] == 1 else d

    def predict(self, x):
        d = self.decision_function(x)
        return self.classes_[(d > 0).astype(int) if d.ndim == 1 else d.argmax(1)]


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["top1", "mean_per_class"])
def test_the_probe_picks_scikit_learns_lambda_and_accuracy(metric):
    (xa, ya), (xv, yv), (xt, yt) = split()
    score = top1 if metric == "top1" else (lambda p, y: mean_per_class_accuracy(p, y, 5))
    val = {lam: score(sklearn_fit(xa, ya, lam).predict(xv), yv) for lam in GRID}
    best = max(val.values())
    chosen = min(lam for lam, s in val.items() if s == best)
    ref = sklearn_fit(np.concatenate([xa, xv]), np.concatenate([ya, yv]), chosen)
    ref_test = score(ref.predict(xt), yt)

    t = [torch.from_numpy(a) for a in (xa, ya, xv, yv, xt, yt)]
    out = logreg_probe(*t, metric=metric, num_classes=5, lambdas=GRID, tol=TOL, log=lambda _: None)
    json.dumps(out)
    assert out["headline"] == metric
    assert out["lambda"] == pytest.approx(chosen)
    assert out["C"] == pytest.approx(1 / chosen)
    assert out[metric] == pytest.approx(ref_test, abs=0.1)
    for lam, s in val.items():
        assert out["val_scores"][repr(lam)] == pytest.approx(s, abs=1.0)  # at most one val sample apart
    assert out["converged"] and out["grid_converged"] and out["stop"] in ("gtol", "ftol")
    assert all(g["grad_norm"] <= TOL or g["stop"] == "ftol" for g in out["grid"].values())
    assert out["train_size"] == 300 and out["val_size"] == 150 and out["test_size"] == 300
    assert out["feature_dim"] == 12 and out["preprocessing"] == "none"
    assert len(out["grid"]) == len(GRID) and out["grid_iterations"] > out["iterations"] > 0
    # the refit is scikit-learn's optimum
    x64, y64 = torch.from_numpy(np.concatenate([xa, xv])).double(), torch.from_numpy(np.concatenate([ya, yv]))
    ref_obj = logreg_objective(x64, y64, torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_), chosen)
    assert out["objective"] == pytest.approx(ref_obj, rel=1e-6)


@pytest.mark.parametrize("lam,centre", [(1e-2, True), (1.0, True), (100.0, False)])
def test_a_fit_reaches_scikit_learns_weights(lam, centre):
    (xa, ya), _, _ = split(seed=1)
    ref = sklearn_fit(xa, ya, lam, centre)
    fit = fit_logreg(torch.from_numpy(xa), torch.from_numpy(ya), lam, num_outputs=5, tol=TOL)
    assert fit.converged and fit.iterations > 0
    assert fit.grad_norm <= TOL or fit.stop == "ftol" and fit.grad_norm <= 10 * TOL
    x64 = torch.from_numpy(xa).double()
    ref_obj = logreg_objective(x64, torch.from_numpy(ya), torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_),
                               lam)
    assert fit.objective == pytest.approx(ref_obj, rel=1e-7)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(fit.weight.numpy(), ref.coef_, atol=1e-3 * scale)
    # the softmax intercept is defined up to a shift: compare centred
    b, rb = fit.bias.numpy(), ref.intercept_
    np.testing.assert_allclose(b - b.mean(), rb - rb.mean(), atol=1e-3 * max(1.0, np.abs(rb).max()))


def multilabel(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    w = rng.normal(size=(10, 4))
    targets = (x @ w + rng.normal(size=(n, 4)) * 1.5 > 0.5).astype(np.float32)
    return x, targets


@pytest.mark.slow
def test_map11_is_scikit_learns_one_vs_rest():
    x, t = multilabel(600, 2)
    (xa, ta), (xv, tv), (xt, tt) = (x[:250], t[:250]), (x[250:400], t[250:400]), (x[400:], t[400:])

    def ovr(xf, tf, lam):
        return [sklearn_fit(xf, tf[:, c], lam) for c in range(4)]

    def scores(models, xs):
        return np.stack([m.decision_function(xs.astype(np.float64)) for m in models], 1)

    val = {lam: map11(scores(ovr(xa, ta, lam), xv), tv) for lam in GRID}
    best = max(val.values())
    chosen = min(lam for lam, s in val.items() if s == best)
    ref_test = map11(scores(ovr(np.concatenate([xa, xv]), np.concatenate([ta, tv]), chosen), xt), tt)

    out = logreg_probe(*(torch.from_numpy(a) for a in (xa, ta, xv, tv, xt, tt)), metric="map11", num_classes=4,
                       lambdas=GRID, tol=TOL, log=lambda _: None)
    json.dumps(out)
    assert out["lambda"] == pytest.approx(chosen)
    assert out["map11"] == pytest.approx(ref_test, abs=0.1)
    assert out["converged"] and out["grid_converged"]


def test_a_class_missing_from_train_is_not_fitted_but_still_counted():
    (xa, ya), (xv, yv), (xt, yt) = split(seed=3)
    keep = ya != 4  # class 4 appears in val and test only
    out = logreg_probe(*(torch.from_numpy(a) for a in (xa[keep], ya[keep], xv, yv, xt, yt)), metric="mean_per_class",
                       num_classes=5, lambdas=GRID[2:5], tol=1e-6, log=lambda _: None)
    assert out["converged"] and 0 < out["mean_per_class"] < 100


def test_bad_input_is_a_user_error():
    (xa, ya), (xv, yv), (xt, yt) = split()
    t = [torch.from_numpy(a) for a in (xa, ya, xv, yv, xt, yt)]
    with pytest.raises(UserError, match="metric"):
        logreg_probe(*t, metric="top5", num_classes=5)
    with pytest.raises(UserError, match=r"labels must be 300 integers in \[0, 3\)"):
        logreg_probe(*t, metric="top1", num_classes=3)
    with pytest.raises(UserError, match="val features have 11 dimensions"):
        logreg_probe(t[0], t[1], t[2][:, :11], t[3], t[4], t[5], metric="top1", num_classes=5)
    with pytest.raises(UserError, match="multi-hot"):
        logreg_probe(*t, metric="map11", num_classes=5)
