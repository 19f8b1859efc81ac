"""Schedules as arrays indexed by global step, so that resuming at any step is exact by construction."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from warmup_start to base over warmup_epochs, then cosine from base to final.

    DINO's `cosine_scheduler`, step for step: the warm-up includes its end point (its last step is already
    `base`, as is the cosine's first). Returns [epochs * steps_per_epoch] float64 values; value[0] =
    warmup_start (or base without warm-up), and the last value approaches final.
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_steps) if warmup_steps > 0 else np.array([])
    steps = epochs * steps_per_epoch - warmup_steps
    t = np.arange(steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(steps, 1)))
    out = np.concatenate([warmup, cosine])
    assert len(out) == epochs * steps_per_epoch
    return out


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> np.ndarray:
    """DINO's teacher temperature: linear over epochs from warmup_temp to temp, then constant; per step."""
    warmup_epochs = min(warmup_epochs, epochs)
    per_epoch = np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs) if warmup_epochs > 0 else [],
                                np.full(epochs - warmup_epochs, temp)])
    return np.repeat(per_epoch, steps_per_epoch)


# Which teacher-temperature schedule each loss term follows: a net's self terms and its cross terms may warm
# up over different lengths (the release: the CNN's sm and st over 50 epochs, everything else over 30).
TEMP_GROUPS = {"sm": "self", "st": "self", "cm": "cross", "ct": "cross"}


def teacher_temp_schedules(cfg, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """{"net1_self", "net1_cross", "net2_self", "net2_cross"} -> per-step teacher temperature of that net's
    self terms (sm, st) or cross terms (cm, ct; the temperature of the other model's teacher outputs they use).

    cfg: mokd.config.Config; net*.warmup_teacher_temp_epochs(_cross) = None take loss.warmup_teacher_temp_epochs.
    """
    lc, out = cfg.loss, {}
    for n in ("net1", "net2"):
        net = getattr(cfg, n)
        for group, own in (("self", net.warmup_teacher_temp_epochs), ("cross", net.warmup_teacher_temp_epochs_cross)):
            warmup = lc.warmup_teacher_temp_epochs if own is None else own
            out[f"{n}_{group}"] = teacher_temp_schedule(lc.warmup_teacher_temp, lc.teacher_temp, warmup,
                                                        cfg.optim.epochs, steps_per_epoch)
    return out
