"""Many-shot transfer: L2-regularised logistic regression on frozen features (Kornblith, Shlens & Le, CVPR 2019).

The protocol as ssl-transfer (Ericsson et al. 2021) runs it: features are used as extracted (no normalisation,
no standardisation); for each of 45 penalties lambda log-spaced from 1e-6 to 1e5 (C = 1 / lambda) a
multinomial logistic regression is fitted on train and scored on val; the best lambda (ties to the weaker
penalty) is refitted on train + val and scored on test. VOC2007 (multi-label) fits one binary logistic
regression per class (one-vs-rest) and scores 11-point mAP.

The objective is scikit-learn's `LogisticRegression(penalty="l2", C=C, fit_intercept=True, solver="lbfgs")`:
sum_i loss_i + ||W||^2 / (2C), intercept unpenalised, the full [K, D] softmax weight for K > 2 classes. As
scikit-learn does, it is minimised divided by N, and a fit has converged when the largest absolute gradient
entry of that scaled objective is at most `tol` (scikit-learn's and SciPy's `gtol`).

Differences from ssl-transfer, all towards the converged optimum of the same objective: scikit-learn stops at
its default max_iter=100 there, here each fit runs to `tol` (docs/transfer.md measures the gap); the grid is
walked from strong to weak regularisation, each fit warm-started from the previous one (a heavily penalised
solution is found in a few steps and each next one is close); and the mAP path is binary logistic regression
with C, where ssl-transfer's old scikit-learn "multinomial" on two classes amounts to a binary fit with 2C.

The solver is torch's L-BFGS (strong Wolfe line search) in float32 with float64 loss sums, stopping at tol / 2
(or at the float32 rounding level of the gradient, 2e-6 times the features' RMS, if that is higher);
the gradient is then recomputed in float64 and, if above tol, the fit continues in float64. So `grad_norm` is
always the float64 figure. As SciPy (and so scikit-learn), a fit also counts as converged when float64
L-BFGS can no longer lower the objective (relative change under ~1e-14, the `ftol` stop); `stop` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mokd.errors import UserError
from mokd_eval.metrics import map11, mean_per_class_accuracy, top1

LAMBDA_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 5, 45))
METRICS = ("top1", "mean_per_class", "map11")
DEFAULT_TOL = 1e-6  # scikit-learn's criterion, tighter than its default 1e-4 (docs/transfer.md)
DEFAULT_MAX_ITER = 10000
HISTORY = 10  # L-BFGS memory, SciPy's default maxcor
FLOAT32_MARGIN = 0.5  # the float32 phase stops at tol * this, so the float64 check rarely has work left
FLOAT32_CHANGE = 1e-9  # or when the objective / N or a step changes less than this (float32 has stalled)
FLOAT32_FLOOR = 2e-6  # times the features' RMS: about the float32 rounding of the gradient; float64 goes below
SOLVER = "torch L-BFGS (memory 10, strong Wolfe), float32 with float64 sums, float64 gradient check"


@dataclass
class Fit:
    """One solved problem: weight [K, D] and bias [K] (float64), with how the solver got there."""
    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    evaluations: int
    grad_norm: float  # max |gradient entry| of the objective divided by N, in float64
    converged: bool  # stop is "gtol" or "ftol"
    stop: str  # "gtol": grad_norm <= tol; "ftol": float64 made no more progress (SciPy's ftol); "max_iter"
    objective: float  # sum of losses + ||W||^2 / (2C), float64


def _loss_grad(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float,
               multilabel: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(objective / N, its gradient in weight [K, D], in bias [K]); sums over rows are taken in float64."""
    n = x.shape[0]
    logits = torch.addmm(bias, x, weight.T)
    if multilabel:
        rows = (F.softplus(logits) - targets * logits).sum(1, dtype=torch.float64)
        g = torch.sigmoid(logits) - targets
    else:
        lse = torch.logsumexp(logits, 1)
        rows = (lse - logits.gather(1, targets[:, None]).squeeze(1)).double()
        g = torch.exp(logits - lse[:, None])
        g[torch.arange(n, device=x.device), targets] -= 1
    penalty = lam / (2 * n) * weight.double().square().sum()
    loss = float(rows.sum() / n + penalty)
    g_weight = (g.T @ x) / n + (lam / n) * weight
    g_bias = g.sum(0, dtype=torch.float64).to(x.dtype) / n
    return loss, g_weight, g_bias


def _lbfgs(x: torch.Tensor, targets: torch.Tensor, lam: float, weight: torch.Tensor, bias: torch.Tensor,
           multilabel: bool, tol: float, max_iter: int, tolerance_change: float
           ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    weight = weight.to(x.dtype).clone().requires_grad_(True)
    bias = bias.to(x.dtype).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=tolerance_change, history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure() -> float:
        loss, weight.grad, bias.grad = _loss_grad(x, targets, weight.detach(), bias.detach(), lam, multilabel)
        return loss

    opt.step(closure)
    state = opt.state[weight]
    return weight.detach(), bias.detach(), int(state.get("n_iter", 0)), int(state.get("func_evals", 1))


def fit_logreg(x: torch.Tensor, targets: torch.Tensor, lam: float, *, multilabel: bool = False,
               num_outputs: int | None = None, init: tuple[torch.Tensor, torch.Tensor] | None = None,
               tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, x64: torch.Tensor | None = None) -> Fit:
    """Minimise scikit-learn's L2 logistic objective with C = 1 / lam on features `x` [N, D].

    `targets`: class indices [N] in [0, num_outputs) (softmax), or with `multilabel` 0/1 floats [N, K] (K
    independent binary problems solved together; the joint gradient's largest entry bounds each one's). `x`
    sets the solving dtype; `x64` is x in float64 when the caller holds it already. `init`: a warm start.

    The solver works on centred features x - mean with the intercept b' = b + W mean: the same logits, the same
    penalty (the intercept is not penalised), so the same optimum, but far better conditioned when features are
    far from zero (pooled post-ReLU features are). Convergence is judged on the gradient in these coordinates.
    """
    n, d = x.shape
    k = targets.shape[1] if multilabel else int(num_outputs or int(targets.max()) + 1)
    x64 = x.double() if x64 is None else x64
    mean = x64.mean(0)
    xc64 = x64 - mean
    weight, bias = init if init is not None else (x.new_zeros(k, d), x.new_zeros(k))
    weight, bias = weight.double(), bias.double() + weight.double() @ mean
    iterations = evaluations = 0
    if x.dtype != torch.float64:
        t = targets.to(x.dtype) if multilabel else targets
        floor = FLOAT32_FLOOR * float(xc64.square().mean().sqrt())
        weight, bias, it, ev = _lbfgs(xc64.to(x.dtype), t, lam, weight, bias, multilabel,
                                      max(tol * FLOAT32_MARGIN, floor), max_iter, FLOAT32_CHANGE)
        iterations, evaluations = it, ev
    t64 = targets.double() if multilabel else targets
    weight, bias = weight.double(), bias.double()
    _, g_weight, g_bias = _loss_grad(xc64, t64, weight, bias, lam, multilabel)
    grad_norm = max(float(g_weight.abs().max()), float(g_bias.abs().max()))
    if grad_norm > tol and iterations < max_iter:
        # no progress in float64 (about SciPy's ftol, 64 eps relative) ends the fit as "ftol"
        weight, bias, it, ev = _lbfgs(xc64, t64, lam, weight, bias, multilabel, tol, max_iter - iterations, 1e-14)
        iterations, evaluations = iterations + it, evaluations + ev
        _, g_weight, g_bias = _loss_grad(xc64, t64, weight, bias, lam, multilabel)
        grad_norm = max(float(g_weight.abs().max()), float(g_bias.abs().max()))
    bias = bias - weight @ mean
    objective = logreg_objective(x64, t64, weight, bias, lam, multilabel=multilabel)
    stop = "gtol" if grad_norm <= tol else "max_iter" if iterations >= max_iter else "ftol"
    return Fit(weight, bias, iterations, evaluations, grad_norm, stop != "max_iter", stop, objective)


def logreg_objective(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float,
                     *, multilabel: bool = False) -> float:
    """scikit-learn's objective sum_i loss_i + lam / 2 ||W||^2 (float64) for weight [K, D], bias [K]."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    targets = targets.double() if multilabel else targets
    loss, _, _ = _loss_grad(x, targets, weight, bias, lam, multilabel)
    return loss * x.shape[0]


def _decision(x64: torch.Tensor, fit: Fit) -> torch.Tensor:
    return torch.addmm(fit.bias, x64, fit.weight.T)


def _check(name: str, x: torch.Tensor, y: torch.Tensor, metric: str, num_classes: int, dim: int | None) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"logreg: {name} features must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise UserError(f"logreg: {name} features have {x.shape[1]} dimensions, train has {dim}")
    if not torch.isfinite(x).all():
        raise UserError(f"logreg: {name} features contain NaN or infinite values")
    if metric == "map11":
        if y.shape != (x.shape[0], num_classes) or not ((y == 0) | (y == 1)).all():
            raise UserError(f"logreg: map11 needs {name} targets as 0/1 multi-hot [N, {num_classes}] with "
                            f"N = {x.shape[0]}, got shape {tuple(y.shape)}")
    elif y.shape != (x.shape[0],) or y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UserError(f"logreg: {name} labels must be {x.shape[0]} integers in [0, {num_classes}), got shape "
                        f"{tuple(y.shape)}")


class _Problem:
    """Features and targets on the device, with the class remapping a softmax fit needs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, metric: str, device: torch.device, dtype: torch.dtype,
                 name: str):
        self.multilabel = metric == "map11"
        self.x = x.to(device=device, dtype=dtype)
        self.x64 = self.x if dtype == torch.float64 else x.to(device=device, dtype=torch.float64)
        y = y.to(device)
        if self.multilabel:
            pos = y.sum(0)
            bad = [int(c) for c in torch.nonzero((pos == 0) | (pos == y.shape[0])).flatten()]
            if bad:
                raise UserError(f"logreg: in {name}, classes {bad} have no positive or no negative sample, so "
                                f"their one-vs-rest problem cannot be fitted")
            self.classes = None
            self.targets = y.float()
        else:
            # as scikit-learn: only the classes present are fitted (an absent class has no finite optimum)
            self.classes, self.targets = torch.unique(y, return_inverse=True)
            if len(self.classes) < 2:
                raise UserError(f"logreg: {name} holds a single class ({int(self.classes[0])}); at least two needed")

    def fit(self, lam: float, init: tuple[torch.Tensor, torch.Tensor] | None, tol: float, max_iter: int) -> Fit:
        k = None if self.multilabel else len(self.classes)
        return fit_logreg(self.x, self.targets, lam, multilabel=self.multilabel, num_outputs=k, init=init, tol=tol,
                          max_iter=max_iter, x64=self.x64)

    def init_for(self, other: "_Problem", fit: Fit) -> tuple[torch.Tensor, torch.Tensor]:
        """`fit` (on other's classes) as a warm start for this problem's classes; new classes start at 0."""
        if self.multilabel:
            return fit.weight, fit.bias
        weight = fit.weight.new_zeros(len(self.classes), fit.weight.shape[1])
        bias = fit.bias.new_zeros(len(self.classes))
        pos = torch.searchsorted(self.classes, other.classes)
        weight[pos], bias[pos] = fit.weight, fit.bias
        return weight, bias

    def score(self, metric: str, x64: torch.Tensor, y: torch.Tensor, fit: Fit, num_classes: int) -> float:
        scores = _decision(x64, fit)
        if metric == "map11":
            return map11(scores.cpu(), y.cpu())
        pred = self.classes[scores.argmax(1)].cpu()
        return top1(pred, y.cpu()) if metric == "top1" else mean_per_class_accuracy(pred, y.cpu(), num_classes)


def logreg_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 test_x: torch.Tensor, test_y: torch.Tensor, *, metric: str, num_classes: int,
                 lambdas: Sequence[float] = LAMBDA_GRID, device: str | torch.device = "cpu",
                 tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, dtype: torch.dtype = torch.float32,
                 log: Callable[[str], None] = print) -> dict:
    """The many-shot protocol on features [N, D]: lambda picked on val, refitted on train + val, scored on test.

    Labels are class indices [N] for "top1" and "mean_per_class", multi-hot [N, C] for "map11". Returns the
    record's `metrics` (JSON-serialisable): the headline figure in %, the chosen lambda and C, every val score,
    and the solver's iterations, final gradient norm and convergence for the refit and the grid.
    """
    if metric not in METRICS:
        raise UserError(f"logreg: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not lambdas or any(not (lam > 0 and math.isfinite(lam)) for lam in lambdas):
        raise UserError(f"logreg: the lambda grid must be positive finite numbers, got {list(lambdas)}")
    device = torch.device(device)
    _check("train", train_x, train_y, metric, num_classes, None)
    dim = train_x.shape[1]
    _check("val", val_x, val_y, metric, num_classes, dim)
    _check("test", test_x, test_y, metric, num_classes, dim)

    train = _Problem(train_x, train_y, metric, device, dtype, "train")
    val_x64 = val_x.to(device=device, dtype=torch.float64)
    val_scores: dict[float, float] = {}
    grid: dict[str, dict] = {}
    fits: dict[float, Fit] = {}
    init = None
    for lam in sorted(set(float(v) for v in lambdas), reverse=True):  # strong to weak: each warm start is close
        fit = train.fit(lam, init, tol, max_iter)
        init = (fit.weight, fit.bias)
        fits[lam] = fit
        val_scores[lam] = train.score(metric, val_x64, val_y.to(device), fit, num_classes)
        grid[repr(lam)] = {"iterations": fit.iterations, "grad_norm": fit.grad_norm, "converged": fit.converged,
                           "stop": fit.stop}
        log(f"logreg: lambda {lam:.3g}  val {metric} {val_scores[lam]:.2f}  {fit.iterations} iterations  "
            f"grad {fit.grad_norm:.1e}{'' if fit.converged else '  NOT CONVERGED'}")
    best = max(val_scores.values())
    lam = min(v for v, s in val_scores.items() if s == best)  # ties to the weaker penalty, as ssl-transfer's loop

    trainval = _Problem(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), metric, device, dtype,
                        "train + val")
    refit = trainval.fit(lam, trainval.init_for(train, fits[lam]), tol, max_iter)
    test_x64 = test_x.to(device=device, dtype=torch.float64)
    test_score = trainval.score(metric, test_x64, test_y.to(device), refit, num_classes)
    log(f"logreg: lambda {lam:.3g} (C {1 / lam:.3g}) refitted on train + val: test {metric} {test_score:.2f} "
        f"({refit.iterations} iterations, grad {refit.grad_norm:.1e})")
    return {
        "headline": metric,
        metric: test_score,
        "lambda": lam,
        "C": 1.0 / lam,
        "val_scores": {repr(v): s for v, s in sorted(val_scores.items())},
        "iterations": refit.iterations,
        "grad_norm": refit.grad_norm,
        "converged": refit.converged,
        "stop": refit.stop,
        "objective": refit.objective,
        "grid_iterations": sum(f.iterations for f in fits.values()),
        "grid_converged": all(f.converged for f in fits.values()),
        "grid": grid,
        "solver": SOLVER,
        "tol": tol,
        "max_iter": max_iter,
        "warm_start": "strong to weak penalty along the grid; the refit from the chosen train fit",
        "preprocessing": "none",
        "train_size": int(train_x.shape[0]),
        "val_size": int(val_x.shape[0]),
        "test_size": int(test_x.shape[0]),
        "feature_dim": int(dim),
        "num_classes": int(num_classes),
    }
