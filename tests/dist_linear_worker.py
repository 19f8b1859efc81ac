"""A torchrun-like worker for the DDP linear-probe test, kept apart so spawned processes import little."""

from __future__ import annotations

import os

import torch
from torch import nn


class Blobs(torch.utils.data.Dataset):
    """Fixed 'images' [3, 2, 2] whose mean colour encodes the class (4 classes)."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 4
        self.x = torch.randn(n, 3, 2, 2, generator=g) + self.y.float()[:, None, None, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class PoolNet(nn.Module):
    """The CNN interface the probe uses (forward_features, forward_head), as a frozen global average pool."""

    num_features = 3

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


def train(seed: int = 0):
    from mokd_eval.linear import LinearSettings, new_linear, train_linear_probe

    torch.manual_seed(seed)
    layer = new_linear(3, 4)
    s = LinearSettings(epochs=3, batch_size=16, lr=2.0, warmup_epochs=1)
    m = train_linear_probe(PoolNet(), Blobs(), Blobs(), 4, settings=s, device=torch.device("cpu"), precision="fp32",
                           seed=seed, log=lambda _: None, layer=layer)
    return m, layer


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from mokd.distributed import init_distributed
    from tests.dist_worker import finish_rank

    init_distributed("cpu")
    m, layer = train()
    torch.save({"metrics": m, "weight": layer.weight.detach(), "bias": layer.bias.detach()}, f"{out}.{rank}")
    finish_rank()
