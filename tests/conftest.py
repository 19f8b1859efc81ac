import os

import pytest
import torch

from tests.tiny import TINY_OVERRIDES

# Two cores: keep intra-op threads small so parallel pieces of the suite do not fight.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny_cfg(*extra_overrides) -> Config of a tiny CNN+ViT pair on 48 digits, in tmp_path."""
    from mokd.config import load_config

    def make(*extra: str, out: str | None = None):
        return load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out or tmp_path / 'run'}", *extra])

    return make
