"""Per-model optimisers and their schedules: SGD for CNNs, AdamW for ViTs (paper Sec. 3.4, Supp. A.1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mokd.config import NetConfig, OptimConfig
from mokd.schedules import cosine_schedule

# Paper Supp. A.1 (lr, weight decay), DINO's main_dino.py (min lr, AdamW weight-decay end value).
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.1, "weight_decay": 1e-4, "weight_decay_end": 1e-4},
    "adamw": {"lr": 0.0003, "weight_decay": 0.04, "weight_decay_end": 0.4, "min_lr": 1e-6},
}


def resolve_optimizer(net: NetConfig, vit: bool) -> dict:
    """Fill the net's None fields from the optimiser's defaults; returns the resolved settings.

    The T-Head of an SGD-trained CNN follows the official code: it sits in the CNN's optimiser but in
    groups of its own on the ViT (AdamW) lr and weight-decay schedules, unless thead_lr says otherwise;
    which of its parameters decay is thead_decay's (thead_decays_all).
    """
    kind = net.optimizer if net.optimizer != "auto" else ("adamw" if vit else "sgd")
    d = OPTIMIZER_DEFAULTS[kind]
    lr = net.lr if net.lr is not None else d["lr"]
    min_lr = net.min_lr if net.min_lr is not None else d.get("min_lr", 0.016 * lr)
    wd = net.weight_decay if net.weight_decay is not None else d["weight_decay"]
    wd_end = net.weight_decay_end if net.weight_decay_end is not None else (
        d["weight_decay_end"] if net.weight_decay is None else wd)
    if kind == "sgd":
        a = OPTIMIZER_DEFAULTS["adamw"]
        t_lr = net.thead_lr if net.thead_lr is not None else a["lr"]
        t_min = a["min_lr"] * t_lr / a["lr"]
        thead = {"lr": t_lr, "weight_decay": a["weight_decay"], "weight_decay_end": a["weight_decay_end"]}
    else:
        t_lr = net.thead_lr if net.thead_lr is not None else lr
        t_min = min_lr * t_lr / lr
        thead = {"lr": t_lr, "weight_decay": wd, "weight_decay_end": wd_end}
    thead["min_lr"] = net.thead_min_lr if net.thead_min_lr is not None else t_min
    return {"optimizer": kind, "lr": lr, "min_lr": min_lr, "weight_decay": wd, "weight_decay_end": wd_end,
            "thead": thead, "thead_decay_all": thead_decays_all(net, vit)}


def thead_decays_all(net: NetConfig, vit: bool) -> bool:
    """net.thead_decay resolved: the release decays every parameter of the CNN's T-Head (biases and LayerNorm
    included, in one group on the ViT's schedules) and only the weights of the ViT's."""
    return net.thead_decay == "all" or (net.thead_decay == "auto" and not vit)


def param_groups(module: nn.Module, thead_decay_all: bool = False) -> list[dict]:
    """Weights with decay; biases and norm parameters (ndim <= 1) without; the T-Head's likewise, apart
    (or, with thead_decay_all, every T-Head parameter with decay)."""
    groups = {(t, d): [] for t in ("main", "thead") for d in (True, False)}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        thead = name.startswith("thead.")
        decay = (thead and thead_decay_all) or not (p.ndim <= 1 or name.endswith(".bias"))
        groups[("thead" if thead else "main", decay)].append(p)
    return [{"params": ps, "tag": tag, "apply_wd": decay, **({} if decay else {"weight_decay": 0.0})}
            for (tag, decay), ps in groups.items() if ps]


def build_optimizer(module: nn.Module, settings: dict, optim: OptimConfig, foreach: bool = True
                    ) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups(module)`; foreach=True updates each group with one multi-tensor kernel
    per operation instead of one call per parameter (the same arithmetic, up to float rounding)."""
    groups = param_groups(module, settings["thead_decay_all"])
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=optim.sgd_momentum, foreach=foreach)
    return torch.optim.AdamW(groups, lr=0.0, foreach=foreach)


@dataclass
class Schedules:
    lr: np.ndarray  # [total_steps]
    wd: np.ndarray
    momentum: np.ndarray  # teacher EMA momentum
    thead_lr: np.ndarray
    thead_wd: np.ndarray


def build_schedules(settings: dict, net: NetConfig, optim: OptimConfig, steps_per_epoch: int) -> Schedules:
    """lr: warm-up then cosine, base scaled by batch/256; wd: cosine; teacher momentum: cosine to 1."""
    e, w = optim.epochs, min(optim.warmup_epochs, optim.epochs - 1) if optim.epochs > 1 else 0
    scale = optim.batch_size / 256.0

    def lr_wd(s: dict) -> tuple[np.ndarray, np.ndarray]:
        return (cosine_schedule(s["lr"] * scale, s["min_lr"], e, steps_per_epoch, w),
                cosine_schedule(s["weight_decay"], s["weight_decay_end"], e, steps_per_epoch))

    lr, wd = lr_wd(settings)
    thead_lr, thead_wd = lr_wd(settings["thead"])
    return Schedules(lr=lr, wd=wd, momentum=cosine_schedule(net.momentum_teacher, 1.0, e, steps_per_epoch),
                     thead_lr=thead_lr, thead_wd=thead_wd)


def apply_schedules(optimizer: torch.optim.Optimizer, sched: Schedules, step: int) -> None:
    for g in optimizer.param_groups:
        thead = g.get("tag") == "thead"
        g["lr"] = float((sched.thead_lr if thead else sched.lr)[step])
        if g.get("apply_wd"):
            g["weight_decay"] = float((sched.thead_wd if thead else sched.wd)[step])
