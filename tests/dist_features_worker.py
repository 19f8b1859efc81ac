"""features_for as a bench calls it, run by the feature tests alone or under torchrun (or beside another copy of
itself sharing one cache): each rank saves what it got to OUT.{rank}.

    python -m tests.dist_features_worker CKPT OUT [--cache DIR] [--n 20] [--batch-size 5] [--shard-rows 3]
        [--what memory,cache,multilabel-memory,multilabel] [--kill-rank R --kill-at I] [--meet DIR --peers 2]

The data are the first N validation images of the embedded digits; `multilabel*` gives each image the multi-hot
label {d, (d + 1) mod 10} ([10] uint8); the names ending in `memory` skip the cache. `--kill-at I` makes rank R
SIGKILL itself when it loads image I. `--meet DIR` holds each process at its first image until --peers
processes have reached theirs, so that two runs are certainly extracting the same entry at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch


def multi_hot(targets: list[int], classes: int = 10) -> list[torch.Tensor]:
    out = []
    for d in targets:
        y = torch.zeros(classes, dtype=torch.uint8)
        y[d] = y[(d + 1) % classes] = 1
        out.append(y)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--cache")
    p.add_argument("--what", default="memory,cache,multilabel-memory,multilabel")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--shard-rows", type=int, default=3)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--meet")
    p.add_argument("--peers", type=int, default=2)
    args = p.parse_args()

    from mokd.data import build_dataset, parse_data_spec
    from mokd.distributed import init_distributed, rank
    from mokd_eval.features import features_for
    from mokd_eval.loader import load_models

    init_distributed("cpu")
    (m,) = load_models(args.ckpt, model="net1")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(args.n))
    load = ds._load

    def hooked(i: int):
        if rank() == args.kill_rank and i == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.meet:
            here = Path(args.meet) / f"{os.getpid()}"
            here.touch()
            deadline = time.monotonic() + 120
            while len(list(Path(args.meet).iterdir())) < args.peers and time.monotonic() < deadline:
                time.sleep(0.05)
        return load(i)

    ds._load = hooked
    labelled = ds.subset(range(args.n))
    labelled.targets = multi_hot(ds.targets)
    results = {}
    for what in args.what.split(","):
        data = labelled if what.startswith("multilabel") else ds
        fs = features_for(m, spec, "val", dataset=data, device="cpu", batch_size=args.batch_size,
                          precision="fp32", cache=args.cache, use_cache=not what.endswith("memory"),
                          shard_rows=args.shard_rows)
        results[what] = {"features": fs.features.clone(), "labels": fs.labels.clone(), "from_cache": fs.from_cache,
                         "cache_path": str(fs.cache_path)}
    torch.save(results, f"{args.out}.{rank()}")

    from tests.dist_worker import finish_rank

    finish_rank()


if __name__ == "__main__":
    main()
