"""Classification metrics of the transfer suite, in percent where the field reports percent.

- `top1`: plain accuracy.
- `mean_per_class_accuracy`: the mean over classes of each class's recall (Aircraft, Caltech101, Flowers, Pets in
  Kornblith et al. 2019). Classes with no sample in `y` are left out of the mean (their recall is undefined).
- `voc11_ap` / `map11`: PASCAL VOC 2007's 11-point interpolated average precision, the mean over recall thresholds
  t = 0, 0.1, ..., 1 of the highest precision reached at recall >= t (0 when recall t is never reached).
  Precision and recall are taken at every distinct score (tied scores enter together, as scikit-learn's
  `precision_recall_curve` does), with no artificial (recall 0, precision 1) point: the t = 0 term is the best
  precision over the ranking, as in the VOC devkit. Classes with no positive are left out of `map11`.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def top1(pred: ArrayLike, y: ArrayLike) -> float:
    """Accuracy in % of predicted labels `pred` [N] against labels `y` [N]."""
    pred, y = _numpy(pred).reshape(-1), _numpy(y).reshape(-1)
    if pred.shape != y.shape or y.size == 0:
        raise ValueError(f"top1 needs two label vectors of the same non-zero length, got {pred.shape} and {y.shape}")
    return float(100.0 * np.mean(pred == y))


def mean_per_class_accuracy(pred: ArrayLike, y: ArrayLike, num_classes: int) -> float:
    """Mean over the classes present in `y` [N] of the % of that class's samples predicted right by `pred` [N].

    Classes in range(num_classes) with no sample in `y` are left out (a predicted-only class adds nothing).
    """
    pred, y = _numpy(pred).reshape(-1).astype(np.int64), _numpy(y).reshape(-1).astype(np.int64)
    if pred.shape != y.shape or y.size == 0:
        raise ValueError(f"mean_per_class_accuracy needs two label vectors of the same non-zero length, "
                         f"got {pred.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    count = np.bincount(y, minlength=num_classes)
    right = np.bincount(y[pred == y], minlength=num_classes)
    present = count > 0
    return float(100.0 * np.mean(right[present] / count[present]))


def voc11_ap(scores: ArrayLike, positives: ArrayLike) -> float:
    """VOC2007 11-point interpolated AP (a fraction in [0, 1]) of `scores` [N] against booleans `positives` [N]."""
    scores, positives = _numpy(scores).reshape(-1).astype(np.float64), _numpy(positives).reshape(-1).astype(bool)
    if scores.shape != positives.shape:
        raise ValueError(f"voc11_ap needs scores and positives of one length, got {scores.shape} and {positives.shape}")
    n_pos = int(positives.sum())
    if n_pos == 0:
        raise ValueError("voc11_ap is undefined without a positive sample")
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positives[order]
    tp, fp = np.cumsum(p), np.cumsum(~p)
    # one operating point per distinct score: the last position of each run of ties
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = tp[last], fp[last]
    recall, precision = tp / n_pos, tp / (tp + fp)
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        reached = recall >= t - 1e-12  # 0.1 * 3 is 0.30000000000000004: a recall of exactly 0.3 reaches it
        ap += precision[reached].max() if reached.any() else 0.0
    return float(ap / 11.0)


def map11(scores: ArrayLike, targets: ArrayLike) -> float:
    """Mean over classes of `voc11_ap`, in %: `scores` [N, C], multi-hot `targets` [N, C].

    Classes with no positive in `targets` are left out of the mean.
    """
    scores, targets = _numpy(scores), _numpy(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"map11 needs scores and targets of one shape [N, C], got {scores.shape} and {targets.shape}")
    aps = [voc11_ap(scores[:, c], targets[:, c] > 0) for c in range(scores.shape[1]) if (targets[:, c] > 0).any()]
    if not aps:
        raise ValueError("map11 is undefined when no class has a positive sample")
    return float(100.0 * np.mean(aps))
