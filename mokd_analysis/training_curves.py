"""`mokd plot-log RUN...`: the losses, training health and online k-NN of one or several runs, from log.jsonl.

The numbers (`read_run`) are separate from the figure (`curves_figure`): a reader can check them without
matplotlib. Panels: total loss per model, the loss terms of each model, the teachers' health (per-sample and
batch-mean entropy of the MLP head's target, with the collapse thresholds of mokd.health), and the online
k-NN top-1. A run keeps one colour everywhere; net1 is drawn solid, net2 dashed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import yaml

from mokd.cli_common import debug_option
from mokd.errors import UserError
from mokd.health import DOMINANT_NATS, UNIFORM_FRACTION

NETS = ("net1", "net2")
TERMS = ("sm", "st", "cm", "ct")
NET_STYLE = {"net1": "-", "net2": (0, (4, 2))}


@dataclass
class RunCurves:
    """One run's logged numbers: per logged step (x: global step) and per k-NN evaluation (x: epoch)."""

    name: str
    steps: np.ndarray  # [S] global steps of the step records
    steps_per_epoch: float | None  # to draw epochs on the x-axis; None when the log does not tell
    values: dict[str, np.ndarray]  # field -> [S] (NaN where a record lacks it)
    knn_epochs: np.ndarray  # [E]
    knn: dict[str, np.ndarray]  # "net1"/"net2" -> [E] top-1 %
    out_dim: int | None = None  # K, for the health panel's log K line
    mode: str | None = None
    arch: dict[str, str] = field(default_factory=dict)


def log_path(run: str | Path) -> Path:
    """RUN is a run folder (its log.jsonl) or a log.jsonl file."""
    p = Path(run)
    path = p / "log.jsonl" if p.is_dir() else p
    if not path.is_file():
        raise UserError(f"{run}: no log.jsonl there (expected the --out folder of `mokd train`, or its log.jsonl)")
    return path


def read_run(run: str | Path) -> RunCurves:
    """Parse a run's log.jsonl (lines cut off by a kill are skipped) and, if present, its config.yaml."""
    path = log_path(run)
    steps, knn = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "step":
            steps.append(record)
        elif record.get("type") == "knn":
            knn.append(record)
    if not steps:
        raise UserError(f"{path} holds no step records yet (the first is written after train.log_every steps)")
    keys = sorted({k for r in steps for k, v in r.items()
                   if k not in ("type", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    values = {k: np.array([float(r.get(k, math.nan)) for r in steps]) for k in keys}
    x = np.array([float(r["step"]) for r in steps])
    # The last logged step of an epoch is always written, so (step + 1) / (epoch + 1) there is the epoch length.
    per_epoch = [(r["step"] + 1) / (r["epoch"] + 1) for r in steps if "epoch" in r]
    spe = max(per_epoch) if per_epoch else None
    cfg = _read_config(path.parent / "config.yaml")
    return RunCurves(
        name=path.parent.name if path.name == "log.jsonl" else path.stem, steps=x, steps_per_epoch=spe,
        values=values, knn_epochs=np.array([float(r["epoch"]) for r in knn]),
        knn={n: np.array([float(r.get(f"knn_top1_{n}", math.nan)) for r in knn]) for n in NETS},
        out_dim=cfg.get("head", {}).get("out_dim"), mode=cfg.get("loss", {}).get("mode"),
        arch={n: cfg.get(n, {}).get("name") or cfg.get(n, {}).get("arch") for n in NETS if n in cfg})


def _read_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def curves_figure(runs: list[RunCurves]):
    """Five panels in a row of the page: total loss, net1's terms, net2's terms, MLP-head health, k-NN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mokd_analysis.plots import RUN_COLOURS, STYLE

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 5, figsize=(11.0, 2.6), constrained_layout=True)
        ax_loss, ax_t1, ax_t2, ax_health, ax_knn = axes
        for i, run in enumerate(runs):
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            label = run.name + (f" ({run.mode})" if run.mode else "")
            x = (run.steps + 1) / run.steps_per_epoch if run.steps_per_epoch else run.steps
            for n, loss in zip(NETS, ("loss1", "loss2")):
                if loss in run.values:
                    ax_loss.plot(x, run.values[loss], color=colour, ls=NET_STYLE[n],
                                 label=f"{label} {n}" if len(runs) > 1 else n)
            for ax, n, idx in ((ax_t1, "net1", 1), (ax_t2, "net2", 2)):
                for j, term in enumerate(TERMS):
                    key = f"{term}{idx}"
                    if key in run.values and np.isfinite(run.values[key]).any():
                        ax.plot(x, run.values[key], color=RUN_COLOURS[j] if len(runs) == 1 else colour,
                                ls=("-", "--", ":", "-.")[j], label=term if len(runs) == 1 or i == 0 else None)
            for n in NETS:
                for key, marker_ls in ((f"entropy_{n}", NET_STYLE[n]), (f"mean_entropy_{n}", NET_STYLE[n])):
                    if key in run.values:
                        ax_health.plot(x, run.values[key], color=colour, ls=marker_ls,
                                       alpha=1.0 if key.startswith("entropy") else 0.5,
                                       label=f"{n} {'H' if key.startswith('entropy') else 'H(mean)'}"
                                       if i == 0 else None)
            if run.out_dim:
                log_k = math.log(run.out_dim)
                ax_health.axhline(UNIFORM_FRACTION * log_k, color="0.45", lw=0.8, ls=":")
                ax_health.axhline(log_k, color="0.7", lw=0.8, ls=":")
            for n in NETS:
                if run.knn_epochs.size and np.isfinite(run.knn[n]).any():
                    ax_knn.plot(run.knn_epochs, run.knn[n], color=colour, ls=NET_STYLE[n], marker="o", ms=2.5,
                                label=f"{label} {n}" if len(runs) > 1 else n)
        ax_health.axhline(DOMINANT_NATS, color="0.45", lw=0.8, ls=":")
        xlabel = "epoch" if all(r.steps_per_epoch for r in runs) else "step"
        titles = ("total loss (loss1, loss2)", "net1 loss terms", "net2 loss terms",
                  "teacher health, MLP head (nats)", "online k-NN top-1 (%)")
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel(xlabel if ax is not ax_knn else "epoch")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(frameon=False)
        if not any(r.knn_epochs.size for r in runs):
            ax_knn.text(0.5, 0.5, "no k-NN records\n(train.knn_every = 0)", ha="center", va="center",
                        transform=ax_knn.transAxes)
        if len(runs) > 1:
            fig.suptitle("runs: " + ", ".join(r.name for r in runs))
    return fig


@click.command("plot-log")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              show_default="RUN/curves for one run, ./curves for several",
              help="Output path without extension; one file per --format.")
@click.option("--format", "formats", type=click.Choice(["png", "pdf", "svg"]), multiple=True,
              default=("png", "pdf"), show_default=True, help="File formats to write (repeatable).")
@debug_option
def plot_log_cmd(runs, out, formats):
    """Draw the losses, training health and online k-NN of one or several training runs.

    RUN is the --out folder of `mokd train` (or its log.jsonl). Panels: both models' total loss, each model's
    loss terms (sm, st, cm, ct), the per-sample and batch-mean entropy of each teacher's MLP-head target with
    the collapse thresholds (0.9 log K, log K, log 2; docs/monitoring.md), and the online k-NN top-1.
    Several runs overlay, one colour per run; net1 solid, net2 dashed.
    """
    curves = [read_run(r) for r in runs]
    stem = Path(out) if out else (log_path(runs[0]).parent / "curves" if len(runs) == 1 else Path("curves"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(curves)
    written = []
    for fmt in formats:
        path = stem.with_name(stem.name + f".{fmt}")
        fig.savefig(path, dpi=200)
        written.append(str(path))
    click.echo("written: " + ", ".join(written))
