"""Step 3, render: OUT/report.md, a self-contained OUT/report.html, OUT/report.csv and OUT/figures/, from the
records under OUT/records and the run's status (failures, protocols planned out) alone, so a report can be
redrawn without computing anything.

Tables: per protocol, checkpoints x data sets with a mean column and an average rank column (`cross_table`:
rank 1 is best within a data set, ties share the average of their ranks, and a missing cell is left out: a
checkpoint's mean and average rank are over the data sets it has a number for, and the table says how many);
a summary (one row per model and data set, one headline column per protocol); k-NN per k, linear probe,
many-shot logistic regression, few-shot, rank scores, the CKA matrix per data set; and provenance (one row per
record: parameters, seed, precision, device, checkpoint sha256, format and load report, version and commit,
library versions, wall time, deviations from the published protocol). Every number of the cross tables links to
its record (records/NAME.json), which holds the settings. Figures: each ranked table's ranks as a heatmap
(checkpoints x data sets, as CLIP_benchmark's rank plots), every model's mean attention distance curve, and the
CKA heatmap. report.csv is long: one row per number (checkpoint, dataset, protocol, metric, value, record);
records.csv has one row per record with its provenance.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from mokd_bench.protocols import PROTOCOLS
from mokd_bench.run import RECORDS, STATUS
from mokd_eval.report import PROVENANCE_COLUMNS, _flatten, _fmt, headline, markdown_table, provenance_cells

Table = tuple[list[str], list[list[Any]]]
BULKY_METRICS = ("result", "layer_mean", "distances", "labels", "grid", "notes")  # in the JSON, not the CSV


def label_of(r: dict) -> str:
    c = r.get("checkpoint") or {}
    return str(c.get("label") or c.get("name") or Path(str(c.get("path", "?"))).stem)


def dataset_of(r: dict) -> str:
    """The data set's column name: the bench's (unique within a bench), else a reader's name for its spec."""
    from mokd.naming import data_name

    d = r.get("data") or {}
    return str((r.get("bench") or {}).get("dataset") or d.get("name") or data_name(d.get("spec")))


class Cell:
    """A number in a table with the record it comes from: Markdown `[72.31](records/x.json)`, an HTML link."""

    def __init__(self, value: Any, link: str | None = None, text: str | None = None):
        self.value, self.link, self.text = value, link, text

    def shown(self) -> str:
        return self.text if self.text is not None else _fmt(self.value)

    def __str__(self) -> str:
        return f"[{self.shown()}]({self.link})" if self.link and self.value is not None else self.shown()


def record_link(r: dict) -> str | None:
    """records/NAME.json, relative to the bench's output folder (where report.md and report.html are)."""
    f = r.get("_file")
    return f"{RECORDS}/{Path(f).name}" if f else None


def load_bench(out: str | Path, job_ids: set[str] | None = None) -> tuple[list[dict], dict]:
    """The bench's records (only those of `job_ids` when given) and the last run's status."""
    from mokd_eval.records import scan_records

    out = Path(out)
    records = scan_records(out / RECORDS)[0] if (out / RECORDS).is_dir() else []
    if job_ids is not None:
        records = [r for r in records if (r.get("bench") or {}).get("job") in job_ids]
    try:
        status = json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    data_order = {d.get("name"): i for i, d in enumerate(status.get("datasets") or []) if isinstance(d, dict)}
    records.sort(key=lambda r: ((r.get("bench") or {}).get("entry", 0), label_of(r),
                                data_order.get(dataset_of(r), 99), order.get(r["task"], 99)))
    return records, status


def _models(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(label_of(r) for r in records))


def _datasets(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(dataset_of(r) for r in records))  # records come sorted by the bench's data order


def summary_table(records: list[dict]) -> Table:
    """One row per (model, data set): architecture and format, then each protocol's headline (rank: RankMe,
    alpha-ReQ; few-shot: the headline shot)."""
    tasks = [p for p in PROTOCOLS if any(r["task"] == p for r in records)]
    by = {(label_of(r), dataset_of(r), r["task"]): r for r in records}
    headers = ["model", "data", "arch", "format"]
    for t in tasks:
        headers += [SUMMARY_HEADERS.get(t, PROTOCOLS[t].headline)] + (["alpha-ReQ"] if t == "rank" else [])
    rows = []
    for label in _models(records):
        c = next(r for r in records if label_of(r) == label).get("checkpoint") or {}
        for data in _datasets([r for r in records if label_of(r) == label]):
            row = [label, data, c.get("name") or c.get("arch"), c.get("format")]
            for t in tasks:
                r = by.get((label, data, t))
                if r is None:
                    row.append(None)
                else:
                    row.append(knn_headline(r) if t == "knn" else fewshot_headline(r) if t == "fewshot"
                               else headline(r)[1])
                if t == "rank":
                    row.append(r["metrics"].get("alpha_req") if r else None)
            rows.append(row)
    return headers, rows


SUMMARY_HEADERS = {"linear": "linear top-1 (%), fast probe", "logreg": "logreg (data set's metric)",
                   "fewshot": "few-shot (%), 5-shot or the first"}


# --------------------------------------------------------------------------------------------------------------
# checkpoints x data sets, with mean and average rank


@dataclass(frozen=True)
class Measure:
    """One number per record of a protocol, ranked across checkpoints within each data set when `better` says
    which way (None: shown, not ranked; MAD and CKA are descriptions, not scores)."""
    key: str
    task: str
    title: str
    value: Callable[[dict], float | None]
    better: str | None = "higher"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def knn_k20(r: dict) -> float | None:
    """k = 20 only: a table ranks like with like, so a record without k = 20 is a missing cell."""
    return _num((r["metrics"].get("top1") or {}).get("20"))


FEWSHOT_KEY = re.compile(r"^(?:\d+way_)?(\d+)_?shot$")  # "5way_1shot" (mokd_eval.fewshot), "1shot"


def fewshot_shots(metrics: dict) -> dict[int, tuple[float | None, float | None]]:
    """{shot: (mean %, 95% half-width)} from a few-shot record's metrics ("{ways}way_{K}shot": {mean, ci95})."""
    out = {}
    for key, v in metrics.items():
        hit = FEWSHOT_KEY.match(str(key))
        if hit and isinstance(v, dict):
            out[int(hit[1])] = (_num(v.get("mean")), _num(v.get("ci95")))
    return dict(sorted(out.items()))


def fewshot_headline(r: dict) -> float | None:
    """The mean accuracy of the setting the record names as its headline (5-shot when run), else its first."""
    shots = fewshot_shots(r["metrics"])
    hit = FEWSHOT_KEY.match(str(r["metrics"].get("headline", "")))
    k = int(hit[1]) if hit and int(hit[1]) in shots else next(iter(shots), None)
    return shots[k][0] if k is not None else None


def measures(records: list[dict]) -> list[Measure]:
    """The cross tables the records support, in PROTOCOLS order."""
    present = {r["task"] for r in records}
    out = []
    if "knn" in present:
        out.append(Measure("knn", "knn", PROTOCOLS["knn"].headline, knn_k20))
    if "linear" in present:
        out.append(Measure("linear", "linear", "Linear probe top-1 (%): the fast lr-grid probe on cached features, "
                           "not the paper's 100-epoch protocol", lambda r: _num(r["metrics"].get("top1"))))
    if "logreg" in present:
        out.append(Measure("logreg", "logreg", "Many-shot logistic regression: each data set's metric (top-1, mean "
                           "per-class accuracy or 11-point mAP, %)", lambda r: headline(r)[1]))
    if "fewshot" in present:
        shots = sorted({k for r in records if r["task"] == "fewshot" for k in fewshot_shots(r["metrics"])})
        for k in shots:
            ways = next((r["settings"].get("ways") for r in records if r["task"] == "fewshot"), None)
            out.append(Measure(f"fewshot-{k}", "fewshot", f"Few-shot {ways}-way {k}-shot accuracy (%), mean over "
                               f"episodes", lambda r, k=k: fewshot_shots(r["metrics"]).get(k, (None, None))[0]))
    if "rank" in present:
        out.append(Measure("rankme", "rank", "RankMe (uncentred, as published)",
                           lambda r: _num(r["metrics"].get("rankme"))))
        if any("rankme_centered" in r["metrics"] for r in records if r["task"] == "rank"):
            out.append(Measure("rankme-centred", "rank", "RankMe of the centred embedding",
                               lambda r: _num(r["metrics"].get("rankme_centered"))))
    if "mad" in present:
        out.append(Measure("mad", "mad", "Mean attention distance (px), not ranked",
                           lambda r: _num(r["metrics"].get("mean")), None))
    if "cka" in present:
        out.append(Measure("cka", "cka", "Mean linear CKA to the other checkpoints, not ranked",
                           lambda r: _num(r["metrics"].get("mean_cka_others")), None))
    return out


def average_ranks(values: dict[str, dict[str, float]], better: str = "higher") -> dict[str, dict[str, float]]:
    """{data set: {model: value}} -> {data set: {model: rank}}: rank 1 is the best value within a data set, tied
    values share the average of the ranks they span (1, 2.5, 2.5, 4)."""
    from scipy.stats import rankdata

    out = {}
    for data, by_model in values.items():
        models = list(by_model)
        v = [by_model[m] for m in models]
        ranks = rankdata([-x for x in v] if better == "higher" else v, method="average")
        out[data] = {m: float(r) for m, r in zip(models, ranks)}
    return out


MISSING_NOTE = ("Rank 1 is the best checkpoint on a data set; ties share the average of their ranks. A missing "
                "cell (-) is left out: a checkpoint's mean and average rank are over the data sets it has a number "
                "for (column `data sets`), ranked among the checkpoints with a number there.")


def cross_table(records: list[dict], m: Measure) -> tuple[Table, dict[str, dict[str, float]]]:
    """Checkpoints x data sets of measure `m`, each cell linked to its record, with `mean`, and (ranked
    measures) `avg rank` and `data sets` -> (table, {data set: {model: rank}})."""
    recs = [r for r in records if r["task"] == m.task]
    models, datasets = _models(recs), _datasets(recs)
    cells: dict[tuple[str, str], Cell] = {}
    values: dict[str, dict[str, float]] = {d: {} for d in datasets}
    for r in recs:
        v = m.value(r)
        cells[(label_of(r), dataset_of(r))] = Cell(v, record_link(r))
        if v is not None:
            values[dataset_of(r)][label_of(r)] = v
    ranks = average_ranks(values, m.better) if m.better else {}
    headers = ["model", *datasets, "mean"] + (["avg rank", "data sets"] if m.better else [])
    rows = []
    for label in models:
        mine = [values[d][label] for d in datasets if label in values[d]]
        row = [label, *[cells.get((label, d), Cell(None)) for d in datasets],
               sum(mine) / len(mine) if mine else None]
        if m.better:
            rk = [ranks[d][label] for d in datasets if label in ranks.get(d, {})]
            row += [sum(rk) / len(rk) if rk else None, f"{len(rk)}/{len(datasets)}"]
        rows.append(row)
    if m.better:
        rows.sort(key=lambda row: (row[-2] is None, row[-2] if row[-2] is not None else 0))
    return (headers, rows), ranks


def knn_headline(record: dict) -> float | str | None:
    """mokd report's headline rule (mokd_eval.report.knn_headline): k = 20, DINO's published k; without a k = 20
    result, the best k, named as such."""
    from mokd_eval.report import PUBLISHED_K, knn_headline as rule

    name, value = rule(record["metrics"])
    if value is None or name == f"top1 k={PUBLISHED_K}":
        return value
    return f"{value:.2f} (best k={record['metrics']['best_k']}, not 20)"


def knn_table(records: list[dict]) -> Table | None:
    knn = [r for r in records if r["task"] == "knn"]
    if not knn:
        return None
    ks = sorted({int(k) for r in knn for k in r["metrics"]["top1"]})
    rows = [[label_of(r), dataset_of(r)] + [_pair(r["metrics"]["top1"].get(str(k)), r["metrics"]["top5"].get(str(k)))
                                            for k in ks] + [r["metrics"].get("best_k")] for r in knn]
    return ["model", "data"] + [f"k={k} top-1 / top-5" for k in ks] + ["best k"], rows


def _pair(a: Any, b: Any) -> str:
    return "-" if a is None else f"{a:.2f} / {b:.2f}" if b is not None else f"{a:.2f}"


def linear_table(records: list[dict]) -> Table | None:
    lin = [r for r in records if r["task"] == "linear"]
    if not lin:
        return None
    rows = [[label_of(r), dataset_of(r), r["metrics"].get("top1"), r["metrics"].get("top5"),
             r["metrics"].get("best_lr"), r["metrics"].get("holdout_top1"), r["settings"].get("feature_dim")]
            for r in lin]
    return ["model", "data", "top-1 (%)", "top-5 (%)", "chosen base lr", "held-out top-1 (%)", "feature dim"], rows


def logreg_table(records: list[dict]) -> Table | None:
    """The chosen lambda (C = 1/lambda), split sizes and the solver's state per record."""
    lr = [r for r in records if r["task"] == "logreg"]
    if not lr:
        return None
    rows = []
    for r in lr:
        m, s = r["metrics"], r["settings"]
        name, value = headline(r)
        rows.append([label_of(r), dataset_of(r), name, value, m.get("lambda"), m.get("C"),
                     f"{s.get('fit_size')}/{s.get('val_size')}/{s.get('test_size')}", m.get("iterations"),
                     m.get("grad_norm"), m.get("converged")])
    return ["model", "data", "metric", "test (%)", "lambda", "C", "fit/val/test", "iterations", "grad norm",
            "converged"], rows


def fewshot_table(records: list[dict]) -> Table | None:
    fs = [r for r in records if r["task"] == "fewshot"]
    if not fs:
        return None
    shots = sorted({k for r in fs for k in fewshot_shots(r["metrics"])})
    rows = []
    for r in fs:
        got = fewshot_shots(r["metrics"])
        cells = [f"{got[k][0]:.2f} ± {got[k][1]:.2f}" if k in got and got[k][0] is not None and got[k][1] is not None
                 else (got[k][0] if k in got else None) for k in shots]
        rows.append([label_of(r), dataset_of(r), *cells, r["settings"].get("episodes")])
    ways = fs[0]["settings"].get("ways")
    return ["model", "data", *[f"{ways}-way {k}-shot (%, ± 95%)" for k in shots], "episodes"], rows


def rank_table(records: list[dict]) -> Table | None:
    """RankMe as published (uncentred) beside the centred one, alpha-ReQ, and the collapse flag when recorded."""
    rk = [r for r in records if r["task"] == "rank"]
    if not rk:
        return None
    centred = any("rankme_centered" in r["metrics"] for r in rk)
    flag = any("collapsed" in r["metrics"] for r in rk)
    rows = []
    for r in rk:
        m = r["metrics"]
        rows.append([label_of(r), dataset_of(r), m.get("rankme")] + ([m.get("rankme_centered")] if centred else [])
                    + [m.get("alpha_req")] + (["yes" if m.get("collapsed") else "no" if "collapsed" in m else None]
                                               if flag else []) + [m.get("n"), m.get("dim")])
    return (["model", "data", "RankMe (uncentred)"] + (["RankMe (centred)"] if centred else []) + ["alpha-ReQ"]
            + (["collapsed"] if flag else []) + ["images", "dim"]), rows


def cka_matrix(records: list[dict]) -> tuple[list[str], list[list[float | None]]] | None:
    """(labels, matrix) from the cka records' rows (of one data set); None without them."""
    ck = [r for r in records if r["task"] == "cka"]
    if not ck:
        return None
    labels = list(dict.fromkeys(x for r in ck for x in r["metrics"].get("labels", [])))
    rows = {label_of(r): r["metrics"].get("cka", {}) for r in ck}
    return labels, [[rows.get(a, {}).get(b) for b in labels] for a in labels]


def provenance_rows(records: list[dict]) -> Table:
    rows = [[label_of(r), dataset_of(r), r["task"], Cell(Path(str(r.get("_file"))).name, record_link(r))]
            + [provenance_cells(r)[k] for k in PROVENANCE_COLUMNS] for r in records]
    return ["model", "data", "protocol", "record", *PROVENANCE_COLUMNS], rows


# --------------------------------------------------------------------------------------------------------------
# figures


def mad_results(records: list[dict]) -> list:
    from mokd_analysis.mad import MADResult

    names = {f.name for f in fields(MADResult)}
    return [MADResult(**{k: v for k, v in r["metrics"]["result"].items() if k in names})
            for r in records if r["task"] == "mad" and isinstance(r["metrics"].get("result"), dict)]


def cka_figure(labels: Sequence[str], matrix: Sequence[Sequence[float | None]]):
    """Heatmap of a models x models CKA matrix, the value in each cell (seaborn, the figures' style)."""
    import numpy as np
    import seaborn as sns

    from mokd_analysis.plots import STYLE, WIDTHS, plt

    with plt.rc_context(STYLE):
        n = len(labels)
        side = min(WIDTHS["page"], max(WIDTHS["column"], 0.55 * n + 1.6))
        fig, ax = plt.subplots(figsize=(side, side * 0.85), layout="constrained")
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        sns.heatmap(values, ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", annot=True, fmt=".2f", square=True,
                    xticklabels=labels, yticklabels=labels, cbar_kws={"label": "linear CKA", "shrink": 0.8},
                    annot_kws={"fontsize": 6})
        ax.tick_params(axis="x", rotation=35)
        for t in ax.get_xticklabels():
            t.set_ha("right")
        ax.set_title("Linear CKA between final embeddings")
    return fig


def rank_figure(title: str, datasets: Sequence[str], models: Sequence[str], ranks: dict[str, dict[str, float]]):
    """Heatmap of each checkpoint's rank per data set (1 = best, darker), a mean-rank column at the right."""
    import numpy as np
    import seaborn as sns

    from mokd_analysis.plots import STYLE, WIDTHS, plt

    with plt.rc_context(STYLE):
        cols = [*datasets, "avg rank"]
        values = np.full((len(models), len(cols)), np.nan)
        for a, label in enumerate(models):
            mine = [ranks[d][label] for d in datasets if label in ranks.get(d, {})]
            for b, d in enumerate(datasets):
                values[a, b] = ranks.get(d, {}).get(label, np.nan)
            values[a, -1] = np.mean(mine) if mine else np.nan
        width = min(WIDTHS["page"], max(WIDTHS["column"], 0.55 * len(cols) + 1.8))
        fig, ax = plt.subplots(figsize=(width, 0.3 * len(models) + 1.2), layout="constrained")
        sns.heatmap(values, ax=ax, vmin=1, vmax=max(len(models), 2), cmap="viridis_r", annot=True, fmt=".1f",
                    xticklabels=cols, yticklabels=list(models), cbar_kws={"label": "rank (1 = best)", "shrink": 0.8},
                    annot_kws={"fontsize": 6}, linewidths=0.5, linecolor="white")
        ax.axvline(len(datasets), color="white", lw=2)
        ax.tick_params(axis="x", rotation=35)
        for t in ax.get_xticklabels():
            t.set_ha("right")
        ax.set_title(title)
    return fig


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "data"


def draw_figures(records: list[dict], out: Path) -> dict[str, Path]:
    """Every figure the records support, as PNG (and PDF, SVG) under OUT/figures -> {name: png path}: per ranked
    measure `ranks_<key>`, per data set `mad` and `cka` (suffixed `_<data set>` when the bench has several)."""
    from mokd_analysis.plots import plot_mad, save_figure

    figs: dict[str, Path] = {}
    for m in measures(records):
        if not m.better:
            continue
        (headers, rows), ranks = cross_table(records, m)
        if any(ranks.values()):
            datasets = [d for d in headers[1:-3]]
            figs[f"ranks_{m.key}"] = save_figure(rank_figure(f"Rank per data set: {m.title.split(':')[0]}", datasets,
                                                             [row[0] for row in rows], ranks),
                                                 out / "figures" / f"ranks_{m.key}")["png"]
    datasets = _datasets(records)
    for data in datasets:
        mine = [r for r in records if dataset_of(r) == data]
        suffix = "" if len(datasets) == 1 else f"_{_slug(data)}"
        mads = mad_results(mine)
        if mads:
            spec = next(r for r in mine if r["task"] == "mad")["data"]
            figs[f"mad{suffix}"] = plot_mad(
                mads, out / "figures" / f"mad{suffix}",
                title=f"Mean attention distance ({spec.get('num_images')} images of {data})")["png"]
        cka = cka_matrix(mine)
        if cka:
            figs[f"cka{suffix}"] = save_figure(cka_figure(*cka), out / "figures" / f"cka{suffix}")["png"]
    return figs


# --------------------------------------------------------------------------------------------------------------
# documents


Body = Table | str | None


def sections(records: list[dict], status: dict) -> list[tuple[str, Body, list[str]]]:
    """The report's sections, in order: (title, table or text, names of the figures that follow it)."""
    out: list[tuple[str, Body, list[str]]] = []
    datasets = _datasets(records)
    if any(m.better for m in measures(records)):
        out.append(("Checkpoints x data sets", MISSING_NOTE, []))
    for m in measures(records):
        table, _ = cross_table(records, m)
        out.append((m.title, table, [f"ranks_{m.key}"] if m.better else []))
    out.append(("Summary", summary_table(records), []))
    for title, table in (("k-NN (%)", knn_table(records)),
                         ("Linear probe (fast lr-grid probe on cached features)", linear_table(records)),
                         ("Many-shot logistic regression", logreg_table(records)),
                         ("Few-shot", fewshot_table(records)), ("Rank (no labels)", rank_table(records))):
        if table:
            out.append((title, table, []))
    for data in datasets:
        suffix = "" if len(datasets) == 1 else f"_{_slug(data)}"
        cka = cka_matrix([r for r in records if dataset_of(r) == data])
        if cka:
            title = "Linear CKA between final embeddings" + ("" if len(datasets) == 1 else f" ({data})")
            out.append((title, (["model", *cka[0]], [[a, *row] for a, row in zip(cka[0], cka[1])]),
                        [f"cka{suffix}"]))
    for data in datasets:
        suffix = "" if len(datasets) == 1 else f"_{_slug(data)}"
        if any(r["task"] == "mad" and dataset_of(r) == data for r in records):
            out.append(("Mean attention distance" + ("" if len(datasets) == 1 else f" ({data})"), None,
                        [f"mad{suffix}"]))
    out.append(("Provenance", provenance_rows(records), []))
    fails = status.get("failures") or []
    if fails:
        out.append(("Failures", (["checkpoint", "data", "protocol", "reason"],
                                 [[f["checkpoint"], f.get("dataset") or "-", f.get("protocol") or "(load)",
                                   f["reason"]] for f in fails]), []))
    skipped = status.get("planned_out") or []
    if skipped:
        out.append(("Not run", (["checkpoint", "data", "protocol", "reason"],
                                [[s["checkpoint"], s.get("dataset") or "-", s["protocol"], s["reason"]]
                                 for s in skipped]), []))
    return out


def _intro(records: list[dict], status: dict) -> str:
    data = ", ".join(_datasets(records)) or status.get("data") or "?"
    n_models = len(_models(records))
    fails = len(status.get("failures") or [])
    return (f"{len(records)} record(s) of {n_models} model(s) on {data}"
            + (f"; {fails} failure(s), listed below." if fails else ".")
            + " Each number links to its record (records/*.json), which holds its settings and provenance.")


def render_markdown(records: list[dict], status: dict, figures: dict[str, Path], out: Path) -> str:
    parts = ["# Bench report", "", _intro(records, status)]
    for title, body, figs in sections(records, status):
        parts += ["", f"## {title}"]
        if body is not None:
            parts += ["", body if isinstance(body, str) else markdown_table(*body)]
        for name in figs:
            if name in figures:
                parts += ["", f"![{name}]({figures[name].relative_to(out).as_posix()})"]
    return "\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee}h2{margin-top:1.6em}a{color:#0645ad;text-decoration:none}"""


def _html_cell(c: Any) -> str:
    if isinstance(c, Cell) and c.link and c.value is not None:
        return f'<a href="{html.escape(c.link)}">{html.escape(c.shown())}</a>'
    return html.escape(c.shown() if isinstance(c, Cell) else _fmt(c))


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(records: list[dict], status: dict, figures: dict[str, Path]) -> str:
    """One file, no external resource: tables as HTML (numbers linked to their records), figures as base64 PNG."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mokd bench report</title>',
             f"<style>{CSS}</style></head><body>", "<h1>Bench report</h1>",
             f"<p>{html.escape(_intro(records, status))}</p>"]
    for title, body, figs in sections(records, status):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if body is not None:
            parts.append(f"<p>{html.escape(body)}</p>" if isinstance(body, str) else _html_table(*body))
        parts += [_img(figures[name], name) for name in figs if name in figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


LONG_COLUMNS = ("checkpoint", "dataset", "protocol", "metric", "value", "record")


def render_csv(records: list[dict]) -> str:
    """Long form, one row per number: checkpoint (label), dataset, protocol, metric (the flattened metrics key,
    e.g. top1.20, shots.5.mean), value, record (records/NAME.json)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LONG_COLUMNS)
    for r in records:
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if k not in BULKY_METRICS}
        for name, value in _flatten(metrics).items():
            if _num(value) is not None:
                w.writerow([label_of(r), dataset_of(r), r["task"], name, value, record_link(r)])
    return buf.getvalue()


def render_records_csv(records: list[dict]) -> str:
    """One row per record: model, data set, protocol, headline, provenance, then the numeric metrics flattened."""
    rows = []
    for r in records:
        name, value = headline(r)
        row = {"model": label_of(r), "dataset": dataset_of(r), "protocol": r["task"], "metric": name, "value": value,
               "checkpoint": (r.get("checkpoint") or {}).get("path"), "record": record_link(r),
               **{f"provenance.{k}": v for k, v in provenance_cells(r).items()}}
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if k not in BULKY_METRICS}
        row.update({f"metrics.{k}": v for k, v in _flatten(metrics).items()})
        rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def render(out: str | Path, job_ids: set[str] | None = None) -> dict[str, Path]:
    """Write OUT/report.md, report.html, report.csv, records.csv and the figures -> {kind: path}."""
    out = Path(out)
    records, status = load_bench(out, job_ids)
    figures = draw_figures(records, out)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "report.csv",
             "records_csv": out / "records.csv"}
    paths["md"].write_text(render_markdown(records, status, figures, out))
    paths["html"].write_text(render_html(records, status, figures))
    paths["csv"].write_text(render_csv(records))
    paths["records_csv"].write_text(render_records_csv(records))
    return {**paths, **{f"figure:{k}": v for k, v in figures.items()}}
