"""Detection transfer: the torchvision C4 backend end to end on a tiny drawn COCO set, the schedule and model
shape against the paper's protocol, the shipped detectron2 configs, and the errors users meet first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mokd.cli import cli
from mokd.errors import UserError
from mokd.models.backbones import create_backbone
from mokd_eval.detection import d2_ext
from mokd_eval.detection.coco import METRIC_NAMES, resolve_coco
from mokd_eval.detection.d2_config import DEPTHS, file_name, paper_config
from mokd_eval.detection.d2_train import detectron2_available, metrics_from_d2
from mokd_eval.detection.tv_c4 import Schedule, build_c4_mask_rcnn
from tests.ckpt_factory import make_mokd_checkpoint
from tests.detection_data import make_tiny_coco
REPO = Path(__file__).resolve().parents[1]
NARROW = {"channels": [16, 32, 64, 128]}  # resnet18 at 1/4 width: same structure, a fraction of the cost


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


def narrow_pair(path: Path) -> Path:
    """A MOKD pair: net1 a narrow resnet18 trained with a small stem, net2 a ViT."""
    make_mokd_checkpoint(path, net1={"name": "resnet18", "kwargs": NARROW, "small_stem": True},
                         net2={"name": "test_vit", "kwargs": {}, "small_stem": False})
    return path


@pytest.mark.slow
def test_torchvision_backend_trains_and_reports_twelve_metrics(tmp_path, coco):
    ckpt = narrow_pair(tmp_path / "pair.pth")
    out = tmp_path / "results"
    res = CliRunner().invoke(cli, [
        "eval", "detection", str(ckpt), "--model", "net1", "--coco", str(coco), "--backend", "torchvision",
        "--out", str(out), "--iters", "3", "--batch-size", "2", "--train-sizes", "64,96", "--test-size", "96",
        "--rois-per-image", "32", "--test-proposals", "50", "--num-workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    records = list(out.glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["task"] == "detection" and record["checkpoint"]["label"] == "net1-teacher"
    metrics = record["metrics"]
    assert metrics["headline"] == "APb"
    for name in METRIC_NAMES:
        v = metrics[name]  # None: no ground truth of that size (e.g. no large objects in 96 px images)
        assert v is None or (math.isfinite(v) and 0.0 <= v <= 100.0), (name, v)
    assert metrics["APb"] is not None and metrics["APb_large"] is None
    s = record["settings"]
    assert s["backend"] == "torchvision" and s["iters"] == 3 and s["steps"] == [2]  # a step at 3 never happens
    assert s["lr"] == pytest.approx(0.02 * 2 / 16)
    assert record["data"]["num_classes"] == 2 and record["data"]["train_size"] == 8
    assert record["data"]["paths"]["train_images"] == str(coco / "train2017")
    assert "NaN" not in records[0].read_text()


def test_c4_layout_shares_res5_between_boxes_and_masks():
    resnet = create_backbone("resnet18", NARROW, small_stem=True)
    layer4 = resnet.layer4
    model = build_c4_mask_rcnn(resnet, num_classes=2, train_sizes=(64, 96), test_size=96)
    heads = model.roi_heads
    assert heads.box_head.res5 is layer4 and heads.mask_head is layer4
    assert resnet.conv1.stride == (2, 2) and isinstance(resnet.maxpool, torch.nn.MaxPool2d)  # standard stem back
    with torch.no_grad():
        feat = model.backbone(torch.zeros(1, 3, 64, 64))
    assert feat.shape == (1, 64, 4, 4)  # res4: stride 16, width of layer3
    assert heads.box_roi_pool.output_size == (14, 14)
    assert heads.box_predictor.cls_score.out_features == 3  # 2 classes + background
    assert heads.mask_predictor.conv5_mask.stride == (2, 2)  # 7x7 res5 output -> 14x14 masks
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # FrozenBN throughout
    assert model.transform.min_size == (64, 89, 96)


def test_schedule_is_the_2x_shape_scaled():
    s = Schedule()
    assert s.steps == (120_000, 160_000) and s.lr == 0.02
    assert s.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert s.lr_at(1000) == pytest.approx(0.02)
    assert s.lr_at(119_999) == pytest.approx(0.02) and s.lr_at(120_000) == pytest.approx(0.002)
    assert s.lr_at(160_000) == pytest.approx(0.0002)
    assert Schedule(batch_size=8).lr == pytest.approx(0.01)
    assert Schedule(iters=90, base_lr=0.1).steps == (60, 80) and Schedule(iters=90).warmup == 9
    from mokd_eval.detection.d2_config import schedule as d2_schedule

    for iters in (1, 2, 3, 4, 5, 90, 1000, 180_000):  # both backends share the schedule's shape
        d2 = d2_schedule(iters)
        assert d2["STEPS"] == list(Schedule(iters=iters).steps) and d2["WARMUP_ITERS"] == Schedule(iters=iters).warmup


def test_shipped_detectron2_configs_match_the_protocol():
    for depth in DEPTHS:
        path = REPO / "configs" / "detection" / file_name(depth)
        cfg = yaml.safe_load(path.read_text())
        assert cfg == paper_config(depth), f"{path} is stale: python -m mokd_eval.detection.d2_config"
    cfg = paper_config(34)
    assert cfg["SOLVER"]["MAX_ITER"] == 180_000 and cfg["SOLVER"]["STEPS"] == [120_000, 160_000]
    assert cfg["SOLVER"]["BASE_LR"] == 0.02 and cfg["SOLVER"]["IMS_PER_BATCH"] == 16
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == [600, 800] and cfg["INPUT"]["MIN_SIZE_TEST"] == 800
    assert cfg["INPUT"]["FORMAT"] == "RGB" and cfg["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert cfg["MODEL"]["RESNETS"]["NORM"] == "SyncBN" and cfg["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 64
    assert cfg["MODEL"]["ROI_HEADS"]["NAME"] == "MokdRes5ROIHeads" and cfg["MODEL"]["MASK_ON"] is True
    assert paper_config(50)["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 256
    assert d2_ext.BASIC_RES5_BLOCKS == {18: 2, 34: 3}
    assert d2_ext.AVAILABLE == detectron2_available()


def test_detectron2_results_to_metrics():
    r = {"bbox": {"AP": 40.1, "AP50": 60.2, "AP75": 43.3, "APs": 1.0, "APm": 2.0, "APl": float("nan"),
                  "AP-square": 3.0},
         "segm": {"AP": 35.0, "AP50": 57.0, "AP75": 37.0, "APs": 4.0, "APm": 5.0, "APl": 6.0}}
    assert metrics_from_d2(r) == {"APb": 40.1, "APb50": 60.2, "APb75": 43.3, "APb_small": 1.0, "APb_medium": 2.0,
                                  "APb_large": None, "APs": 35.0, "APs50": 57.0, "APs75": 37.0, "APs_small": 4.0,
                                  "APs_medium": 5.0, "APs_large": 6.0}
    assert len(METRIC_NAMES) == 12


def test_lr_steps_are_valid_for_detectron2_at_every_length():
    """fvcore's MultiStepParamScheduler, as detectron2's build_lr_scheduler calls it, needs steps that are
    strictly increasing, positive and below MAX_ITER, and at least len(steps) + 1 updates."""
    from mokd_eval.detection.d2_config import lr_steps

    for iters in range(1, 40):
        steps = lr_steps(iters)
        assert all(0 < s < iters for s in steps) and steps == sorted(set(steps)) and iters >= len(steps) + 1
    assert lr_steps(3) == [2] and lr_steps(1) == [] and lr_steps(5) == [3, 4] and lr_steps(180_000) == [120_000, 160_000]


def test_train_sizes_take_a_range_or_a_choice():
    import click

    from mokd_eval.detection.cli import parse_train_sizes
    from mokd_eval.detection.tv_c4 import sizes_grid

    assert parse_train_sizes("600,800") == ("range", (600, 800))
    assert parse_train_sizes("640,672,704,736,768,800") == ("choice", (640, 672, 704, 736, 768, 800))
    assert parse_train_sizes("choice:600,800") == ("choice", (600, 800))
    assert parse_train_sizes("800") == ("choice", (800,))
    for bad in ("800,600", "range:600,700,800", "big", "4,8", "spread:600,800"):
        with pytest.raises(click.BadParameter):
            parse_train_sizes(bad)
    assert sizes_grid((600, 800), 800, "choice") == (600, 800)
    assert sizes_grid((600, 800), 800) == (600, 625, 650, 675, 700, 725, 750, 775, 800)


def _eval(args):
    return CliRunner().invoke(cli, ["eval", "detection", *args])


def _assert_clean_error(res, *needles):
    assert res.exit_code != 0
    assert "Traceback" not in res.output, res.output
    for n in needles:
        assert n in res.output, res.output


def test_bad_coco_folders(tmp_path, coco):
    ckpt = narrow_pair(tmp_path / "pair.pth")
    base = [str(ckpt), "--model", "net1", "--backend", "torchvision"]
    _assert_clean_error(_eval(base + ["--coco", str(tmp_path / "nothere")]), "does not exist",
                        "annotations/instances_train2017.json")
    _assert_clean_error(_eval(base), "--coco")

    partial = tmp_path / "partial"
    (partial / "annotations").mkdir(parents=True)
    (partial / "train2017").mkdir()
    (partial / "annotations" / "instances_train2017.json").write_text((coco / "annotations" / "instances_train2017.json").read_text())
    _assert_clean_error(_eval(base + ["--coco", str(partial)]), "instances_val2017.json", "val2017/")

    (partial / "val2017").mkdir()
    (partial / "annotations" / "instances_val2017.json").write_text("{not json")
    _assert_clean_error(_eval(base + ["--coco", str(partial)]), "not a readable JSON file")
    (partial / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    _assert_clean_error(_eval(base + ["--coco", str(partial)]), "not a COCO instances file")


def test_custom_paths_override_the_layout(tmp_path, coco):
    splits = resolve_coco(None, train_json=coco / "annotations" / "instances_train2017.json",
                          val_json=coco / "annotations" / "instances_val2017.json",
                          train_images=coco / "train2017", val_images=coco / "val2017")
    assert splits.val_images == coco / "val2017"
    with pytest.raises(UserError, match="val2017"):
        resolve_coco(coco, val_images=tmp_path / "missing")
    other = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    other["categories"] = other["categories"][:1]
    (tmp_path / "val.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="different categories"):
        resolve_coco(coco, val_json=tmp_path / "val.json")


def test_non_resnet_backbone_is_a_clear_error(tmp_path, coco):
    ckpt = narrow_pair(tmp_path / "pair.pth")
    res = _eval([str(ckpt), "--model", "net2", "--coco", str(coco), "--backend", "torchvision"])
    _assert_clean_error(res, "not a plain ResNet")


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_missing_detectron2_says_how_to_install(tmp_path, coco):
    ckpt = narrow_pair(tmp_path / "pair.pth")
    res = _eval([str(ckpt), "--model", "net1", "--coco", str(coco)])
    _assert_clean_error(res, "detectron2 is not installed", "git+https://github.com/facebookresearch/detectron2.git",
                        "--backend torchvision")


def test_detectron2_run_plumbing_without_detectron2(tmp_path, coco, monkeypatch):
    """The detectron2 path up to launch: exported weights, the run's config, the record (launch is faked)."""
    import pickle

    from mokd_eval.detection import d2_train

    seen = {}

    def fake_run(cfg, splits, out_dir):
        seen["cfg"], seen["out_dir"] = cfg, out_dir
        return metrics_from_d2({"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}, "segm": {"AP": 4.0, "AP50": 5.0, "AP75": 6.0}})

    monkeypatch.setattr(d2_train, "detectron2_available", lambda: True)
    monkeypatch.setattr(d2_train, "run_detectron2", fake_run)
    narrow = narrow_pair(tmp_path / "narrow.pth")
    res = _eval([str(narrow), "--coco", str(coco), "--out", str(tmp_path / "res")])
    _assert_clean_error(res, "non-standard widths", "--backend torchvision")

    ckpt = tmp_path / "pair.pth"
    make_mokd_checkpoint(ckpt, net1={"name": "resnet18", "kwargs": {}, "small_stem": True},
                         net2={"name": "test_vit", "kwargs": {}, "small_stem": False})
    res = _eval([str(ckpt), "--coco", str(coco), "--out", str(tmp_path / "res"), "--iters", "90", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 18 and cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 2
    assert cfg["SOLVER"]["MAX_ITER"] == 90 and cfg["SOLVER"]["STEPS"] == [60, 80]
    assert cfg["SOLVER"]["BASE_LR"] == pytest.approx(0.01) and cfg["SOLVER"]["IMS_PER_BATCH"] == 8
    assert cfg["DATASETS"] == {"TRAIN": [d2_train.TRAIN_NAME], "TEST": [d2_train.VAL_NAME]}
    assert cfg["TEST"]["PRECISE_BN"] == {"ENABLED": True, "NUM_ITER": 200} and cfg["SEED"] == 0
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == [600, 800] and cfg["INPUT"]["MIN_SIZE_TRAIN_SAMPLING"] == "range"
    with open(cfg["MODEL"]["WEIGHTS"], "rb") as f:
        assert "res5.1.conv2.norm.running_var" in pickle.load(f)["model"]
    path = next((tmp_path / "res").glob("*.json"))
    record = json.loads(path.read_text())
    assert record["metrics"]["APs75"] == 6.0 and record["settings"]["backend"] == "detectron2"
    assert record["metrics"]["APb_large"] is None and "NaN" not in path.read_text()  # strict JSON: null
    assert set(METRIC_NAMES) <= set(record["metrics"])
    assert record["data"]["train_size"] == 8 and record["data"]["num_classes"] == 2
    assert set(record["data"]["paths"]) == {"train_json", "val_json", "train_images", "val_images"}

    # a quick CPU run: any iteration count, a short precise BN, the sizes as a choice, its own seed
    res = _eval([str(ckpt), "--coco", str(coco), "--out", str(tmp_path / "cpu"), "--iters", "3", "--batch-size",
                 "2", "--device", "cpu", "--precise-bn-iters", "4", "--train-sizes", "64,80,96", "--seed", "5"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg["MODEL"]["DEVICE"] == "cpu" and cfg["SOLVER"]["STEPS"] == [2] and cfg["SEED"] == 5
    assert cfg["TEST"]["PRECISE_BN"]["NUM_ITER"] == 4
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == [64, 80, 96] and cfg["INPUT"]["MIN_SIZE_TRAIN_SAMPLING"] == "choice"


def test_detection_records_have_the_same_data_fields_for_both_backends(coco):
    from mokd_eval.detection.coco import CocoDetection, split_counts

    splits = resolve_coco(coco)
    counts = split_counts(splits)
    train = CocoDetection(splits.train_json, splits.train_images, train=True)
    val = CocoDetection(splits.val_json, splits.val_images, train=False)
    assert counts == {"train_size": len(train), "val_size": len(val), "num_classes": 2,
                      "classes": ["square", "triangle"]}


def test_basic_block_res5_head_with_a_stand_in_detectron2(monkeypatch):
    """d2_ext against stand-ins for the few detectron2 names it uses: R34 gets 3 basic blocks 256 -> 512,
    the first with stride 2; R50 falls back to the stock bottleneck head."""
    import importlib
    import sys
    import types
    from types import SimpleNamespace

    calls = []

    class Res5ROIHeads:
        @classmethod
        def _build_res5_block(cls, cfg):
            return torch.nn.Sequential(torch.nn.Identity()), 2048

    class ResNet:
        @staticmethod
        def make_stage(block_class, num_blocks, **kwargs):
            calls.append((block_class, num_blocks, kwargs))
            return [torch.nn.Identity() for _ in range(num_blocks)]

    class Registry(dict):
        def register(self, obj):
            self[obj.__name__] = obj

    registry = Registry()
    norms = []

    def get_norm(norm, channels):
        norms.append((norm, channels))
        return torch.nn.BatchNorm2d(channels)

    modules = {"detectron2": types.ModuleType("detectron2"),
               "detectron2.layers": SimpleNamespace(get_norm=get_norm),
               "detectron2.modeling": types.ModuleType("detectron2.modeling"),
               "detectron2.modeling.backbone": types.ModuleType("detectron2.modeling.backbone"),
               "detectron2.modeling.backbone.resnet": SimpleNamespace(BasicBlock="BasicBlock", ResNet=ResNet),
               "detectron2.modeling.roi_heads": SimpleNamespace(ROI_HEADS_REGISTRY=registry,
                                                                Res5ROIHeads=Res5ROIHeads)}
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "detectron2" else None)
    try:
        ext = importlib.reload(d2_ext)
        head = registry["MokdRes5ROIHeads"]
        cfg = SimpleNamespace(MODEL=SimpleNamespace(RESNETS=SimpleNamespace(DEPTH=34, RES2_OUT_CHANNELS=64,
                                                                              NORM="SyncBN")))
        res5, channels = head._build_res5_block(cfg)
        assert channels == 512 and len(res5) == 4 and isinstance(res5.norm, torch.nn.BatchNorm2d)  # 3 blocks + norm
        assert calls == [("BasicBlock", 3, {"stride_per_block": [2, 1, 1], "in_channels": 256, "out_channels": 512,
                                             "norm": "SyncBN"})]
        cfg.MODEL.RESNETS.DEPTH = 50
        res5, channels = head._build_res5_block(cfg)  # the stock bottleneck res5, with the extra norm after it
        assert channels == 2048 and list(dict(res5.named_children())) == ["0", "norm"]
        assert norms == [("SyncBN", 512), ("SyncBN", 2048)]
        assert ext.AVAILABLE
    finally:
        monkeypatch.undo()
        importlib.reload(d2_ext)
    assert d2_ext.AVAILABLE == detectron2_available()


@pytest.mark.slow
@pytest.mark.skipif(not detectron2_available(), reason="detectron2 is not installed")
def test_detectron2_runs_for_real_on_the_cpu(tmp_path, coco):
    """The whole detectron2 path, on the tiny set: export, config, training with a short schedule (3 iterations:
    the count that crashed detectron2's scheduler), precise BN, COCO evaluation, the record."""
    ckpt = tmp_path / "pair.pth"
    make_mokd_checkpoint(ckpt, net1={"name": "resnet18", "kwargs": {}, "small_stem": False},
                         net2={"name": "test_vit", "kwargs": {}, "small_stem": False})
    out = tmp_path / "res"
    res = _eval([str(ckpt), "--model", "net1", "--coco", str(coco), "--out", str(out), "--iters", "3",
                 "--batch-size", "2", "--device", "cpu", "--precise-bn-iters", "2", "--train-sizes", "64,96",
                 "--test-size", "96", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    path = next(out.glob("*.json"))
    record = json.loads(path.read_text())
    assert "NaN" not in path.read_text() and set(METRIC_NAMES) <= set(record["metrics"])
    assert record["env"]["packages"]["detectron2"] and record["settings"]["steps"] == [2]
    assert all(v is None or 0.0 <= v <= 100.0 for k, v in record["metrics"].items() if k in METRIC_NAMES)
