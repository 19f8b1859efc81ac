"""Prediction consistency between two models (the paper's Table 9).

Consistency is the fraction of evaluation images on which the two models' k-NN top-1 predictions are the same
label. Table 9 also "replaces" one of the MOKD-trained models by an independently trained model of similar
accuracy: if the replaced pair is about as consistent as the MOKD pair, the rise in consistency comes from the
higher accuracy, not from the models becoming alike.
"""

from __future__ import annotations

import torch


def prediction_consistency(pred_a: torch.Tensor, pred_b: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """pred_a, pred_b [N] predicted labels (labels [N] optional) -> {"consistency", ... breakdown}.

    With labels: accuracy of each, the fraction where both are right, and where they agree on a wrong label.
    """
    pred_a, pred_b = pred_a.flatten().long().cpu(), pred_b.flatten().long().cpu()
    if pred_a.shape != pred_b.shape or pred_a.numel() == 0:
        raise ValueError(f"predictions must be two non-empty vectors of one length, got {pred_a.shape}, {pred_b.shape}")
    same = pred_a == pred_b
    out = {"consistency": same.float().mean().item(), "num_images": int(pred_a.numel())}
    if labels is not None:
        labels = labels.flatten().long().cpu()
        ra, rb = pred_a == labels, pred_b == labels
        out.update({
            "accuracy_a": 100.0 * ra.float().mean().item(),
            "accuracy_b": 100.0 * rb.float().mean().item(),
            "both_correct": (ra & rb).float().mean().item(),
            "agree_wrong": (same & ~ra).float().mean().item(),
            "disagree": (~same).float().mean().item(),
        })
    return out


def replacement_consistency(pred_a: torch.Tensor, pred_b: torch.Tensor, pred_c: torch.Tensor,
                            labels: torch.Tensor | None = None, replace: str = "a") -> dict:
    """Table 9's comparison: consistency of (A, B) and of the pair with A (or B) replaced by C, preds [N] each.

    -> {"pair": {...}, "replaced": {...}, "replace": "a"|"b", "delta": replaced - pair consistency}.
    """
    if replace not in ("a", "b"):
        raise ValueError(f"replace must be 'a' or 'b', got {replace!r}")
    pair = prediction_consistency(pred_a, pred_b, labels)
    replaced = prediction_consistency(pred_c, pred_b, labels) if replace == "a" else \
        prediction_consistency(pred_a, pred_c, labels)
    return {"pair": pair, "replaced": replaced, "replace": replace,
            "delta": replaced["consistency"] - pair["consistency"]}
