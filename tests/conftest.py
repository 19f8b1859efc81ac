import os

import pytest
import torch

# Two cores: keep intra-op threads small so parallel pieces of the suite do not fight.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_OVERRIDES = [
    "net1.arch=test_resnet", "net1.small_stem=true", "net1.kwargs={}",
    "net2.arch=test_vit", "net2.kwargs={img_size: 32, patch_size: 8}", "net2.small_stem=false",
    "augment.global_size=32", "augment.local_size=16", "augment.local_crops=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "thead.dim=32", "thead.num_heads=2", "thead.depth=1",
    "optim.epochs=2", "optim.batch_size=16", "optim.warmup_epochs=1", "optim.precision=fp32",
    "loss.warmup_teacher_temp_epochs=1",
    "data.spec=digits", "data.num_workers=0", "data.subset=48",
    "train.knn_every=0", "train.progress=false", "train.log_every=1", "train.save_every=0",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny_cfg(*extra_overrides) -> Config of a tiny CNN+ViT pair on 48 digits, in tmp_path."""
    from mokd.config import load_config

    def make(*extra: str, out: str | None = None):
        return load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out or tmp_path / 'run'}", *extra])

    return make
