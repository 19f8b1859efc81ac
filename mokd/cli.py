"""The `mokd` command line: train, eval, analyze, bench, export, report, data.

`eval`, `analyze`, `bench`, `export` and `report` live in the evaluation, analysis and bench packages and are
imported only when invoked, so `mokd train` does not pay for them and the dependency arrows keep pointing one way.
"""

from __future__ import annotations

import importlib
import sys

import click

from mokd.cli_common import batch_size_option, data_options, debug_option, device_option, epochs_option, \
    out_option, skip_bad_images_option
from mokd.errors import UserError


def shipped_configs() -> list[str]:
    """Names `--config NAME` accepts (the YAML files shipped in configs/)."""
    from mokd.config import PACKAGE_CONFIGS

    return sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))

LAZY_COMMANDS = {
    "eval": ("mokd_eval.cli", "eval_cli"),
    "export": ("mokd_eval.export", "export_cmd"),
    "report": ("mokd_eval.cli", "report_cmd"),
    "analyze": ("mokd_analysis.cli", "analyze_cli"),
    "bench": ("mokd_bench.cli", "bench_cmd"),
    "data": ("mokd.data_cli", "data_cli"),
    "plot-log": ("mokd_analysis.training_curves", "plot_log_cmd"),
}


def user_message(e: UserError) -> str:
    """The error's own line; a UserError raised in a DataLoader worker arrives wrapped in its traceback."""
    text = str(e)
    if text.startswith("Caught ") and "Traceback" in text:
        tail = text.rstrip().splitlines()[-1]
        return tail.split("UserError: ", 1)[-1]
    return text


class MokdGroup(click.Group):
    """Lazily loads sub-packages' commands, and turns UserError into a clean message and exit code 2."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.meta.get("mokd.debug"):
                raise
            raise click.ClickException(user_message(e)) from e


@click.group(cls=MokdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110,
                                                "show_default": True})
@debug_option
@click.version_option(package_name="mokd")
def cli():
    """MOKD: train model pairs by multi-mode online knowledge distillation, evaluate and analyse checkpoints."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              show_default="configs/default.yaml, a small CPU pair on digits",
              help=f"YAML config file, or the name of a shipped config: {', '.join(shipped_configs())}.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", show_default="none",
              help="Override a config value, e.g. --set loss.ct=false --set net2.lam=0.1 (repeatable).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out exactly where it stopped (its newest readable checkpoint; "
                   "from scratch when there is none yet).")
@click.option("--resume-from", "resume_from", type=click.Path(exists=True, dir_okay=False), default=None,
              show_default="none",
              help="Roll the run in --out back to this checkpoint (e.g. OUT/checkpoint_0040.pth) and continue from "
                   "it: last.pth and newer numbered checkpoints move into OUT/rolled-back-TIME/, so a later --resume "
                   "continues this line, not the abandoned one.")
@click.option("--overwrite", is_flag=True,
              help="Start over in an --out that holds a run: its checkpoints, log and config are deleted.")
@click.option("--print-config", "print_config", is_flag=True,
              help="Print the resolved config (file, --set and flags applied) as YAML and exit; the output works as "
                   "a --config file.")
@skip_bad_images_option("log.jsonl")
@data_options
@out_option(default=None, default_text="the config's train.output_dir")
@epochs_option(default_text="the config's optim.epochs")
@batch_size_option(default_text="the config's optim.batch_size")
@device_option
@click.option("--seed", type=int, default=None, help="Random seed (default: the config's).")
@debug_option
def train(config_file, overrides, resume, resume_from, overwrite, print_config, skip_bad_images, data, class_list, out, epochs, batch_size,
          device, seed):
    """Train a MOKD model pair (or, with loss.mode=independent, two plain DINO runs).

    Runs unchanged under torchrun: torchrun --nproc_per_node=8 -m mokd train --config configs/....yaml

    SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 save a resumable checkpoint of the current step and exit with status
    128 + the signal number; run the same command with --resume to continue.
    """
    from pathlib import Path

    from mokd.config import apply_cli_flags, config_yaml, load_config, read_yaml
    from mokd.preemption import StoppedBySignal
    from mokd.trainer import train as run_training

    if resume_from is not None and overwrite:
        raise UserError("--resume-from continues the run in --out from a checkpoint and --overwrite starts it over: "
                        "give one of them")
    if (resume or resume_from) and config_file is None:
        # Resuming continues the run as it was configured: its own resolved config, then any overrides.
        run_dir = Path(out) if out else Path(load_config(None).train.output_dir)
        if (run_dir / "config.yaml").is_file():
            config_file = run_dir / "config.yaml"
            if "pipeline" not in (read_yaml(config_file).get("augment") or {}):
                overrides = ("augment.pipeline=pil", *overrides)  # a run from before the fast pipeline: keep its crops
    cfg = load_config(config_file, overrides)
    cfg = apply_cli_flags(cfg, data=data, class_list=class_list, out=out, epochs=epochs, batch_size=batch_size,
                          device=device if device != "auto" else None, seed=seed)
    if skip_bad_images:
        cfg.data.skip_bad_images = True
    if print_config:
        click.echo(config_yaml(cfg), nl=False)
        return
    try:
        run_training(cfg, resume_run=resume or resume_from is not None, overwrite=overwrite,
                     resume_from=Path(resume_from) if resume_from else None)
    except StoppedBySignal as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


def main() -> None:
    cli(prog_name="mokd")


if __name__ == "__main__":
    sys.exit(main())
