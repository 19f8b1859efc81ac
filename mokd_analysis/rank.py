"""Label-free quality scores of an embedding: RankMe, alpha-ReQ, and whether the embedding has collapsed.

- RankMe (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained self-supervised
  representations by their rank", eq. 1): the exponential of the Shannon entropy of the embedding matrix's
  singular values normalised to sum 1, p_k = sigma_k / ||sigma||_1 + eps. Between 1 (a collapsed, rank-1
  embedding) and min(N, D) (all singular values equal). As in the paper, the embeddings are not centred; so a
  large offset shared by every embedding (a ViT's CLS feature grows one: on the default run its mean is 46x
  the spread around it by epoch 6) counts as one dominant direction and pulls RankMe towards 1 even when the
  spread around the mean is rich. `center=True` scores that spread instead (`rankme_centered` in rank_scores).
- alpha-ReQ (Agrawal et al. 2022, "alpha-ReQ: assessing representation quality in self-supervised learning by
  measuring eigenspectrum decay"), as the authors' library (reptrix, `get_alpha`) defines it: the exponent
  alpha of the power law lambda_k ~ k^-alpha fitted to the eigenvalues of the centred features' covariance by
  weighted least squares of log lambda_k on log k, weight 1/k, over k = 6 .. 100 (1-based; the first five
  eigenvalues are left out, as the authors do, to fit the tail). Where fewer than 100 eigenvalues are non-zero
  (above `EIG_FLOOR` = 1e-10 times the largest: a covariance of N < D examples has D - N + 1 eigenvalues that are
  zero up to rounding) the fit runs from 6 to the last non-zero one, and `alpha_fit` says so; with fewer than
  `MIN_FIT_POINTS` (5) eigenvalues in range there is no fit (alpha None). `alpha_fit.r2` is the weighted fit's
  R^2 of log lambda_k over the fitted range. Around 1 is what the paper finds for good representations; larger is
  faster decay (towards collapse), smaller slower (towards white noise, alpha = 0).
- Collapse: centring removes the offset shared by all embeddings, so the centred scores of an embedding that maps
  every image to the same point plus rounding noise look healthy (identical embeddings plus 1e-12 noise: centred
  RankMe 63.4 of 64). `spread_to_offset` = sqrt(mean_i ||x_i - mu||^2) / ||mu|| (RMS distance to the mean over
  the norm of the mean; None when the mean is exactly 0) says how large that spread is; the embedding is flagged
  `collapsed` when the spread is at most `COLLAPSE_TOL` (1e-4) of the embeddings' RMS norm (float32 features
  carry ~1e-7 relative rounding; a trained ViT's CLS spread is a few percent of its offset, far above it).

All are computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mokd.errors import UserError

EIG_FLOOR = 1e-10
ALPHA_FIRST, ALPHA_LAST = 6, 100  # 1-based eigenvalue indices of the authors' fit range
MIN_FIT_POINTS = 5
COLLAPSE_TOL = 1e-4
# what every rank record's settings say about how its numbers were computed (analyze rank and the bench alike)
RANK_SETTINGS = {"rankme_eps": 1e-7, "alpha_fit": "weighted (1/k) least squares of log eigenvalue on log k, "
                 "k = 6..100 of the centred covariance (Agrawal et al. 2022, reptrix get_alpha)",
                 "collapse_tol": COLLAPSE_TOL}
RANK_KEYS = ("rankme", "rankme_centered", "alpha_req", "alpha_fit", "spread_to_offset", "collapsed",
             "collapse_reason", "n", "dim")  # rank_scores' output, as records carry it


def _matrix64(features: Tensor, need: int) -> Tensor:
    if features.dim() != 2:
        raise UserError(f"expected features [N, D], got shape {tuple(features.shape)}")
    if features.shape[0] < need:
        raise UserError(f"expected at least {need} embeddings, got {features.shape[0]}")
    x = features.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise UserError("the features hold NaN or infinite values: the model's outputs are not finite")
    return x


def rankme(features: Tensor, eps: float = 1e-7, center: bool = False) -> float:
    """RankMe of an embedding matrix [N, D]: exp(-sum_k p_k log p_k), p_k = sigma_k / sum(sigma) + eps.
    An all-zero matrix scores 1 (no singular value carries anything; treated as fully collapsed).
    `center`: of the embeddings minus their mean (not in the paper; see the module docstring)."""
    x = _matrix64(features, 1)
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s / total + eps
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # 0 log 0 = 0 when eps = 0


def covariance_spectrum(features: Tensor) -> Tensor:
    """Eigenvalues of the centred feature covariance [N, D] -> [D], in descending order."""
    x = _matrix64(features, 2)
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / (x.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)


def alpha_fit(features: Tensor) -> dict:
    """The power-law fit of the covariance eigenspectrum of features [N, D] (module docstring):
    {'alpha': float | None, 'first': 6, 'last': the last index fitted (1-based), 'r2': float | None,
     'points': eigenvalues fitted}. alpha and r2 are None when fewer than MIN_FIT_POINTS non-zero eigenvalues
    lie in 6 .. 100."""
    lam = covariance_spectrum(features)
    nonzero = int((lam > EIG_FLOOR * lam[0]).sum()) if lam.numel() and lam[0] > 0 else 0
    last = min(ALPHA_LAST, nonzero)
    points = max(0, last - ALPHA_FIRST + 1)
    if points < MIN_FIT_POINTS:
        return {"alpha": None, "first": ALPHA_FIRST, "last": last, "r2": None, "points": points}
    k = torch.arange(ALPHA_FIRST, last + 1, dtype=torch.float64)
    y = torch.log(lam[ALPHA_FIRST - 1:last])
    w = 1.0 / k
    a = torch.stack([-torch.log(k), torch.ones_like(k)], 1)  # log lambda = -alpha log k + c
    coef = torch.linalg.solve(a.T @ (a * w[:, None]), a.T @ (w * y))
    resid = y - a @ coef
    ybar = (w * y).sum() / w.sum()
    total = (w * (y - ybar).square()).sum()
    r2 = 1.0 if total <= 0 else float(1.0 - (w * resid.square()).sum() / total)
    return {"alpha": float(coef[0]), "first": ALPHA_FIRST, "last": last, "r2": r2, "points": points}


def alpha_req(features: Tensor) -> float:
    """alpha-ReQ of features [N, D] (alpha_fit's alpha); NaN where there is no fit (too few eigenvalues)."""
    alpha = alpha_fit(features)["alpha"]
    return math.nan if alpha is None else alpha


def collapse(features: Tensor) -> dict:
    """{'spread_to_offset': RMS distance to the mean / norm of the mean (None when the mean is 0),
    'collapsed': bool, 'collapse_reason': str | None} of features [N, D] (module docstring)."""
    x = _matrix64(features, 2)
    mu = x.mean(0)
    spread = float((x - mu).square().sum(1).mean().sqrt())
    offset = float(mu.norm())
    scale = float(x.square().sum(1).mean().sqrt())
    ratio = spread / offset if offset > 0 else None
    reason = None
    if scale == 0:
        reason = "every embedding is zero"
    elif spread <= COLLAPSE_TOL * scale:
        reason = (f"every image maps to (almost) the same point: the spread around the mean is {spread / scale:.1e} "
                  f"of the embeddings' norm (collapsed below {COLLAPSE_TOL:g}); the centred scores only measure noise")
    return {"spread_to_offset": ratio, "collapsed": reason is not None, "collapse_reason": reason}


def rank_scores(features: Tensor) -> dict:
    """Every score of features [N, D], ready for a JSON record: {'rankme', 'rankme_centered', 'alpha_req',
    'alpha_fit': {'first', 'last', 'r2', 'points'}, 'spread_to_offset', 'collapsed', 'collapse_reason', 'n', 'dim'}.
    alpha_req is None where there is no fit. The one function `mokd analyze rank`, the bench and the trainer's
    monitor call."""
    x = _matrix64(features, 2)
    fit = alpha_fit(x)
    return {"rankme": rankme(x), "rankme_centered": rankme(x, center=True), "alpha_req": fit.pop("alpha"),
            "alpha_fit": fit, **collapse(x), "n": int(x.shape[0]), "dim": int(x.shape[1])}
