"""`mokd analyze mad | consistency | tsne`: the paper's Sec. 4.6 analyses for any checkpoints the loader reads.

Each command loads models through mokd_eval's loader (a MOKD checkpoint gives both models), uses the
embedded digits unless --data says otherwise, writes figures and numbers into --out, and one result record
per analysed model (consistency: per pair).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from mokd.cli_common import data_options, debug_option, device_option, out_option, resolve_data, seed_option
from mokd.data import build_dataset
from mokd.errors import UserError
from mokd.naming import data_name
from mokd_eval.common import echo, load_eval_data, load_models_cli, loader_options, pos_resample_option, \
    precision_for, setup_run
from mokd_eval.features import eval_transform, features_for, fit_input_size
from mokd_eval.knn import knn_predict
from mokd_eval.records import write_record
from mokd_eval.report import markdown_table


def analysis_options(f):
    """The loader options, --data/--class-list, --out, --device and --seed, shared by every analysis."""
    for option in reversed([loader_options, data_options, out_option(default="results/analysis"), device_option,
                            seed_option]):
        f = option(f)
    return f


figure_width_option = click.option(
    "--figure-width", "figure_width", type=click.Choice(["auto", "column", "page"]), default="auto",
    show_default=True, help="Width of the figures: one column (3.25 in) or the page (6.875 in) of a CVPR paper; "
                            "auto: a column for one panel, the page for more.")


def _load(paths: list[str], opts: dict) -> list:
    """Every model of every checkpoint; labels get the checkpoint's run name when several files are given."""
    models = []
    for path in paths:
        for m in load_models_cli(path, **opts):
            if len(paths) > 1:
                m.label = f"{m.checkpoint['run']} {m.label}"
            models.append(m)
    return models


def _image_size(m, image_size: int | None) -> int:
    """--image-size, else the checkpoint's training resolution, else 224 (third-party models)."""
    return int(image_size or m.image_size or 224)


def _subset(n: int, max_images: int | None, seed: int) -> list[int]:
    if not max_images or n <= max_images:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, max_images, replace=False).tolist())


@click.group("analyze")
def analyze_cli():
    """Analyse checkpoints: mean attention distance, prediction consistency, t-SNE (paper Sec. 4.6)."""


@analyze_cli.command("mad")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Input resolution (default: the checkpoint's training resolution, else 224).")
@click.option("--max-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images of the validation split averaged over (a seeded pick).")
@figure_width_option
@debug_option
def mad_cmd(checkpoints, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device, seed,
            batch_size, image_size, max_images, figure_width):
    """Mean attention distance per layer and head (ViTs) or per residual block (CNNs), the paper's Fig. 5 and
    supplementary Fig. S2.

    Several checkpoints overlay in one figure (e.g. independent against MOKD); a MOKD checkpoint gives both
    models; each run keeps its colour and marker in both panels. Writes mad.png, mad.pdf, mad.svg, mad.json,
    mad.csv and a record per model into --out.
    """
    from mokd_analysis.mad import model_mad, save_mad_tables
    from mokd_analysis.plots import plot_mad

    t0 = time.time()
    dev = setup_run(device, seed)
    spec = resolve_data(data, class_list)
    models = _load(list(checkpoints), dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs, key=key,
                                           allow_partial=allow_partial))
    val = build_dataset(spec, "val")
    pick = _subset(len(val), max_images, seed)
    results = []
    for m in models:
        size = _image_size(m, image_size)
        fit_input_size(m.backbone, size)
        ds = val.subset(pick)
        ds.transform = eval_transform(size, spec.native_size is not None)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
        r = model_mad(m.backbone, loader, dev, label=m.label, arch=m.checkpoint["name"])
        r.run, r.mode = m.checkpoint["run"], m.checkpoint.get("mode")
        results.append(r)
    out_dir = Path(out)
    tables = save_mad_tables(results, out_dir)
    figures = plot_mad(results, out_dir / "mad", width=figure_width,
                       title=f"Mean attention distance on {data_name(spec)} val ({results[0].num_images} images)")
    for m, r in zip(models, results):
        means = r.layer_means()
        echo(f"\n{r.label} ({r.arch}, {r.kind}, {r.image_size} px, {r.num_images} images): mean attention distance (px)")
        if r.kind == "vit":
            echo(markdown_table(["layer", "mean over heads", "min head", "max head"],
                                [[i + 1, means[i], min(row), max(row)] for i, row in enumerate(r.distances)]))
        else:
            echo(markdown_table(["block", "distance"], [[i + 1, means[i]] for i in range(len(means))]))
        write_record(out_dir, task="mad", checkpoint=m.checkpoint,
                     data={"spec": str(spec), "split": "val", "num_images": r.num_images},
                     settings={"image_size": r.image_size, "max_images": max_images, "seed": seed},
                     metrics={"headline": "mean", "mean": float(np.mean(means)), "layer_mean": means,
                              "distances": r.distances, "figures": {k: str(v) for k, v in {**figures, **tables}.items()}},
                     wall_time_s=time.time() - t0, device=dev)
    echo(f"\nwritten: {', '.join(str(p) for p in {**figures, **tables}.values())}")


def _models_for_pair(ckpt_a: str, ckpt_b: str | None, opts: dict, models_ab: tuple[str | None, str | None]) -> list:
    """Two models: both of a MOKD checkpoint given alone, or one from each of two checkpoints."""
    if ckpt_b is None:
        models = load_models_cli(ckpt_a, **{**opts, "model": models_ab[0]})
        if len(models) != 2:
            raise UserError(f"{ckpt_a} holds {len(models)} model(s): give a second checkpoint to compare with")
        return models
    pair = []
    for path, which in ((ckpt_a, models_ab[0]), (ckpt_b, models_ab[1])):
        found = load_models_cli(path, **{**opts, "model": which})
        if len(found) != 1:
            raise UserError(f"{path} holds {len(found)} models: say which with --model-a/--model-b (net1 or net2)")
        m = found[0]
        m.label = f"{Path(path).parent.name or Path(path).stem} {m.label}".strip()
        pair.append(m)
    return pair


@analyze_cli.command("consistency")
@click.argument("ckpt_a", type=click.Path(dir_okay=False))
@click.argument("ckpt_b", required=False, type=click.Path(dir_okay=False))
@click.option("--replacement", type=click.Path(dir_okay=False), default=None,
              show_default="none", help="A third checkpoint that replaces one model of the pair (Table 9's last column).")
@click.option("--replace", type=click.Choice(["a", "b"]), default="a", show_default=True,
              help="Which model of the pair the replacement stands in for.")
@click.option("--model-a", default=None, show_default="the file's only model; both of one MOKD file",
              help="net1|net2 of CKPT_A (MOKD checkpoints).")
@click.option("--model-b", default=None, show_default="the file's only model", help="net1|net2 of CKPT_B.")
@click.option("--model-c", default=None, show_default="the file's only model", help="net1|net2 of the replacement.")
@click.option("--branch", type=click.Choice(["teacher", "student"]), default=None, show_default="teacher",
              help="Which branch to load (MoCo and solo-learn: the query/online encoder).")
@click.option("--arch", default=None, metavar="TIMM_NAME", show_default="the file's own",
              help="timm architecture when a file does not name it.")
@click.option("--allow-partial", "allow_partial", is_flag=True,
              help="Analyse even if not every backbone tensor matched (the rest keep their random init).")
@pos_resample_option
@click.option("--k", "k", type=click.IntRange(min=1), default=20, show_default=True, help="k-NN neighbours.")
@click.option("--temperature", type=float, default=0.07, show_default=True,
              help="k-NN vote temperature (DINO's weights exp(similarity / T)).")
@data_options
@out_option(default="results/analysis")
@device_option
@seed_option
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Input resolution (default: the data's own size for small images, else the checkpoint's "
                   "training resolution, else 224).")
@debug_option
def consistency_cmd(ckpt_a, ckpt_b, replacement, replace, model_a, model_b, model_c, branch, arch, allow_partial, k,
                    temperature, data, class_list, out, device, seed, batch_size, image_size):
    """Fraction of evaluation images on which two models' k-NN predictions agree (Table 9).

    CKPT_A alone (a MOKD checkpoint) compares its two models. --replacement C repeats the comparison with C
    in place of one model, which tells whether higher agreement comes from higher accuracy alone.
    """
    from mokd_analysis.consistency import prediction_consistency, replacement_consistency

    t0 = time.time()
    dev = setup_run(device, seed)
    prec = precision_for("auto", dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list)
    opts = dict(branch=branch, arch=arch, arch_kwargs=None, key=None, allow_partial=allow_partial)
    models = _models_for_pair(ckpt_a, ckpt_b, opts, (model_a, model_b))
    if replacement:
        found = load_models_cli(replacement, **{**opts, "model": model_c})
        if len(found) != 1:
            raise UserError(f"{replacement} holds {len(found)} models: say which with --model-c (net1 or net2)")
        found[0].label = f"replacement {found[0].label}"
        models.append(found[0])
    preds, accs = [], []
    for m in models:
        kw = dict(device=dev, batch_size=batch_size, precision=prec, image_size=image_size, progress=True)
        train = features_for(m, spec, "train", dataset=train_ds, **kw)
        test = features_for(m, spec, "val", dataset=val_ds, **kw)
        # the bank from the sharded cache is streamed shard by shard; only the queries are held whole
        p = knn_predict(train.bank, train.labels, test.features, ks=(k,), temperature=temperature,
                        num_classes=len(train_ds.classes), log=None)[min(k, len(train_ds))][:, 0]
        preds.append(p)
        accs.append(100.0 * (p == test.labels).float().mean().item())
    labels = test.labels
    pair = prediction_consistency(preds[0], preds[1], labels)
    rows = [[f"{models[0].label} + {models[1].label}", accs[0], accs[1], f"{pair['consistency']:.3f}"]]
    metrics = {"headline": "consistency", "consistency": pair["consistency"], "pair": pair, "k": k}
    if replacement:
        rep = replacement_consistency(preds[0], preds[1], preds[2], labels, replace=replace)
        kept = models[1] if replace == "a" else models[0]
        rows.append([f"{models[2].label} + {kept.label}", accs[2] if replace == "a" else accs[0],
                     accs[1] if replace == "a" else accs[2], f"{rep['replaced']['consistency']:.3f}"])
        metrics.update({"replaced": rep["replaced"], "replace": replace, "delta": rep["delta"]})
    echo(f"\nk-NN (k={k}) prediction consistency on {spec.kind} val ({len(labels)} images):")
    echo(markdown_table(["pair", "k-NN A (%)", "k-NN B (%)", "consistency"], rows))
    path = write_record(out, task="consistency",
                        checkpoint={**models[0].checkpoint, "compared_with": [m.checkpoint for m in models[1:]]},
                        data={"spec": str(spec), "split": "val", "num_images": int(len(labels))},
                        settings={"k": k, "temperature": temperature, "image_size": image_size, "seed": seed,
                                  "replace": replace if replacement else None},
                        metrics=metrics, wall_time_s=time.time() - t0, device=dev)
    echo(f"record: {path}")


@analyze_cli.command("tsne")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--classes", "num_classes", type=click.IntRange(min=1), default=10, show_default=True,
              help="Classes drawn at random (seeded) for the plot.")
@click.option("--per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="At most this many validation images per class and model.")
@click.option("--perplexity", type=float, default=30.0, show_default=True, help="t-SNE perplexity (openTSNE).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Input resolution (default: the data's own size for small images, else the checkpoint's "
                   "training resolution, else 224).")
@click.option("--side-by-side", "side_by_side", is_flag=True,
              help="Two checkpoints in two panels of one joint embedding (Fig. 4): independent left, MOKD right.")
@figure_width_option
@debug_option
def tsne_cmd(checkpoints, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device, seed,
             num_classes, per_class, perplexity, batch_size, image_size, side_by_side, figure_width):
    """t-SNE of models' features on randomly chosen classes (Fig. 4 / S1): a colour per class, a marker per model.

    One map of one or two models (a MOKD checkpoint given alone contributes both of its models), or with
    --side-by-side the paper's layout: A.pth and B.pth in two panels, independent left and MOKD right, each
    with its own models (net1 circles, net2 triangles), embedded jointly so that the panels compare.
    Writes tsne.png, tsne.pdf, tsne.svg and tsne.npz (coordinates, labels, model ids) into --out.
    """
    from mokd_analysis.plots import plot_tsne
    from mokd_analysis.tsne import choose_classes, joint_tsne, save_embedding

    if len(checkpoints) > 2:
        raise UserError(f"tsne takes one or two checkpoints, got {len(checkpoints)}")
    if side_by_side and len(checkpoints) != 2:
        raise UserError(f"--side-by-side compares two checkpoints (independent and MOKD), got {len(checkpoints)}")
    t0 = time.time()
    dev = setup_run(device, seed)
    prec = precision_for("auto", dev)
    spec = resolve_data(data, class_list)
    val = build_dataset(spec, "val")
    opts = dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs, key=key, allow_partial=allow_partial)
    if side_by_side:
        per_file = sorted((_load([c], opts) for c in checkpoints), key=_mode_rank)
        models = [m for ms in per_file for m in ms]
    else:
        models = _load(list(checkpoints), opts)
        if len(models) > 2:
            raise UserError(f"{len(models)} models loaded; one t-SNE map overlays one or two: pick one with --model, "
                            f"or draw the two checkpoints in two panels with --side-by-side")
    chosen = choose_classes(len(val.classes), num_classes, seed)
    targets = np.asarray(val.targets)
    rng = np.random.default_rng(seed)
    keep = sorted(i for c in chosen for i in rng.permutation(np.flatnonzero(targets == c))[:per_class].tolist())
    ds = val.subset(keep)
    feats = []
    for m in models:
        # only the chosen images are extracted (about classes x per-class rows), uncached: no bank to stream
        fs = features_for(m, spec, "val", dataset=ds, device=dev, batch_size=batch_size, precision=prec,
                          image_size=image_size, use_cache=False, progress=True)
        feats.append(fs.features)
    coords, ids = joint_tsne(feats, seed=seed, perplexity=perplexity)
    remap = {c: i for i, c in enumerate(chosen)}
    labels = np.tile(np.asarray([remap[targets[i]] for i in keep]), len(models))
    class_names = [val.classes[c] for c in chosen]
    out_dir = Path(out)
    what = f"t-SNE of {len(chosen)} {data_name(spec)} classes"
    if side_by_side:
        names = [m.checkpoint["name"] for m in models]
        layout = dict(panels=[_run_title(ms[0]) for ms in per_file],
                      panel_of_model=[p for p, ms in enumerate(per_file) for _ in ms],
                      marker_of_model=[i for ms in per_file for i in range(len(ms))])
        if per_file[0][0].checkpoint.get("mode") == per_file[1][0].checkpoint.get("mode"):
            echo(f"note: both checkpoints say mode {per_file[0][0].checkpoint.get('mode')}; panels in the order given")
    else:
        names = [f"{_run_title(m)}: {m.checkpoint['name']}" if len(checkpoints) > 1 else m.checkpoint["name"]
                 for m in models]
        layout = dict(panels=[f"{what}, {_run_title(models[0])}" if len(checkpoints) == 1 else what])
    figures = plot_tsne(coords, labels, ids, class_names, names, out_dir / "tsne", title=what, width=figure_width,
                        **layout)
    emb = save_embedding(out_dir / "tsne.npz", coords, labels, ids, class_names,
                         [f"{_run_title(m)}: {m.checkpoint['name']}" for m in models],
                         np.tile(np.asarray(keep), len(models)))
    for m in models:
        write_record(out_dir, task="tsne", checkpoint=m.checkpoint,
                     data={"spec": str(spec), "split": "val", "classes": class_names, "num_images": len(keep)},
                     settings={"perplexity": perplexity, "seed": seed, "per_class": per_class},
                     metrics={"headline": None, "figures": {k: str(v) for k, v in figures.items()},
                              "embedding": str(emb)}, wall_time_s=time.time() - t0, device=dev)
    echo(f"written: {', '.join(str(p) for p in figures.values())}, {emb}")


def _run_title(m) -> str:
    """'r50_vits_indep · independent': the run and, for our checkpoints, the mode its config states."""
    c = m.checkpoint
    return " · ".join(x for x in (c.get("run"), c.get("mode")) if x)


def _mode_rank(models: list) -> int:
    """Independent runs left of MOKD runs (Fig. 4), other files after; a stable sort keeps the given order."""
    return {"independent": 0, "mokd": 1}.get(models[0].checkpoint.get("mode"), 2)
