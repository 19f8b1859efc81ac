"""GPU paths, checked in a few minutes on one CUDA GPU: pass/fail and images (or queries) per second per path.

    PYTHONPATH=. python benchmarks/gpu_check.py [--steps 5] [--batch-size 32] [--bank 100000]

  train   a bf16 and an fp16 (GradScaler) step of the default pair (configs/default.yaml) and of R50 + ViT-S/16
          at 224 px (configs/mokd_r50_vits16.yaml), through build_state's distributed path: an NCCL process
          group of one process, DistributedDataParallel students, SyncBatchNorm; the fast step under
          train.compile as training sets it (--compile auto, the default: torch.compile on CUDA; false:
          eager), and R50 + ViT-S/16 once more in bf16 with optim.accum_steps=2 (two micro-batches of the
          batch, DDP's no_sync in the first). Pass: finite losses, every student moved, the fp16 scaler's
          scale finite.
  knn     the torch fp32, certified fp16 and (faiss-gpu installed) FAISS GPU searches of a 100k x 384 bank.
          Pass: certified: neighbour sets identical to the fp32 torch search's, similarities within 1e-5 (the
          order may differ only where fp32 rounding cannot tell two apart); FAISS: identical lists on at
          least 99.9% of the queries (its own summation order may swap near-ties).
  features  R50 and ViT-S/16 extraction at 224 px in fp32 and bf16. Pass: finite, bf16 within cosine 0.99.
  loader  benchmarks/loader.py on this machine's cores (--loader-images a measurement; 1, 2 and all-cores
          workers; DINO's PIL chain, ours, and ours shipping uint8 for data.gpu_augment, whose device part is
          timed on the GPU). Pass: it ran; the figures are ours / DINO per worker.
  torchrun  `torchrun --nproc_per_node=1 -m mokd train` for one epoch on the embedded digits with NCCL, once with
          the workers augmenting and once with data.gpu_augment. Pass: exit status 0 and a last.pth.

On a machine without CUDA it says so and exits with status 0, doing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"default pair": None, "R50 + ViT-S/16 224px": str(ROOT / "configs" / "mokd_r50_vits16.yaml")}


def cuda_missing_message() -> str | None:
    if torch.cuda.is_available():
        return None
    return "gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); nothing checked"


def init_one_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)


def check_train(name: str, config: str | None, precision: str, args, accum: int = 1) -> tuple[bool, float, str]:
    from mokd import distributed
    from mokd.config import load_config
    from mokd.fast_augment import to_device
    from torch._dynamo.eval_frame import OptimizedModule

    from mokd.trainer import build_loader, build_state, train_step

    class OneProcessDDP(distributed.DistInfo):
        """World size 1 that still takes build_state's distributed branch (DDP students, SyncBatchNorm)."""

        @property
        def enabled(self) -> bool:
            return True

    overrides = ["data.spec=digits", "data.num_workers=4", "train.device=cuda:0", f"optim.precision={precision}",
                 f"train.compile={args.compile}", "train.fast_step=true", f"optim.accum_steps={accum}"]
    if config is not None:
        overrides.append(f"optim.batch_size={args.batch_size}")
    cfg = load_config(config, overrides)
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    loader, _ = build_loader(cfg, distributed.DistInfo())
    batches = iter(loader)
    micro = [to_device(next(batches)[0], device) for _ in range(accum)]
    crops = micro[0] if accum == 1 else micro
    state = build_state(cfg, device, 1000, OneProcessDDP())
    model = state.model
    model.train()
    ddp = all(isinstance(state.ddp.get(n), torch.nn.parallel.DistributedDataParallel) for n in model.student)
    compiled = any(isinstance(f, OptimizedModule) for f in model.student_forward.values())
    sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.student.modules())
    has_bn = sync_bn or any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.student.modules())
    before = {n: [p.detach().clone() for p in model.student[n].parameters()] for n in model.student}
    for i in range(args.warmup):
        train_step(state, crops, i, freeze_last_layer=False, cfg=cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses = train_step(state, crops, args.warmup + i, freeze_last_layer=False, cfg=cfg)
    torch.cuda.synchronize()
    rate = cfg.optim.batch_size * args.steps / (time.perf_counter() - t0)
    finite = all(torch.isfinite(v).all().item() for v in losses.values())
    moved = all(any(not torch.equal(a, b.detach()) for a, b in zip(before[n], model.student[n].parameters()))
                for n in model.student)
    scale_ok = precision != "fp16" or (state.scaler.is_enabled() and
                                       torch.isfinite(torch.tensor(state.scaler.get_scale())).item())
    ok = finite and moved and scale_ok and ddp and (sync_bn or not has_bn)
    note = (f"batch {cfg.optim.batch_size}" + (f" = {accum} x {micro[0][0].shape[0]}" if accum > 1 else "")
            + f", loss1 {losses['loss1'].item():.3f}, DDP {ddp}, SyncBN {sync_bn}, compiled {compiled}"
            + (f", scale {state.scaler.get_scale():.0f}" if precision == "fp16" else "")
            + f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return ok, rate, note


def check_knn(args) -> list[tuple[str, bool, float, str]]:
    from mokd_eval.knn import certified_search, resolve_backend, search

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(1000, 384, generator=g)
    bank = centres[torch.randint(0, 1000, (args.bank,), generator=g)] + 2.0 * torch.randn(args.bank, 384, generator=g)
    queries = centres[torch.randint(0, 1000, (args.queries,), generator=g)] + 2.0 * torch.randn(args.queries, 384,
                                                                                               generator=g)
    bank = torch.nn.functional.normalize(bank, dim=1).cuda()
    queries = torch.nn.functional.normalize(queries, dim=1).cuda()
    rows = []

    def timed(fn):
        fn()  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, args.queries / (time.perf_counter() - t0)

    (ref_s, ref_i), rate = timed(lambda: search(bank, queries, 200, backend="torch", log=None))
    rows.append(("knn torch fp32 (GPU)", True, rate, f"auto picks {resolve_backend('auto', bank.device)}"))
    (s, i, redone), rate = timed(lambda: certified_search(bank, queries, 200, log=None))
    same = (i.cpu() == ref_i.cpu()).all(1).float().mean().item()
    same_set = (i.cpu().sort(1).values == ref_i.cpu().sort(1).values).all(1).float().mean().item()
    diff = (s.cpu().float() - ref_s.cpu().float()).abs().max().item()  # order may differ only within fp32 rounding
    rows.append(("knn certified fp16 (GPU)", same_set == 1.0 and diff < 1e-5, rate,
                 f"identical sets {100 * same_set:.3f}%, lists {100 * same:.3f}%, max |sim diff| {diff:.1e}, "
                 f"{redone} queries re-searched in fp32"))
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        rows.append(("knn faiss-gpu", False, 0.0, "faiss is not installed"))
        return rows
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        rows.append(("knn faiss-gpu", False, 0.0, "this faiss build has no GPU support (install faiss-gpu)"))
        return rows
    (s, i), rate = timed(lambda: search(bank, queries, 200, backend="faiss", log=None))
    same = (i == ref_i).all(1).float().mean().item()
    rows.append(("knn faiss-gpu", same >= 0.999, rate, f"identical lists {100 * same:.3f}%"))
    return rows


def check_features(args) -> list[tuple[str, bool, float, str]]:
    from mokd.models.backbones import create_backbone
    from mokd_eval.features import extract_features

    class RandomImages(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], 0

    data, rows = RandomImages(args.images), []
    for label, name in (("R50", "resnet50"), ("ViT-S/16", "vit_small_patch16_224")):
        torch.manual_seed(0)
        model = create_backbone(name).cuda().eval()
        feats = {}
        for precision in ("fp32", "bf16"):
            extract_features(model, RandomImages(64), device="cuda", batch_size=64, precision=precision)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats[precision], _ = extract_features(model, data, device="cuda", batch_size=128, precision=precision,
                                                   num_workers=4)
            torch.cuda.synchronize()
            rate = args.images / (time.perf_counter() - t0)
            rows.append((f"features {label} {precision}", bool(torch.isfinite(feats[precision]).all()), rate, ""))
        cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"], dim=1).min().item()
        rows[-1] = (rows[-1][0], rows[-1][1] and cos > 0.99, rows[-1][2], f"min cosine to fp32 {cos:.4f}")
    return rows


def check_loader(args) -> list[tuple[str, bool, float, str]]:
    """benchmarks/loader.py in a process of its own; one row per crop setting at the largest worker count."""
    cores = os.cpu_count() or 1
    workers = sorted({1, 2, cores})
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "loader.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--images", str(args.loader_images),
               "--workers", ",".join(map(str, workers)), "--gpu-augment", "--json", str(figures)]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        if rc != 0:
            return [("loader benchmark", False, 0.0, f"exit status {rc}")]
        table = json.loads(figures.read_text())
    rows = []
    for r in table["table"]:
        if r["workers"] == workers[-1]:
            finish = table["device_finish"].get(r["crops"])
            rows.append((f"loader {r['crops']} x{r['workers']} workers", True, r["fast"],
                         f"ours/DINO {r['ratio']:.2f}x per worker; uint8 shipping {r['fast-uint8']:.1f}/worker"
                         + (f"; GPU finish {finish:.0f} img/s" if finish else "")))
    return rows


def check_torchrun(args) -> list[tuple[str, bool, float, str]]:
    """One epoch of `mokd train` under torchrun, one process, NCCL: with and without data.gpu_augment."""
    rows = []
    for name, extra in (("workers augment", []), ("gpu_augment", ["--set", "data.gpu_augment=true"])):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "mokd",
                   "train", "--data", "digits", "--epochs", "1", "--device", "cuda", "--out", str(Path(tmp) / "run"),
                   "--set", "train.progress=false", "--set", "data.subset=512", "--set", "optim.batch_size=64",
                   "--set", f"train.compile={args.compile}", *extra]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
            ok = done.returncode == 0 and (Path(tmp) / "run" / "last.pth").is_file()
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] if not ok else []
            rows.append((f"torchrun 1 GPU NCCL, {name}", ok, 512 / (time.perf_counter() - t0),
                         f"exit status {done.returncode}" + (f": {tail[0][:120]}" if tail else "")))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="batch of the R50 + ViT-S/16 pair")
    p.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                   help="train.compile for the train and torchrun checks; auto (training's default) compiles on CUDA")
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--loader-images", type=int, default=256, help="images a measurement of the loader benchmark")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: train, knn, features, loader, "
                   "torchrun")
    args = p.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    missing = cuda_missing_message()
    if missing:
        print(missing)
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows: list[tuple[str, bool, float, str]] = []

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # a failing path is reported, and the others still run
            traceback.print_exc()
            return [(name, False, 0.0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]

    init_one_process_group()
    for pair, config in PAIRS.items():
        for precision in ("bf16", "fp16"):
            name = f"train {pair} {precision}"
            if "train" not in skip:
                rows += guarded(name, lambda: [(name, *check_train(pair, config, precision, args))])
            torch.cuda.empty_cache()
    if "train" not in skip:
        pair = "R50 + ViT-S/16 224px"
        name = f"train {pair} bf16 accum 2"
        rows += guarded(name, lambda: [(name, *check_train(pair, PAIRS[pair], "bf16", args, accum=2))])
        torch.cuda.empty_cache()
    if "knn" not in skip:
        rows += guarded("knn", lambda: check_knn(args))
    if "features" not in skip:
        rows += guarded("features", lambda: check_features(args))
    if "loader" not in skip:
        rows += guarded("loader", lambda: check_loader(args))
    if "torchrun" not in skip:
        rows += guarded("torchrun", lambda: check_torchrun(args))
    print(f"\n{'path':<38} {'result':<6} {'per s':>9}  notes (train, features, torchrun: images/s; knn: queries/s; "
          f"loader: ours, images/s per worker)")
    for name, ok, rate, note in rows:
        print(f"{name:<38} {'PASS' if ok else 'FAIL':<6} {rate:>9.1f}  {note}")
    import torch.distributed as dist

    dist.destroy_process_group()
    failed = sum(not ok for _, ok, _, _ in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
