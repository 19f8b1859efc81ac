"""torchrun-like workers for the sharded-extraction and sharded-cache tests, kept apart so spawned processes
import little."""

from __future__ import annotations

import os

import torch


def finish_rank() -> None:
    """End a spawned rank once its results are saved: destroy its process group, then exit skipping interpreter
    finalisation: there, gloo's C++ threads sometimes meet the dying interpreter and abort the process
    ("terminate called without an active exception", about 1 run in 30 of the linear-probe test on torch
    2.14), after every result was written. Errors before this point still fail the test."""
    import sys

    from mokd.distributed import cleanup

    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Numbers(torch.utils.data.Dataset):
    """Image i is the constant i: the features reveal the order they were produced in."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), i % 3


class MeanNet(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def sharded_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from mokd.distributed import init_distributed
    from mokd_eval.features import extract_features

    init_distributed("cpu")
    feats, labels = extract_features(MeanNet(), Numbers(n), device="cpu", batch_size=2, precision="fp32")
    torch.save((feats, labels), f"{out}.{rank}")
    finish_rank()


def shard_cache_worker(rank: int, world: int, port: int, n: int, folder: str) -> None:
    """Each rank writes its slice's shards of Numbers(n) into one folder; saves what it reads back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from pathlib import Path

    from mokd.distributed import init_distributed
    from mokd_eval.features import extract_to_shards

    init_distributed("cpu")
    bank, labels = extract_to_shards(MeanNet(), Numbers(n), Path(folder), device="cpu", batch_size=2, shard_rows=2)
    torch.save((torch.cat(list(bank)), labels, list(bank.rows)), f"{folder}.{rank}")
    finish_rank()
