"""CLI help stands alone: every option says what it does and what it defaults to."""

import click
from click.testing import CliRunner

from mokd.cli import cli, shipped_configs


def _commands(cmd=cli, ctx=None, path=("mokd",)):
    """(command, its context as Click builds it for an invocation, "mokd eval knn") for every leaf command."""
    ctx = ctx or cli.make_context("mokd", [], resilient_parsing=True)
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            yield from _commands(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True), (*path, name))
    else:
        yield cmd, ctx, " ".join(path)


def test_every_option_has_help_and_shows_its_default():
    missing = []
    for cmd, ctx, path in _commands():
        assert ctx.show_default, f"{path}: the root group's show_default did not reach this context"
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            record = p.get_help_record(ctx)
            if not p.help:
                missing.append(f"{path} {p.opts[0]}: no help")
            elif not (p.is_flag or p.required) and "default" not in record[1].lower():
                missing.append(f"{path} {p.opts[0]}: no default shown ({record[1][:60]})")
    assert missing == []


def test_help_texts_that_were_wrong_or_missing():
    runner = CliRunner()
    train = runner.invoke(cli, ["train", "--help"], terminal_width=200).output
    assert all(name in train for name in shipped_configs()) and "mokd_r50_vits16" in train
    assert "--print-config" in train and "[default: 0.0]" not in train
    export = runner.invoke(cli, ["export", "--help"], terminal_width=200).output
    assert "Evaluate" not in export and "(default: both)" not in export
    report = runner.invoke(cli, ["report", "--help"], terminal_width=200).output
    assert "subfolders" in report and "report.md" in report and "report.csv" in report and "Table 1" in report
    knn = runner.invoke(cli, ["eval", "knn", "--help"], terminal_width=200).output
    assert "[default: (256)" in knn  # the protocol's own batch size where the option's value is None
    mad = runner.invoke(cli, ["analyze", "mad", "--help"], terminal_width=200).output
    assert "Fig. 5" in mad and "Figure 3" not in mad
