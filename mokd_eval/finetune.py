"""End-to-end fine-tuning of a backbone with a new linear head: semi-supervised ImageNet 1% / 10% (Supp. A.3)
and transfer to CIFAR-10/100 (Supp. A.4).

Semi-supervised: the subsets are the standard split files (one image file name a line, e.g.
`n01440764_10026.JPEG`, matched by basename within the ImageFolder train split; the class is the folder).
Global batch 1024, 60 epochs for 1% and 30 for 10%, 5 warm-up epochs then cosine, SGD momentum 0.9,
RandomResizedCrop + flip. The paper searched the base lr per model; our default is 0.01 for the backbone
(scaled by batch/256, i.e. 0.04 at batch 1024) and 10x that for the freshly initialised head (`--head-lr-mult`,
as SwAV's semi-supervised recipe does), no weight decay.
CIFAR: the same, but 100 epochs with 10 warm-up epochs, images upscaled to the model's resolution.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import click
import torch
import torch.nn.functional as F
from torch import nn

from mokd import distributed as dist
from mokd.device import autocast, grad_scaler
from mokd.errors import UserError
from mokd.models.backbones import global_dim
from mokd_eval.linear import new_linear
from mokd_eval.supervised import (check_finite, eval_loader, evaluate, scaled_lr, set_lr, train_loader,
                                  warmup_cosine)

SEMISUP_EPOCHS = {1: 60, 10: 30}


@dataclass
class FinetuneSettings:
    """Every knob of fine-tuning; defaults are the semi-supervised protocol's (CIFAR changes epochs/warm-up)."""
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 0.01  # base lr of the backbone, scaled by batch_size/256
    head_lr_mult: float = 10.0
    warmup_epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 0.0
    image_size: int = 224
    eval_every: int = 1
    workers: int = 0


class Classifier(nn.Module):
    """Backbone + linear head on its global feature: images [B, 3, H, W] -> logits [B, num_classes]."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = new_linear(global_dim(backbone), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return self.head(b.forward_head(b.forward_features(x), pre_logits=True))


def finetune(backbone: nn.Module, train_set, val_set, num_classes: int, *, settings: FinetuneSettings,
             device: torch.device, precision: str = "bf16", seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune `backbone` (in place) with a new head on `train_set`; evaluate on `val_set` every
    `eval_every` epochs. Returns metrics: top1/top5 (%) at the best epoch, best_epoch, final_top1/final_top5."""
    torch.manual_seed(seed)
    for p in backbone.parameters():
        p.requires_grad_(True)
    model = Classifier(backbone, num_classes).to(device)
    net: nn.Module = model
    if dist.world_size() > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    peak = scaled_lr(settings.lr, settings.batch_size)
    opt = torch.optim.SGD([
        {"params": list(model.backbone.parameters()), "lr_mult": 1.0},
        {"params": list(model.head.parameters()), "lr_mult": settings.head_lr_mult},
    ], lr=peak, momentum=settings.momentum, weight_decay=settings.weight_decay)
    scaler = grad_scaler(device, precision)
    loader, sampler = train_loader(train_set, settings.batch_size, seed=seed, workers=settings.workers)
    val = eval_loader(val_set, settings.batch_size, workers=settings.workers)
    steps = len(loader)
    schedule = warmup_cosine(peak, settings.epochs * steps, settings.warmup_epochs * steps)
    best = {"top1": -1.0, "top5": 0.0, "epoch": 0}
    last = {"top1": 0.0, "top5": 0.0}
    step = 0
    for epoch in range(settings.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        loss_sum, n_seen = torch.zeros((), device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            set_lr(opt, float(schedule[step]))
            with autocast(device, precision):
                logits = net(images)
            loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * labels.numel()
            n_seen += labels.numel()
            step += 1
        check_finite(loss_sum, "fine-tuning")
        if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
            model.eval()
            last = evaluate(model, val, device, precision)
            if last["top1"] > best["top1"]:
                best = {**last, "epoch": epoch + 1}
            log(f"  epoch {epoch + 1}/{settings.epochs}  loss {loss_sum.item() / max(n_seen, 1):.4f}  "
                f"val top1 {last['top1']:.2f}  top5 {last['top5']:.2f}  (best {best['top1']:.2f} @ {best['epoch']})")
    return {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"],
            "final_top1": last["top1"], "final_top5": last["top5"], "lr": peak, "headline": "top1"}


# ----------------------------------------------------------------------------------------------- subsets

def read_split_file(path: str | Path) -> list[str]:
    """Image file names of a split file (one a line; blank lines and '#' comments skipped; a leading
    folder such as `n01440764/` is dropped, the basename is what identifies an image)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"split file {path} does not exist (expected a text file with one image file name a "
                        f"line, such as n01440764_10026.JPEG)")
    names = [Path(ln.strip()).name for ln in path.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise UserError(f"split file {path} lists no images (expected one image file name a line, such as "
                        f"n01440764_10026.JPEG)")
    return names


def split_indices(paths: Sequence[str] | None, names: Sequence[str], source: str = "the split file") -> list[int]:
    """Indices into a dataset's image `paths` of the images listed by `names`, matched by basename.

    Raises UserError for names not found (listing a few), for names matching several images, and for data
    sets without file paths (CIFAR, digits)."""
    if paths is None:
        raise UserError(f"{source} selects images by file name, which needs ImageFolder data (--data ROOT); "
                        f"this data set has no image files")
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_name.setdefault(Path(p).name, []).append(i)
    unknown = [n for n in dict.fromkeys(names) if n not in by_name]
    if unknown:
        raise UserError(f"{len(unknown)} of the {len(names)} names in {source} are not images of the training "
                        f"split: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                        f"(images are matched by file name, e.g. n01440764_10026.JPEG, within ROOT/train/<class>/)")
    ambiguous = [n for n in dict.fromkeys(names) if len(by_name[n]) > 1]
    if ambiguous:
        raise UserError(f"{len(ambiguous)} names in {source} match several training images (same file name in "
                        f"different class folders): {', '.join(ambiguous[:5])}")
    return sorted({by_name[n][0] for n in names})


def percent_subset(targets: Sequence[int], percent: float, seed: int) -> list[int]:
    """A seeded `percent`% of every class (at least one image per class): indices, sorted."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(list(targets))
    chosen = []
    for c in torch.unique(t).tolist():
        idx = torch.nonzero(t == c).flatten()
        m = max(1, int(round(idx.numel() * percent / 100.0)))
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:m]])
    return sorted(torch.cat(chosen).tolist())


def infer_percent(path: str | Path) -> int | None:
    """1 or 10 from a split file's name (`1percent.txt`, `10percent.txt`, `imagenet_1pct.txt`, ...), else None."""
    m = re.search(r"(?<!\d)(1|10)[\s_-]*(percent|pct|perc|%)", Path(path).name, flags=re.IGNORECASE)
    return int(m.group(1)) if m else None
