"""CLI plumbing shared by every `mokd eval` protocol: checkpoint and feature options, loading with a printed
report, device/distributed set-up, and the data split pair with its class check.

A protocol command reads:

    @click.command("knn")
    @checkpoint_options
    @data_options
    @feature_options
    ...
    def knn_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, ...):
        device = setup_run(device, seed)
        spec, train_ds, val_ds = load_eval_data(data, class_list)
        for m in load_models_cli(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial): ...
"""

from __future__ import annotations

import json

import click
import torch

from mokd import distributed as dist
from mokd.checkpoint import seed_everything
from mokd.cli_common import resolve_data
from mokd.data import DataSpec, ImageDataset, build_dataset, check_same_classes
from mokd.device import resolve_device, resolve_precision
from mokd.errors import UserError
from mokd_eval.loader import LoadedModel, load_models


def echo(message: str = "") -> None:
    """click.echo on rank 0 only."""
    if dist.is_main():
        click.echo(message)


def _parse_kwargs(ctx, param, value):
    if value in (None, ""):
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        out = {}
        for item in value.split(","):
            k, sep, v = item.partition("=")
            if not sep:
                raise click.BadParameter(f"expected JSON or key=value,... such as img_size=32,patch_size=4; got {value!r}")
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v.strip()
    if not isinstance(out, dict):
        raise click.BadParameter(f"expected a mapping, got {value!r}")
    return out


def loader_options(f):
    """--model, --branch, --arch, --arch-kwargs, --key, --allow-partial, --cifar-stem, --pos-resample: how to
    read a checkpoint."""
    options = [
        click.option("--model", default=None, metavar="NAME",
                     help="MOKD checkpoints: net1 or net2 (default: both); official MOKD files: cnn or vit."),
        click.option("--branch", type=click.Choice(["teacher", "student"]), default=None,
                     help="Which branch to load (default: teacher; MoCo and solo-learn: the query/online encoder)."),
        click.option("--arch", default=None, metavar="TIMM_NAME", show_default="the file's own",
                     help="timm architecture when the file does not name it (official MOKD files: CNN,VIT)."),
        click.option("--arch-kwargs", "arch_kwargs", default=None, callback=_parse_kwargs, metavar="KWARGS",
                     show_default="none",
                     help="Extra timm.create_model arguments, as JSON or k=v,... (e.g. img_size=32,patch_size=4)."),
        click.option("--key", default=None, metavar="NAME", show_default="the detected format's",
                     help="Sub-dict (dotted) or key prefix holding the backbone weights, for unknown layouts."),
        click.option("--allow-partial", "allow_partial", is_flag=True,
                     help="Evaluate even if not every backbone tensor matched (the rest keep their random init)."),
        # Read by load_models_cli from the click context, so that no command's signature changes.
        click.option("--cifar-stem", "cifar_stem", is_flag=True, expose_value=False, callback=_remember_cifar_stem,
                     help="CNNs: first convolution at stride 1 and no stem max-pool, as CIFAR models are trained "
                          "(a 3x3 first convolution is recognised without this flag; a 7x7 one is not)."),
        pos_resample_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


CIFAR_STEM_KEY = "mokd_eval.cifar_stem"


def _remember_cifar_stem(ctx, param, value):
    ctx.meta[CIFAR_STEM_KEY] = bool(value)


def _cifar_stem_flag() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(CIFAR_STEM_KEY))


POS_RESAMPLE_KEY = "mokd_eval.pos_resample"


def _remember_pos_resample(ctx, param, value):
    ctx.meta[POS_RESAMPLE_KEY] = value


def _pos_resample_flag() -> str | None:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(POS_RESAMPLE_KEY) if ctx else None


# Part of loader_options; commands with loader options of their own (analyze consistency) add it alone.
pos_resample_option = click.option(
    "--pos-resample", "pos_resample", type=click.Choice(["dino", "timm"]), default=None, expose_value=False,
    callback=_remember_pos_resample, show_default="None: the rule the checkpoint's source trained with",
    help="ViTs away from their native size: resample the position embedding by DINO's rule (bicubic, scale "
         "(n + 0.1) / N, as DINO and MOKD train) or timm's; the load report says which and why, "
         "docs/fidelity.md lists each source's.")


def checkpoint_options(f):
    """CKPT argument plus the loader options."""
    return click.argument("checkpoint", type=click.Path(dir_okay=False))(loader_options(f))


def feature_options(f):
    """--image-size, --precision, --num-workers, --cache-dir, --no-cache."""
    options = [
        click.option("--image-size", "image_size", type=click.IntRange(min=8), default=None,
                     help="Evaluation crop size (default: the images' own size for digits, photos and CIFAR, else the "
                          "checkpoint's training resolution, else 224)."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="fp32",
                     show_default=True,
                     help="Precision of feature extraction: fp32 as the published protocols (DINO's evaluation); "
                          "bf16/fp16 autocast is faster but moves k-NN accuracy (benchmarks/features.py); auto: "
                          "bf16 where the device computes it natively."),
        click.option("--num-workers", "num_workers", type=click.IntRange(min=0), default=None,
                     help="Data-loading (decode, resize) worker processes [default: up to 8 per process, so that "
                          "JPEG decoding does not hold back extraction; 0 for digits, photos or under 4 cores]."),
        click.option("--cache-dir", "cache_dir", type=click.Path(file_okay=False), default=None,
                     help="Feature cache folder (default: $MOKD_CACHE or ~/.cache/mokd/features)."),
        click.option("--no-cache", "no_cache", is_flag=True, help="Neither read nor write the feature cache."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def setup_run(device: str | None, seed: int = 0) -> torch.device:
    """Resolve the device, join the torchrun process group if there is one, seed every RNG."""
    dev = resolve_device(device)
    dist.init_distributed(dev.type)
    seed_everything(seed)
    return dev


def precision_for(precision: str, device: torch.device) -> str:
    return resolve_precision(precision, device)


def load_eval_data(data: str | None, class_list: str | None, skip_bad_images: bool = False
                   ) -> tuple[DataSpec, ImageDataset, ImageDataset]:
    """Both splits of --data, checked to share one class list. No images are decoded here, unless
    `skip_bad_images` (--skip-bad-images): then every image file is decoded once, and those that fail are left
    out (each split's `skipped`), counted and named. Leaving files out changes the file list, which the feature
    cache key holds, so such a set is never confused with the full one."""
    spec = resolve_data(data, class_list)
    train, val = (build_dataset(spec, split, skip_unreadable=skip_bad_images) for split in ("train", "val"))
    check_same_classes(train, val)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"{spec}: the {'train' if len(train) == 0 else 'val'} split holds no images")
    skipped = train.skipped + val.skipped
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        echo(f"left out {len(skipped)} unreadable image file(s) (--skip-bad-images): {shown}; all are listed in "
             f"the result records (data.skipped_files)")
    return spec, train, val


def data_record(spec: DataSpec, train: ImageDataset, val: ImageDataset, skipped: list[str] | None = None) -> dict:
    """The result record's `data` field; `skipped`: the unreadable files left out (default: both splits')."""
    skipped = train.skipped + val.skipped if skipped is None else skipped
    return {"spec": str(spec), "kind": spec.kind, "train_size": len(train), "val_size": len(val),
            "num_classes": len(train.classes), "classes": list(train.classes), "skipped_images": len(skipped),
            **({"skipped_files": list(skipped)} if skipped else {})}


def load_models_cli(checkpoint: str, model: str | None, branch: str | None, arch: str | None,
                    arch_kwargs: dict | None, key: str | None, allow_partial: bool) -> list[LoadedModel]:
    """load_models, printing one load report per model (rank 0)."""
    models = load_models(checkpoint, model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs, key=key,
                         allow_partial=allow_partial, cifar_stem=_cifar_stem_flag(), pos_resample=_pos_resample_flag())
    for m in models:
        echo_load_report(m, checkpoint)
    return models


def echo_load_report(m: LoadedModel, source: str) -> None:
    """What was loaded from `source`, the match report and its notes (rank 0)."""
    c = m.checkpoint
    echo(f"loaded {m.label}: {c['name']} from {source} [{c['format']}{', ' + c['branch'] if c.get('branch') else ''}]")
    echo(f"  {m.report.summary()}")
    for note in m.report.notes:
        echo(f"  note: {note}")
