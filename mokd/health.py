"""Training health: DINO's two collapse signals and the student-teacher agreement, and what to do about them.

Per model, on the MLP head's outputs for the two global views of a batch (and, in MOKD, on the T-Head's, the
target of L_st, and on L_ct's target, teacher j's T-Head run with model i's query):
- teacher entropy: the mean over samples of H(p_t), p_t the centred and sharpened teacher output. It reaches
  log K when every output is uniform (one kind of collapse);
- batch-mean entropy: H of the batch's mean teacher output. It falls towards 0 when one dimension wins for
  every sample (the other kind); a healthy run keeps it high while the per-sample entropy is low;
- agreement: the fraction of samples whose student argmax equals the teacher's on the same view.
The gap between the two entropies is the information the outputs carry about the input: near 0, every
sample gets the same output, whether flat or sharp, which is collapse too. A teacher can be flat (per-sample
entropy near log K: the temperature's doing as much as the network's) and still tell its inputs apart; it is
collapsed to uniform outputs when it is flat and that gap is a small part of what the flatness leaves
(log K - H), or when it is so flat that its targets hardly differ from uniform. Entropies are in nats, computed
on each process's own batch.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def health_metrics(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """teacher_probs [N, K] (rows sum to 1), student_logits [N, K] for the same views -> three scalars."""
    p = teacher_probs.float()
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()
    mean = p.mean(dim=0)
    ent_mean = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    agree = (student_logits.argmax(dim=-1) == p.argmax(dim=-1)).float().mean()
    return {"entropy": ent, "mean_entropy": ent_mean, "agreement": agree}


# A healthy teacher's per-sample entropy sits well below log K and its batch-mean entropy well above the
# per-sample one. The limits were 0.95 log K and 0.1 nats. The old digits recipe's teachers had gaps of
# 0.00-0.01 nats from epoch 2 and reached 0.99 log K by epoch 3; the recipe that replaced them ends at
# 0.69-0.89 log K with gaps of 0.57-1.57 nats (5 seeds, both modes).
UNIFORM_FRACTION = 0.9  # per-sample entropy above this fraction of log K: outputs nearly uniform
DOMINANT_NATS = math.log(2.0)  # batch-mean entropy below log 2: fewer than two dimensions in use
CONSTANT_NATS = 0.5  # batch-mean minus per-sample entropy below this: outputs nearly the same for every input
# Between UNIFORM_FRACTION and FLAT_FRACTION of log K a teacher is flat; it is collapsed to uniform outputs
# only when its outputs no longer depend on the input: the entropy gap under FLAT_INFO of the headroom
# log K - H (the gap is at most that). The digits ViT's teacher at 0.04 sat at 0.92 log K while its k-NN
# rose (docs/monitoring.md#health-signals). Above FLAT_FRACTION it is uniform whatever the gap: its targets
# differ from uniform by under 0.03 log K (the collapsed runs of 2026-12-01 to 12-04 reached 0.99 log K).
FLAT_FRACTION = 0.97
FLAT_INFO = 0.5


# The teacher outputs the figures are kept for: key infix in the log ("entropy_thead_net1") and a name.
TEACHER_OUTPUTS = (("", "MLP head"), ("thead_", "T-Head"), ("search_", "L_ct target"))
# What cures an output that no longer depends on the input, where it is not the MLP head's cure; checked
# before the other two signals, since such a target is usually also near-uniform or one-dimensional.
CONSTANT_CURES = {"L_ct target": "centre it (loss.ct_center=true; the release does not) or lower the T-Head's "
                                 "lr (net*.thead_lr)"}


def teacher_outputs(means: dict[str, float], net: str):
    """(name, entropy, batch-mean entropy) of each of `net`'s teacher outputs that `means` has figures for."""
    for infix, name in TEACHER_OUTPUTS:
        if f"entropy_{infix}{net}" in means:
            yield name, means[f"entropy_{infix}{net}"], means[f"mean_entropy_{infix}{net}"]


def collapse_warning(name: str, entropy: float, mean_entropy: float, out_dim: int,
                     constant_cure: str | None = None) -> str | None:
    """A one-line warning when a model's teacher has collapsed, with the knob that usually cures it
    (`constant_cure`, when given, for an output that is the same for every input), or a note (starting
    "note:") when it is flat but still depends on its input; None when healthy."""
    if constant_cure and mean_entropy - entropy < CONSTANT_NATS:
        return (f"warning: {name} gives nearly the same output for every input (batch-mean entropy "
                f"{mean_entropy:.2f} vs per-sample {entropy:.2f} nats): {constant_cure}")
    log_k = math.log(out_dim)
    sharpen = "sharpen the teacher (lower loss.teacher_temp or loss.warmup_teacher_temp) or lower the learning rate"
    if entropy > UNIFORM_FRACTION * log_k:
        gap, headroom = mean_entropy - entropy, log_k - entropy
        if entropy > FLAT_FRACTION * log_k or gap < FLAT_INFO * headroom:
            return (f"warning: {name} looks collapsed to uniform outputs (teacher entropy {entropy:.2f} of "
                    f"log K = {log_k:.2f} nats, batch-mean {mean_entropy:.2f}): {sharpen}")
        return (f"note: {name} has a flat teacher (entropy {entropy:.2f} of log K = {log_k:.2f} nats) that still "
                f"depends on its input (batch-mean {mean_entropy:.2f}: {gap:.2f} of the {headroom:.2f} nats left), "
                f"so not collapsed; its targets teach little: {sharpen}")
    if mean_entropy < DOMINANT_NATS:
        return (f"warning: {name} looks collapsed to one dominant dimension (entropy of the batch-mean output "
                f"{mean_entropy:.2f} nats, under log 2): centre more (loss.center_momentum closer to 0.9 or "
                f"below), soften the teacher (raise loss.teacher_temp) or lower the learning rate")
    if mean_entropy - entropy < CONSTANT_NATS:
        return (f"warning: {name} gives nearly the same output for every input (batch-mean entropy {mean_entropy:.2f}"
                f" vs per-sample {entropy:.2f} nats): normalise the head (head.use_bn=true), sharpen the teacher "
                f"(lower loss.teacher_temp) or lower the learning rate")
    return None
