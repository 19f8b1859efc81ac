"""Linear probe: one linear layer on a frozen backbone's features (the paper's Supp. A.2, DINO's recipe).

Full protocol: SGD (momentum 0.9, no weight decay), global batch 2048, lr = base * batch/256 with base 0.08 for
ResNets and 0.008 for ViTs, 10 warm-up epochs then cosine, 100 epochs, RandomResizedCrop + flip; the frozen
backbone runs under bf16 autocast, only the layer trains (DDP under torchrun). ViT features are the CLS tokens
of the last 4 blocks (after the final norm) concatenated, optionally with the mean patch token of the last
block (`--avgpool`); CNN features are the pooled output. No batch norm in front of the layer.

Fast mode: features are extracted once with the evaluation transform (and cached); a bank of linear layers,
one per learning rate of a grid, trains in one pass on the same batches; a held-out part of the training set
picks the learning rate, and the chosen layer's accuracy on val is reported. Features from the sharded cache are
streamed, never held whole: training reads a window of about 1 GiB at a time (see `train_linear_bank`), and
the accuracies chunk by chunk. The batches depend only on the seed, not on how the features are stored.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import click
import torch
import torch.nn.functional as F
from torch import nn

from mokd import distributed as dist
from mokd.cli_common import batch_size_option, data_options, debug_option, device_option, epochs_option, \
    out_option, seed_option, skip_bad_images_option
from mokd.device import autocast, grad_scaler
from mokd.errors import UserError
from mokd.models.backbones import global_dim, is_vit
from mokd_eval.common import (checkpoint_options, data_record, echo, feature_options, load_eval_data,
                              load_models_cli, precision_for, setup_run)
from mokd_eval.features import ShardedFeatures, features_for, fit_input_size, forward_features, \
    resolve_image_size, spec_transform, take_rows
from mokd_eval.records import write_record
from mokd_eval.report import markdown_table
from mokd_eval.supervised import (default_workers, eval_loader, evaluate, fit, scaled_lr, topk_correct,
                                  train_loader, train_transform, warmup_cosine)

BASE_LR_CNN = 0.08
BASE_LR_VIT = 0.008
EXTRACT_BATCH = 256  # images per rank per forward when caching features (--batch-size is the training batch)
DEFAULT_LR_GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
WINDOW_BYTES = 1 << 30  # fp32 features in memory at a time while the fast probe trains on a larger bank
CHUNK_ROWS = 256  # consecutive rows that a window takes together (read as one run)


@dataclass
class LinearSettings:
    """Every knob of the probe; defaults are the paper's (lr None = 0.08 for CNNs, 0.008 for ViTs)."""
    epochs: int = 100
    batch_size: int = 2048
    lr: float | None = None  # base lr, scaled by batch_size/256
    warmup_epochs: int = 10
    momentum: float = 0.9
    weight_decay: float = 0.0
    n_last_blocks: int = 4
    avgpool: bool = False
    image_size: int = 224
    eval_every: int = 1
    workers: int = 0
    # fast mode
    lr_grid: tuple[float, ...] = field(default=DEFAULT_LR_GRID)
    holdout: float = 0.1


def default_base_lr(backbone: nn.Module) -> float:
    return BASE_LR_VIT if is_vit(backbone) else BASE_LR_CNN


def effective_blocks(backbone: nn.Module, n_last_blocks: int) -> int:
    """n_last_blocks capped at the ViT's depth (1 for CNNs, where it does not apply)."""
    return min(n_last_blocks, len(backbone.blocks)) if is_vit(backbone) else 1


def probe_features(backbone: nn.Module, x: torch.Tensor, n_last_blocks: int = 4,
                   avgpool: bool = False) -> torch.Tensor:
    """x [B, 3, H, W] -> features [B, D] for the linear layer: mokd_eval.features.forward_features in the probe's
    mode. ViT: its embedding (the CLS token through the final norm, DINO's) at each of the last n blocks,
    concatenated (D = n*C), plus the mean patch token of the last block when `avgpool` (D = (n+1)*C), as in DINO's
    eval_linear. CNN: pooled output.
    """
    if not is_vit(backbone):
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    n = effective_blocks(backbone, n_last_blocks)
    return forward_features(backbone, x, probe_mode(avgpool, n), n)


def probe_mode(avgpool: bool, n: int) -> str:
    """The feature mode (mokd_eval.features) of the probe over n blocks (the name the feature cache files it
    under); CNNs give their pooled output in every mode."""
    return ("lastn_avgpool" if n > 1 else "avgpool") if avgpool else "lastn"


def probe_dim(backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> int:
    if not is_vit(backbone):
        return global_dim(backbone)
    return backbone.embed_dim * (effective_blocks(backbone, n_last_blocks) + int(avgpool))


def new_linear(dim: int, num_classes: int) -> nn.Linear:
    """DINO's init: weights N(0, 0.01), zero bias."""
    layer = nn.Linear(dim, num_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


# ----------------------------------------------------------------------------------------------- full protocol

def train_linear_probe(backbone: nn.Module, train_set, val_set, num_classes: int, *, settings: LinearSettings,
                       device: torch.device, precision: str = "bf16", seed: int = 0,
                       log: Callable[[str], None] = print, layer: nn.Linear | None = None) -> dict:
    """Train one linear layer on the frozen `backbone` (datasets yield (image [3,H,W], label)).

    `layer` (optional) is trained in place instead of a freshly initialised one. Returns metrics: top1/top5 (%)
    at the best epoch (by val top-1), best_epoch, final_top1/final_top5, base_lr, lr.
    """
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if layer is None:
        layer = new_linear(probe_dim(backbone, settings.n_last_blocks, settings.avgpool), num_classes)
    layer = layer.to(device)
    head: nn.Module = layer
    if dist.world_size() > 1:
        head = nn.parallel.DistributedDataParallel(layer, device_ids=[device.index] if device.type == "cuda" else None)
    base_lr = settings.lr if settings.lr is not None else default_base_lr(backbone)
    peak = scaled_lr(base_lr, settings.batch_size)
    opt = torch.optim.SGD(layer.parameters(), lr=peak, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    loader, sampler = train_loader(train_set, settings.batch_size, seed=seed, workers=settings.workers)
    val = eval_loader(val_set, settings.batch_size, workers=settings.workers)
    steps = len(loader)
    schedule = warmup_cosine(peak, settings.epochs * steps, settings.warmup_epochs * steps)

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            f = probe_features(backbone, images, settings.n_last_blocks, settings.avgpool)
        return f.float()

    best, last = fit(head, lambda images, labels: F.cross_entropy(head(features(images)), labels),
                     lambda: evaluate(lambda x: layer(features(x)), val, device, "fp32"), opt,
                     grad_scaler(device, "fp32"), schedule, loader, sampler, epochs=settings.epochs,
                     eval_every=settings.eval_every, device=device, log=log, what="linear probe")
    return {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"],
            "final_top1": last["top1"], "final_top5": last["top5"], "base_lr": base_lr, "lr": peak,
            "headline": "top1"}


# ----------------------------------------------------------------------------------------------- fast mode

class LinearBank(nn.Module):
    """L independent linear layers [L, C, D] applied to the same input: x [B, D] -> logits [L, B, C].

    Every layer starts from the same DINO-style init (drawn once from the seeded RNG), so layer l is exactly
    the layer a single-lr run with that seed would train.
    """

    def __init__(self, n_layers: int, dim: int, num_classes: int):
        super().__init__()
        ref = new_linear(dim, num_classes)
        self.weight = nn.Parameter(ref.weight.detach()[None].repeat(n_layers, 1, 1))
        self.bias = nn.Parameter(ref.bias.detach()[None].repeat(n_layers, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,lcd->lbc", x, self.weight) + self.bias[:, None, :]


def epoch_windows(n: int, window_rows: int, chunk_rows: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Positions 0..n-1 dealt into windows of about `window_rows` for one epoch, each sorted (one window when
    they fit). Runs of `chunk_rows` consecutive positions go to the windows in an order seeded by (seed, epoch),
    so that each window draws from the whole bank (an ImageFolder's rows come sorted by class) and is still read
    in runs."""
    if n <= window_rows:
        return [torch.arange(n)]
    runs = torch.arange(n).split(chunk_rows)
    order = torch.randperm(len(runs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    per = max(1, window_rows // chunk_rows)
    return [torch.cat([runs[r] for r in order[a:a + per]]).sort().values for a in range(0, len(order), per)]


def shuffled_batches(windows: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                     gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x [B, D], y [B]) batches of `batch_size` rows (the last one shorter) from windows (x [n_w, D], y [n_w])
    read one after another, each window's rows in a permutation drawn from `gen`; the rows left at the end of a
    window start the next one's first batch, so the batches are those of one permutation cut in order."""
    tail_x = tail_y = None
    for xw, yw in windows:
        order = torch.randperm(len(yw), generator=gen).to(xw.device)
        if tail_y is not None:
            head, order = order[:batch_size - len(tail_y)], order[batch_size - len(tail_y):]
            tail_x, tail_y = torch.cat([tail_x, xw[head]]), torch.cat([tail_y, yw[head]])
            if len(tail_y) < batch_size:
                continue
            yield tail_x, tail_y
        full = len(order) - len(order) % batch_size
        for a in range(0, full, batch_size):
            yield xw[order[a:a + batch_size]], yw[order[a:a + batch_size]]
        tail_x, tail_y = xw[order[full:]], yw[order[full:]]
    if tail_y is not None and len(tail_y):
        yield tail_x, tail_y


def train_linear_bank(x: torch.Tensor | ShardedFeatures, y: torch.Tensor, lrs: Sequence[float], *, num_classes: int,
                      epochs: int, batch_size: int, warmup_epochs: int, momentum: float = 0.9,
                      weight_decay: float = 0.0, seed: int = 0, device: torch.device | str = "cpu",
                      rows: torch.Tensor | None = None, window_rows: int | None = None,
                      chunk_rows: int = CHUNK_ROWS) -> LinearBank:
    """Train one linear layer per peak lr in `lrs` on features x [N, D] (in memory or the cache's shards), labels
    y [N], or on their rows `rows` only, all layers on the same batches.

    Each layer follows SGD with momentum (torch.optim.SGD's update, no dampening) on its own cross-entropy,
    with its own warm-up + cosine schedule; each epoch's batches cut a permutation drawn from a generator seeded
    with `seed`. Rows over `window_rows` (default: 1 GiB of fp32) are never read at once: each epoch deals them
    into windows (`epoch_windows`), read one at a time (from a sharded bank, only the shards they lie in) and
    permuted within (`shuffled_batches`). The batches depend on the rows, seed and window size only, so features
    in shards train exactly as in memory.
    """
    device = torch.device(device)
    n_all, dim = x.shape
    rows = torch.arange(n_all) if rows is None else torch.as_tensor(rows, dtype=torch.long).sort().values
    n, window_rows = len(rows), window_rows or max(1, WINDOW_BYTES // (4 * dim))
    torch.manual_seed(seed)
    bank = LinearBank(len(lrs), dim, num_classes).to(device)
    steps = -(-n // batch_size)
    unit = warmup_cosine(1.0, epochs * steps, warmup_epochs * steps)  # schedule shape; scaled per layer
    peaks = torch.tensor(list(lrs), dtype=torch.float32, device=device)
    bufs = [torch.zeros_like(p) for p in bank.parameters()]
    gen = torch.Generator().manual_seed(seed)

    def read(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = rows[positions]
        return take_rows(x, r).to(device), y[r].to(device)

    whole = read(torch.arange(n)) if n <= window_rows else None  # rows that fit one window are read once
    step = 0
    for epoch in range(epochs):
        windows = (whole,) if whole is not None else \
            map(read, epoch_windows(n, window_rows, chunk_rows, seed, epoch))
        for xb, yb in shuffled_batches(windows, batch_size, gen):
            logits = bank(xb)  # [L, b, C]
            # sum of the layers' mean losses: each layer gets exactly the gradient of its own loss
            loss = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(lrs)), reduction="sum") / len(yb)
            bank.zero_grad(set_to_none=True)
            loss.backward()
            lr = peaks * float(unit[step])
            with torch.no_grad():
                for p, buf in zip(bank.parameters(), bufs):
                    g = p.grad + weight_decay * p if weight_decay else p.grad
                    buf.mul_(momentum).add_(g)
                    p.sub_(lr.view(-1, *([1] * (p.dim() - 1))) * buf)
            step += 1
    return bank


@torch.no_grad()
def bank_accuracy(bank: LinearBank, x: torch.Tensor | ShardedFeatures, y: torch.Tensor,
                  rows: torch.Tensor | None = None, chunk: int = 8192) -> torch.Tensor:
    """Top-1 and top-5 accuracy (%) of every layer on features x [N, D] (in memory or the cache's shards, read
    `chunk` rows at a time), labels y [N], or on their rows `rows` only -> [L, 2]."""
    dev = bank.weight.device
    rows = torch.arange(len(y)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    hits = torch.zeros(bank.weight.shape[0], 2, device=dev)
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        logits = bank(take_rows(x, r).to(dev))  # [L, b, C]
        hits += torch.stack([topk_correct(lg, y[r].to(dev)) for lg in logits])
    return 100.0 * hits / max(len(rows), 1)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of labels [N] into (train [N - M], held out [M]): `fraction` of every class, seeded,
    at least one held-out sample per class that has two or more."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        m = int(round(fraction * idx.numel()))
        m = min(max(m, 1 if idx.numel() > 1 else 0), idx.numel() - 1)
        held.append(idx[:m])
        keep.append(idx[m:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def fast_linear_probe(train_x: torch.Tensor | ShardedFeatures, train_y: torch.Tensor,
                      val_x: torch.Tensor | ShardedFeatures, val_y: torch.Tensor, *, num_classes: int,
                      settings: LinearSettings, seed: int = 0, device: torch.device | str = "cpu",
                      log: Callable[[str], None] = print) -> dict:
    """Grid-search the lr on cached features: train_x [N, D], val_x [M, D] (labels [N], [M]), each in memory or
    in the cache's shards (streamed).

    A `settings.holdout` fraction of the training features (stratified, seeded) picks the best base lr of
    `settings.lr_grid`; its layer's val accuracy is the result.
    """
    fit_idx, hold_idx = stratified_holdout(train_y, settings.holdout, seed)
    base = list(settings.lr_grid)
    peaks = [scaled_lr(b, settings.batch_size) for b in base]
    bank = train_linear_bank(train_x, train_y, peaks, num_classes=num_classes, epochs=settings.epochs,
                             batch_size=settings.batch_size, warmup_epochs=settings.warmup_epochs,
                             momentum=settings.momentum, weight_decay=settings.weight_decay, seed=seed,
                             device=device, rows=fit_idx)
    hold = bank_accuracy(bank, train_x, train_y, rows=hold_idx)  # [L, 2]
    # best held-out top-1; ties go to the better top-5, then the smaller lr
    best = max(range(len(base)), key=lambda i: (hold[i, 0].item(), hold[i, 1].item(), -base[i]))
    val = bank_accuracy(bank, val_x, val_y)
    for i, b in enumerate(base):
        log(f"  lr {b:<8g} held-out top1 {hold[i, 0].item():6.2f}   val top1 {val[i, 0].item():6.2f}"
            f"{'  <- chosen' if i == best else ''}")
    if len(base) > 1 and base[best] in (min(base), max(base)):
        log(f"  note: the chosen lr {base[best]:g} is at the edge of the grid; a wider --lr-grid may do better")
    return {"top1": val[best, 0].item(), "top5": val[best, 1].item(), "best_lr": base[best],
            "best_lr_scaled": peaks[best], "holdout_top1": hold[best, 0].item(),
            "grid": {f"{b:g}": {"holdout_top1": hold[i, 0].item(), "val_top1": val[i, 0].item()}
                     for i, b in enumerate(base)},
            "n_fit": int(fit_idx.numel()), "n_holdout": int(hold_idx.numel()), "headline": "top1"}


# ----------------------------------------------------------------------------------------------- CLI

def _parse_floats(_ctx, _param, value: str | None) -> tuple[float, ...] | None:
    if value in (None, ""):
        return None
    try:
        out = tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.001,0.01,0.1, got {value!r}") from e
    if not out or min(out) <= 0:
        raise click.BadParameter(f"expected positive learning rates, got {value!r}")
    return out


def fast_features(m, spec, split: str, dataset, *, n_last_blocks: int, avgpool: bool, **kw):
    """Cached eval-transform features [N, D] in the probe's layout (see `probe_features`), via features_for."""
    n = effective_blocks(m.backbone, n_last_blocks)
    return features_for(m, spec, split, dataset=dataset, mode=probe_mode(avgpool, n), n_last_blocks=n, **kw)


@click.command("linear")
@checkpoint_options
@data_options
@skip_bad_images_option("the result records")
@out_option(default="results")
@device_option
@seed_option
@batch_size_option(default_text="2048")
@epochs_option(default_text="100")
@feature_options
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Base learning rate, scaled by batch/256 [default: 0.08 for CNNs, 0.008 for ViTs].")
@click.option("--warmup-epochs", "warmup_epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs of linear lr warm-up before the cosine decay.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", "weight_decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="SGD weight decay (the paper uses none).")
@click.option("--n-last-blocks", "n_last_blocks", type=click.IntRange(min=1), default=4, show_default=True,
              help="ViTs: concatenate the CLS tokens of this many last blocks (capped at the depth).")
@click.option("--avgpool", is_flag=True, help="ViTs: also append the mean patch token of the last block.")
@click.option("--eval-every", "eval_every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate on val every N epochs (full protocol); the best epoch is reported.")
@click.option("--fast", is_flag=True,
              help="Train a grid of learning rates at once on cached eval-transform features and pick the best on "
                   "a held-out part of the training set.")
@click.option("--lr-grid", "lr_grid", callback=_parse_floats, default=None, metavar="LRS",
              help="--fast: comma-separated base lrs [default: 1e-4 ... 1, 13 values].")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="--fast: fraction of each training class held out to pick the lr.")
@debug_option
def linear_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, skip_bad_images,
               out, device, seed, batch_size, epochs, image_size, precision, num_workers, cache_dir, no_cache, lr,
               warmup_epochs, momentum, weight_decay, n_last_blocks, avgpool, eval_every, fast, lr_grid, holdout):
    """Linear probe of CHECKPOINT's frozen features (paper Supp. A.2: SGD, batch 2048, 100 epochs, base lr
    0.08 for CNNs / 0.008 for ViTs scaled by batch/256, 10 warm-up epochs, cosine, no weight decay).

    --fast trains a grid of lrs together on cached features. Runs unchanged under torchrun.
    """
    dev = setup_run(device, seed)
    prec = precision_for(precision, dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list, skip_bad_images)
    num_workers = default_workers(spec.kind) if num_workers is None else num_workers
    echo(f"data: {spec}: {len(train_ds)} train / {len(val_ds)} val images, {len(train_ds.classes)} classes")
    models = load_models_cli(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial)
    num_classes = len(train_ds.classes)
    rows = []
    for m in models:
        t0 = time.time()
        size = resolve_image_size(spec, image_size, m.image_size)
        s = LinearSettings(epochs=epochs or 100, batch_size=batch_size or 2048, lr=lr, warmup_epochs=warmup_epochs,
                           momentum=momentum, weight_decay=weight_decay, n_last_blocks=n_last_blocks,
                           avgpool=avgpool, image_size=size, eval_every=eval_every, workers=num_workers,
                           lr_grid=lr_grid or DEFAULT_LR_GRID, holdout=holdout)
        if s.warmup_epochs > s.epochs:
            raise UserError(f"--warmup-epochs {s.warmup_epochs} is more than --epochs {s.epochs}")
        n_eff = effective_blocks(m.backbone, n_last_blocks)
        if is_vit(m.backbone) and n_eff < n_last_blocks:
            echo(f"note: {m.label} has {n_eff} blocks; using the CLS tokens of all {n_eff}")
        if fast:
            echo(f"\nlinear --fast {m.label}: {len(s.lr_grid)} lrs, {s.epochs} epochs, batch {s.batch_size}, "
                 f"{size} px, held-out {s.holdout:.0%}")
            common = dict(device=dev, batch_size=EXTRACT_BATCH, precision=prec,
                          image_size=size, num_workers=num_workers, cache=cache_dir, use_cache=not no_cache,
                          progress=True, log=echo)
            tr = fast_features(m, spec, "train", train_ds, n_last_blocks=n_last_blocks, avgpool=avgpool, **common)
            va = fast_features(m, spec, "val", val_ds, n_last_blocks=n_last_blocks, avgpool=avgpool, **common)
            # every rank trains the same bank on the same features (cheap), so no rank waits on another
            # a bank from the sharded cache is streamed, not read whole
            metrics = fast_linear_probe(tr.bank, tr.labels, va.bank, va.labels, num_classes=num_classes,
                                        settings=s, seed=seed, device=dev, log=echo)
            dim = tr.dim
        else:
            base = s.lr if s.lr is not None else default_base_lr(m.backbone)
            echo(f"\nlinear {m.label}: {s.epochs} epochs, batch {s.batch_size}, base lr {base:g} "
                 f"(lr {scaled_lr(base, s.batch_size):g}), {size} px, {prec}")
            fit_input_size(m.backbone, size)
            tr_set, va_set = copy.copy(train_ds), copy.copy(val_ds)
            tr_set.transform = train_transform(size)
            va_set.transform = spec_transform(spec, size)
            metrics = train_linear_probe(m.backbone, tr_set, va_set, num_classes, settings=s, device=dev,
                                         precision=prec, seed=seed, log=echo)
            dim = probe_dim(m.backbone, n_last_blocks, avgpool)
        settings = {**asdict(s), "mode": "fast" if fast else "full", "n_last_blocks": n_eff,
                    "feature_dim": dim, "precision": prec, "seed": seed, "world_size": dist.world_size()}
        if not fast:
            settings.pop("lr_grid"), settings.pop("holdout")
            settings["lr"] = metrics["base_lr"]
        m.backbone.to("cpu")  # free the accelerator for the next model
        rows.append([m.label, m.checkpoint.get("arch"), metrics["top1"], metrics["top5"],
                     f"{metrics['best_lr']:g}" if fast else metrics["best_epoch"]])
        if dist.is_main():
            path = write_record(out, task="linear",
                                checkpoint={**m.checkpoint, "load_report": m.report.as_dict_brief()},
                                data=data_record(spec, train_ds, val_ds), settings=settings, metrics=metrics,
                                wall_time_s=time.time() - t0, device=dev)
            echo(f"record: {path}")
    echo("")
    echo(markdown_table(["model", "arch", "top-1 (%)", "top-5 (%)", "best lr" if fast else "best epoch"], rows))
    dist.barrier()
