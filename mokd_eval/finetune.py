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

import copy
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import click
import torch
import torch.nn.functional as F
from torch import nn

from mokd import distributed as dist
from mokd.cli_common import batch_size_option, data_options, debug_option, device_option, epochs_option, \
    out_option, seed_option, skip_bad_images_option
from mokd.device import autocast, grad_scaler
from mokd.errors import UserError
from mokd.models.backbones import global_dim
from mokd_eval.common import (checkpoint_options, data_record, echo, load_eval_data, load_models_cli,
                              precision_for, setup_run)
from mokd_eval.features import fit_input_size, resolve_image_size, spec_transform
from mokd_eval.linear import new_linear
from mokd_eval.records import write_record
from mokd_eval.report import markdown_table
from mokd_eval.supervised import (default_workers, eval_loader, evaluate, fit, scaled_lr,
                                  train_loader, train_transform, warmup_cosine)

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

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            logits = net(images)
        return F.cross_entropy(logits.float(), labels)

    best, last = fit(net, loss_fn, lambda: evaluate(model, val, device, precision), opt, scaler, schedule, loader,
                     sampler, epochs=settings.epochs, eval_every=settings.eval_every, device=device, log=log,
                     what="fine-tuning")
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
    sets without file paths (CIFAR, digits, photos)."""
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


# ----------------------------------------------------------------------------------------------- CLI

def finetune_options(warmup: int, epochs: str):
    """Options shared by `semisup` and `cifar` (the warm-up default differs: 5 and 10 epochs)."""
    options = [
        checkpoint_options, data_options, skip_bad_images_option("the result records"),
        out_option(default="results"), device_option, seed_option,
        batch_size_option(default_text="1024"), epochs_option(default_text=epochs),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
                     help="Base lr of the backbone, scaled by batch/256 (the paper searched it per model)."),
        click.option("--head-lr-mult", "head_lr_mult", type=click.FloatRange(min=0), default=10.0,
                     show_default=True, help="The new linear head's lr is this multiple of the backbone's."),
        click.option("--warmup-epochs", "warmup_epochs", type=click.IntRange(min=0), default=warmup,
                     show_default=True, help="Epochs of linear lr warm-up before the cosine decay."),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True,
                     help="SGD momentum."),
        click.option("--weight-decay", "weight_decay", type=click.FloatRange(min=0), default=0.0,
                     show_default=True, help="SGD weight decay."),
        click.option("--image-size", "image_size", type=click.IntRange(min=8), default=None,
                     help="Training and evaluation resolution (see the command's help for the default)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Autocast precision (fp16 uses a grad scaler; CUDA only)."),
        click.option("--num-workers", "num_workers", type=click.IntRange(min=0), default=None,
                     help="Data-loading worker processes [default: up to 8 per process; 0 for digits, photos or "
                          "under 4 cores]."),
        click.option("--eval-every", "eval_every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Evaluate on val every N epochs; the best epoch is reported."),
        debug_option,
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


LOAD_OPTIONS = ("model", "branch", "arch", "arch_kwargs", "key", "allow_partial")


def settings_from_options(opts: dict, *, epochs: int, data_kind: str) -> FinetuneSettings:
    """FinetuneSettings from the shared command options (image_size is filled in per model)."""
    workers = default_workers(data_kind) if opts["num_workers"] is None else opts["num_workers"]
    s = FinetuneSettings(epochs=epochs, batch_size=opts["batch_size"] or 1024, lr=opts["lr"],
                         head_lr_mult=opts["head_lr_mult"], warmup_epochs=opts["warmup_epochs"],
                         momentum=opts["momentum"], weight_decay=opts["weight_decay"], image_size=0,
                         eval_every=opts["eval_every"], workers=workers)
    if s.warmup_epochs > s.epochs:
        raise UserError(f"--warmup-epochs {s.warmup_epochs} is more than --epochs {s.epochs}")
    return s


def run_finetune(task: str, checkpoint: str, load_args: dict, spec, train_ds, val_ds, data: dict,
                 settings: FinetuneSettings, *, size_for: Callable, out: str, device: torch.device, precision: str,
                 seed: int) -> list[dict]:
    """Fine-tune every model of `checkpoint` on `train_ds` (at `size_for(model)` px), evaluate on `val_ds`,
    write one record each and print a table. Returns the metrics, one dict per model."""
    models = load_models_cli(checkpoint, *(load_args[k] for k in LOAD_OPTIONS))
    rows, results = [], []
    for m in models:
        t0 = time.time()
        s = replace(settings, image_size=size_for(m))
        echo(f"\n{task} {m.label}: {len(train_ds)} training images, {s.epochs} epochs, batch {s.batch_size}, "
             f"lr {scaled_lr(s.lr, s.batch_size):g} (head x{s.head_lr_mult:g}), {s.image_size} px, {precision}")
        fit_input_size(m.backbone, s.image_size)
        tr, va = copy.copy(train_ds), copy.copy(val_ds)
        tr.transform, va.transform = train_transform(s.image_size), spec_transform(spec, s.image_size)
        metrics = finetune(m.backbone, tr, va, len(val_ds.classes), settings=s, device=device, precision=precision,
                           seed=seed, log=echo)
        record_settings = {**asdict(s), "precision": precision, "seed": seed, "world_size": dist.world_size()}
        rows.append([m.label, m.checkpoint.get("arch"), metrics["top1"], metrics["top5"], metrics["best_epoch"]])
        if dist.is_main():
            path = write_record(out, task=task, checkpoint={**m.checkpoint, "load_report": m.report.as_dict_brief()},
                                data=data, settings=record_settings, metrics=metrics, wall_time_s=time.time() - t0,
                                device=device)
            echo(f"record: {path}")
        results.append(metrics)
        m.backbone.to("cpu")  # free the accelerator for the next model
    echo("")
    echo(markdown_table(["model", "arch", "top-1 (%)", "top-5 (%)", "best epoch"], rows))
    dist.barrier()
    return results


@click.command("semisup")
@finetune_options(warmup=5, epochs="60 for 1%, 30 for 10%")
@click.option("--split-file", "split_file", type=click.Path(dir_okay=False), default=None,
              show_default="none: a seeded --percent of every class",
              help="Subset of the training split: one image file name a line (e.g. the standard 1percent.txt, "
                   "10percent.txt); matched by file name within ROOT/train/<class>/.")
@click.option("--percent", type=click.FloatRange(0, 100, min_open=True), default=None,
              help="1 or 10: sets the epochs (60 / 30) [default: from the split file's name]. Without a split "
                   "file, a seeded PERCENT% of every class is drawn (default 10).")
def semisup_cmd(checkpoint, split_file, percent, data, class_list, skip_bad_images, out, device, seed, epochs,
                image_size, precision, **opts):
    """Semi-supervised fine-tuning of CHECKPOINT on a 1% or 10% subset (paper Supp. A.3).

    Batch 1024, 60 epochs (1%) or 30 (10%), 5 warm-up epochs, cosine, SGD momentum 0.9. The paper searched the
    base lr per model; the default 0.01 (x batch/256, head x10, no weight decay) is a starting point for that
    search. Resolution: --image-size, else the native size of small-image data, else the checkpoint's training
    resolution, else 224. Runs unchanged under torchrun.
    """
    dev = setup_run(device, seed)
    prec = precision_for(precision, dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list, skip_bad_images)
    if split_file is not None:
        names = read_split_file(split_file)
        if train_ds.skipped:  # listed images that did not decode are left out too, not reported as unknown
            gone = {Path(p).name for p in train_ds.skipped} - {Path(p).name for p in train_ds.paths}
            if gone & set(names):
                echo(f"note: {len(gone & set(names))} image(s) of the split file did not decode: left out")
                names = [n for n in names if n not in gone]
        idx = split_indices(train_ds.paths, names, source=f"split file {split_file}")
        inferred = infer_percent(split_file)
        if percent is not None and inferred is not None and percent != inferred:
            echo(f"note: --percent {percent:g} overrides the {inferred}% in the split file's name")
        percent = percent if percent is not None else inferred
        subset = f"split file {Path(split_file).name}: {len(idx)} images"
    else:
        percent = 10.0 if percent is None else percent
        idx = percent_subset(train_ds.targets, percent, seed)
        subset = f"seeded {percent:g}% of every class: {len(idx)} images (no split file given)"
    if epochs is None:
        if percent not in SEMISUP_EPOCHS:
            raise UserError("cannot tell the number of epochs: pass --percent 1 or 10 (60 or 30 epochs), or --epochs N"
                            + (f" (the split file's name {Path(split_file).name!r} says neither 1% nor 10%)"
                               if split_file and percent is None else ""))
        epochs = SEMISUP_EPOCHS[int(percent)]
    settings = settings_from_options(opts, epochs=epochs, data_kind=spec.kind)
    echo(f"data: {spec}: {subset} of {len(train_ds)} train / {len(val_ds)} val, {len(train_ds.classes)} classes")
    train_sub = train_ds.subset(idx)
    data_rec = {**data_record(spec, train_sub, val_ds, skipped=train_ds.skipped + val_ds.skipped),
                "train_size_full": len(train_ds),
                "split_file": str(split_file) if split_file else None, "percent": percent}
    run_finetune("semisup", checkpoint, opts, spec, train_sub, val_ds, data_rec, settings,
                 size_for=lambda m: resolve_image_size(spec, image_size, m.image_size), out=out, device=dev,
                 precision=prec, seed=seed)


@click.command("cifar")
@finetune_options(warmup=10, epochs="100")
def cifar_cmd(checkpoint, data, class_list, skip_bad_images, out, device, seed, epochs, image_size, precision,
              **opts):
    """Transfer: fine-tune CHECKPOINT on CIFAR-10/100 (paper Supp. A.4), --data cifar10:PATH or cifar100:PATH.

    As semisup, but 100 epochs with 10 warm-up epochs on the full training set. Images are upscaled to
    --image-size [default: the checkpoint's training resolution, else 224]. Any ImageFolder works too; with no
    --data, the embedded digits. Runs unchanged under torchrun.
    """
    dev = setup_run(device, seed)
    prec = precision_for(precision, dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list, skip_bad_images)
    settings = settings_from_options(opts, epochs=epochs or 100, data_kind=spec.kind)
    echo(f"data: {spec}: {len(train_ds)} train / {len(val_ds)} val images, {len(train_ds.classes)} classes")
    run_finetune("cifar", checkpoint, opts, spec, train_ds, val_ds, data_record(spec, train_ds, val_ds), settings,
                 size_for=lambda m: int(image_size or m.image_size or 224), out=out, device=dev, precision=prec,
                 seed=seed)
