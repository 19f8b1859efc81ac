"""Loss terms against values computed by hand from the paper's equations (Eq. 1-9) and DINO's centring."""

import math

import numpy as np
import pytest
import torch

from mokd.losses import Center, dino_cross_entropy, paired_cross_entropy, sharpen


def softmax(x, temp):
    e = [math.exp(v / temp) for v in x]
    return [v / sum(e) for v in e]


def H(t, s_logits, temp):
    """-sum_k t_k log softmax(s / temp)_k, written out."""
    p = softmax(s_logits, temp)
    return -sum(tk * math.log(pk) for tk, pk in zip(t, p))


def test_dino_cross_entropy_matches_hand_computation_and_skips_same_view():
    s = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-0.3, 0.9, 0.0]]  # 3 student views (2 global + 1 local), B=1
    t = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]  # 2 teacher views
    temp = 0.1
    # pairs (teacher view, student view) with different views: (0,1), (0,2), (1,0), (1,2)
    expected = (H(t[0], s[1], temp) + H(t[0], s[2], temp) + H(t[1], s[0], temp) + H(t[1], s[2], temp)) / 4
    got = dino_cross_entropy(torch.tensor(s), torch.tensor(t), temp, n_student_views=3, n_teacher_views=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    with_same = dino_cross_entropy(torch.tensor(s), torch.tensor(t), temp, 3, 2, skip_same_view=False)
    expected_all = (expected * 4 + H(t[0], s[0], temp) + H(t[1], s[1], temp)) / 6
    assert with_same.item() == pytest.approx(expected_all, rel=1e-5)
    assert with_same.item() != pytest.approx(got.item(), rel=1e-3)


def test_two_view_loss_is_eq2_symmetrised_form():
    """With only the two global views, the loss is (H(m'_b, m_a) + H(m'_a, m_b)) / 2 (Eq. 2)."""
    torch.manual_seed(0)
    s, t_logits = torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    t = sharpen(t_logits, 0.04)
    got = dino_cross_entropy(s, t, 0.1, 2, 2)
    sa, sb = s.chunk(2)
    ta, tb = t.chunk(2)
    manual = np.mean([(H(tb[r].tolist(), sa[r].tolist(), 0.1) + H(ta[r].tolist(), sb[r].tolist(), 0.1)) / 2
                      for r in range(4)])
    assert got.item() == pytest.approx(manual, rel=1e-5)


def test_paired_cross_entropy_and_sharpen_with_centre():
    s = torch.tensor([[2.0, 1.0, 0.0]])
    logits = torch.tensor([[0.3, 0.1, -0.2]])
    center = torch.tensor([[0.1, -0.1, 0.0]])
    p = sharpen(logits, 0.07, center)
    hand = softmax([0.3 - 0.1, 0.1 + 0.1, -0.2 - 0.0], 0.07)
    assert p[0].tolist() == pytest.approx(hand, rel=1e-5)
    assert paired_cross_entropy(s, p, 0.1).item() == pytest.approx(H(hand, [2.0, 1.0, 0.0], 0.1), rel=1e-5)


def test_center_update_is_ema_of_batch_mean():
    c = Center(3, momentum=0.9)
    c.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    batch = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    c.update(batch)
    expected = [0.9 * 1 + 0.1 * 1, 0.9 * 2 + 0.1 * 2, 0.9 * 3 + 0.1 * 3]
    assert c.center[0].tolist() == pytest.approx(expected)
    c.update(torch.tensor([[10.0, 0.0, 0.0]]))
    assert c.center[0, 0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 10.0)
