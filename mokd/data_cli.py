"""`mokd data check SPEC`: what a --data spec resolves to (set, root, metric, classes, images per split)."""

from __future__ import annotations

import click

from mokd.cli_common import debug_option, seed_option


@click.group("data")
def data_cli():
    """Inspect data sets given as --data specs (docs/datasets.md)."""


@data_cli.command("check")
@click.argument("spec", metavar="SPEC")
@click.option("--class-list", "class_list", type=click.Path(dir_okay=False), default=None,
              show_default="all classes", help="Class folder names (one a line) selecting a subset (ImageFolder data).")
@click.option("--decode", is_flag=True,
              help="Decode every image file too, and list those that do not decode (exit status 1 if any).")
@seed_option
@debug_option
def check_cmd(spec, class_list, decode, seed):
    """Read SPEC's layout and split files and print what was found: the data set, its root, the metric the
    transfer protocols report, the classes, and the images per split: the train pool, its fit and validation
    rows (official val, or a seeded 20%), and the test split (what `build_dataset(spec, "val")` returns).

    SPEC is any --data value: digits, photos, an ImageFolder root, cifar10:PATH, dtd:PATH, voc2007:PATH, ...
    """
    from mokd.data import build_dataset, check_same_classes, holdout_split, parse_data_spec
    from mokd.transfer_data import HOLDOUT_FRACTION, TRANSFER_SETS

    data = parse_data_spec(spec, class_list)
    train = build_dataset(data, "train", skip_unreadable=decode)
    test = build_dataset(data, "val", skip_unreadable=decode)
    check_same_classes(train, test)
    fit, val = holdout_split(data, train, seed)
    title = TRANSFER_SETS[data.kind].title if data.transfer else data.kind
    shown = ", ".join(train.classes[:5]) + (", ..." if len(train.classes) > 5 else "")
    rule = "official" if data.official_val else f"seeded {HOLDOUT_FRACTION:.0%} of the pool, seed {seed}"
    lines = [f"data set: {title} ({data})",
             f"root: {data.root if data.root is not None else '(embedded)'}",
             f"metric: {data.metric}",
             f"classes: {len(train.classes)} ({shown})"]
    if data.multilabel:
        lines.append("labels: multi-label (multi-hot over the classes)")
    lines += [f"train pool: {len(train)}", f"  fit: {len(fit)}", f"  val: {len(val)} ({rule})",
              f"test: {len(test)}"]
    skipped = train.skipped + test.skipped
    if decode:
        lines.append(f"unreadable images: {len(skipped)}" + (f" ({', '.join(skipped[:5])}"
                                                             f"{', ...' if len(skipped) > 5 else ''})" if skipped else ""))
    click.echo("\n".join(lines))
    if skipped:
        raise SystemExit(1)
