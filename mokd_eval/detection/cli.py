"""`mokd eval detection`: C4 Mask R-CNN transfer to COCO (paper Sec. 4.4), with detectron2 or torchvision."""

from __future__ import annotations

import time
from pathlib import Path

import click

from mokd.cli_common import debug_option, device_option, out_option, seed_option
from mokd.errors import UserError
from mokd_eval.common import checkpoint_options, echo

BACKENDS = ("detectron2", "torchvision")


def _sizes(ctx, param, value):
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected MIN,MAX such as 600,800; got {value!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) < 8:
        raise click.BadParameter(f"expected MIN,MAX such as 600,800; got {value!r}")
    return sizes


@click.command("detection")
@checkpoint_options
@click.option("--coco", "coco", type=click.Path(), default=None,
              help="COCO root: annotations/instances_{train,val}2017.json, train2017/, val2017/.")
@click.option("--train-json", type=click.Path(dir_okay=False), default=None, help="Override: train annotations.")
@click.option("--val-json", type=click.Path(dir_okay=False), default=None, help="Override: val annotations.")
@click.option("--train-images", type=click.Path(file_okay=False), default=None, help="Override: train images.")
@click.option("--val-images", type=click.Path(file_okay=False), default=None, help="Override: val images.")
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
              help="Shorter side range for training, MIN,MAX.")
@click.option("--test-size", "test_size", type=click.IntRange(min=8), default=800, show_default=True,
              help="Shorter side at test.")
@click.option("--rois-per-image", "rois_per_image", type=click.IntRange(min=1), default=512, show_default=True,
              help="torchvision backend: sampled RoIs per training image (lower only for quick checks).")
@click.option("--test-proposals", "test_proposals", type=click.IntRange(min=1), default=1000, show_default=True,
              help="torchvision backend: RPN proposals per test image (lower only for quick checks).")
@click.option("--num-workers", "num_workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="torchvision backend: data-loading worker processes.")
@device_option
@seed_option
@debug_option
def detection_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, coco, train_json, val_json,
                  train_images, val_images, backend, out, iters, batch_size, lr, train_sizes, test_size,
                  rois_per_image, test_proposals, num_workers, device, seed):
    """Fine-tune the ResNet in CHECKPOINT as a C4 Mask R-CNN on COCO and report box and mask AP.

    \b
    mokd eval detection run/last.pth --model net1 --coco /data/coco              # detectron2, all GPUs
    mokd eval detection r50.pth --arch resnet50 --coco /data/coco --backend torchvision
    """
    from mokd_eval.detection.coco import resolve_coco
    from mokd_eval.detection.d2_train import INSTALL_HINT, detectron2_available
    from mokd_eval.export import load_one, resnet_structure

    if backend == "detectron2" and not detectron2_available():
        raise UserError(INSTALL_HINT)
    splits = resolve_coco(coco, train_json=train_json, val_json=val_json, train_images=train_images,
                          val_images=val_images)
    loaded = load_one(checkpoint, target="detectron2", model=model, branch=branch, arch=arch,
                      arch_kwargs=arch_kwargs, key=key, allow_partial=allow_partial)
    structure = resnet_structure(loaded.backbone.state_dict())
    out_dir = Path(out)
    run_dir = out_dir / f"detection_{backend}_{Path(checkpoint).stem}_{loaded.label}".replace("/", "_")
    start = time.time()
    data = {"spec": f"coco:{coco}" if coco else "coco-format", **splits.as_dict()}
    if backend == "torchvision":
        metrics, settings, sizes = _run_torchvision(loaded, splits, iters, batch_size, lr, train_sizes, test_size,
                                                    rois_per_image, test_proposals, num_workers, device, seed)
        data.update(sizes)
    else:
        metrics, settings = _run_detectron2(loaded, structure, splits, run_dir, iters, batch_size, lr, train_sizes,
                                            test_size, seed)
    settings.update(protocol="C4 Mask R-CNN, COCO (paper Sec. 4.4 / A.5)", resnet_depth=structure["depth"])
    from mokd_eval.records import write_record

    record = write_record(out_dir, task="detection", checkpoint=loaded.checkpoint, data=data, settings=settings,
                          metrics={**metrics, "headline": "APb"}, wall_time_s=time.time() - start)
    echo("  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
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
    result = run_torchvision(loaded.backbone, splits, schedule=schedule, train_sizes=train_sizes,
                             test_size=test_size, rois_per_image=rois_per_image, test_proposals=test_proposals,
                             device=dev, seed=seed, num_workers=num_workers, log=echo)
    settings = {**result["settings"], "device": str(dev)}
    return result["metrics"], settings, result["data"]


def _run_detectron2(loaded, structure, splits, run_dir, iters, batch_size, lr, train_sizes, test_size, seed):
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
    cfg = run_config(paper_config(structure["depth"]), weights=weights, out_dir=run_dir,
                     iters=iters, batch_size=batch_size, lr=lr, seed=seed, num_classes=splits.num_classes)
    cfg["INPUT"].update(MIN_SIZE_TRAIN=list(train_sizes) if len(train_sizes) == 2 else [train_sizes[0]] * 2,
                        MIN_SIZE_TEST=test_size)
    metrics = run_detectron2(cfg, splits, run_dir)
    settings = {"backend": "detectron2", "config": cfg, "iters": iters, "batch_size": batch_size,
                "lr": cfg["SOLVER"]["BASE_LR"], "steps": cfg["SOLVER"]["STEPS"], "train_sizes": list(train_sizes),
                "test_size": test_size, "seed": seed}
    return metrics, settings
