"""What the two supervised protocols (linear probe, fine-tuning) share: training transforms, the warm-up +
cosine learning-rate schedule, rank-sharded loaders, and top-k accuracy summed over ranks.

Batch sizes are global (split across torchrun ranks); learning rates are base values scaled by batch/256.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T

from mokd import distributed as dist
from mokd.data import EMBEDDED
from mokd.device import autocast
from mokd.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int) -> Callable:
    """RandomResizedCrop(size) + horizontal flip, ImageNet normalisation -> [3, size, size] float tensor."""
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr * global batch / 256."""
    return base_lr * batch_size / 256.0


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, final: float = 0.0) -> np.ndarray:
    """Per-step learning rates [total_steps]: linear warm-up from 0 to `peak`, then cosine decay to `final`.

    Precomputed and indexed by global step, as every schedule in this project.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(0.0, peak, warmup_steps, endpoint=False) + (peak / max(warmup_steps, 1))
    rest = total_steps - warmup_steps
    i = np.arange(rest)
    cos = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * i / max(rest, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its own `lr_mult` (1 unless the group says otherwise)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def per_rank_batch(batch_size: int) -> int:
    """Split a global batch over ranks; the global batch must divide evenly so that lr scaling holds."""
    ws = dist.world_size()
    if batch_size % ws:
        raise UserError(f"--batch-size {batch_size} is global and must be divisible by the number of "
                        f"processes ({ws})")
    return batch_size // ws


def default_workers(dataset_kind: str) -> int:
    """Worker processes for decoding: none for the embedded in-memory sets, none with under 4 cores per process
    (measured on 2 cores: the main process decodes 500 x 375 JPEGs at 166 images/s, 16x what R50 extracts,
    and a worker only took a core from the model), else up to 8, one core left to the main process."""
    if dataset_kind in EMBEDDED:
        return 0
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(dist.world_size(), 1)
    return 0 if per_process < 4 else min(8, per_process - 1)


def train_loader(dataset: Dataset, batch_size: int, *, seed: int, workers: int = 0,
                 drop_last: bool = False) -> tuple[DataLoader, DistributedSampler | None]:
    """Shuffled loader of this rank's share of `dataset` (global `batch_size`); call
    `sampler.set_epoch(e)` each epoch when the sampler is not None."""
    sampler = None
    if dist.world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=per_rank_batch(batch_size), shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, drop_last=drop_last, generator=g, pin_memory=torch.cuda.is_available(),
                        persistent_workers=workers > 0)
    return loader, sampler


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int = 0) -> DataLoader:
    """This rank's strided share of `dataset`, unpadded, so that summed counts are exact."""
    ws, r = dist.world_size(), dist.rank()
    shard = dataset if ws == 1 else Subset(dataset, list(range(r, len(dataset), ws)))
    return DataLoader(shard, batch_size=max(1, per_rank_batch(batch_size)), shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> torch.Tensor:
    """logits [B, C], labels [B] -> number of samples whose label is in the top k, one count per k [len(ks)].
    k is capped at C (top-5 of a 3-class problem is top-3, i.e. 100%)."""
    ks = list(ks)
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # [B, kmax]
    hit = top.eq(labels[:, None])  # [B, kmax]
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]).float()


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
             precision: str) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `forward` (images [B, 3, H, W] -> logits [B, C]) over every rank's shard."""
    counts = torch.zeros(3, device=device)  # top1 hits, top5 hits, samples
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = forward(images)
        counts[:2] += topk_correct(logits.float(), labels)
        counts[2] += labels.numel()
    dist.all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n}


def check_finite(loss: torch.Tensor, what: str) -> None:
    if not math.isfinite(loss.item()):
        raise UserError(f"{what}: the loss became {loss.item()}; the learning rate is probably too high "
                        f"(try a smaller --lr)")


def fit(module: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        evaluate_fn: Callable[[], dict], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
        schedule: np.ndarray, loader: DataLoader, sampler: DistributedSampler | None, *, epochs: int,
        eval_every: int, device: torch.device, log: Callable[[str], None], what: str) -> tuple[dict, dict]:
    """The supervised loop shared by the linear probe and fine-tuning -> (best, last) {top1, top5[, epoch]}.

    loss_fn(images, labels) -> scalar loss; the lr follows `schedule` (indexed by global step); the model is
    evaluated every `eval_every` epochs and after the last one.
    """
    best = {"top1": -1.0, "top5": 0.0, "epoch": 0}
    last = {"top1": 0.0, "top5": 0.0}
    step = 0
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        module.train()
        loss_sum, n_seen = torch.zeros((), device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            set_lr(optimizer, float(schedule[step]))
            loss = loss_fn(images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * labels.numel()
            n_seen += labels.numel()
            step += 1
        check_finite(loss_sum, what)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            module.eval()
            last = evaluate_fn()
            if last["top1"] > best["top1"]:
                best = {**last, "epoch": epoch + 1}
            log(f"  epoch {epoch + 1}/{epochs}  loss {loss_sum.item() / max(n_seen, 1):.4f}  "
                f"val top1 {last['top1']:.2f}  top5 {last['top5']:.2f}  (best {best['top1']:.2f} @ {best['epoch']})")
    return best, last
