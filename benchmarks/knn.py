"""k-NN search: the exact backends (fp32 torch matmul, certified bf16/fp16 + fp32 re-rank, FAISS flat index)
on a DINO-sized problem.

    PYTHONPATH=. python benchmarks/knn.py [--bank 100000] [--queries 10000] [--dim 384] [--classes 1000]
                                          [--backends torch,certified,faiss] [--device cpu]

Each backend runs in its own process, so that its peak memory (Linux VmHWM, reset after the data are made)
is its own; each logs the bank's memory before its search. Prints time and peak extra memory against the
fp32 torch search, whether the neighbour lists are identical to its, and what `--backend auto` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def make_data(bank: int, queries: int, dim: int, classes: int, seed: int = 0):
    """Features [bank, D], labels [bank], queries [queries, D]; clustered so that k-NN is meaningful."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (bank,), generator=g)
    train = centres[labels] + 2.0 * torch.randn(bank, dim, generator=g)
    q_labels = torch.randint(0, classes, (queries,), generator=g)
    test = centres[q_labels] + 2.0 * torch.randn(queries, dim, generator=g)
    return train, labels, test, q_labels


def worker(args) -> None:
    from mokd_eval.knn import knn_predict, search

    train, labels, test, _ = make_data(args.bank, args.queries, args.dim, args.classes)
    if args.device != "cpu":
        train, test = train.to(args.device), test.to(args.device)
    knn_predict(train[:1000], labels[:1000], test[:10], ks=(10,), num_classes=args.classes, backend=args.backend,
                log=None)  # warm-up (thread pools, kernels)
    if args.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak()
    base = _status_kib("VmRSS")
    bank = torch.nn.functional.normalize(train, dim=1)
    queries = torch.nn.functional.normalize(test, dim=1)
    t0 = time.perf_counter()
    sims, idx = search(bank, queries, 200, backend=args.backend, log=print)
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    result = {"seconds": seconds, "peak_extra_mib": peak_mib}
    if args.device != "cpu":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    torch.save({"idx": idx, "sims": sims}, args.save)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="device of the torch backend's tensors (cpu or cuda)")
    p.add_argument("--backends", default="torch,certified,faiss")
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend:
        return worker(args)

    from mokd_eval.knn import resolve_backend

    backends = args.backends.split(",")
    if "torch" not in backends:
        backends.insert(0, "torch")
    print(f"bank {args.bank} x {args.dim}, {args.queries} queries, {args.classes} classes, top-200 neighbours, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; --backend auto picks "
          f"{resolve_backend('auto', args.device)!r} on {args.device}")
    results, found = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            save = os.path.join(tmp, f"{backend}.pt")
            cmd = [sys.executable, __file__, "--backend", backend, "--save", save, "--bank", str(args.bank),
                   "--queries", str(args.queries), "--dim", str(args.dim), "--classes", str(args.classes),
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                sys.exit(f"{backend} run failed:\n{out.stderr}")
            for line in out.stdout.splitlines():
                if line.startswith("RESULT "):
                    results[backend] = json.loads(line[7:])
                else:
                    print(f"  [{backend}] {line}")
            found[backend] = torch.load(save, weights_only=True)
    ref = results["torch"]
    ref_idx, ref_sims = found["torch"]["idx"], found["torch"]["sims"]
    print(f"\n{'backend':<10} {'time (s)':>9} {'vs torch fp32':>14} {'peak extra RSS (MiB)':>21} "
          f"{'identical lists':>16} {'identical sets':>15} {'max |sim diff|':>15}")
    for name, r in results.items():
        idx, sims = found[name]["idx"], found[name]["sims"]
        same = (idx == ref_idx).all(1).float().mean().item() * 100
        same_set = (idx.sort(1).values == ref_idx.sort(1).values).all(1).float().mean().item() * 100
        # where only the order differs, it is between similarities that fp32 rounding cannot tell apart
        diff = (sims.float() - ref_sims.float()).abs().max().item()
        print(f"{name:<10} {r['seconds']:>9.2f} {r['seconds'] / ref['seconds']:>13.2f}x {r['peak_extra_mib']:>21.1f} "
              f"{same:>15.3f}% {same_set:>14.3f}% {diff:>15.2e}"
              + (f"   GPU peak {r['gpu_peak_mib']:.1f} MiB" if "gpu_peak_mib" in r else ""))

if __name__ == "__main__":
    main()
