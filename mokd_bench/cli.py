"""`mokd bench MANIFEST` / `mokd bench CKPT... --protocols ...`: plan, run, render."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from mokd.cli_common import debug_option, out_option, skip_bad_images_option
from mokd.errors import UserError
from mokd_eval.common import echo, feature_options, loader_options

MANIFEST_SUFFIXES = (".yaml", ".yml")
LOADER_PARAMS = ("model", "branch", "arch", "arch_kwargs", "key", "allow_partial")


def _given(ctx: click.Context, name: str, value):
    """The value when given on the command line (or by environment), else None: manifests keep theirs."""
    source = ctx.get_parameter_source(name)
    return None if source in (None, ParameterSource.DEFAULT) else value


@click.command("bench")
@click.argument("sources", nargs=-1, required=True, metavar="MANIFEST | CKPT...")
@click.option("--protocols", default=None, metavar="LIST",
              help="Comma-separated protocols of knn, linear, logreg, fewshot, rank, mad, cka [default: all, or the "
                   "manifest's].")
@click.option("--label", "labels", multiple=True,
              help="A label per checkpoint, in the order given (default: the file's own: run and model, or stem).")
@click.option("--set", "protocol_settings", multiple=True, metavar="PROTOCOL.KEY=VALUE",
              show_default="none: each protocol's defaults, or the manifest's settings",
              help="A protocol setting, e.g. --set knn.ks=[20] --set linear.epochs=10 (repeatable).")
@loader_options
@click.option("--data", "data", multiple=True, metavar="SPEC", show_default="digits, or the manifest's",
              help="A data set, repeatable: every protocol runs on each. An ImageFolder root, 'digits', 'photos', "
                   "'cifar10:PATH', 'cifar100:PATH', or a transfer set by name such as 'dtd:PATH', 'food101:PATH', "
                   "'voc2007:PATH' (docs/bench.md).")
@click.option("--class-list", "class_list", type=click.Path(dir_okay=False), default=None, show_default="all classes",
              help="Text file of class folder names (one a line) selecting a subset of each ImageFolder data set.")
@skip_bad_images_option("the result records")
@out_option(default="bench")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (CUDA when available).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--batch-size", "batch_size", type=click.IntRange(min=1), default=None, show_default="256",
              help="Images per forward pass when extracting features (global: split across torchrun ranks).")
@feature_options
@debug_option
def bench_cmd(sources, protocols, labels, protocol_settings, model, branch, arch, arch_kwargs, key, allow_partial,
              data, class_list, skip_bad_images, out, device, seed, batch_size, image_size, precision, num_workers,
              cache_dir, no_cache):
    """Benchmark checkpoints with several protocols in one run, features extracted once and shared.

    MANIFEST is a YAML file naming the checkpoints, each with its own label and loader options (docs/bench.md);
    or give checkpoint files (PATH or PATH::TIMM_ARCH) with --label per file. Writes one record per checkpoint
    and protocol into OUT/records, and OUT/report.md, report.html (self-contained), report.csv and figures.
    Run it again to resume: jobs whose records are written are not recomputed. A checkpoint that fails is
    listed with its reason while the others finish; the exit status is then 1.
    """
    from mokd_bench.data import load_datasets
    from mokd_bench.plan import BenchConfig, load_manifest, make_plan, merge_cli, parse_protocols, parse_set
    from mokd_bench.render import load_bench, render, summary_table
    from mokd_bench.run import run_plan
    from mokd_eval.common import CIFAR_STEM_KEY
    from mokd_eval.report import markdown_table
    from mokd_eval.spec import parse_checkpoint_args

    ctx = click.get_current_context()
    pos_resample = ctx.meta.get("mokd_eval.pos_resample")  # --pos-resample, where loader_options has it
    cifar_stem = bool(ctx.meta.get(CIFAR_STEM_KEY))
    loader = dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs, key=key,
                  allow_partial=allow_partial or None, cifar_stem=cifar_stem or None, pos_resample=pos_resample)
    if len(sources) == 1 and Path(sources[0]).suffix.lower() in MANIFEST_SUFFIXES:
        given = [f"--{k.replace('_', '-')}" for k, v in loader.items() if v] + (["--label"] if labels else [])
        if given:
            raise UserError(f"{' '.join(given)}: with a manifest, set these per checkpoint in it "
                            f"(keys label, arch, arch_kwargs, model, branch, key, allow_partial, cifar_stem, "
                            f"pos_resample)")
        cfg = load_manifest(sources[0])
    else:
        manifests = [s for s in sources if Path(s).suffix.lower() in MANIFEST_SUFFIXES]
        if manifests:
            raise UserError(f"give one manifest alone, or checkpoint files; got {len(sources)} arguments with "
                            f"manifest(s) {', '.join(manifests)}")
        cfg = BenchConfig(entries=parse_checkpoint_args(list(sources), list(labels), **loader))
    cfg = merge_cli(cfg, datasets=list(data) or None, class_list=class_list, protocols=parse_protocols(protocols),
                    settings=parse_set(protocol_settings) or None, device=_given(ctx, "device", device),
                    seed=_given(ctx, "seed", seed), batch_size=batch_size, image_size=image_size,
                    precision=_given(ctx, "precision", precision), num_workers=num_workers, cache_dir=cache_dir,
                    no_cache=no_cache or None, skip_bad_images=skip_bad_images or None)
    datasets, data_failures = load_datasets(cfg.datasets, cfg.class_list, cfg.skip_bad_images)
    for f in data_failures:
        echo(f"data set {f['dataset']} failed: {f['reason']}")
    plan = make_plan(cfg, datasets, data_failures)
    shown = [f"{d.name}{'' if d.labelled else ' (no labels)'}" for d in datasets if d is not None]
    echo(f"bench: {len(cfg.entries)} checkpoint(s) x {', '.join(cfg.protocols)} on {', '.join(shown) or 'no data'}: "
         f"{len(plan.jobs)} job(s)")
    for p in plan.planned_out:
        echo(f"not run: {p['protocol']} on {p['dataset']} ({p['reason']})")
    res = run_plan(plan, out, log=echo, debug=bool(ctx.meta.get("mokd.debug")))
    from mokd import distributed as dist

    if not dist.is_main():
        return  # rank 0 writes the records and the report
    paths = render(out, res.job_ids)
    records, _ = load_bench(out, res.job_ids)
    echo("")
    echo(markdown_table(*summary_table(records)))
    echo(f"\n{len(res.written)} record(s) written, {res.reused} job(s) already done (resumed), "
         f"{res.extracted} feature set(s) extracted")
    echo(f"written: {paths['md']}, {paths['html']}, {paths['csv']}")
    if res.failures:
        click.echo(f"{len(res.failures)} failure(s):", err=True)
        for f in res.failures:
            where = " / ".join(x for x in (f["checkpoint"], f.get("dataset"), f.get("protocol")) if x)
            click.echo(f"  {where}: {f['reason']}", err=True)
        sys.exit(1)
