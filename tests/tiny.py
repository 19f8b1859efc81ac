"""A tiny CNN + ViT pair on 48 digits at 32 px: the configuration most trainer tests start from, and the
helpers that compare two of its runs."""

import json

import pytest
import torch

from mokd.checkpoint import load_file

TIMING_KEYS = {"img_per_s", "peak_mem_mb"}  # log fields that depend on the machine, not on the run

TINY_OVERRIDES = [
    "net1.arch=test_resnet", "net1.small_stem=true", "net1.kwargs={}",
    "net2.arch=test_vit", "net2.kwargs={img_size: 32, patch_size: 8}", "net2.small_stem=false",
    "augment.global_size=32", "augment.local_size=16", "augment.local_crops=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    # The paper's head (no BatchNorm; configs/default.yaml has it): with it a 2-process CPU run, whose head
    # statistics are per process (SyncBatchNorm is for CUDA), cannot equal a 1-process run exactly
    "head.use_bn=false",
    # and the release's T-Head (the defaults' BatchNorm, centred L_ct target and sharper T-Head targets are
    # tested on their own in tests/test_thead_health.py)
    "thead.use_bn=false", "loss.ct_center=false", "loss.thead_temp_scale=1.0",
    "net1.norm_last_layer_thead=null", "net2.norm_last_layer_thead=null", "net1.thead_decay=auto",
    "thead.dim=32", "thead.num_heads=2", "thead.depth=1",
    "optim.epochs=2", "optim.batch_size=16", "optim.warmup_epochs=1", "optim.precision=fp32",
    "loss.warmup_teacher_temp_epochs=1",
    "data.spec=digits", "data.num_workers=0", "data.subset=48",
    "train.knn_every=0", "train.progress=false", "train.log_every=1", "train.save_every=0",
]


def read_log(path):
    """A run's log.jsonl as records, without the machine-dependent fields."""
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS} for ln in open(path)]


def assert_same_run(dir_a, dir_b, atol, rtol, log_rtol, step=None):
    """Two runs ended with equal weights (within atol/rtol) and logged the same steps with equal loss terms."""
    a, b = load_file(dir_a / "last.pth"), load_file(dir_b / "last.pth")
    if step is not None:
        assert a["step"] == b["step"] == step
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=atol, rtol=rtol), k
    la, lb = read_log(dir_a / "log.jsonl"), read_log(dir_b / "log.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("sm1", "ct2", "loss"):
            assert ra[key] == pytest.approx(rb[key], rel=log_rtol)
