"""`mokd eval ...`, `mokd report`. Each protocol's command lives beside the protocol and is imported lazily."""

from __future__ import annotations

import importlib

import click

from mokd.cli_common import debug_option

EVAL_COMMANDS = {
    "knn": ("mokd_eval.knn", "knn_cmd"),
    "linear": ("mokd_eval.linear", "linear_cmd"),
    "semisup": ("mokd_eval.finetune", "semisup_cmd"),
    "cifar": ("mokd_eval.finetune", "cifar_cmd"),
    "detection": ("mokd_eval.detection.cli", "detection_cmd"),
}


class LazyGroup(click.Group):
    def __init__(self, *args, lazy: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group("eval", cls=LazyGroup, lazy=EVAL_COMMANDS)
def eval_cli():
    """Evaluate a checkpoint (ours or third-party) with a standard protocol."""


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@debug_option
def report_cmd(directory):
    """Render the result records in DIRECTORY as Markdown and CSV tables (DIRECTORY/report.md, report.csv).

    Every *.json record under DIRECTORY is read, in subfolders too (so several `mokd eval --out` folders, or a
    `benchmarks/reproduce.py` output, render together). report.md holds: all results (one row per record:
    task, run, model, architecture, mode, data, headline figure and unit); k-NN top-1 / top-5 per k; a Table 1
    grid (independent vs MOKD, with mean ± std over seeds); the files skipped and why. report.csv: one row per record, the
    same columns plus every metric flattened (metrics.top1.20, ...).
    """
    from mokd_eval.report import write_report

    md, md_path, csv_path = write_report(directory)
    click.echo(md)
    click.echo(f"written: {md_path}, {csv_path}")
