"""Label-free quality scores of an embedding: RankMe and alpha-ReQ.

- RankMe (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained self-supervised
  representations by their rank", eq. 1): the exponential of the Shannon entropy of the embedding matrix's
  singular values normalised to sum 1, p_k = sigma_k / ||sigma||_1 + eps. Between 1 (a collapsed, rank-1
  embedding) and min(N, D) (all singular values equal). As in the paper, the embeddings are not centred.
- alpha-ReQ (Agrawal et al. 2022, "alpha-ReQ: assessing representation quality in self-supervised learning by
  measuring eigenspectrum decay"): the exponent alpha of the power law lambda_k ~ k^-alpha fitted to the
  eigenvalues of the feature covariance (centred), by least squares of log lambda_k on log k. The fit runs over
  k = 1 .. r, r the numerical rank: the eigenvalues above `EIG_FLOOR` (1e-10) times the largest (a covariance of
  N < D examples has D - N + 1 eigenvalues that are zero up to rounding, whose logarithms would swamp the fit).
  Around 1 is what the paper finds for good representations; larger is faster decay (towards collapse), smaller
  slower (towards white noise, alpha = 0).

Both are computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mokd.errors import UserError

EIG_FLOOR = 1e-10


def _matrix64(features: Tensor, need: int) -> Tensor:
    if features.dim() != 2:
        raise UserError(f"expected features [N, D], got shape {tuple(features.shape)}")
    if features.shape[0] < need:
        raise UserError(f"expected at least {need} embeddings, got {features.shape[0]}")
    x = features.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise UserError("the features hold NaN or infinite values: the model's outputs are not finite")
    return x


def rankme(features: Tensor, eps: float = 1e-7) -> float:
    """RankMe of an embedding matrix [N, D]: exp(-sum_k p_k log p_k), p_k = sigma_k / sum(sigma) + eps.
    An all-zero matrix scores 1 (no singular value carries anything; treated as fully collapsed)."""
    x = _matrix64(features, 1)
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


def alpha_req(features: Tensor) -> float:
    """alpha of lambda_k ~ k^-alpha fitted to the covariance eigenspectrum of features [N, D] (least squares in
    log-log over k = 1 .. numerical rank). NaN when fewer than 2 eigenvalues are above the floor (a rank-0 or
    rank-1 embedding has no slope to fit)."""
    lam = covariance_spectrum(features)
    if lam.numel() == 0 or lam[0] <= 0:
        return math.nan
    lam = lam[lam > EIG_FLOOR * lam[0]]
    if lam.numel() < 2:
        return math.nan
    logk = torch.log(torch.arange(1, lam.numel() + 1, dtype=torch.float64))
    logl = torch.log(lam)
    dk = logk - logk.mean()
    slope = (dk * (logl - logl.mean())).sum() / dk.square().sum()
    return float(-slope)


def rank_scores(features: Tensor) -> dict:
    """{'rankme', 'alpha_req', 'n', 'dim'} of features [N, D], ready for a JSON record: alpha_req is None where
    alpha_req() is NaN (fewer than 2 non-zero eigenvalues)."""
    x = _matrix64(features, 2)
    alpha = alpha_req(x)
    return {"rankme": rankme(x), "alpha_req": None if math.isnan(alpha) else alpha, "n": int(x.shape[0]),
            "dim": int(x.shape[1])}
