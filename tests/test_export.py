"""`mokd export`: detectron2 names and shapes (written out here from the ResNet definition, not imported from
detectron2), timm and torchvision round trips, and clear errors for what cannot be exported."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file

from mokd.cli import cli
from tests.ckpt_factory import make_mokd_checkpoint

# ResNet (He et al. 2016, Table 1): blocks per stage and block type; widths of res2..res5 outputs.
RESNETS = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet34": ((3, 4, 6, 3), "basic"),
           "resnet50": ((3, 4, 6, 3), "bottleneck")}
BN = ("weight", "bias", "running_mean", "running_var")


def expected_detectron2(depths, block) -> dict[str, tuple]:
    """detectron2 ResNet parameter names -> shapes: stem.conv1 (+ .norm), res{2..5}.{i}.conv{1..k} (+ .norm),
    res{s}.0.shortcut (+ .norm) where a block changes the width. Bottleneck: 1x1, 3x3, 1x1 convs with width/4."""
    out = {"stem.conv1.weight": (64, 3, 7, 7)}
    out.update({f"stem.conv1.norm.{f}": (64,) for f in BN})
    in_ch = 64
    for s, n in enumerate(depths):
        width = 64 * 2 ** s
        out_ch = width if block == "basic" else 4 * width
        for i in range(n):
            prefix = f"res{s + 2}.{i}."
            if block == "basic":
                convs = [(width, in_ch, 3, 3), (width, width, 3, 3)]
            else:
                convs = [(width, in_ch, 1, 1), (width, width, 3, 3), (out_ch, width, 1, 1)]
            for k, shape in enumerate(convs, start=1):
                out[f"{prefix}conv{k}.weight"] = shape
                out.update({f"{prefix}conv{k}.norm.{f}": (shape[0],) for f in BN})
            if in_ch != out_ch:
                out[f"{prefix}shortcut.weight"] = (out_ch, in_ch, 1, 1)
                out.update({f"{prefix}shortcut.norm.{f}": (out_ch,) for f in BN})
            in_ch = out_ch
    return out


R18_SMALL = {"name": "resnet18", "kwargs": {}, "small_stem": True}
VIT = {"name": "test_vit", "kwargs": {}, "small_stem": False}


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_detectron2_names_and_shapes(tmp_path, name):
    ckpt = tmp_path / f"{name}.pth"
    bb = timm.create_model(name, num_classes=0)
    for p in bb.state_dict().values():  # distinct values, so a swapped pair of tensors shows
        p.copy_(torch.randn_like(p.float()).to(p.dtype))
    torch.save(bb.state_dict(), ckpt)
    out = tmp_path / f"{name}.pkl"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--to", "detectron2", str(out), "--arch", name])
    assert res.exit_code == 0, res.output
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "mokd" and obj["matching_heuristics"] is True
    got = {k: v.shape for k, v in obj["model"].items()}
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())
    assert got == expected_detectron2(*RESNETS[name])
    sd = bb.state_dict()
    np.testing.assert_array_equal(obj["model"]["stem.conv1.norm.running_var"], sd["bn1.running_var"].numpy())
    np.testing.assert_array_equal(obj["model"]["res3.0.shortcut.norm.weight"], sd["layer2.0.downsample.1.weight"].numpy())
    last = "res5.2.conv3.weight" if name == "resnet50" else "res5.1.conv2.weight"
    np.testing.assert_array_equal(obj["model"][last], sd[last.replace("res5", "layer4")].numpy())


def test_mokd_checkpoint_to_all_targets(tmp_path):
    ckpt = tmp_path / "pair.pth"
    states = make_mokd_checkpoint(ckpt, net1=R18_SMALL, net2=VIT)
    teacher = states[("net1", "teacher")]
    runner = CliRunner()

    # the pair holds a ViT too: detectron2 picks the only ResNet by itself
    res = runner.invoke(cli, ["export", str(ckpt), "--to", "detectron2", str(tmp_path / "r18.pkl")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "r18.pkl", "rb") as f:
        d2 = pickle.load(f)["model"]
    np.testing.assert_array_equal(d2["res4.1.conv2.weight"], teacher["layer3.1.conv2.weight"].numpy())

    res = runner.invoke(cli, ["export", str(ckpt), "--to", "timm", str(tmp_path / "r18.safetensors"), "--model", "net1"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "r18.json").read_text())
    assert meta["name"] == "resnet18" and meta["small_stem"] is True
    reloaded = timm.create_model(meta["name"], **meta["kwargs"])
    reloaded.load_state_dict(load_file(tmp_path / "r18.safetensors"), strict=True)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, teacher[k]), k

    res = runner.invoke(cli, ["export", str(ckpt), "--to", "torchvision", str(tmp_path / "r18.pth"), "--model", "net1",
                              "--branch", "student"])
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    student = states[("net1", "student")]
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, student[k]), k

    # the ViT exports to timm, with its kwargs in the sidecar
    res = runner.invoke(cli, ["export", str(ckpt), "--to", "timm", str(tmp_path / "vit.safetensors"), "--model", "net2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "vit.json").read_text())
    timm.create_model(meta["name"], **meta["kwargs"]).load_state_dict(load_file(tmp_path / "vit.safetensors"))


@pytest.mark.parametrize("target", ["detectron2", "torchvision"])
def test_non_resnet_is_a_clear_error(tmp_path, target):
    ckpt = tmp_path / "pair.pth"
    make_mokd_checkpoint(ckpt, net1=R18_SMALL, net2=VIT)
    out = tmp_path / "out.bin"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--to", target, str(out), "--model", "net2"])
    assert res.exit_code != 0
    assert "not a plain ResNet" in res.output and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".out.bin*"))


def test_two_resnets_need_model(tmp_path):
    ckpt = tmp_path / "pair.pth"
    make_mokd_checkpoint(ckpt, net1=R18_SMALL, net2=R18_SMALL)
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--to", "detectron2", str(tmp_path / "x.pkl")])
    assert res.exit_code != 0 and "--model" in res.output and "Traceback" not in res.output
