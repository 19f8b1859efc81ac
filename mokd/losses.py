"""MOKD's loss terms as pure functions of tensors, and the teacher centre as a small module.

Shapes: V views stacked view-major, so `logits.chunk(V)` gives one [B, K] block per view.
All softmaxes and logs run in fp32 whatever the autocast context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mokd import distributed


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                       n_student_views: int, n_teacher_views: int, skip_same_view: bool = True) -> torch.Tensor:
    """Mean over (teacher view, student view) pairs of H(p_t, p_s), skipping pairs that share a view.

    student_logits [Vs*B, K] (views 0..Vs-1; the first views are the global ones, aligned with the teacher's),
    teacher_probs [Vt*B, K] (already centred and sharpened, detached). H(t, s) = -sum t log s, batch-averaged.
    """
    s_logp = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(n_student_views)
    t = teacher_probs.float().chunk(n_teacher_views)
    total, n_terms = 0.0, 0
    for it, tp in enumerate(t):
        for iv, sl in enumerate(s_logp):
            if skip_same_view and iv == it:
                continue
            total = total + torch.sum(-tp * sl, dim=-1).mean()
            n_terms += 1
    if n_terms == 0:
        raise ValueError("no (teacher view, student view) pair left after skipping same-view pairs")
    return total / n_terms


def paired_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """H(target, softmax(student / temp)) for row-aligned pairs: [N, K], [N, K] -> scalar (mean over rows)."""
    s_logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return torch.sum(-target_probs.float() * s_logp, dim=-1).mean()


def sharpen(logits: torch.Tensor, temp: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((logits - center) / temp) in fp32; center [1, K] or None (no centring)."""
    x = logits.float()
    if center is not None:
        x = x - center
    return F.softmax(x / temp, dim=-1)


class Center(nn.Module):
    """EMA of the teacher's batch-mean output, all-reduced across ranks (DINO's centring)."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """teacher_logits [V*B, K]: the centre moves toward their mean over every rank's batch."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_logits.shape[0])], device=batch_sum.device)
        distributed.all_reduce_sum(batch_sum)
        distributed.all_reduce_sum(count)
        self.center.mul_(self.momentum).add_(batch_sum / count, alpha=1.0 - self.momentum)
