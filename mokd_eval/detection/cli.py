"""`mokd eval detection`: C4 Mask R-CNN transfer to COCO (paper Sec. 4.4), with detectron2 or torchvision."""

from __future__ import annotations

import time
from pathlib import Path

import click

from mokd.cli_common import debug_option, device_option, out_option, seed_option
from mokd.errors import UserError
from mokd_eval.common import checkpoint_options, echo

BACKENDS = ("detectron2", "torchvision")


SIZES_HELP = ("MIN,MAX (a range, e.g. 600,800), a list of three or more sizes to choose from (e.g. "
              "640,672,704,736,768,800), one size, or range:A,B / choice:A,B,... to say which")


def parse_train_sizes(value: str) -> tuple[str, tuple[int, ...]]:
    """'600,800' -> ("range", (600, 800)); '640,704,800' or '800' -> ("choice", ...); a 'range:'/'choice:' prefix
    says it outright. The shorter image side is drawn from the range, or from the list."""
    kind, _, body = value.rpartition(":")
    if kind not in ("", "range", "choice"):
        raise click.BadParameter(f"expected {SIZES_HELP}; got {value!r}")
    try:
        sizes = tuple(int(v) for v in body.split(","))
    except ValueError:
        raise click.BadParameter(f"expected {SIZES_HELP}; got {value!r}") from None
    kind = kind or ("range" if len(sizes) == 2 else "choice")
    if min(sizes) < 8 or (kind == "range" and (len(sizes) != 2 or sizes[0] > sizes[1])):
        raise click.BadParameter(f"expected {SIZES_HELP} (sizes of at least 8, a range as MIN <= MAX); got {value!r}")
    return kind, sizes


def _sizes(ctx, param, value):
    return parse_train_sizes(value)


def strict_json(x):
    """Non-finite floats -> None, so that the record is strict JSON (null, not NaN)."""
    import math

    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@click.command("detection")
@checkpoint_options
@click.option("--coco", "coco", type=click.Path(), default=None, show_default="none: required unless the four overrides are given",
              help="COCO root: annotations/instances_{train,val}2017.json, train2017/, val2017/.")
@click.option("--train-json", type=click.Path(dir_okay=False), default=None, show_default="from --coco",
              help="Override: train annotations.")
@click.option("--val-json", type=click.Path(dir_okay=False), default=None, show_default="from --coco",
              help="Override: val annotations.")
@click.option("--train-images", type=click.Path(file_okay=False), default=None, show_default="from --coco",
              help="Override: train images.")
@click.option("--val-images", type=click.Path(file_okay=False), default=None, show_default="from --coco",
              help="Override: val images.")
@click.option("--backend", type=click.Choice(BACKENDS), default="detectron2", show_default=True,
              help="detectron2 (the paper's set-up, GPUs) or torchvision (a re-implementation that runs anywhere; "
                   "its numbers are not comparable with detectron2's).")
@out_option(default="results/detection")
@click.option("--iters", type=click.IntRange(min=1), default=180_000, show_default=True,
              help="Training iterations (the paper's 2x schedule: 180k; lr steps at 2/3 and 8/9).")
@click.option("--batch-size", "batch_size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per iteration, over all GPUs.")
@click.option("--lr", type=float, default=None, help="Base learning rate (default: 0.02 x batch / 16).")
@click.option("--train-sizes", "train_sizes", default="600,800", show_default=True, callback=_sizes,
              help=f"Shorter side for training: {SIZES_HELP}.")
@click.option("--test-size", "test_size", type=click.IntRange(min=8), default=800, show_default=True,
              help="Shorter side at test.")
@click.option("--rois-per-image", "rois_per_image", type=click.IntRange(min=1), default=512, show_default=True,
              help="torchvision backend: sampled RoIs per training image (lower only for quick checks).")
@click.option("--test-proposals", "test_proposals", type=click.IntRange(min=1), default=1000, show_default=True,
              help="torchvision backend: RPN proposals per test image (lower only for quick checks).")
@click.option("--num-workers", "num_workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data-loading worker processes (per GPU for detectron2).")
@click.option("--precise-bn-iters", "precise_bn_iters", type=click.IntRange(min=0), default=200, show_default=True,
              help="detectron2 backend: iterations of precise BN statistics after training (0: off; "
                   "lower only for quick checks).")
@device_option
@seed_option
@debug_option
def detection_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, coco, train_json, val_json,
                  train_images, val_images, backend, out, iters, batch_size, lr, train_sizes, test_size,
                  rois_per_image, test_proposals, num_workers, precise_bn_iters, device, seed):
    """Fine-tune the ResNet in CHECKPOINT as a C4 Mask R-CNN on COCO and report box and mask AP.

    \b
    mokd eval detection run/last.pth --model net1 --coco /data/coco              # detectron2, all GPUs
    mokd eval detection r50.pth --arch resnet50 --coco /data/coco --backend torchvision
    mokd eval detection r18.pth --arch resnet18 --coco tiny/ --device cpu --iters 4 --precise-bn-iters 2
    """
    from mokd_eval.detection.coco import resolve_coco, split_counts
    from mokd_eval.detection.d2_train import INSTALL_HINT, detectron2_available
    from mokd_eval.export import load_one, resnet_structure

    if backend == "detectron2" and not detectron2_available():
        raise UserError(INSTALL_HINT)
    splits = resolve_coco(coco, train_json=train_json, val_json=val_json, train_images=train_images,
                          val_images=val_images)
    loaded = load_one(checkpoint, target="detectron2", model=model, branch=branch, arch=arch,
                      arch_kwargs=arch_kwargs, key=key, allow_partial=allow_partial)
    structure = resnet_structure(loaded.backbone.state_dict())
    stem = loaded.arch.get("stem_conv")
    if stem and stem["kernel"] != 7:
        raise UserError(f"{loaded.label} has a {stem['kernel']}x{stem['kernel']} CIFAR-style first convolution; the C4 "
                        "detector's stem is the standard 7x7 stride-2 one, which these weights cannot fill")
    out_dir = Path(out)
    run_dir = out_dir / f"detection_{backend}_{Path(checkpoint).stem}_{loaded.label}".replace("/", "_")
    start = time.time()
    # The same fields for both backends: counts at the top (as classification records have), paths apart.
    data = {"spec": f"coco:{coco}" if coco else "coco-format", "kind": "coco", **split_counts(splits),
            "paths": splits.as_dict()}
    if backend == "torchvision":
        metrics, settings = _run_torchvision(loaded, splits, iters, batch_size, lr, train_sizes, test_size,
                                             rois_per_image, test_proposals, num_workers, device, seed)
    else:
        metrics, settings = _run_detectron2(loaded, structure, splits, run_dir, iters, batch_size, lr, train_sizes,
                                            test_size, seed, device, precise_bn_iters, num_workers)
    settings.update(protocol="C4 Mask R-CNN, COCO (paper Sec. 4.4 / A.5)", resnet_depth=structure["depth"])
    from mokd_eval.records import write_record

    record = write_record(out_dir, task="detection", checkpoint=loaded.checkpoint, data=data,
                          settings=strict_json(settings), metrics=strict_json({**metrics, "headline": "APb"}),
                          wall_time_s=time.time() - start, device=settings.get("device"))
    echo("  ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in metrics.items()))
    echo(f"record: {record}")


def _run_torchvision(loaded, splits, iters, batch_size, lr, train_sizes, test_size, rois_per_image, test_proposals,
                     num_workers, device, seed):
    from mokd.device import resolve_device
    from mokd_eval.detection.tv_c4 import Schedule, run_torchvision

    dev = resolve_device(device)
    if loaded.arch.get("small_stem"):
        echo("note: the backbone was trained with a small-image stem; detection fine-tunes it with the standard "
             "stride-4 stem (stride-2 conv1 and max-pool)")
    schedule = Schedule(iters=iters, batch_size=batch_size, base_lr=lr)
    result = run_torchvision(loaded.backbone, splits, schedule=schedule, train_sizes=train_sizes[1],
                             sampling=train_sizes[0],
                             test_size=test_size, rois_per_image=rois_per_image, test_proposals=test_proposals,
                             device=dev, seed=seed, num_workers=num_workers, log=echo)
    settings = {**result["settings"], "device": str(dev)}
    return result["metrics"], settings


def _run_detectron2(loaded, structure, splits, run_dir, iters, batch_size, lr, train_sizes, test_size, seed,
                    device, precise_bn_iters, num_workers):
    from mokd.device import resolve_device
    from mokd_eval.detection.d2_config import paper_config
    from mokd_eval.detection.d2_train import run_config, run_detectron2
    from mokd_eval.export import echo_warnings, export_backbone

    if structure["depth"] not in (18, 34, 50, 101):
        raise UserError(f"detectron2 configs exist for ResNet-18/34/50/101; this backbone has {structure['block']} "
                        f"blocks {structure['depths']}")
    if not structure["standard_widths"]:
        raise UserError(f"{loaded.arch['name']} with {loaded.arch.get('kwargs')} has non-standard widths; the detectron2 "
                        "configs build the standard ResNet (64/128/256/512 channels per stage). Use --backend "
                        "torchvision, or a detectron2 config of your own with the exported weights")
    with echo_warnings():
        weights = export_backbone(loaded.backbone, loaded.arch, "detectron2", run_dir / "backbone_d2.pkl")[0]
    dev = resolve_device(device)
    cfg = run_config(paper_config(structure["depth"]), weights=weights, out_dir=run_dir,
                     iters=iters, batch_size=batch_size, lr=lr, seed=seed, num_classes=splits.num_classes,
                     device=dev.type, precise_bn_iters=precise_bn_iters, train_sizes=train_sizes,
                     test_size=test_size, num_workers=num_workers)
    metrics = run_detectron2(cfg, splits, run_dir)
    settings = {"backend": "detectron2", "config": cfg, "iters": iters, "batch_size": batch_size,
                "lr": cfg["SOLVER"]["BASE_LR"], "steps": cfg["SOLVER"]["STEPS"],
                "train_sizes": list(train_sizes[1]), "train_sizes_sampling": train_sizes[0], "test_size": test_size,
                "precise_bn_iters": precise_bn_iters, "seed": seed, "device": dev.type}
    return metrics, settings
