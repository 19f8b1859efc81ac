"""Figures a paper can use as they are: mean attention distance per layer (Fig. 5 / S2) and t-SNE maps
(Fig. 4 / S1). Agg backend only.

Every figure is drawn at the width of one column or of the whole text of a CVPR page (3.25 in, 6.875 in),
with 7-8 pt text, and written as PNG (300 dpi), PDF and SVG with its fonts embedded (TrueType in the PDF,
glyphs as paths in the SVG), so that it can go into a paper without scaling. A run keeps one colour and
marker in every panel; legends sit beside the data, never on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from mokd_analysis.distance import uniform_distance  # noqa: E402
from mokd_analysis.mad import MADResult  # noqa: E402
from mokd_analysis.rank import EIG_FLOOR  # noqa: E402

WIDTHS = {"column": 3.25, "page": 6.875}  # inches: CVPR \columnwidth and \textwidth
WIDTH_CHOICES = ("auto", *WIDTHS)
FORMATS = ("png", "pdf", "svg")
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and in greyscale print by marker.
RUN_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
REFERENCE = {"color": "0.45", "ls": (0, (1.5, 1.5)), "lw": 0.9}
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7,
    "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "legend.fontsize": 6.5, "legend.title_fontsize": 7,
    "figure.titlesize": 8, "axes.linewidth": 0.6, "lines.linewidth": 1.1, "xtick.major.width": 0.6,
    "ytick.major.width": 0.6, "grid.linewidth": 0.4, "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path",
    "savefig.dpi": 300,
}
MODE_ORDER = {"independent": 0, "mokd": 1}


@dataclass(frozen=True)
class RunStyle:
    colour: str
    marker: str


def styled(fn):
    """Run a figure function under STYLE (sizes, fonts embedded on save)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def figure_width(width: str, panels: int) -> float:
    """Inches for `width` (column | page | auto: a column for one panel, the page for more)."""
    if width == "auto":
        width = "column" if panels == 1 else "page"
    if width not in WIDTHS:
        raise ValueError(f"figure width must be one of {', '.join(WIDTH_CHOICES)}, got {width!r}")
    return WIDTHS[width]


def run_label(run: str | None, mode: str | None) -> str:
    """'r18_vit · independent' (the mode only when the checkpoint states it)."""
    return " · ".join(x for x in (run or "?", mode) if x)


def run_styles(runs: Sequence[tuple[str, str | None]]) -> dict[str, RunStyle]:
    """One colour and marker per run, independent runs first, then MOKD runs, then the rest (stable)."""
    order: dict[str, str | None] = {}
    for run, mode in runs:
        order.setdefault(run, mode)
    ranked = sorted(order, key=lambda r: (MODE_ORDER.get(order[r] or "", 2), list(order).index(r)))
    return {r: RunStyle(RUN_COLOURS[i % len(RUN_COLOURS)], MARKERS[i % len(MARKERS)]) for i, r in enumerate(ranked)}


def _legend_axes(fig: Figure, spec) -> plt.Axes:
    ax = fig.add_subplot(spec)
    ax.axis("off")
    return ax


def _legends_together(ax: plt.Axes, legends: list[dict], stack: bool = False, gap: float = 0.04) -> None:
    """Several legends as one block at the top of the (hidden) axes `ax`: in a row centred as a group, or
    with `stack` one under the other, centred."""
    fig = ax.figure
    fig.canvas.draw()  # lay out the figure, so that legend sizes can be measured
    made, sizes = [], []
    for kw in legends:
        handles = kw.pop("handles")
        leg = Legend(ax, handles, [h.get_label() for h in handles], loc="upper left", bbox_to_anchor=(0.0, 1.0),
                     frameon=False, borderaxespad=0.0, **kw)
        ax.add_artist(leg)
        bbox = leg.get_window_extent(fig.canvas.get_renderer()).transformed(ax.transAxes.inverted())
        made.append(leg)
        sizes.append((bbox.width, bbox.height))
    x = max(0.0, (1.0 - sum(w for w, _ in sizes) - gap * (len(sizes) - 1)) / 2)
    y = 1.0
    for leg, (w, h) in zip(made, sizes):
        leg.set_bbox_to_anchor((max(0.0, (1.0 - w) / 2) if stack else x, y), transform=ax.transAxes)
        x += w + gap
        y -= (h + gap) if stack else 0.0


def _equal_scale_limits(coords: np.ndarray, margin: float = 0.05) -> tuple[list[tuple[float, float]], float]:
    """(x and y limits, height/width ratio) showing `coords` [N, 2] at one scale on both axes, the ratio
    kept between 0.45 and 1 so that a long thin embedding still gets a readable panel."""
    lo, hi = coords.min(0).astype(float), coords.max(0).astype(float)
    span = np.maximum(hi - lo, 1e-6) * (1 + 2 * margin)
    ratio = float(np.clip(span[1] / span[0], 0.45, 1.0))
    xs, ys = (span[0], span[0] * ratio) if span[1] <= span[0] * ratio else (span[1] / ratio, span[1])
    mid = (lo + hi) / 2
    return [(mid[0] - xs / 2, mid[0] + xs / 2), (mid[1] - ys / 2, mid[1] + ys / 2)], ratio


def _fit_ylim(ax: plt.Axes, values: Sequence[float]) -> None:
    """A y-range around the data (and reference levels), not from 0: differences between runs stay visible."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    # At least 5% of the level itself: a spread of hundredths of a pixel is drawn as the flat line it is.
    span = max(hi - lo, 0.05 * max(abs(lo), abs(hi)), 1e-6)
    mid, half = (lo + hi) / 2, 0.54 * span
    ax.set_ylim(mid - half, mid + half)


# --------------------------------------------------------------------------------------------------------------
# mean attention distance


def _uniform_levels(r: MADResult) -> list[float]:
    """Per layer/block: the distance uniform attention over that layer's grid would give."""
    return [uniform_distance(tuple(g), tuple(s)) if g and g[0] else 0.0 for g, s in zip(r.grid, r.stride)]


@styled
def mad_figure(results: list[MADResult], title: str | None = None, width: str = "auto") -> Figure:
    """One panel per model kind (ViT: heads per layer; CNN: residual blocks), every run in its own colour and
    marker, the same in both panels, and the uniform-attention level of the grid used as a dotted line.

    ViT: a small dot per head (runs side by side within a layer) and the mean over heads as a line with
    markers. CNN: one point per block. The legend under each panel names run, mode and model as built.
    """
    kinds = [k for k in ("vit", "cnn") if any(r.kind == k for r in results)]
    w = figure_width(width, len(kinds))
    stacked = w < WIDTHS["page"] and len(kinds) > 1
    styles = run_styles([(r.run or r.label, r.mode) for r in results])
    entries = {k: sum(1 for r in results if r.kind == k) for k in kinds}
    leg_h = [0.2 + 0.22 * (entries[k] + 1) for k in kinds]  # inches: two lines per entry, one reference line
    plot_h = 1.9 if stacked or len(kinds) == 1 else 2.2
    if stacked:
        heights = [h for k, lh in zip(kinds, leg_h) for h in (plot_h, lh)]
        fig = plt.figure(figsize=(w, sum(heights) + 0.3), layout="constrained")
        grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
        cells = [(grid[2 * i, 0], grid[2 * i + 1, 0]) for i in range(len(kinds))]
    else:
        heights = [plot_h, max(leg_h)]
        fig = plt.figure(figsize=(w, sum(heights) + 0.3), layout="constrained")
        grid = fig.add_gridspec(2, len(kinds), height_ratios=heights)
        cells = [(grid[0, i], grid[1, i]) for i in range(len(kinds))]
    for kind, (plot_cell, legend_cell) in zip(kinds, cells):
        ax = fig.add_subplot(plot_cell)
        rank = list(styles)
        group = sorted((r for r in results if r.kind == kind), key=lambda r: rank.index(r.run or r.label))
        handles, values, seen = [], [], {}
        spread = 0.5 / max(1, len(group))
        for j, r in enumerate(group):
            run = r.run or r.label
            st = styles[run]
            second = seen.get(run, 0)  # a run with two models of one kind (a homogeneous pair): dashed, open marker
            seen[run] = second + 1
            line = dict(color=st.colour, marker=st.marker, ms=3.6, lw=1.1, ls="--" if second else "-",
                        mfc="white" if second else st.colour, mew=0.8)
            d = np.asarray(r.distances, dtype=float)
            xs = np.arange(1, len(d) + 1, dtype=float)
            if kind == "vit":
                off = (j - (len(group) - 1) / 2) * spread if len(group) > 1 else 0.0
                ax.scatter(np.repeat(xs + off, d.shape[1]), d.ravel(), s=4, color=st.colour, alpha=0.45,
                           edgecolors="none", zorder=2)
                ax.plot(xs + off, d.mean(1), zorder=3, **line)
            else:
                ax.plot(xs, d[:, 0], zorder=3, **line)
            values += d.ravel().tolist()
            handles.append(Line2D([], [], **line, label=f"{run_label(run, r.mode)}\n{r.arch or r.label}"))
        refs: dict[tuple, list[float]] = {}
        for r in group:
            refs.setdefault(tuple(map(tuple, r.grid)), _uniform_levels(r))
        for i, (grids, level) in enumerate(refs.items()):
            xs = np.arange(1, len(level) + 1)
            if kind == "vit":
                ax.axhline(level[0], zorder=1, **REFERENCE)
                what = f"{grids[0][0]}×{grids[0][1]} patch grid"
            else:
                ax.plot(xs, level, zorder=1, **REFERENCE)
                what = "each block's grid"
            values += level
            if i == 0 or kind == "vit":
                handles.append(Line2D([], [], **REFERENCE, label=f"uniform attention ({what})"))
        _fit_ylim(ax, values)
        n = max(len(r.distances) for r in group)
        ax.set_xticks(range(1, n + 1, 1 if n <= 16 else 2))
        ax.set_xlim(0.5, n + 0.5)
        ax.set_xlabel("layer" if kind == "vit" else "residual block")
        ax.set_ylabel("mean attention distance (px)")
        sizes = ", ".join(f"{s} px" for s in sorted({r.image_size for r in group}))
        ax.set_title(f"ViT: heads (dots) and their mean, {sizes}" if kind == "vit" else f"CNN: blocks, {sizes}")
        ax.grid(alpha=0.35)
        ax.spines[["top", "right"]].set_visible(False)
        _legend_axes(fig, legend_cell).legend(handles=handles, loc="upper center", frameon=False, ncol=1,
                                              handlelength=2.4, borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    return fig


def plot_mad(results: list[MADResult], out_stem: Path, title: str | None = None, width: str = "auto"
             ) -> dict[str, Path]:
    """mad_figure written as PNG, PDF and SVG -> {format: path}."""
    return save_figure(mad_figure(results, title, width), out_stem)


# --------------------------------------------------------------------------------------------------------------
# t-SNE


@styled
def tsne_figure(coords: np.ndarray, labels: np.ndarray, model_ids: np.ndarray, class_names: list[str],
                model_names: list[str], title: str | None = None, *, panels: list[str] | None = None,
                panel_of_model: Sequence[int] | None = None, marker_of_model: Sequence[int] | None = None,
                width: str = "auto") -> Figure:
    """coords [N, 2], labels [N] (index into class_names), model_ids [N] (index into model_names).

    A colour per class, a marker per model. `panels` (titles) with `panel_of_model` split the models over
    panels side by side that share one embedding and one pair of axes ranges (Fig. 4: independent left,
    MOKD right); `marker_of_model` gives the models of different panels the same marker (net1 circles,
    net2 triangles). The class and the model legends sit together under the panels.
    """
    import seaborn as sns

    n_models = len(model_names)
    panels = panels or [title or "t-SNE"]
    panel_of_model = list(panel_of_model) if panel_of_model is not None else [0] * n_models
    marker_of_model = list(marker_of_model) if marker_of_model is not None else list(range(n_models))
    palette = sns.color_palette("tab10" if len(class_names) <= 10 else "husl", len(class_names))
    w = figure_width(width, len(panels))
    side = (w - 0.15 * (len(panels) - 1)) / len(panels)
    stack = w < WIDTHS["page"]  # a column: the model legend goes under the class legend
    ncol = min(5 if len(panels) > 1 else 3, len(class_names))
    class_rows, model_rows = -(-len(class_names) // ncol), len(set(marker_of_model))
    leg_h = 0.6 + 0.14 * (class_rows + model_rows) if stack else 0.35 + 0.14 * max(class_rows, model_rows)
    lims, ratio = _equal_scale_limits(coords)
    height = side * ratio
    fig = plt.figure(figsize=(w, height + leg_h + (0.45 if title and len(panels) > 1 else 0.25)), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[height, leg_h])
    axes = []
    for p, ptitle in enumerate(panels):
        ax = fig.add_subplot(grid[0, p])
        axes.append(ax)
        for m in (m for m in range(n_models) if panel_of_model[m] == p):
            for c in range(len(class_names)):
                sel = (model_ids == m) & (labels == c)
                if sel.any():
                    ax.scatter(coords[sel, 0], coords[sel, 1], s=18, color=palette[c], alpha=0.85,
                               marker=MARKERS[marker_of_model[m] % len(MARKERS)], edgecolors="white", linewidths=0.3)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set(xlim=lims[0], ylim=lims[1])  # one embedding: the same ranges, at one scale, in every panel
        ax.set_box_aspect(ratio)
        ax.set_title(ptitle if len(panels) == 1 else f"({chr(97 + p)}) {ptitle}")
    markers: dict[int, list[str]] = {}
    for m, name in enumerate(model_names):
        names = markers.setdefault(marker_of_model[m], [])
        if name not in names:
            names.append(name)
    class_handles = [Line2D([], [], ls="", marker="o", ms=4.5, color=palette[c], label=n)
                     for c, n in enumerate(class_names)]
    model_handles = [Line2D([], [], ls="", marker=MARKERS[k % len(MARKERS)], ms=5, color="0.25", label=" / ".join(v))
                     for k, v in sorted(markers.items())]
    leg_ax = _legend_axes(fig, grid[1, :])
    _legends_together(leg_ax, [dict(handles=class_handles, title="class", ncol=ncol, columnspacing=0.8, handletextpad=0.2),
                               dict(handles=model_handles, title="model", handletextpad=0.3)], stack=stack)
    if title and len(panels) > 1:
        fig.suptitle(title)
    return fig


def plot_tsne(coords: np.ndarray, labels: np.ndarray, model_ids: np.ndarray, class_names: list[str],
              model_names: list[str], out_stem: Path, title: str | None = None, **kw) -> dict[str, Path]:
    """tsne_figure written as PNG, PDF and SVG -> {format: path}."""
    return save_figure(tsne_figure(coords, labels, model_ids, class_names, model_names, title, **kw), out_stem)


def save_figure(fig: Figure, out_stem: Path, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """Write `fig` as out_stem.{png,pdf,svg} at its own size (no tight crop, so the width stays that of a
    column or a page) and close it -> {format: path}."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {f: out_stem.with_suffix(f".{f}") for f in formats}
    with plt.rc_context(STYLE):
        for f, p in paths.items():
            fig.savefig(p, metadata={"Creator": "mokd"} if f in ("pdf", "svg") else None)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------------------------
# CKA, attention maps, eigenspectra (figures of the numbers that mokd analyze cka | attention | rank write)


@styled
def cka_figure(matrix: np.ndarray, names_a: list[str], names_b: list[str], label_a: str, label_b: str,
               title: str | None = None, width: str = "auto") -> Figure:
    """Linear CKA between every layer of A (rows) and of B (columns) as a heatmap on a fixed 0-1 scale, so two
    figures compare by colour; the values are printed in the cells when there is room."""
    import seaborn as sns

    m = np.asarray(matrix, dtype=float)
    w = figure_width(width, 1 if max(m.shape) <= 12 else 2)
    cell = min(0.32, (w - 1.6) / max(m.shape[1], 1))
    fig, ax = plt.subplots(figsize=(w, max(1.8, cell * m.shape[0] + 1.4)), layout="constrained")
    annotate = max(m.shape) <= 12
    sns.heatmap(m, ax=ax, vmin=0.0, vmax=1.0, cmap="magma", square=False, annot=annotate, fmt=".2f",
                annot_kws={"fontsize": 4.5}, xticklabels=names_b, yticklabels=names_a, linewidths=0.0,
                cbar_kws={"label": "linear CKA", "shrink": 0.8})
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    ax.tick_params(axis="x", labelrotation=90, labelsize=5.5)
    ax.tick_params(axis="y", labelrotation=0, labelsize=5.5)
    if title:
        ax.set_title(title)
    return fig


def plot_cka(matrix: np.ndarray, names_a: list[str], names_b: list[str], label_a: str, label_b: str,
             out_stem: Path, title: str | None = None, width: str = "auto") -> dict[str, Path]:
    """cka_figure written as PNG, PDF and SVG -> {format: path}."""
    return save_figure(cka_figure(matrix, names_a, names_b, label_a, label_b, title, width), out_stem)


def _upsampled(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map [h, w] bilinearly resized to the image's size and scaled to 0-1 (each map on its own scale)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


@styled
def attention_figure(images: np.ndarray, panels: list[tuple[str, str, np.ndarray]], title: str | None = None
                     ) -> Figure:
    """A grid: one row per image, the image first, then one column per panel (model and map: rollout, head h,
    feature norm), the columns of one model grouped under its label. images [n, S, S, 3] in 0-1; panels: (model
    label, map name, maps [n, h, w]). Each map is upsampled to the image and drawn on its own 0-1 scale over a
    faded copy of the image."""
    n, cols = images.shape[0], 1 + len(panels)
    side = min(0.9, WIDTHS["page"] / cols)
    groups: list[tuple[str, list[tuple[str, np.ndarray]]]] = [("", [])]  # the images' own column first
    for label, what, maps in panels:
        if groups[-1][0] != label or len(groups) == 1:
            groups.append((label, []))
        groups[-1][1].append((what, maps))
    fig = plt.figure(figsize=(side * cols, side * n + 0.75), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(1, len(groups), width_ratios=[max(1, len(g[1])) for g in groups],
                                           wspace=0.02))
    for sub, (label, maps_of) in zip(subfigs, groups):
        ncol = max(1, len(maps_of))
        axes = sub.subplots(n, ncol, squeeze=False)
        # a one-column group gets its label on two lines, so that it does not reach over its neighbours; every
        # group's title has two lines, so that the rows of images line up across groups
        two = label.replace(" ", "\n", 1) if ncol == 1 and " " in label else f"{label}\n\u200b"
        sub.suptitle(two, fontsize=6.5)
        for r in range(n):
            img = images[r]
            if not maps_of:
                axes[r, 0].imshow(img)
                if r == 0:
                    axes[r, 0].set_title("image", fontsize=5.5)
            for c, (what, maps) in enumerate(maps_of):
                ax = axes[r, c]
                ax.imshow(img.mean(-1), cmap="gray", vmin=0, vmax=1, alpha=0.5)
                ax.imshow(_upsampled(maps[r], img.shape[:2]), cmap="inferno", vmin=0, vmax=1, alpha=0.75)
                if r == 0:
                    ax.set_title(what, fontsize=5.5)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def plot_attention(images: np.ndarray, panels: list[tuple[str, str, np.ndarray]], out_stem: Path,
                   title: str | None = None) -> dict[str, Path]:
    """attention_figure written as PNG, PDF and SVG -> {format: path}."""
    return save_figure(attention_figure(images, panels, title), out_stem)


@styled
def rank_figure(spectra: list[np.ndarray], labels: list[str], scores: list[dict], title: str | None = None,
                width: str = "auto") -> Figure:
    """Each model's covariance eigenspectrum (normalised by its largest eigenvalue) against the index, log-log,
    with the fitted power law k^-alpha dotted over the range it was fitted on (scores' `alpha_fit` first..last);
    the legend gives RankMe, RankMe of the centred features and alpha-ReQ, and says COLLAPSED where rank_scores
    flagged it. A collapsed embedding drops off at once; a steeper line is a larger alpha."""
    fig, ax = plt.subplots(figsize=(figure_width(width, 1), 2.3 + 0.14 * len(labels)), layout="constrained")
    for i, (lam, label, s) in enumerate(zip(spectra, labels, scores)):
        lam = np.asarray(lam, dtype=float)
        lam = lam[lam > EIG_FLOOR * lam.max()] if lam.size and lam.max() > 0 else lam[:0]  # the non-zero ones
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        alpha = s.get("alpha_req")
        centred = f" (centred {s['rankme_centered']:.1f})" if s.get("rankme_centered") is not None else ""
        text = f"{label}: RankMe {s['rankme']:.1f}{centred}, α " + ("n/a" if alpha is None else f"{alpha:.2f}")
        if s.get("collapsed"):
            text += ", COLLAPSED"
        if lam.size == 0:
            continue
        k = np.arange(1, lam.size + 1)
        ax.loglog(k, lam / lam[0], color=colour, lw=1.1, label=text)
        fit = s.get("alpha_fit") or {}
        if alpha is not None and fit.get("last"):
            # the weighted least-squares intercept: the 1/k-weighted mean of log lambda + alpha log k over the range
            kk = np.arange(fit["first"], fit["last"] + 1)
            w = 1.0 / kk
            c = float(np.sum(w * (np.log(lam[kk - 1] / lam[0]) + alpha * np.log(kk))) / w.sum())
            ax.loglog(kk, np.exp(c) * kk ** -alpha, **{**REFERENCE, "color": colour, "lw": 0.8})
    ax.set_xlabel("eigenvalue index k")
    ax.set_ylabel("eigenvalue / largest")
    ax.grid(alpha=0.35, which="both")
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(frameon=False, loc="outside lower center", fontsize=5.5)  # under the axes, never on the data
    if title:
        ax.set_title(title)
    return fig


def plot_rank(spectra: list[np.ndarray], labels: list[str], scores: list[dict], out_stem: Path,
              title: str | None = None, width: str = "auto") -> dict[str, Path]:
    """rank_figure written as PNG, PDF and SVG -> {format: path}."""
    return save_figure(rank_figure(spectra, labels, scores, title, width), out_stem)
