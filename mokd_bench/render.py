"""Step 3, render: OUT/report.md, a self-contained OUT/report.html, OUT/report.csv and OUT/figures/, from the
records under OUT/records and the run's status (failures, protocols planned out) alone, so a report can be
redrawn without computing anything.

Tables: a summary (one row per model, one headline column per protocol), k-NN per k, linear probe, rank scores,
the CKA matrix, and provenance (one row per record: parameters, seed, precision, device, checkpoint sha256,
format and load report, version and commit, library versions, wall time, deviations from the published
protocol). Figures: every model's mean attention distance curve in one figure, and the CKA heatmap.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from mokd_bench.protocols import PROTOCOLS
from mokd_bench.run import RECORDS, STATUS
from mokd_eval.report import PROVENANCE_COLUMNS, _flatten, _fmt, headline, markdown_table, provenance_cells

Table = tuple[list[str], list[list[Any]]]
BULKY_METRICS = ("result", "layer_mean", "distances", "labels", "grid", "notes")  # in the JSON, not the CSV


def label_of(r: dict) -> str:
    c = r.get("checkpoint") or {}
    return str(c.get("label") or c.get("name") or Path(str(c.get("path", "?"))).stem)


def load_bench(out: str | Path, job_ids: set[str] | None = None) -> tuple[list[dict], dict]:
    """The bench's records (only those of `job_ids` when given) and the last run's status."""
    from mokd_eval.records import scan_records

    out = Path(out)
    records = scan_records(out / RECORDS)[0] if (out / RECORDS).is_dir() else []
    if job_ids is not None:
        records = [r for r in records if (r.get("bench") or {}).get("job") in job_ids]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    records.sort(key=lambda r: ((r.get("bench") or {}).get("entry", 0), label_of(r), order.get(r["task"], 99)))
    try:
        status = json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    return records, status


def _models(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(label_of(r) for r in records))


def summary_table(records: list[dict]) -> Table:
    """One row per model: its architecture and format, then each protocol's headline (rank: RankMe, alpha-ReQ)."""
    tasks = [p for p in PROTOCOLS if any(r["task"] == p for r in records)]
    by = {(label_of(r), r["task"]): r for r in records}
    headers = ["model", "arch", "format"]
    for t in tasks:
        headers += [PROTOCOLS[t].headline] + (["alpha-ReQ"] if t == "rank" else [])
    rows = []
    for label in _models(records):
        c = next(r for r in records if label_of(r) == label).get("checkpoint") or {}
        row = [label, c.get("name") or c.get("arch"), c.get("format")]
        for t in tasks:
            r = by.get((label, t))
            row.append((knn_headline(r) if t == "knn" else headline(r)[1]) if r else None)
            if t == "rank":
                row.append(r["metrics"].get("alpha_req") if r else None)
        rows.append(row)
    return headers, rows


def knn_headline(record: dict) -> float | str | None:
    """k = 20, DINO's published k, not the best k on val (choosing k on the evaluation split is tuning on it);
    without a k = 20 result, the best k, named."""
    m = record["metrics"]
    if "20" in m["top1"]:
        return m["top1"]["20"]
    return f"{m['best_top1']:.2f} (best k={m['best_k']})" if m.get("best_top1") is not None else None


def knn_table(records: list[dict]) -> Table | None:
    knn = [r for r in records if r["task"] == "knn"]
    if not knn:
        return None
    ks = sorted({int(k) for r in knn for k in r["metrics"]["top1"]})
    rows = [[label_of(r)] + [_pair(r["metrics"]["top1"].get(str(k)), r["metrics"]["top5"].get(str(k))) for k in ks]
            + [r["metrics"].get("best_k")] for r in knn]
    return ["model"] + [f"k={k} top-1 / top-5" for k in ks] + ["best k"], rows


def _pair(a: Any, b: Any) -> str:
    return "-" if a is None else f"{a:.2f} / {b:.2f}" if b is not None else f"{a:.2f}"


def linear_table(records: list[dict]) -> Table | None:
    lin = [r for r in records if r["task"] == "linear"]
    if not lin:
        return None
    rows = [[label_of(r), r["metrics"].get("top1"), r["metrics"].get("top5"), r["metrics"].get("best_lr"),
             r["metrics"].get("holdout_top1"), r["settings"].get("feature_dim")] for r in lin]
    return ["model", "top-1 (%)", "top-5 (%)", "chosen base lr", "held-out top-1 (%)", "feature dim"], rows


def rank_table(records: list[dict]) -> Table | None:
    rk = [r for r in records if r["task"] == "rank"]
    if not rk:
        return None
    rows = [[label_of(r), r["metrics"].get("rankme"), r["metrics"].get("alpha_req"), r["metrics"].get("n"),
             r["metrics"].get("dim")] for r in rk]
    return ["model", "RankMe", "alpha-ReQ", "images", "dim"], rows


def cka_matrix(records: list[dict]) -> tuple[list[str], list[list[float | None]]] | None:
    """(labels, matrix) from the cka records' rows; None without them."""
    ck = [r for r in records if r["task"] == "cka"]
    if not ck:
        return None
    labels = list(dict.fromkeys(x for r in ck for x in r["metrics"].get("labels", [])))
    rows = {label_of(r): r["metrics"].get("cka", {}) for r in ck}
    return labels, [[rows.get(a, {}).get(b) for b in labels] for a in labels]


def provenance_rows(records: list[dict]) -> Table:
    rows = [[label_of(r), r["task"]] + [provenance_cells(r)[k] for k in PROVENANCE_COLUMNS] for r in records]
    return ["model", "protocol", *PROVENANCE_COLUMNS], rows


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


def draw_figures(records: list[dict], out: Path) -> dict[str, Path]:
    """Every figure the records support, as PNG (and PDF, SVG) under OUT/figures -> {name: png path}."""
    from mokd_analysis.plots import plot_mad, save_figure

    figs: dict[str, Path] = {}
    mads = mad_results(records)
    if mads:
        spec = next(r for r in records if r["task"] == "mad")["data"]
        figs["mad"] = plot_mad(mads, out / "figures" / "mad",
                               title=f"Mean attention distance ({spec.get('num_images')} images of {spec.get('spec')})"
                               )["png"]
    cka = cka_matrix(records)
    if cka:
        figs["cka"] = save_figure(cka_figure(*cka), out / "figures" / "cka")["png"]
    return figs


# --------------------------------------------------------------------------------------------------------------
# documents


def sections(records: list[dict], status: dict) -> list[tuple[str, Table | str | None]]:
    """The report's sections, in order: (title, table or text)."""
    out: list[tuple[str, Table | str | None]] = [("Summary", summary_table(records))]
    for title, table in (("k-NN (%)", knn_table(records)), ("Linear probe", linear_table(records)),
                         ("Rank (no labels)", rank_table(records))):
        if table:
            out.append((title, table))
    cka = cka_matrix(records)
    if cka:
        out.append(("Linear CKA between final embeddings", (["model", *cka[0]],
                                                           [[a, *row] for a, row in zip(cka[0], cka[1])])))
    out.append(("Provenance", provenance_rows(records)))
    fails = status.get("failures") or []
    if fails:
        out.append(("Failures", (["checkpoint", "protocol", "reason"],
                                 [[f["checkpoint"], f.get("protocol") or "(load)", f["reason"]] for f in fails])))
    skipped = status.get("planned_out") or []
    if skipped:
        out.append(("Not run", (["checkpoint", "protocol", "reason"],
                                [[s["checkpoint"], s["protocol"], s["reason"]] for s in skipped])))
    return out


def _intro(records: list[dict], status: dict) -> str:
    data = status.get("data") or next((r["data"].get("spec") for r in records), "?")
    n_models = len(_models(records))
    fails = len(status.get("failures") or [])
    return (f"{len(records)} record(s) of {n_models} model(s) on {data}"
            + (f"; {fails} failure(s), listed below." if fails else "."))


def render_markdown(records: list[dict], status: dict, figures: dict[str, Path], out: Path) -> str:
    parts = ["# Bench report", "", _intro(records, status)]
    for title, body in sections(records, status):
        parts += ["", f"## {title}", ""]
        parts.append(body if isinstance(body, str) else markdown_table(*body))
        if title.startswith("Linear CKA") and "cka" in figures:
            parts += ["", f"![CKA]({figures['cka'].relative_to(out)})"]
    if "mad" in figures:
        parts += ["", "## Mean attention distance", "",
                  f"![mean attention distance]({figures['mad'].relative_to(out)})"]
    return "\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee}h2{margin-top:1.6em}"""


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(records: list[dict], status: dict, figures: dict[str, Path]) -> str:
    """One file, no external resource: tables as HTML, figures as base64 PNG."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mokd bench report</title>',
             f"<style>{CSS}</style></head><body>", "<h1>Bench report</h1>",
             f"<p>{html.escape(_intro(records, status))}</p>"]
    for title, body in sections(records, status):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<p>{html.escape(body)}</p>" if isinstance(body, str) else _html_table(*body))
        if title.startswith("Linear CKA") and "cka" in figures:
            parts.append(_img(figures["cka"], "linear CKA heatmap"))
    if "mad" in figures:
        parts += ["<h2>Mean attention distance</h2>", _img(figures["mad"], "mean attention distance")]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_csv(records: list[dict]) -> str:
    """One row per record: model, protocol, headline, provenance, then the numeric metrics flattened."""
    rows = []
    for r in records:
        name, value = headline(r)
        row = {"model": label_of(r), "protocol": r["task"], "metric": name, "value": value,
               "checkpoint": (r.get("checkpoint") or {}).get("path"),
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
    """Write OUT/report.md, report.html, report.csv and the figures -> {kind: path}."""
    out = Path(out)
    records, status = load_bench(out, job_ids)
    figures = draw_figures(records, out)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "report.csv"}
    paths["md"].write_text(render_markdown(records, status, figures, out))
    paths["html"].write_text(render_html(records, status, figures))
    paths["csv"].write_text(render_csv(records))
    return {**paths, **{f"figure:{k}": v for k, v in figures.items()}}
