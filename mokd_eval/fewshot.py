"""Few-shot transfer: N-way K-shot episodes scored by a prototype classifier on frozen features.

As ssl-transfer's few-shot evaluation (Ericsson et al. 2021, after Snell et al.'s prototypical networks and the
CD-FSL benchmark): each episode draws `ways` classes, then for each class `shots` support and `queries` query
images without overlap; a query goes to the class whose prototype (the mean of its support features) is
nearest in squared Euclidean distance. Features are used as extracted (ssl-transfer does not normalise them).
The accuracy is averaged over episodes and reported with 1.96 std / sqrt(episodes) (std over episodes, ddof 0,
as ssl-transfer). Every shot setting draws its own episodes from (seed, ways, shots, queries), so a setting's
result does not depend on which other settings run with it. Classes with fewer than shots + queries images
cannot fill an episode and are left out (and listed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mokd.errors import UserError

EPISODE_BYTES = 1 << 26  # the query x prototype differences held at a time


def _labels(y: np.ndarray | torch.Tensor) -> np.ndarray:
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return y.reshape(-1).astype(np.int64)


def draw_episodes(y: np.ndarray | torch.Tensor, *, ways: int, shots: int, queries: int, episodes: int, seed: int
                  ) -> tuple[np.ndarray, list[int]]:
    """Episodes as row indices [episodes, ways, shots + queries] into `y` [N] (per class: support, then query).

    Returns them and the classes left out for having fewer than shots + queries rows.
    """
    y = _labels(y)
    need = shots + queries
    classes, counts = np.unique(y, return_counts=True)
    eligible = classes[counts >= need]
    left_out = [int(c) for c in classes[counts < need]]
    if len(eligible) < ways:
        raise UserError(f"few-shot: {ways}-way {shots}-shot episodes with {queries} queries need {ways} classes with "
                        f"at least {need} images each; {len(eligible)} of {len(classes)} classes have that many")
    members = {int(c): np.flatnonzero(y == c) for c in eligible}
    rng = np.random.default_rng([seed, ways, shots, queries])
    out = np.empty((episodes, ways, need), dtype=np.int64)
    for e in range(episodes):
        for w, c in enumerate(rng.choice(eligible, ways, replace=False)):
            out[e, w] = rng.choice(members[int(c)], need, replace=False)
    return out, left_out


def prototype_accuracy(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Per-episode accuracy (fraction) of the prototype rule.

    support [E, W, S, D], query [E, W, Q, D]: episode e's query (w, q) is right when way w's support mean is
    the nearest prototype in squared Euclidean distance (ties to the lower way index).
    """
    protos = support.mean(2)  # [E, W, D]
    e, w, q, d = query.shape
    flat = query.reshape(e, w * q, 1, d)
    dist = (flat - protos[:, None]).square().sum(-1)  # [E, W*Q, W]
    truth = torch.arange(w, device=query.device).repeat_interleave(q)
    return (dist.argmin(-1) == truth).float().mean(1)


def fewshot_episodes(x: torch.Tensor, y: torch.Tensor | np.ndarray, *, ways: int = 5, shots: Sequence[int] = (1, 5, 20),
                     queries: int = 15, episodes: int = 600, seed: int = 0) -> dict:
    """Few-shot accuracy of features `x` [N, D] with labels `y` [N], for every K in `shots`.

    Returns the record's `metrics`: per setting "{ways}way_{K}shot" the mean accuracy and its 95% interval in %,
    the episode count and the classes left out; the headline is the 5-shot setting when there is one.
    """
    y = _labels(y)
    if x.ndim != 2 or x.shape[0] != len(y):
        raise UserError(f"few-shot: features must be [N, D] with one label per row, got {tuple(x.shape)} and "
                        f"{len(y)} labels")
    shots = [int(k) for k in shots]
    if ways < 2 or queries < 1 or episodes < 1 or not shots or min(shots) < 1:
        raise UserError(f"few-shot: need ways >= 2, shots >= 1, queries >= 1 and episodes >= 1, got ways {ways}, "
                        f"shots {shots}, queries {queries}, episodes {episodes}")
    x = x.float()
    out: dict = {}
    for k in shots:
        idx, left_out = draw_episodes(y, ways=ways, shots=k, queries=queries, episodes=episodes, seed=seed)
        per_episode = x.shape[1] * ways * queries * ways * 4
        chunk = max(1, EPISODE_BYTES // per_episode)
        accs = []
        for start in range(0, episodes, chunk):
            rows = torch.from_numpy(idx[start:start + chunk]).to(x.device)
            feats = x[rows]  # [E, W, K + Q, D]
            accs.append(prototype_accuracy(feats[:, :, :k], feats[:, :, k:]))
        acc = 100.0 * torch.cat(accs).double().cpu().numpy()
        out[f"{ways}way_{k}shot"] = {
            "mean": float(acc.mean()),
            "ci95": float(1.96 * acc.std() / np.sqrt(episodes)),
            "episodes": episodes,
            "classes": int(len(np.unique(y)) - len(left_out)),
            "left_out": left_out,
        }
    headline = 5 if 5 in shots else shots[0]
    return {
        "headline": f"{ways}way_{headline}shot",
        **out,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
        "seed": seed,
        "classifier": "prototype (support mean), squared Euclidean distance",
        "feature_normalisation": "none",
    }
