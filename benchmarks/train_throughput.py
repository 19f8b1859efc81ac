"""Training-step speed: the fast step against the plain one, and a MOKD pair against each model alone as DINO.

Default mode (in one process, so that the figures share the machine's state): step time of the plain path
(train.fast_step=false) and of the fast path (and, with --compile, the fast path under torch.compile), for
each precision, best of --repeats alternating rounds; the step's matrix FLOPs (torch.utils.flop_counter)
over its time as a fraction of the peak of a --peak-size^3 matmul measured in the same process, in fp32 and
in bf16; and a torch.profiler top-10 of one fast step per precision:

  python benchmarks/train_throughput.py [--preset r18-vitt16-128] [--precisions fp32,bf16] [--repeats 5]

--vs-dino: MOKD against net1 and net2 trained alone as plain DINO. All figures come from one invocation, on the same batch of crops (the first batch of the config's data),
each configuration in its own subprocess so that peak memory is per configuration:

  python benchmarks/train_throughput.py                       # the default pair (configs/default.yaml)
  python benchmarks/train_throughput.py --preset r18-vitt-64  # ResNet-18 + ViT-T/8 at 64 px
  python benchmarks/train_throughput.py --config configs/mokd_r50_vits16.yaml --batch-size 64 --device cuda

Printed: images/s of the MOKD step (forward, backward, both optimiser steps, EMA), of net1 and net2 each as
plain DINO, MOKD time over the sum of the two DINO times, bf16 over fp32 speed-up, and peak memory (CUDA
allocator peak on GPU; growth of the process's max resident set over its pre-model baseline on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = {
    "default": [],
    "r18-vitt-64": ["net1.arch=resnet18", "net1.kwargs={}", "net1.small_stem=true",
                    "net2.arch=vit_tiny_patch16_224", "net2.kwargs={img_size: 64, patch_size: 8}",
                    "augment.global_size=64", "augment.local_size=32"],
    # the shapes of the issue's measurement of the authors' step: R18 + ViT-T/16, batch 16, 2x128 + 6x64 px,
    # K = 4096, the paper's head and T-Head widths
    "r18-vitt16-128": ["net1.arch=resnet18", "net1.kwargs={}", "net1.small_stem=false",
                       "net2.arch=vit_tiny_patch16_224", "net2.kwargs={img_size: 128}",
                       "augment.global_size=128", "augment.local_size=64", "augment.local_crops=6",
                       "head.out_dim=4096", "head.hidden_dim=2048", "head.bottleneck_dim=256",
                       "thead.dim=384", "thead.num_heads=6", "thead.depth=3", "optim.batch_size=16"],
}


def measure(args) -> dict:
    """Runs inside the subprocess: build one configuration and time `args.steps` steps on one fixed batch."""
    import resource

    import torch

    from mokd import distributed
    from mokd.config import load_config
    from mokd.device import autocast
    from mokd.losses import Center, dino_cross_entropy, sharpen
    from mokd.models.backbones import configure_attention, create_backbone, is_vit
    from mokd.models.mokd import Branch, teacher_kwargs
    from mokd.optim import build_optimizer, resolve_optimizer
    from mokd.trainer import build_loader, build_state, train_step

    torch.manual_seed(0)
    overrides = [*PRESETS[args.preset], *args.set, f"optim.precision={args.precision}", "data.num_workers=0",
                 f"train.device={args.device}"]
    if args.batch_size:
        overrides.append(f"optim.batch_size={args.batch_size}")
    cfg = load_config(args.config, overrides)
    device = torch.device(args.device)
    loader, _ = build_loader(cfg, distributed.DistInfo())
    crops = [c.to(device) for c in next(iter(loader))[0]]
    batch = crops[0].shape[0]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if args.what == "mokd":
        state = build_state(cfg, device, len(loader), distributed.DistInfo())

        def step(i):
            train_step(state, crops, i, freeze_last_layer=False, cfg=cfg)
    else:  # one model alone, as plain DINO: its branch without T-Head, its EMA teacher, one centre
        net = getattr(cfg, args.what)
        student = Branch(create_backbone(net.arch, net.kwargs, net.small_stem), cfg, None,
                         cfg.train.channels_last).to(device)
        teacher = Branch(create_backbone(net.arch, teacher_kwargs(net.kwargs), net.small_stem), cfg, None,
                         cfg.train.channels_last).to(device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        configure_attention(student, device, args.precision)  # as the trainer does
        configure_attention(teacher, device, args.precision)
        center = Center(cfg.head.out_dim).to(device)
        settings = resolve_optimizer(net, is_vit(student.backbone))
        opt = build_optimizer(student, settings, cfg.optim)
        for g in opt.param_groups:
            g["lr"] = settings["lr"] * cfg.optim.batch_size / 256
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

        def step(i):
            with autocast(device, args.precision):
                s = student(crops)
                with torch.no_grad():
                    t = teacher(crops[:2])
                loss = dino_cross_entropy(s.mlp, sharpen(t.mlp, 0.04, center.center), 0.1, len(crops), 2)
            center.update(t.mlp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(student.parameters(), net.clip_grad)
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                tp = list(teacher.parameters())
                torch._foreach_mul_(tp, 0.996)
                torch._foreach_add_(tp, [p.detach() for p in student.parameters()], alpha=0.004)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"img_per_s": batch * args.steps / elapsed, "s_per_step": elapsed / args.steps, "peak_mb": peak,
            "batch": batch, "arch": cfg.net1.arch if args.what == "net1" else cfg.net2.arch if args.what == "net2"
            else f"{cfg.net1.arch} + {cfg.net2.arch}"}


def _best_seconds(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(n: int, dtype, device, rounds: int = 3) -> float:
    """FLOP/s of an n^3 matmul in `dtype` (best of `rounds`)."""
    import torch

    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()

    def run():
        a @ b
        sync()
    return 2 * n ** 3 / _best_seconds(run, rounds)


def compare_paths(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mokd import distributed
    from mokd.config import load_config
    from mokd.trainer import build_loader, build_state, train_step

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = [("plain", ["train.fast_step=false", "train.compile=false"]),
             ("fast", ["train.fast_step=true", "train.compile=false"])]
    if args.compile:
        paths.append(("fast+compile", ["train.fast_step=true", "train.compile=true"]))
    peaks = {p: matmul_peak(args.peak_size, dt, device) for p, dt in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"preset {args.preset!r}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul {args.peak_size}^3 peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    rows = []
    for precision in args.precisions.split(","):
        base = [*PRESETS[args.preset], *args.set, f"optim.precision={precision}", "data.num_workers=0",
                f"train.device={args.device}"] + ([f"optim.batch_size={args.batch_size}"] if args.batch_size else [])
        states, cfgs, crops = {}, {}, None
        for name, extra in paths:
            cfg = load_config(args.config, [*base, *extra])
            if crops is None:
                loader, _ = build_loader(cfg, distributed.DistInfo())
                crops = [c.to(device) for c in next(iter(loader))[0]]
            torch.manual_seed(0)
            states[name], cfgs[name] = build_state(cfg, device, 1000, distributed.DistInfo()), cfg
            states[name].model.train()

        def steps(name, n):
            for i in range(n):
                train_step(states[name], crops, i, freeze_last_layer=False, cfg=cfgs[name])
            sync()
        for name, _ in paths:
            steps(name, args.warmup)
        best = {name: float("inf") for name, _ in paths}
        for _ in range(args.repeats):  # alternating rounds: a busy spell of the machine hits every path alike
            for name, _ in paths:
                t0 = time.perf_counter()
                steps(name, args.steps)
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
        with FlopCounterMode(display=False) as counter:
            steps("fast", 1)
        flops = counter.get_total_flops()
        for name, _ in paths:
            rows.append((precision, name, best[name], best["plain"] / best[name], flops / best[name]))
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            steps("fast", 1)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile of one fast {precision} step (top 10 by self time):")
        print(prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=40))
        batch = crops[0].shape[0]
        del states
    print(f"\nbatch {batch}, {args.steps} timed steps per round after {args.warmup} warm-up, best of "
          f"{args.repeats} alternating rounds; matrix FLOPs per step {flops / 1e9:.1f} G")
    print(f"{'precision':<9} {'path':<13} {'s/step':>8} {'speed-up':>9} {'GFLOP/s':>8} "
          f"{'of fp32 peak':>12} {'of bf16 peak':>12}")
    for precision, name, sec, speedup, rate in rows:
        print(f"{precision:<9} {name:<13} {sec:>8.3f} {speedup:>8.2f}x {rate / 1e9:>8.1f} "
              f"{100 * rate / peaks['fp32']:>11.1f}% {100 * rate / peaks['bf16']:>11.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations; each figure is its best round (robust to a busy machine)")
    p.add_argument("--vs-dino", action="store_true", help="MOKD against each model alone as DINO (subprocesses)")
    p.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the matmul whose speed is the peak")
    p.add_argument("--what", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    if not args.vs_dino:
        return compare_paths(args)

    results = {}
    rounds = [(r, precision, what) for r in range(args.repeats) for precision in args.precisions.split(",")
              for what in ("mokd", "net1", "net2")]
    for _, precision, what in rounds:
        cmd = [sys.executable, __file__, "--what", what, "--precision", precision, "--preset", args.preset,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        cmd += ["--config", args.config] if args.config else []
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        for s in args.set:
            cmd += ["--set", s]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.exit(f"{what} {precision} failed:\n{out.stderr[-3000:]}")
        r = json.loads(line[7:])
        best = results.get((what, precision))
        if best is None or r["img_per_s"] > best["img_per_s"]:
            results[(what, precision)] = r
        print(f"  measured {what:5s} {precision}: {r['img_per_s']:.1f} img/s", file=sys.stderr, flush=True)

    batch = next(iter(results.values()))["batch"]
    print(f"\nTraining throughput, preset {args.preset!r}, batch {batch}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, best of {args.repeats} round(s), device {args.device}")
    print(f"{'run':<34} {'precision':<9} {'img/s':>9} {'s/step':>8} {'peak MiB':>9}")
    for (what, precision), r in sorted(results.items(), key=lambda kv: (kv[0][1] != 'fp32', kv[0][0] != 'mokd', kv[0][0])):
        name = {"mokd": "MOKD pair", "net1": "net1 alone (DINO)", "net2": "net2 alone (DINO)"}[what]
        print(f"{name + ' ' + r['arch']:<34.34} {precision:<9} {r['img_per_s']:>9.1f} {r['s_per_step']:>8.3f} "
              f"{r['peak_mb']:>9.0f}")
    print()
    precisions = args.precisions.split(",")
    for precision in precisions:
        m, a, b = (results[(w, precision)]["s_per_step"] for w in ("mokd", "net1", "net2"))
        print(f"{precision}: MOKD step time / (net1 DINO + net2 DINO) = {m / (a + b):.2f}")
    if "fp32" in precisions and "bf16" in precisions:
        for what in ("mokd", "net1", "net2"):
            sp = results[(what, "bf16")]["img_per_s"] / results[(what, "fp32")]["img_per_s"]
            print(f"bf16 autocast speed-up over fp32, {what}: {sp:.2f}x")


if __name__ == "__main__":
    main()
