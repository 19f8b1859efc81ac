"""The transfer metrics against cases worked out by hand (and VOC AP against scikit-learn's precision curve)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve

from mokd_eval.metrics import map11, mean_per_class_accuracy, top1, voc11_ap


def test_top1():
    assert top1(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx(75.0)
    assert top1(torch.tensor([3]), torch.tensor([3])) == 100.0
    with pytest.raises(ValueError):
        top1(np.array([0, 1]), np.array([0]))


def test_mean_per_class_accuracy_leaves_out_absent_classes():
    pred = np.array([0, 0, 1, 1, 2])
    y = np.array([0, 1, 1, 1, 2])
    # class 0: 1/1, class 1: 2/3, class 2: 1/1; class 3 has no sample and is left out
    assert mean_per_class_accuracy(pred, y, 4) == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    # differs from top1 (4/5) because the classes weigh equally
    assert top1(pred, y) == pytest.approx(80.0)
    with pytest.raises(ValueError):
        mean_per_class_accuracy(pred, y, 2)


def test_voc11_ap_hand_computed():
    # ranking: +, -, +, -, -  -> (recall, precision): (.5, 1), (.5, .5), (1, 2/3), (1, .5), (1, .4)
    # t = 0 ... 0.5 (6 thresholds): best precision 1; t = 0.6 ... 1 (5 thresholds): 2/3
    ap = voc11_ap(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0], bool))
    assert ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # a negative on top: no (recall 0, precision 1) point is invented, so every threshold gets precision 1/2
    assert voc11_ap(np.array([0.9, 0.8]), np.array([0, 1], bool)) == pytest.approx(0.5)
    # tied scores enter together: one operating point at recall 1, precision 1/2
    assert voc11_ap(np.array([0.5, 0.5]), np.array([1, 0], bool)) == pytest.approx(0.5)
    # three positives: recall 1/3 and 2/3 must reach the thresholds 0.3 and 0.6 exactly like the devkit does
    ap = voc11_ap(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 1], bool))
    # points (1/3, 1), (1/3, 1/2), (2/3, 2/3), (1, 3/4): t <= .3 -> 1 (4 thr.), t in .4-.6 -> 3/4, t >= .7 -> 3/4
    assert ap == pytest.approx((4 * 1 + 7 * 0.75) / 11)
    with pytest.raises(ValueError):
        voc11_ap(np.array([0.1, 0.2]), np.array([0, 0], bool))


def _sklearn_curve_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(positives, scores)
    return float(np.mean([precision[recall >= t - 1e-12].max() for t in np.linspace(0, 1, 11)]))


def test_voc11_ap_matches_the_precision_recall_curve_when_the_top_score_is_positive():
    rng = np.random.default_rng(0)
    for _ in range(20):
        positives = rng.random(60) < 0.3
        scores = rng.normal(size=60) + positives
        if not positives[np.argmax(scores)]:
            continue  # there scikit-learn's appended (0, 1) point makes the t = 0 term 1
        assert voc11_ap(scores, positives) == pytest.approx(_sklearn_curve_ap(scores, positives))


def test_map11_leaves_out_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.7, 0.2, 0.1], [0.6, 0.9, 0.0], [0.5, 0.3, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    first = voc11_ap(scores[:, 0], targets[:, 0] > 0)
    second = voc11_ap(scores[:, 1], targets[:, 1] > 0)
    assert map11(scores, targets) == pytest.approx(100 * (first + second) / 2)
    assert first == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
