"""Options shared by every command, so that `--data`, `--out`, `--device`, `--seed` mean one thing everywhere."""

from __future__ import annotations

import click

from mokd.data import DataSpec, parse_data_spec


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta["mokd.debug"] = True
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
                            help="Show full tracebacks instead of one-line error messages.")


def data_options(f):
    """--data SPEC and --class-list FILE, parsed into a `DataSpec` passed as `data`."""
    f = click.option("--class-list", "class_list", type=click.Path(dir_okay=False), default=None,
                     show_default="all classes",
                     help="Text file of class folder names (one a line) selecting a subset, e.g. ImageNet-100.")(f)
    f = click.option("--data", "data", default=None, metavar="SPEC",
                     help="Data set: an ImageFolder root (ROOT/train, ROOT/val), 'digits' (embedded, default), "
                          "'photos' (embedded, 12 classes of photograph patches), 'cifar10:PATH' or "
                          "'cifar100:PATH' (python archive folders), or a transfer set in its own layout: 'stl10:', "
                          "'food101:', 'sun397:', 'cars:', 'aircraft:', 'voc2007:', 'dtd:', 'pets:', 'caltech101:', "
                          "'flowers102:', 'eurosat:' + PATH (docs/datasets.md).")(f)
    return f


def skip_bad_images_option(listed_in: str):
    """--skip-bad-images: image files that do not decode are left out, counted, and listed in `listed_in`."""
    return click.option("--skip-bad-images", "skip_bad_images", is_flag=True,
                        help=f"Leave out image files that do not decode (counted, and listed in {listed_in}) "
                             f"instead of stopping at the first one.")


def resolve_data(data: str | None, class_list: str | None) -> DataSpec:
    return parse_data_spec(data, class_list)


def out_option(default: str | None, default_text: str | None = None):
    return click.option("--out", "out", type=click.Path(file_okay=False), default=default,
                        show_default=default_text or True, help="Output folder.")


device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N, or auto (CUDA when available).")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
def batch_size_option(f=None, *, default_text: str = "the protocol's"):
    """--batch-size; `@batch_size_option` or `@batch_size_option(default_text=...)` to say what None means."""
    option = click.option("--batch-size", "batch_size", type=click.IntRange(min=1), default=None,
                          show_default=default_text, help="Batch size (global across ranks).")
    return option(f) if f is not None else option


def epochs_option(f=None, *, default_text: str = "the protocol's"):
    """--epochs; `@epochs_option` or `@epochs_option(default_text=...)` to say what None means."""
    option = click.option("--epochs", type=click.IntRange(min=1), default=None, show_default=default_text,
                          help="Number of epochs.")
    return option(f) if f is not None else option
