"""The many-shot logistic-regression protocol: `mokd_eval.logreg.logreg_probe` against scikit-learn, one run.

    PYTHONPATH=. python benchmarks/transfer.py [--n 50000] [--dim 2048] [--classes 100] [--grid-size 45]
                                               [--tol 1e-6] [--max-iter 10000] [--device cpu] [--threads N]
    PYTHONPATH=. python benchmarks/transfer.py --stop100 [--data digits] [--grid-size 45]

Data: a seeded Gaussian mixture (class means N(0, spread^2) per dimension, unit noise, an offset of 2), split
64 / 16 / 20 % into train / val / test. Both sides run the whole protocol: every lambda of
logspace(-6, 5, grid-size) fitted on train and scored on val (top-1), the best refitted on train + val and
scored on test. scikit-learn runs as ssl-transfer drives it (LogisticRegression, lbfgs, warm_start=True,
the grid from weak to strong penalty) but to convergence: the same tol and a max_iter no fit reaches. Prints
the times, their ratio (ours / scikit-learn), the chosen lambdas, iterations and the test accuracies. No
reduced precision is used (float32 with float64 sums, float64 check), so no bf16 rate is measured.

`--stop100` instead measures how far ssl-transfer's own run (scikit-learn defaults: max_iter 100, tol 1e-4,
warm_start along the grid from weak to strong penalty) is from the converged protocol (the same loop with
--tol and --max-iter), on the synthetic set or on scikit-learn's digits (raw pixels, seeded 64 / 16 / 20 %
split): chosen lambda and test accuracy of each, how many fits stopped at 100 iterations, and the largest
gradient entry of the objective / N left at 100 iterations.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from mokd_eval.logreg import _loss_grad, logreg_probe


def make_data(n: int, dim: int, classes: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * spread
    y = rng.integers(0, classes, n)
    x = (means[y] + rng.normal(size=(n, dim)) + 2.0).astype(np.float32)
    a, b = int(0.64 * n), int(0.8 * n)
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    a, b = int(0.64 * len(y)), int(0.8 * len(y))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def grad_norm(clf: LogisticRegression, x: np.ndarray, y: np.ndarray, lam: float) -> float:
    """Largest |gradient entry| of scikit-learn's objective / N at the fitted coefficients (float64)."""
    _, gw, gb = _loss_grad(torch.from_numpy(x), torch.from_numpy(np.searchsorted(clf.classes_, y)),
                           torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_), lam, False)
    return max(float(gw.abs().max()), float(gb.abs().max()))


def sklearn_protocol(train, val, test, grid, tol: float, max_iter: int, grads: bool = False) -> dict:
    (xa, ya), (xv, yv), (xt, yt) = [(x.astype(np.float64), y) for x, y in (train, val, test)]
    clf = LogisticRegression(tol=tol, max_iter=max_iter, warm_start=True)
    val_scores, iterations, capped, norms = {}, 0, 0, {}
    for lam in sorted(grid):  # weak to strong penalty, as ssl-transfer's loop
        clf.set_params(C=1.0 / lam).fit(xa, ya)
        iterations += int(clf.n_iter_.max())
        capped += int(clf.n_iter_.max() >= max_iter)
        val_scores[lam] = 100.0 * clf.score(xv, yv)
        if grads:
            norms[lam] = grad_norm(clf, xa, ya, lam)
    best = max(val_scores.values())
    lam = min(v for v, s in val_scores.items() if s == best)
    xf, yf = np.concatenate([xa, xv]), np.concatenate([ya, yv])
    clf.set_params(C=1.0 / lam).fit(xf, yf)
    return {"lambda": lam, "top1": 100.0 * clf.score(xt, yt), "grid_iterations": iterations,
            "iterations": int(clf.n_iter_.max()), "capped": capped, "val_scores": val_scores, "grad_norms": norms,
            "refit_grad_norm": grad_norm(clf, xf, yf, lam) if grads else None}


def stop100(train, val, test, grid, tol: float, max_iter: int) -> None:
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # as ssl-transfer: counted below instead
    t0 = time.perf_counter()
    short = sklearn_protocol(train, val, test, grid, 1e-4, 100, grads=True)
    t_short = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = sklearn_protocol(train, val, test, grid, tol, max_iter, grads=True)
    t_full = time.perf_counter() - t0
    for name, r, t in (("ssl-transfer (max_iter 100, tol 1e-4)", short, t_short),
                       (f"converged (max_iter {max_iter}, tol {tol:g})", full, t_full)):
        worst = max(r["grad_norms"], key=r["grad_norms"].get)
        print(f"{name}: {t:.1f} s  lambda {r['lambda']:.3g}  test top-1 {r['top1']:.2f}  fits stopped at max_iter "
              f"{r['capped']} of {len(grid)}  grid iterations {r['grid_iterations']}  refit iterations "
              f"{r['iterations']}  refit grad {r['refit_grad_norm']:.1e}  largest grid grad "
              f"{r['grad_norms'][worst]:.1e} (lambda {worst:.3g})")
    diffs = [abs(short["val_scores"][lam] - full["val_scores"][lam]) for lam in grid]
    print(f"test top-1 100-iteration minus converged: {short['top1'] - full['top1']:+.2f} points; chosen lambda "
          f"{short['lambda']:.3g} vs {full['lambda']:.3g} ({np.log10(short['lambda'] / full['lambda']):+.2f} decades); "
          f"largest val score difference over the grid {max(diffs):.2f} points")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50000, help="rows in all (train / val / test = 64 / 16 / 20 %%)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--spread", type=float, default=0.15, help="std of the class means per dimension (overlap)")
    p.add_argument("--grid-size", type=int, default=45, help="lambdas, log-spaced from 1e-6 to 1e5")
    p.add_argument("--tol", type=float, default=1e-6, help="max |gradient| of the objective / N, both solvers")
    p.add_argument("--max-iter", type=int, default=10000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop100", action="store_true", help="ssl-transfer's 100-iteration stop against convergence")
    p.add_argument("--data", choices=["synthetic", "digits"], default="synthetic")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.data == "digits":
        train, val, test = digits_data(args.seed)
        args.n, args.dim, args.classes = sum(len(y) for _, y in (train, val, test)), 64, 10
    else:
        train, val, test = make_data(args.n, args.dim, args.classes, args.spread, args.seed)
    grid = [float(v) for v in np.logspace(-6, 5, args.grid_size)]
    if args.stop100:
        print(f"{args.data}: {args.n} x {args.dim}, {args.classes} classes, {len(grid)} lambdas", flush=True)
        stop100(train, val, test, grid, args.tol, args.max_iter)
        return
    print(f"{args.n} x {args.dim} features, {args.classes} classes, train/val/test {len(train[1])}/{len(val[1])}/"
          f"{len(test[1])}, {len(grid)} lambdas, tol {args.tol:g}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}", flush=True)

    t0 = time.perf_counter()
    ours = logreg_probe(*(torch.from_numpy(a) for part in (train, val, test) for a in part), metric="top1",
                        num_classes=args.classes, lambdas=grid, device=args.device, tol=args.tol,
                        max_iter=args.max_iter, log=lambda _: None)
    if args.device != "cpu":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    print(f"mokd logreg:  {t_ours:8.1f} s  lambda {ours['lambda']:.3g}  test top-1 {ours['top1']:.2f}  "
          f"grid iterations {ours['grid_iterations']}  refit {ours['iterations']}  "
          f"all converged {ours['converged'] and ours['grid_converged']}", flush=True)

    t0 = time.perf_counter()
    ref = sklearn_protocol(train, val, test, grid, args.tol, args.max_iter)
    t_ref = time.perf_counter() - t0
    print(f"scikit-learn: {t_ref:8.1f} s  lambda {ref['lambda']:.3g}  test top-1 {ref['top1']:.2f}  "
          f"grid iterations {ref['grid_iterations']}  refit {ref['iterations']}  fits at max_iter {ref['capped']}")

    diffs = [abs(ours["val_scores"][repr(lam)] - s) for lam, s in ref["val_scores"].items()]
    print(f"time ours / scikit-learn: {t_ours / t_ref:.3f}   test top-1 ours - scikit-learn: "
          f"{ours['top1'] - ref['top1']:+.2f} points   largest val score difference over the grid: {max(diffs):.2f}")


if __name__ == "__main__":
    main()
