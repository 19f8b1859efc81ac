"""Train and evaluate the C4 Mask R-CNN with detectron2 on every visible GPU (needs detectron2 installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mokd.errors import UserError

INSTALL_HINT = (
    "detectron2 is not installed (it is not on PyPI). Install it from source against your torch and CUDA, "
    "as its install guide says (https://detectron2.readthedocs.io/en/latest/tutorials/install.html): "
    "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "(needs gcc and g++ >= 5.4, and for GPUs the CUDA toolkit matching torch). Or run the torchvision re-implementation "
    "with --backend torchvision (its numbers are not comparable with detectron2's).")

TRAIN_NAME, VAL_NAME = "mokd_coco_train", "mokd_coco_val"


def detectron2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("detectron2") is not None


def run_config(base: dict, *, weights: Path, out_dir: Path, iters: int, batch_size: int, lr: float | None,
               seed: int, num_classes: int, device: str = "cuda", precise_bn_iters: int | None = None,
               train_sizes: tuple[str, list[int]] | None = None, test_size: int | None = None,
               num_workers: int | None = None) -> dict:
    """The paper config with this run's weights, data, schedule, device and output folder filled in.

    train_sizes: ("range", [MIN, MAX]) or ("choice", [S1, S2, ...]) for INPUT.MIN_SIZE_TRAIN(_SAMPLING).
    """
    from mokd_eval.detection.d2_config import schedule

    cfg = json.loads(json.dumps(base))
    cfg["MODEL"]["DEVICE"] = device
    if precise_bn_iters is not None:
        cfg["TEST"]["PRECISE_BN"]["NUM_ITER"] = precise_bn_iters
        cfg["TEST"]["PRECISE_BN"]["ENABLED"] = precise_bn_iters > 0
    if train_sizes is not None:
        cfg["INPUT"].update(MIN_SIZE_TRAIN_SAMPLING=train_sizes[0], MIN_SIZE_TRAIN=list(train_sizes[1]))
    if test_size is not None:
        cfg["INPUT"]["MIN_SIZE_TEST"] = test_size
    if num_workers is not None:
        cfg["DATALOADER"] = {"NUM_WORKERS": num_workers}
    cfg["MODEL"]["WEIGHTS"] = str(weights)
    cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] = num_classes
    cfg["DATASETS"] = {"TRAIN": [TRAIN_NAME], "TEST": [VAL_NAME]}
    cfg["SOLVER"].update(schedule(iters), IMS_PER_BATCH=batch_size,
                         BASE_LR=lr if lr is not None else 0.02 * batch_size / 16)
    cfg["SOLVER"]["CHECKPOINT_PERIOD"] = max(1, min(cfg["SOLVER"]["CHECKPOINT_PERIOD"], iters))
    cfg["OUTPUT_DIR"] = str(out_dir)
    cfg["SEED"] = seed
    return cfg


def run_detectron2(cfg: dict, splits, out_dir: Path) -> dict[str, float]:
    """Write the config, launch training + COCO evaluation on all visible GPUs, return the six AP figures."""
    import torch
    from detectron2.engine import launch

    if cfg["MODEL"].get("DEVICE", "cuda") == "cpu":
        num_gpus = 1  # one process on the CPU: SyncBN then acts as plain BatchNorm
    else:
        num_gpus = torch.cuda.device_count()
        if num_gpus == 0:
            raise UserError("the detectron2 backend trains on CUDA GPUs and none is visible; pass --device cpu "
                            "(slow, for checks) or use --backend torchvision")
    if cfg["SOLVER"]["IMS_PER_BATCH"] % num_gpus:
        raise UserError(f"--batch-size {cfg['SOLVER']['IMS_PER_BATCH']} does not split evenly over the {num_gpus} "
                        "visible GPUs (detectron2 needs the same number of images on each)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    result_path = out_dir / "d2_results.json"
    result_path.unlink(missing_ok=True)
    launch(_worker, num_gpus, num_machines=1, machine_rank=0, dist_url="auto",
           args=(str(cfg_path), splits.as_dict(), str(result_path)))
    if not result_path.is_file():
        raise RuntimeError(f"detectron2 finished without writing {result_path}")
    results = json.loads(result_path.read_text())
    return metrics_from_d2(results)


def metrics_from_d2(results: dict) -> dict[str, float | None]:
    """detectron2's COCOEvaluator output {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", ...}, "segm": ...}
    -> the twelve figures of METRIC_NAMES (in %); NaN (no ground truth of that size) becomes None."""
    import math

    from mokd_eval.detection.coco import METRIC_NAMES, metric_name

    out = {}
    for task, prefix in (("bbox", "APb"), ("segm", "APs")):
        for coco_name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            v = (results.get(task) or {}).get(coco_name)
            v = float(v) if v is not None else None
            out[metric_name(prefix, coco_name)] = v if v is not None and math.isfinite(v) else None
    assert tuple(out) == METRIC_NAMES
    return out


def _worker(cfg_path: str, splits: dict, result_path: str) -> None:
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    import mokd_eval.detection.d2_ext  # noqa: F401  registers MokdRes5ROIHeads

    for name, js, images in ((TRAIN_NAME, splits["train_json"], splits["train_images"]),
                             (VAL_NAME, splits["val_json"], splits["val_images"])):
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, js, images)
    cfg = get_cfg()
    cfg.merge_from_file(cfg_path)
    cfg.freeze()
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    # What detectron2's default_setup does: each rank its own seed, derived from SEED (Python, NumPy, torch).
    seed_all_rng(cfg.SEED + comm.get_rank())

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # its EvalHook evaluates once after the last iteration
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    if comm.is_main_process():
        Path(result_path).write_text(json.dumps(results, default=float))
