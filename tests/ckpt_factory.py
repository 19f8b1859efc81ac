"""Checkpoint builders out of tiny timm models, and a fixture isolating the feature cache.

Test modules that extract features import `isolated_cache` (autouse) so that ~/.cache is never touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mokd.models.backbones import create_backbone

VIT32 = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}, "small_stem": False}
VIT32_P4 = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 4}, "small_stem": False}
RESNET = {"name": "test_resnet", "kwargs": {}, "small_stem": False}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache during tests."""
    monkeypatch.setenv("MOKD_CACHE", str(tmp_path / "feature-cache"))


def backbone_state(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_backbone(arch["name"], arch["kwargs"], arch["small_stem"]).state_dict()


def make_mokd_checkpoint(path: Path, net1: dict = VIT32, net2: dict = VIT32_P4, mode: str = "mokd",
                         global_size: int = 32) -> dict:
    """A file in our training layout; returns {(net, branch): backbone state dict} for comparisons."""
    states, model = {}, {}
    for i, (net, arch) in enumerate((("net1", net1), ("net2", net2))):
        for j, branch in enumerate(("teacher", "student")):
            sd = backbone_state(arch, seed=10 * i + j)
            states[(net, branch)] = sd
            model.update({f"{branch}.{net}.backbone.{k}": v for k, v in sd.items()})
            model[f"{branch}.{net}.mlp_head.mlp.0.weight"] = torch.randn(4, 4)
    model["centers.net1"] = torch.zeros(8)
    torch.save({"format": "mokd", "version": 1, "epoch": 3, "step": 30, "arch": {"net1": net1, "net2": net2},
                "config": {"augment": {"global_size": global_size}, "loss": {"mode": mode}}, "model": model,
                "optimizer": {}, "metrics": {}}, path)
    return states
