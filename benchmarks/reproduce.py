"""Does MOKD beat its baseline? MOKD and the independent (two plain DINO runs) baseline, S seeds, one budget.

    python benchmarks/reproduce.py                                  # default pair on digits, 3 seeds
    python benchmarks/reproduce.py --seeds 5 --config configs/default.yaml --data digits --out runs/reproduce
    python benchmarks/reproduce.py --ablation no_ct:loss.ct=false --ablation no_st:loss.st=false
    python benchmarks/reproduce.py --set optim.epochs=8             # applies to every run alike
    python benchmarks/reproduce.py --device cuda --config configs/photos.yaml --seeds 5 --budget-minutes 10

On CUDA (--device cuda) every training runs at once on the one GPU, one process each (bf16, data.gpu_augment:
the loader workers only crop, the colour/blur/solarise of each batch runs on the GPU), with the embedded data
sets. --budget-minutes picks the epochs: a 2-epoch calibration of all runs at once (OUT/calibrate) measures a
steady epoch and the fixed costs, and the epochs are what fits 80% of the budget (the rest: evaluation). On a
machine without CUDA, --device cuda refuses with one line and exit status 2.

For every seed and mode it runs `mokd train` (`--jobs` at once, each in its own process; same config, same seed, same epochs: the only difference is
loss.mode or the ablation's settings; with one seed both modes start from the same weights), with the online
k-NN monitor every epoch. Then it evaluates both teachers of every final checkpoint with `mokd eval knn`
(k=20) and `mokd eval linear --fast`, which write result records into OUT/records (read them with
`mokd report OUT/records`). It prints one table: per model and mode the mean and standard deviation over
seeds, the paired MOKD minus independent gap with its 95% confidence interval (Student t over seeds), and
each model's gain over its own initialisation (online k-NN), beside a k-NN on raw pixels as a floor. It also
writes OUT/summary.json and OUT/knn_curves.png. Finished runs are kept: rerunning the script skips them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NETS = ("net1", "net2")
BASELINE = "independent"


def parse_ablation(text: str) -> tuple[str, list[str]]:
    """'NAME:key=v,key=v' -> (NAME, ['key=v', 'key=v'])."""
    name, sep, sets = text.partition(":")
    if not sep or not name or not sets:
        raise SystemExit(f"--ablation expects NAME:key=value[,key=value...], e.g. no_ct:loss.ct=false; got {text!r}")
    return name, [s for s in sets.split(",") if s]


def run_cli(args: list[str]) -> None:
    """One `mokd` command in this process (imports once); a failure stops the harness with its message."""
    from mokd.cli import cli

    try:
        cli.main(args, prog_name="mokd", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise SystemExit(f"mokd {' '.join(args)} failed with exit code {e.code}") from e


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def finished(run_dir: Path, epochs: int) -> bool:
    return any(r.get("type") == "knn" and r.get("epoch") == epochs for r in read_log(run_dir)) and \
        (run_dir / "last.pth").is_file()


def train_run(run_dir: Path, base: list[str], extra: list[str], seed: int, epochs: int, threads: int,
              device_sets: tuple[str, ...] = ()) -> float:
    """Train one run unless it already finished, in a process of its own with `threads` intra-op threads;
    returns the training time in seconds (0 when skipped). Its console output goes to RUN/train.out."""
    if finished(run_dir, epochs):
        print(f"[reproduce] {run_dir} finished earlier: kept", flush=True)
        return 0.0
    # An unfinished run continues where it stopped (--resume starts from scratch when it holds no checkpoint).
    extra_flags = ["--resume"] if run_dir.exists() else []
    # The online k-NN curve: every epoch, or ten points over a long schedule (each costs two extractions).
    args = ["train", *base, "--out", str(run_dir), "--seed", str(seed), "--set", f"train.knn_every={max(1, epochs // 10)}",
            "--set", "train.progress=false", *[a for s in (*device_sets, *extra) for a in ("--set", s)], *extra_flags]
    print(f"[reproduce] mokd {' '.join(args)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.train.out"
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "mokd", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        raise SystemExit(f"training {run_dir} failed (exit code {rc}); the end of {log_path}:\n{tail}")
    elapsed = time.perf_counter() - t0
    print(f"[reproduce] {run_dir} trained in {elapsed / 60:.1f} min", flush=True)
    return elapsed


def cuda_refusal(device: str | None) -> str | None:
    """The one-line reason --device cuda cannot run here, or None."""
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return ("reproduce.py: --device cuda was asked for, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); run without --device for the CPU reproduction")
    return None


def device_settings(device: str | None, jobs: int) -> tuple[str, ...]:
    """Config overrides every training gets on `device`: on CUDA the one GPU, bf16, the photometric augmentation
    on the GPU and the loader workers the cores allow (the data sets are the embedded ones, in memory);
    torch.compile off, as its start-up in every one of the concurrent processes would take a short budget."""
    if device != "cuda":
        return () if device is None else (f"train.device={device}",)
    workers = max(1, (os.cpu_count() or 1) // jobs - 1)
    return ("train.device=cuda", "optim.precision=bf16", "data.gpu_augment=true", f"data.num_workers={workers}",
            "train.compile=false")


EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+: .*\((\d+(?:\.\d+)?)s\)$")


def epoch_seconds(out_file: Path) -> list[float]:
    """The epoch times a training printed to its console file (`epoch E/N: ... (12.3s)` lines)."""
    if not out_file.is_file():
        return []
    return [float(m.group(2)) for ln in out_file.read_text().splitlines() if (m := EPOCH_LINE.match(ln.strip()))]


def pick_epochs(budget_s: float, spent_s: float, runs: list[tuple[float, list[float]]]) -> int:
    """Epochs that fit: `runs` are the calibration runs' (wall seconds, epoch seconds); a run then costs
    fixed + E x epoch, fixed being its wall time beyond its epochs (start-up, k-NN, checkpoints), epoch the
    slowest steady (last) epoch. 80% of the budget is for training, the rest for evaluation."""
    epoch = max(e[-1] for _, e in runs)
    fixed = max(wall - sum(e) for wall, e in runs)
    return max(1, int((0.8 * budget_s - spent_s - fixed) // epoch))


def evaluate(run_dir: Path, records: Path, data: str, linear: bool) -> dict:
    """k-NN (k=20) and fast linear probe of both teachers; returns {net: {knn, linear}} from their records."""
    ckpt = run_dir / "last.pth"
    common = [str(ckpt), "--branch", "teacher", "--data", data, "--out", str(records), "--no-cache",
              "--seed", "0"]
    run_cli(["eval", "knn", *common, "--ks", "20"])
    if linear:
        run_cli(["eval", "linear", *common, "--fast"])
    out: dict = {n: {} for n in NETS}
    for path in sorted(records.glob("*.json")):
        r = json.loads(path.read_text())
        c = r.get("checkpoint", {})
        if Path(str(c.get("path", ""))).resolve() != ckpt.resolve():
            continue
        net = c.get("model")
        if net in out:
            out[net][r["task"]] = r["metrics"]["best_top1"] if r["task"] == "knn" else r["metrics"]["top1"]
    return out


def run_health(run_dir: Path, log: list[dict] | None = None) -> dict:
    """Per model: the last epoch's teacher entropy and batch-mean entropy (nats, mokd.health) of its MLP head and,
    in MOKD, of its T-Head and its L_ct target ("heads": name -> (H, H(mean))), and the epochs whose mean
    figures fired a collapse warning for any of them, from the run's log records (read from RUN/log.jsonl
    unless given) with the run's own out_dim."""
    import yaml

    from mokd.health import CONSTANT_CURES, collapse_warning, teacher_outputs

    out_dim = yaml.safe_load((run_dir / "config.yaml").read_text())["head"]["out_dim"]
    epochs = [r for r in (read_log(run_dir) if log is None else log) if r.get("type") == "epoch"]
    out = {}
    for n in NETS:
        # What the trainer printed for each epoch: collapse warnings, and notes for flat teachers
        said = [(r["epoch"], [collapse_warning(head, h, hm, out_dim, CONSTANT_CURES.get(head))
                              for head, h, hm in teacher_outputs(r, n)]) for r in epochs]
        heads = {head: (h, hm) for head, h, hm in teacher_outputs(epochs[-1], n)}
        out[n] = {"entropy": epochs[-1][f"entropy_{n}"], "mean_entropy": epochs[-1][f"mean_entropy_{n}"],
                  "heads": heads, "log_k": math.log(out_dim),
                  "warned_epochs": [e for e, ws in said if any(w and w.startswith("warning:") for w in ws)],
                  "flat_epochs": [e for e, ws in said if any(w and w.startswith("note:") for w in ws)]}
    return out


def health_line(name: str, seed: int, health: dict) -> str:
    parts = []
    for n in NETS:
        h = health[n]
        flag = f"collapse warning at epoch(s) {','.join(map(str, h['warned_epochs']))}" if h["warned_epochs"] \
            else "no warning"
        flat = f", flat-teacher note at epoch(s) {','.join(map(str, h['flat_epochs']))}" if h.get("flat_epochs") else ""
        others = "".join(f", {head} {hh:.2f} / {hm:.2f}" for head, (hh, hm) in list(h.get("heads", {}).items())[1:])
        parts.append(f"{n} H {h['entropy']:.2f} H(mean) {h['mean_entropy']:.2f} of log K {h['log_k']:.2f}{others}, "
                     f"{flag}{flat}")
    return f"[reproduce] health {name} seed {seed} (last epoch): " + "; ".join(parts)


def raw_pixel_knn(data: str, size: int) -> float:
    """k-NN (k=20, DINO's weighted vote on cosine similarity) on the evaluation-transformed pixels."""
    import torch

    from mokd.data import build_dataset, parse_data_spec
    from mokd_eval.features import eval_transform
    from mokd_eval.knn import knn_evaluate

    spec = parse_data_spec(data)
    tf = eval_transform(size, spec.native_size is not None)

    def load(split):
        ds = build_dataset(spec, split, tf)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs).flatten(1), torch.tensor(ys), len(ds.classes)

    tr, ytr, n_cls = load("train")
    va, yva, _ = load("val")
    tr, va = torch.nn.functional.normalize(tr, dim=1), torch.nn.functional.normalize(va, dim=1)
    return knn_evaluate(tr, ytr, va, yva, ks=(20,), num_classes=n_cls, backend="torch", log=None)["top1"][20]


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% confidence interval (Student t with S-1 degrees of freedom)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return m, m - half, m + half


def fmt_gap(m: float, lo: float, hi: float) -> str:
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else f"{m:+.2f}"


def fmt(m: float, s: float, sign: str = "") -> str:
    return f"{m:{sign}.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:{sign}.2f}"


def curves_png(results: dict, arch: dict, path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    modes = list(results)
    colours = dict(zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for ax, n in zip(axes, NETS):
        for mode in modes:
            for i, (seed, run) in enumerate(sorted(results[mode].items())):
                ep, acc = zip(*run["curve"][n])
                ax.plot(ep, acc, color=colours[mode], marker="o", ms=3, lw=1.2, alpha=0.85,
                        label=mode if i == 0 else None)
        ax.set_title("\n".join(textwrap.wrap(f"{n}: {arch[n]}", 52)), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("online k-NN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(title="one line per seed", fontsize=8, title_fontsize=8, loc="center left",
                   bbox_to_anchor=(1.02, 0.5))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def mad_runs(results: dict, data: str, out: Path) -> dict:
    """`mokd analyze mad` of both teachers of every MOKD and independent run -> {mode: {kind: [[layer means of
    one seed]...]}}, with each run's mad.json, figure and records under OUT/mad/MODE/seedS."""
    per_mode: dict = {}
    for mode in ("mokd", BASELINE):
        per_mode[mode] = {}
        for seed, run in sorted(results[mode].items()):
            target = out / "mad" / mode / f"seed{seed}"
            if not (target / "mad.json").is_file():
                run_cli(["analyze", "mad", str(Path(run["run"]) / "last.pth"), "--branch", "teacher", "--data", data,
                         "--out", str(target), "--seed", "0"])
            for r in json.loads((target / "mad.json").read_text()):
                per_mode[mode].setdefault(r["kind"], []).append(r["layer_mean"])
                per_mode.setdefault("uniform", {})[r["kind"]] = uniform_levels(r)
    return per_mode


def uniform_levels(r: dict) -> list[float]:
    """Per layer/block of a mad.json entry: the distance uniform attention over its grid would give."""
    from mokd_analysis.distance import uniform_distance

    return [uniform_distance(tuple(g), tuple(st)) if g and g[0] else float("nan") for g, st in zip(r["grid"], r["stride"])]


def mad_summary(per_mode: dict) -> list[dict]:
    """Per kind (vit, cnn) and layer: mean ± std over seeds per mode and the paired MOKD minus independent
    difference with its 95% interval, flagged when the interval contains 0 (inside the seed noise)."""
    rows = []
    for kind in ("vit", "cnn"):
        if kind not in per_mode["mokd"] or kind not in per_mode[BASELINE]:
            continue
        a, b = np.asarray(per_mode["mokd"][kind]), np.asarray(per_mode[BASELINE][kind])
        for layer in range(a.shape[1]):
            m, lo, hi = paired_ci(list(a[:, layer] - b[:, layer]))
            rows.append({"kind": kind, "layer": layer + 1, "mokd": mean_std(list(a[:, layer])),
                         BASELINE: mean_std(list(b[:, layer])), "gap": (m, lo, hi),
                         "inside_noise": bool(math.isnan(lo) or lo <= 0.0 <= hi)})
    return rows


def mad_png(per_mode: dict, arch: dict, out: Path) -> list[Path]:
    """Both kinds side by side: mean attention distance per layer/block, a line per mode (mean over seeds,
    bars: std) over thin per-seed lines, and the uniform-attention level of each layer's grid (dotted)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("vit", "cnn") if k in per_mode["mokd"]]
    colours = {"mokd": "#d62728", BASELINE: "#1f77b4"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.875, 2.9), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for mode in ("mokd", BASELINE):
            a = np.asarray(per_mode[mode][kind])
            x = np.arange(1, a.shape[1] + 1)
            for row in a:
                ax.plot(x, row, color=colours[mode], lw=0.6, alpha=0.25)
            ax.errorbar(x, a.mean(0), yerr=a.std(0, ddof=1) if len(a) > 1 else None, color=colours[mode],
                        marker="o", ms=3.5, lw=1.4, capsize=2.5, label=f"{mode} (mean ± std over {len(a)} seeds)")
        uniform = per_mode.get("uniform", {}).get(kind)
        if uniform:
            ax.plot(x, uniform, color="0.4", ls=":", lw=1.0, label="uniform attention over the grid")
        net = "net2" if kind == "vit" else "net1"
        ax.set_title("\n".join(textwrap.wrap(f"{net}: {arch.get(net, kind)}", 48)), fontsize=7)
        ax.set_xlabel("block (residual stage output)" if kind == "cnn" else "layer", fontsize=7)
        ax.set_ylabel("mean attention distance (px)", fontsize=7)
        ax.set_xticks(x)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths = [out / "mad_seeds.png", out / "mad_seeds.pdf"]
    for p in paths:
        fig.savefig(p, dpi=300)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=None, help="config file or shipped name (default: configs/default.yaml)")
    ap.add_argument("--data", default=None,
                    help="data spec, as for mokd train (default: the config's data.spec; digits for the default)")
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (default: 5)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs of every run (default: the config's optim.epochs); a longer schedule "
                         "is this flag away, e.g. --epochs 30, or --config configs/cpu_long.yaml")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run (repeatable)")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=V[,KEY=V]",
                    help="an extra MOKD variant compared with the baseline too (repeatable)")
    ap.add_argument("--out", default="runs/reproduce", help="folder for runs, records, summary and plot")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear probe (k-NN only)")
    ap.add_argument("--mad", action="store_true",
                    help="also the mean attention distance of both teachers of every MOKD and independent run "
                         "(mokd analyze mad), compared per layer over seeds, with OUT/mad_seeds.png")
    ap.add_argument("--jobs", type=int, default=None,
                    help="trainings run at once, each in its own process (default: 2 on the CPU, one per core of "
                         "a 2-core machine, which beats one process with two threads there; every run on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the trainings run (default: the config's train.device); cuda: all at once on one "
                         "GPU in bf16, see above")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="pick the epochs so that the whole reproduction fits this many minutes (overrides --epochs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per training (default: cores / jobs)")
    args = ap.parse_args(argv)
    refusal = cuda_refusal(args.device)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if args.seeds < 1 or (args.jobs is not None and args.jobs < 1):
        raise SystemExit("--seeds and --jobs must be >= 1")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise SystemExit(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    sys.path.insert(0, str(ROOT))
    from mokd.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "records"
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
        args.overrides.append(f"optim.epochs={args.epochs}")
    cfg = load_config(args.config, args.overrides)
    if args.data is None:
        args.data = cfg.data.spec
    base = (["--config", args.config] if args.config else []) + ["--data", args.data]
    base += [a for s in args.overrides for a in ("--set", s)]
    variants = {"mokd": ["loss.mode=mokd"], BASELINE: [f"loss.mode={BASELINE}"]}
    variants.update(dict(parse_ablation(a) for a in args.ablation))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    from mokd.naming import model_name

    arch = {n: model_name(getattr(cfg, n).arch, getattr(cfg, n).kwargs, getattr(cfg, n).small_stem,
                          getattr(cfg, n).name) for n in NETS}
    t_start = time.perf_counter()
    results: dict = {v: {} for v in variants}
    # Seed-major order: an interrupted harness has complete pairs for the seeds it finished.
    plan = [(seed, name, sets, out / name / f"seed{seed}") for seed in seeds for name, sets in variants.items()]
    jobs = args.jobs or (len(plan) if args.device == "cuda" else 2)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    on_device = device_settings(args.device, jobs)
    if args.budget_minutes is not None:
        calibrate = [(seed, name, sets + ["optim.epochs=2"], out / "calibrate" / name / f"seed{seed}")
                     for seed, name, sets, _ in plan]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            walls = list(pool.map(lambda job: train_run(job[3], base, job[2], job[0], 2, threads, on_device),
                                  calibrate))
        timed = [(w, epoch_seconds(job[3].parent / f"{job[3].name}.train.out")) for w, job in zip(walls, calibrate)]
        timed = [(w, e) for w, e in timed if w > 0 and e]
        if not timed:
            raise SystemExit(f"--budget-minutes: no calibration run in {out / 'calibrate'} printed its epoch times "
                             f"(delete that folder to calibrate again)")
        epochs = pick_epochs(60 * args.budget_minutes, time.perf_counter() - t_start, timed)
        print(f"[reproduce] budget {args.budget_minutes:g} min: {len(plan)} runs at once take "
              f"{max(e[-1] for _, e in timed):.1f}s a steady epoch; {epochs} epochs each", flush=True)
        args.overrides.append(f"optim.epochs={epochs}")
        cfg = load_config(args.config, args.overrides)
        base += ["--set", f"optim.epochs={epochs}"]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        times = list(pool.map(lambda job: train_run(job[3], base, job[2], job[0], cfg.optim.epochs, threads,
                                                     on_device), plan))
    for (seed, name, sets, run_dir), train_s in zip(plan, times):
        log = read_log(run_dir)
        knn = [r for r in log if r.get("type") == "knn"]
        ev = evaluate(run_dir, records, args.data, linear=not args.no_linear)
        results[name][seed] = {
            "train_s": train_s, "run": str(run_dir),
            "init": {n: knn[0][f"knn_top1_{n}"] for n in NETS},
            "online_end": {n: knn[-1][f"knn_top1_{n}"] for n in NETS},
            "curve": {n: [(r["epoch"], r[f"knn_top1_{n}"]) for r in knn] for n in NETS},
            "eval": ev, "health": run_health(run_dir, log),
        }
        print(health_line(name, seed, results[name][seed]["health"]), flush=True)
    floor = raw_pixel_knn(args.data, cfg.augment.global_size)
    protocols = ["knn"] + ([] if args.no_linear else ["linear"])

    rows, summary = [], {"config": args.config or "configs/default.yaml", "data": args.data, "seeds": seeds,
                         "overrides": args.overrides, "device_settings": list(on_device),
                         "epochs": cfg.optim.epochs, "raw_pixel_knn": floor,
                         "arch": arch, "runs": results, "table": []}
    for n in NETS:
        for name in variants:
            runs = [results[name][s] for s in seeds]
            row = {"model": f"{n} ({arch[n]})", "mode": name}
            gains = [r["online_end"][n] - r["init"][n] for r in runs]
            row["init"] = mean_std([r["init"][n] for r in runs])
            row["gain_over_init"] = mean_std(gains)
            row["health"] = {"entropy": mean_std([r["health"][n]["entropy"] for r in runs]),
                             "mean_entropy": mean_std([r["health"][n]["mean_entropy"] for r in runs]),
                             "runs_warned": sum(bool(r["health"][n]["warned_epochs"]) for r in runs)}
            for head in list(runs[0]["health"][n].get("heads", {}))[1:]:  # T-Head, L_ct target (MOKD runs)
                row["health"][head] = [mean_std([r["health"][n]["heads"][head][k] for r in runs])[0] for k in (0, 1)]
            for p in protocols:
                row[p] = mean_std([r["eval"][n][p] for r in runs])
                if name != BASELINE:
                    diffs = [results[name][s]["eval"][n][p] - results[BASELINE][s]["eval"][n][p] for s in seeds]
                    row[f"{p}_gap"] = paired_ci(diffs)
            rows.append(row)
    summary["table"] = rows
    summary["wall_time_s"] = time.perf_counter() - t_start

    head = ["model", "mode", "k-NN init", "gain over init (online k-NN)"]
    for p in protocols:
        head += [f"{p} top-1", f"{p}: minus {BASELINE} [95% CI]"]
    head += ["last-epoch H / H(mean) (nats)", "T-Head; L_ct target", "runs with a collapse warning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["mode"], fmt(*row["init"]), fmt(*row["gain_over_init"], sign="+")]
        for p in protocols:
            cells.append(fmt(*row[p]))
            if f"{p}_gap" in row:
                cells.append(fmt_gap(*row[f"{p}_gap"]))
            else:
                cells.append("—")
        h = row["health"]
        extra = "; ".join(f"{h[k][0]:.2f} / {h[k][1]:.2f}" for k in ("T-Head", "L_ct target") if k in h) or "—"
        cells += [f"{h['entropy'][0]:.2f} / {h['mean_entropy'][0]:.2f}", extra, f"{h['runs_warned']} of {len(seeds)}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if args.mad:
        per_mode = mad_runs(results, args.data, out)
        mad_rows = mad_summary(per_mode)
        summary["mad"] = {"per_seed": per_mode, "table": mad_rows}
        mad_png(per_mode, arch, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "table.md").write_text(table + "\n")
    curves_png(results, arch, out / "knn_curves.png")
    print()
    print(f"MOKD vs {BASELINE} on {args.data}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
          f"{cfg.optim.epochs} epochs each, teachers evaluated (k-NN k=20; linear = fast probe); mean ± std over seeds")
    print(table)
    print(f"floor: k-NN (k=20) on raw pixels at {cfg.augment.global_size} px: {floor:.2f}%")
    if args.mad:
        mlines = ["| model | layer | independent (px) | mokd (px) | mokd minus independent [95% CI] | |",
                  "|---|---|---|---|---|---|"]
        for r in mad_rows:
            mlines.append(f"| {arch['net2' if r['kind'] == 'vit' else 'net1']} | {r['layer']} | "
                          f"{fmt(*r[BASELINE])} | {fmt(*r['mokd'])} | {fmt_gap(*r['gap'])} | "
                          f"{'inside the seed noise' if r['inside_noise'] else 'outside the seed noise'} |")
        (out / "mad.md").write_text("\n".join(mlines) + "\n")
        print()
        print("Mean attention distance of the teachers (mokd analyze mad, 256 val images), mean ± std over seeds:")
        print("\n".join(mlines))
        print(f"wrote {out / 'mad.md'}, {out / 'mad_seeds.png'}")
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'knn_curves.png'}, records in {records} "
          f"({summary['wall_time_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
