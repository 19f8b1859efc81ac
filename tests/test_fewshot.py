"""Few-shot episodes: seeded, class-balanced, without overlap; the prototype rule on a hand-made case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mokd.errors import UserError
from mokd_eval.fewshot import draw_episodes, fewshot_episodes, prototype_accuracy


def features(seed: int = 0, classes: int = 8, per_class: int = 40, dim: int = 16):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.normal(size=(classes, dim))[y] * 1.5 + rng.normal(size=(len(y), dim))
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def test_episodes_are_class_balanced_without_overlap():
    _, y = features()
    y = y.clone()
    y[:35] = 0
    y[35:40] = 99  # class 99 has 5 images: too few for 5 + 15, left out
    idx, left_out = draw_episodes(y, ways=5, shots=5, queries=15, episodes=50, seed=0)
    assert idx.shape == (50, 5, 20) and left_out == [99]
    labels = y.numpy()[idx]
    for episode in labels:
        assert (episode == episode[:, :1]).all()  # each way holds one class
        assert len(set(episode[:, 0])) == 5  # five different classes
        assert 99 not in episode[:, 0]
    for episode in idx:
        assert len(np.unique(episode)) == episode.size  # support and query never share an image
    # over many episodes every eligible class is drawn
    assert set(labels[:, :, 0].ravel()) == set(range(8))


def test_episodes_are_seeded():
    x, y = features()
    a = fewshot_episodes(x, y, shots=(1, 5), episodes=40, seed=0)
    b = fewshot_episodes(x, y, shots=(1, 5), episodes=40, seed=0)
    c = fewshot_episodes(x, y, shots=(1, 5), episodes=40, seed=1)
    assert a == b
    assert a["5way_1shot"]["mean"] != c["5way_1shot"]["mean"]
    same = draw_episodes(y, ways=5, shots=1, queries=15, episodes=40, seed=3)[0]
    assert (same == draw_episodes(y, ways=5, shots=1, queries=15, episodes=40, seed=3)[0]).all()
    assert not (same == draw_episodes(y, ways=5, shots=1, queries=15, episodes=40, seed=4)[0]).all()
    # a setting's episodes do not depend on the other settings asked for
    assert fewshot_episodes(x, y, shots=(5,), episodes=40, seed=0)["5way_5shot"] == a["5way_5shot"]


def test_prototype_rule_hand_made():
    # one episode, 2 ways, 2 shots: prototypes (0, 0) and (4, 0)
    support = torch.tensor([[[[-1.0, 0.0], [1.0, 0.0]], [[4.0, 1.0], [4.0, -1.0]]]])
    # way 0 queries: (1.9, 0) -> proto 0 (right), (2.1, 0) -> proto 1 (wrong)
    # way 1 queries: (3, 5) -> d0 = 34, d1 = 26 -> proto 1 (right), (5, 0) -> proto 1 (right)
    query = torch.tensor([[[[1.9, 0.0], [2.1, 0.0]], [[3.0, 5.0], [5.0, 0.0]]]])
    assert prototype_accuracy(support, query).tolist() == [pytest.approx(0.75)]


def test_fewshot_record():
    x, y = features()
    out = fewshot_episodes(x, y, ways=5, shots=(1, 5, 20), queries=15, episodes=60, seed=0)
    json.dumps(out)
    assert out["headline"] == "5way_5shot"
    one, five, twenty = out["5way_1shot"], out["5way_5shot"], out["5way_20shot"]
    assert 20 < one["mean"] < five["mean"] <= twenty["mean"] <= 100  # more shots, better prototypes
    for r in (one, five, twenty):
        assert r["episodes"] == 60 and r["classes"] == 8 and r["left_out"] == [] and 0 < r["ci95"] < 10
    # 20 + 15 > 34: a class with 34 images is left out of the 20-shot setting only
    keep = np.r_[np.arange(0, 34), np.arange(40, 320)]
    out = fewshot_episodes(x[keep], y[keep], shots=(5, 20), episodes=10)
    assert out["5way_5shot"]["left_out"] == [] and out["5way_20shot"]["left_out"] == [0]
    assert out["5way_20shot"]["classes"] == 7


def test_too_few_classes_is_a_user_error():
    x, y = features(classes=4)
    with pytest.raises(UserError, match="need 5 classes with at least 20 images"):
        fewshot_episodes(x, y, shots=(5,), episodes=5)
    with pytest.raises(UserError, match="one label per row"):
        fewshot_episodes(x[:10], y, episodes=5)
