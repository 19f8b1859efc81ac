"""t-SNE maps of one or two models' features on a few classes (the paper's Fig. 4 / S1).

Two models rarely share a feature width (R50: 2048, ViT-S: 384), so each model's features are L2-normalised
(the geometry k-NN uses) and reduced by PCA to a common width, then the two sets are stacked and embedded by
one openTSNE run. Both models thus share one map; how far apart their clusters lie reflects their different
feature spaces, as in the paper's figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def choose_classes(num_classes: int, k: int = 10, seed: int = 0) -> list[int]:
    """k class indices drawn at random (seeded), sorted; all classes when there are k or fewer."""
    if num_classes <= k:
        return list(range(num_classes))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_classes, generator=g)[:k].tolist())


def reduce_features(features: torch.Tensor, dim: int = 50) -> np.ndarray:
    """features [N, C] -> L2-normalised, centred, PCA-projected [N, min(dim, C, N)] float32 array."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    x = x - x.mean(0, keepdim=True)
    d = min(dim, x.shape[0], x.shape[1])
    if d < x.shape[1]:
        _, _, v = torch.pca_lowrank(x, q=d, center=False, niter=4)
        x = x @ v[:, :d]
    return x.numpy().astype(np.float32)


def joint_tsne(features: list[torch.Tensor], *, seed: int = 0, perplexity: float = 30.0, pca_dim: int = 50,
               n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """features: one [N_m, C_m] tensor per model -> (coords [sum N_m, 2], model ids [sum N_m]).

    Each model's features are reduced to the same width (see the module docstring), stacked and embedded
    together. Perplexity is capped at (N - 1) / 3 so that tiny sets still embed.
    """
    from openTSNE import TSNE

    dim = min([pca_dim] + [f.shape[1] for f in features] + [f.shape[0] for f in features])
    parts = [reduce_features(f, dim) for f in features]
    x = np.concatenate(parts)
    if x.shape[0] < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {x.shape[0]}")
    ids = np.concatenate([np.full(len(p), m, dtype=np.int64) for m, p in enumerate(parts)])
    perp = float(min(perplexity, (x.shape[0] - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perp, random_state=seed, n_jobs=n_jobs, verbose=False,
                negative_gradient_method="bh" if x.shape[0] < 2000 else "fft")
    coords = np.asarray(tsne.fit(x), dtype=np.float32)
    return coords, ids


def save_embedding(path: Path, coords: np.ndarray, labels: np.ndarray, model_ids: np.ndarray,
                   class_names: list[str], model_names: list[str], indices: np.ndarray | None = None) -> Path:
    """Write an .npz with coords [N, 2], labels [N], model_ids [N], class_names, model_names (and image indices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if indices is None else {"indices": indices}
    np.savez(path, coords=coords, labels=labels, model_ids=model_ids, class_names=np.asarray(class_names),
             model_names=np.asarray(model_names), **extra)
    return path
