"""`mokd report DIR`: result records rendered as Markdown and CSV tables.

Sections: all results (one row per record: run, model, architecture as built, mode, headline figure and its
unit; k-NN's headline is top-1 at DINO's published k = 20, as in `mokd bench`, never the best k picked on the
split it reports), a per-k table for k-NN (with the best k in a column labelled as tuned on the evaluation split), a Table-1-style grid (pair x independent/MOKD x k-NN/linear, net1 and net2)
for records of our own checkpoints, whose `checkpoint` field carries `mode` and `pair`, the same two figures for
every other checkpoint (third-party files, and ours without a pair and mode) beside them, and the files that
were skipped with the reason. Several records in one grid cell (runs with other seeds, say) are shown as
mean ± std and listed below the grid, with a warning when they are not repeats of one evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from mokd.errors import UserError
from mokd.naming import data_name, model_name, run_name
from mokd_eval.records import VOLATILE_SETTINGS, scan_records

PUBLISHED_K = 20  # DINO's k-NN protocol (Caron et al. 2021) reports k = 20; `mokd bench` headlines it too
HEADLINE: dict[str, str] = {}  # task -> headline key where metrics["headline"] does not name it (else "top1");
# k-NN's headline is knn_headline's
UNITS = {"knn": "%", "linear": "%", "semisup": "%", "cifar": "%", "finetune": "%", "mad": "px",
         "consistency": "fraction", "detection": "AP"}
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
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def knn_headline(metrics: dict) -> tuple[str, float | None]:
    """(name, value) of a k-NN record's headline: top-1 at k = 20, DINO's published k, chosen before seeing the
    data. The best k on the split being reported is tuned on it, so it is the headline only where no k = 20 was
    run, and its name says which k and that it is not 20."""
    top1 = metrics.get("top1") or {}
    if str(PUBLISHED_K) in top1:
        return f"top1 k={PUBLISHED_K}", _number(top1[str(PUBLISHED_K)])
    if metrics.get("best_k") is None:
        return "-", None
    return (f"top1 k={metrics['best_k']} (not {PUBLISHED_K}: the best k, tuned on the evaluation split)",
            _number(metrics.get("best_top1")))


def headline(record: dict) -> tuple[str, float | None]:
    """(metric name, value) of a record's headline figure (k-NN: knn_headline)."""
    m = record.get("metrics") or {}
    if "headline" in m and m["headline"] is None:  # a figure-only task (t-SNE): no number to report
        return "-", None
    if record.get("task") == "knn" and isinstance(m.get("top1"), dict):
        return knn_headline(m)
    name = m.get("headline") or HEADLINE.get(record.get("task"), "top1")
    if _number(m.get(name)) is None:
        name = next((k for k, v in m.items() if _number(v) is not None), name)
    return str(name), _number(m.get(name))


def unit(record: dict) -> str:
    """The unit of a record's headline figure: % for accuracies, px for distances, fraction for agreement."""
    task, (name, value) = record.get("task"), headline(record)
    if value is None:
        return "-"
    if task in UNITS:
        return UNITS[task]
    return "%" if name.startswith(("top1", "top5", "best_top")) else "-"


def identity(record: dict) -> dict:
    """run, model, name (architecture as built), mode of a record; records written before these fields
    existed get them from the checkpoint path and architecture."""
    c = record.get("checkpoint") or {}
    model = c.get("model") or c.get("label")
    if c.get("model") and c.get("branch"):
        model = f"{c['model']} ({c['branch']})"
    name = c.get("name") or (model_name(c["arch"], c.get("arch_kwargs"), bool(c.get("small_stem")))
                             if c.get("arch") else None)
    return {"run": c.get("run") or (run_name(c["path"]) if c.get("path") else None), "model": model,
            "name": name, "mode": c.get("mode")}


def _data(record: dict) -> str | None:
    spec = (record.get("data") or {}).get("spec")
    return data_name(spec) if spec else None


def _row(r: dict) -> dict:
    c = r.get("checkpoint") or {}
    ident = identity(r)
    name, value = headline(r)
    return {"task": r.get("task"), "run": ident["run"], "model": ident["model"], "arch": ident["name"],
            "mode": ident["mode"], "data": _data(r), "metric": name, "value": value, "unit": unit(r) if r else None,
            "format": c.get("format"), "pair": c.get("pair"), "checkpoint": c.get("path"),
            "data_spec": (r.get("data") or {}).get("spec"), "wall_time_s": r.get("wall_time_s"), "file": r.get("_file"),
            **{f"provenance.{k}": v for k, v in provenance_cells(r).items()}}


PROVENANCE_COLUMNS = ("params", "seed", "precision", "device", "sha256", "format", "load", "version", "versions",
                      "wall_s", "deviations")


def provenance_cells(r: dict) -> dict:
    """A record's provenance as short cells (records written before `provenance` existed give what they hold)."""
    p = r.get("provenance") or {}
    if not r:
        return dict.fromkeys(PROVENANCE_COLUMNS)
    c, env = r.get("checkpoint") or {}, r.get("env") or {}
    params = p.get("params", {k: v for k, v in (r.get("settings") or {}).items() if k not in VOLATILE_SETTINGS})
    load = p.get("load_report") or c.get("load_report")
    world = p.get("world_size", env.get("world_size"))
    device = p.get("device_type") or str(env.get("device", "")).split(":")[0] or None
    commit = p.get("git_commit", env.get("git_commit"))
    versions = {k: p.get(k) for k in ("torch", "timm", "faiss")}
    deviations = p.get("deviations")
    return {
        "params": ", ".join(f"{k}={_short(v)}" for k, v in params.items() if k not in ("seed", "precision")),
        "seed": p.get("seed", params.get("seed")), "precision": p.get("precision", params.get("precision")),
        "device": f"{device} x{world}" if device and world else device,
        "sha256": (p.get("checkpoint_sha256") or c.get("sha256") or "")[:12] or None,
        "format": p.get("checkpoint_format") or c.get("format"),
        "load": (f"{load['matched']}/{load['total']} matched, {load.get('missing', 0)} missing"
                 if isinstance(load, dict) and "matched" in load else None),
        "version": f"{p.get('mokd_version') or '?'}@{(commit or '?')[:8]}",
        "versions": " ".join(f"{k} {v}" for k, v in versions.items() if v) or None,
        "wall_s": p.get("wall_time_s", r.get("wall_time_s")),
        "deviations": "; ".join(deviations) if deviations else ("none" if deviations is not None else None),
    }


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_short(x) for x in v) if len(v) <= 6 else f"{_short(v[0])}..{_short(v[-1])} ({len(v)})"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def provenance_table(records: list[dict], label=None) -> str:
    """One row per record: who (label), what (task), and its provenance cells."""
    label = label or (lambda r: identity(r)["model"] or identity(r)["run"])
    rows = [[label(r), r.get("task")] + [provenance_cells(r)[k] for k in PROVENANCE_COLUMNS] for r in records]
    return markdown_table(["model", "task", *PROVENANCE_COLUMNS], rows)


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        return {prefix[:-1]: ";".join(map(str, d))}
    return {prefix[:-1]: d}


def render_markdown(records: list[dict], skipped: Sequence[tuple[Path, str]] = ()) -> str:
    parts = ["# Results", "", f"{len(records)} result record(s)"
             + (f"; {len(skipped)} file(s) skipped (listed at the end)." if skipped else "."), "", "## All results", ""]
    rows = [_row(r) for r in records]
    parts.append(markdown_table(["task", "run", "model", "arch", "mode", "data", "metric", "value", "unit"],
                                [[x["task"], x["run"], x["model"], x["arch"], x["mode"], x["data"], x["metric"],
                                  x["value"], x["unit"]] for x in rows]))
    knn = [r for r in records if r.get("task") == "knn"]
    if knn:
        ks = sorted({int(k) for r in knn for k in r["metrics"]["top1"] if str(k).isdigit()})
        parts += ["", "## k-NN (top-1 / top-5, %)", ""]
        table = []
        for r in knn:
            m, ident = r["metrics"], identity(r)
            t1, t5 = m["top1"], m["top5"]
            table.append([ident["run"], ident["model"], ident["name"], ident["mode"], _data(r)]
                         + [_pair_cell(t1.get(str(k)), t5.get(str(k))) for k in ks]
                         + [f"{_fmt(_number(m.get('best_top1')))} (k={m.get('best_k')})"])
        parts.append(markdown_table(["run", "model", "arch", "mode", "data"] + [f"k={k}" for k in ks]
                                    + ["best top-1 (k tuned on the evaluation split)"], table))
        parts += ["", f"Headline figures elsewhere in this report are top-1 at k={PUBLISHED_K} (DINO's published k); "
                      "the best k is picked on the split it is reported on, so it flatters."]
    grid = table1_grid(records)
    if grid:
        parts += ["", "## Table 1: independent training vs MOKD (%)", "", grid]
    others = other_checkpoints_table(records)
    if others:
        parts += ["", "## Other checkpoints: k-NN and linear (%)" if grid else "## Checkpoints: k-NN and linear (%)",
                  "", others]
    parts += ["", "## Provenance", "", provenance_table(records)]
    if skipped:
        parts += ["", "## Skipped files", ""] + [f"- {p}: {why}" for p, why in skipped]
    return "\n".join(parts) + "\n"


def _pair_cell(top1: Any, top5: Any) -> str:
    a, b = _number(top1), _number(top5)
    return "-" if a is None else f"{a:.2f} / {b:.2f}" if b is not None else f"{a:.2f}"


def _summary(values: list[float]) -> str | float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _stable_settings(r: dict) -> str:
    s = {k: v for k, v in (r.get("settings") or {}).items() if k not in VOLATILE_SETTINGS}
    return json.dumps(s, sort_keys=True, default=str)


def table1_grid(records: list[dict]) -> str | None:
    """Rows: pair (net1, net2 as built) and data; columns: task x mode x net, each the headline figure.

    A cell that several records fall into shows mean ± std (sample std, n records); the records are listed
    under the grid, with a warning when one checkpoint appears twice or their evaluation settings differ.
    """
    cells: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in records:
        c = r.get("checkpoint") or {}
        if not _in_grid(r):
            continue
        if r.get("task") not in dict(GRID_TASKS):
            continue
        row = (str(c["pair"]), _data(r))
        col = (r["task"], c["mode"], c["model"])
        cells.setdefault(row, {}).setdefault(col, []).append(r)
    if not cells:
        return None
    cols = [(t, m, n) for t, _ in GRID_TASKS for m, _ in GRID_MODES for n in ("net1", "net2")]
    title = {c: f"{dict(GRID_TASKS)[c[0]]} {dict(GRID_MODES)[c[1]]} {c[2].capitalize()}" for c in cols}
    headers = ["Net1", "Net2", "data"] + [title[c] for c in cols]
    rows, notes = [], []
    for (pair, data), vals in sorted(cells.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        net1, _, net2 = pair.partition("+")
        line = [net1, net2, data]
        for col in cols:
            recs = vals.get(col, [])
            line.append(_summary([v for v in (headline(r)[1] for r in recs) if v is not None]))
            if len(recs) > 1:
                notes.append(_cell_note(f"{title[col]} of {net1} + {net2} on {data}", recs))
        rows.append(line)
    table = markdown_table(headers, rows)
    if notes:
        table += "\n\nCells with several records (mean ± sample std over them):\n\n" + "\n".join(notes)
    return table


def _in_grid(r: dict) -> bool:
    c = r.get("checkpoint") or {}
    return c.get("mode") in dict(GRID_MODES) and bool(c.get("pair")) and c.get("model") in ("net1", "net2")


def other_checkpoints_table(records: list[dict]) -> str | None:
    """k-NN and linear headline figures of the checkpoints the Table-1 grid leaves out (third-party files, and
    ours without mode and pair): one row per checkpoint (label, architecture as built, format) and data set;
    several records in a cell are summarised as in the grid."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        if r.get("task") not in dict(GRID_TASKS) or _in_grid(r):
            continue
        c, ident = r.get("checkpoint") or {}, identity(r)
        row = (str(c.get("label") or ident["model"] or ident["run"]), ident["name"], c.get("format"), _data(r),
               c.get("sha256"))
        cells.setdefault(row, {}).setdefault(r["task"], []).append(r)
    if not cells:
        return None
    figure = lambda recs: _summary([v for v in (headline(r)[1] for r in recs) if v is not None])  # noqa: E731
    rows = [[label, name, fmt, data] + [figure(vals.get(t, [])) for t, _ in GRID_TASKS]
            for (label, name, fmt, data, _), vals in sorted(cells.items(), key=lambda kv: [str(x) for x in kv[0]])]
    return markdown_table(["checkpoint", "arch", "format", "data"] + [title for _, title in GRID_TASKS], rows)


def _cell_note(where: str, recs: list[dict]) -> str:
    listed = ", ".join(f"{identity(r)['run']} {_fmt(headline(r)[1])}" for r in recs)
    note = f"- {where}: {listed}"
    shas = [(r.get("checkpoint") or {}).get("sha256") for r in recs]
    if len(set(shas)) < len(shas):
        note += "\n  warning: one checkpoint is counted more than once (evaluated twice); check the records: " \
                + ", ".join(Path(r.get("_file", "?")).name for r in recs)
    elif len({_stable_settings(r) for r in recs}) > 1:
        note += "\n  warning: their evaluation settings differ, so the spread is not only between runs: " \
                + ", ".join(Path(r.get("_file", "?")).name for r in recs)
    return note


def render_csv(records: list[dict]) -> str:
    """One row per record: the fixed columns, then every metric flattened (metrics.top1.20, ...)."""
    rows = []
    for r in records:
        row = _row(r)
        row.update({f"metrics.{k}": v for k, v in _flatten(r.get("metrics") or {}).items()})
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
    """Render DIR's records -> (markdown text, DIR/report.md, DIR/report.csv). Files that cannot be read, and
    records missing a field, are skipped and named in the report."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder (expected the --out folder of `mokd eval ...`)")
    if (directory / "bench_status.json").is_file():  # mokd_bench.run.STATUS: its report.md is the bench's own
        raise UserError(f"{directory} is the output of `mokd bench`, whose report.md and report.csv this would "
                        f"overwrite; run `mokd report {directory / 'records'}` for these tables")
    records, skipped = scan_records(directory)
    if not records:
        why = "; skipped: " + "; ".join(f"{p} ({r})" for p, r in skipped) if skipped else ""
        raise UserError(f"{directory} holds no result records (JSON files written by `mokd eval ...`){why}")
    md = render_markdown(records, skipped)
    md_path, csv_path = directory / "report.md", directory / "report.csv"
    md_path.write_text(md)
    csv_path.write_text(render_csv(records))
    return md, md_path, csv_path
