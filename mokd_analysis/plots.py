"""Figures: mean attention distance per layer (Fig. 5 / S2) and t-SNE maps (Fig. 4 / S1). Agg backend only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mokd_analysis.mad import MADResult  # noqa: E402

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def plot_mad(results: list[MADResult], out_stem: Path, title: str | None = None) -> dict[str, Path]:
    """One panel per model kind (ViT heads per layer; CNN blocks), models overlaid in colours -> {png, pdf}.

    ViT: one point per head at each layer (models side by side within a layer), with the mean over heads as a
    line. CNN: one point per residual block, joined by a line.
    """
    kinds = [k for k in ("vit", "cnn") if any(r.kind == k for r in results)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, kind in zip(axes[0], kinds):
        group = [(i, r) for i, r in enumerate(results) if r.kind == kind]
        width = 0.6 / max(1, len(group))
        for j, (i, r) in enumerate(group):
            c = colours[i % len(colours)]
            layers = np.arange(1, len(r.distances) + 1, dtype=float)
            offset = (j - (len(group) - 1) / 2) * width if len(group) > 1 else 0.0
            if kind == "vit":
                d = np.asarray(r.distances)  # [L, H]
                xs = np.repeat(layers + offset, d.shape[1])
                ax.scatter(xs, d.ravel(), s=16, color=c, alpha=0.75, marker=MARKERS[j % len(MARKERS)],
                           edgecolors="none", label=f"{r.label} ({r.arch})")
                ax.plot(layers + offset, d.mean(1), color=c, lw=1, alpha=0.6)
            else:
                d = np.asarray(r.distances)[:, 0]
                ax.plot(layers, d, color=c, lw=1.2, marker=MARKERS[j % len(MARKERS)], ms=5,
                        label=f"{r.label} ({r.arch})")
        ax.set_xlabel("layer" if kind == "vit" else "residual block")
        ax.set_ylabel("mean attention distance (pixels)")
        n = max(len(r.distances) for _, r in group)
        ax.set_xticks(range(1, n + 1, 1 if n <= 16 else 2))
        size = ", ".join(sorted({f"{r.image_size}px" for _, r in group}))
        ax.set_title(f"{'ViT heads' if kind == 'vit' else 'CNN blocks'} at {size}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_stem)


def plot_tsne(coords: np.ndarray, labels: np.ndarray, model_ids: np.ndarray, class_names: list[str],
              model_names: list[str], out_stem: Path, title: str | None = None) -> dict[str, Path]:
    """coords [N, 2], labels [N] (class index into class_names), model_ids [N] -> {png, pdf}.

    A colour per class and a marker per model.
    """
    import seaborn as sns

    palette = sns.color_palette("tab10" if len(class_names) <= 10 else "husl", len(class_names))
    fig, ax = plt.subplots(figsize=(6.8, 5.6))
    for m, mname in enumerate(model_names):
        for c, cname in enumerate(class_names):
            sel = (model_ids == m) & (labels == c)
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=14, color=palette[c], marker=MARKERS[m % len(MARKERS)],
                           alpha=0.8, edgecolors="none", linewidths=0)
    class_handles = [plt.Line2D([], [], ls="", marker="o", color=palette[c], label=n) for c, n in enumerate(class_names)]
    model_handles = [plt.Line2D([], [], ls="", marker=MARKERS[m % len(MARKERS)], color="0.3", label=n)
                     for m, n in enumerate(model_names)]
    leg = ax.legend(handles=class_handles, title="class", fontsize=7, title_fontsize=8, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.add_artist(leg)
    ax.legend(handles=model_handles, title="model", fontsize=7, title_fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of features")
    fig.tight_layout()
    return _save(fig, out_stem)


def _save(fig, out_stem: Path) -> dict[str, Path]:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_stem.with_suffix(".png"), "pdf": out_stem.with_suffix(".pdf")}
    fig.savefig(paths["png"], dpi=150, bbox_inches="tight")
    fig.savefig(paths["pdf"], bbox_inches="tight")
    plt.close(fig)
    return paths
