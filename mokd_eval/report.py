"""`mokd report DIR`: result records rendered as Markdown and CSV tables.

Sections: all results (one row per record, with its headline figure), a per-k table for k-NN, and a
Table-1-style grid (pair x independent/MOKD x k-NN/linear, net1 and net2) for records of our own
checkpoints, whose `checkpoint` field carries `mode` and `pair`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from mokd.errors import UserError
from mokd_eval.records import read_records

HEADLINE = {"knn": "best_top1"}  # other tasks: metrics["headline"] names the key, else "top1"
GRID_TASKS = (("knn", "k-NN"), ("linear", "Linear"))
GRID_MODES = (("independent", "Independent"), ("mokd", "MOKD"))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style Markdown table, columns padded for reading in a terminal."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def headline(record: dict) -> tuple[str, float | None]:
    """(metric name, value) of a record's headline figure."""
    m = record.get("metrics", {})
    name = m.get("headline") or HEADLINE.get(record.get("task"), "top1")
    if not isinstance(m.get(name), (int, float)):
        name = next((k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)), name)
    v = m.get(name)
    return name, float(v) if isinstance(v, (int, float)) else None


def _ckpt_name(r: dict) -> str:
    c = r.get("checkpoint", {})
    return Path(str(c.get("path", "?"))).name


def _row(r: dict) -> dict:
    c, d = r.get("checkpoint", {}), r.get("data", {})
    name, value = headline(r)
    return {"task": r.get("task"), "checkpoint": _ckpt_name(r), "model": c.get("label"), "arch": c.get("arch"),
            "format": c.get("format"), "mode": c.get("mode"), "pair": c.get("pair"), "data": d.get("spec"),
            "metric": name, "value": value, "wall_time_s": r.get("wall_time_s"), "file": r.get("_file")}


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        return {prefix[:-1]: ";".join(map(str, d))}
    return {prefix[:-1]: d}


def render_markdown(records: list[dict]) -> str:
    parts = ["# Results", "", f"{len(records)} result record(s).", "", "## All results", ""]
    rows = [_row(r) for r in records]
    parts.append(markdown_table(["task", "checkpoint", "model", "arch", "data", "metric", "value (%)"],
                                [[x["task"], x["checkpoint"], x["model"], x["arch"], x["data"], x["metric"],
                                  x["value"]] for x in rows]))
    knn = [r for r in records if r.get("task") == "knn"]
    if knn:
        ks = sorted({int(k) for r in knn for k in r["metrics"].get("top1", {})})
        parts += ["", "## k-NN (top-1 / top-5, %)", ""]
        table = []
        for r in knn:
            m = r["metrics"]
            t1, t5 = m.get("top1", {}), m.get("top5", {})
            table.append([_ckpt_name(r), r["checkpoint"].get("label"), r.get("data", {}).get("spec")]
                         + [f"{t1[str(k)]:.2f} / {t5[str(k)]:.2f}" if str(k) in t1 else "-" for k in ks]
                         + [m.get("best_k")])
        parts.append(markdown_table(["checkpoint", "model", "data"] + [f"k={k}" for k in ks] + ["best k"], table))
    grid = table1_grid(records)
    if grid:
        parts += ["", "## Table 1: independent training vs MOKD (%)", "", grid]
    return "\n".join(parts) + "\n"


def table1_grid(records: list[dict]) -> str | None:
    """Rows: pair (net1 arch, net2 arch) and data; columns: task x mode x net, each the headline figure."""
    cells: dict[tuple, dict] = {}
    for r in records:
        c = r.get("checkpoint", {})
        if c.get("mode") not in dict(GRID_MODES) or not c.get("pair") or c.get("model") not in ("net1", "net2"):
            continue
        if r.get("task") not in dict(GRID_TASKS):
            continue
        row = (c["pair"], r.get("data", {}).get("spec"))
        col = (r["task"], c["mode"], c["model"])
        prev = cells.setdefault(row, {}).get(col)
        value = headline(r)[1]
        if prev is None or (r.get("created", ""), value) > (prev[0], prev[1]):  # newest record wins
            cells[row][col] = (r.get("created", ""), value)
    if not cells:
        return None
    cols = [(t, m, n) for t, _ in GRID_TASKS for m, _ in GRID_MODES for n in ("net1", "net2")]
    headers = ["Net1", "Net2", "data"] + [f"{dict(GRID_TASKS)[t]} {dict(GRID_MODES)[m]} {n.capitalize()}"
                                          for t, m, n in cols]
    rows = []
    for (pair, spec), vals in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        net1, _, net2 = pair.partition("+")
        rows.append([net1, net2, spec] + [vals[c][1] if c in vals else None for c in cols])
    return markdown_table(headers, rows)


def render_csv(records: list[dict]) -> str:
    """One row per record: the fixed columns, then every metric flattened (metrics.top1.20, ...)."""
    rows = []
    for r in records:
        row = _row(r)
        row.update({f"metrics.{k}": v for k, v in _flatten(r.get("metrics", {})).items()})
        rows.append(row)
    fields = list(_row({}).keys())
    fields += sorted({k for row in rows for k in row if k not in fields})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def write_report(directory: str | Path) -> tuple[str, Path, Path]:
    """Render DIR's records -> (markdown text, DIR/report.md, DIR/report.csv)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder (expected the --out folder of `mokd eval ...`)")
    records = read_records(directory)
    if not records:
        raise UserError(f"{directory} holds no result records (JSON files written by `mokd eval ...`)")
    md = render_markdown(records)
    md_path, csv_path = directory / "report.md", directory / "report.csv"
    md_path.write_text(md)
    csv_path.write_text(render_csv(records))
    return md, md_path, csv_path
