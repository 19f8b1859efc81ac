"""`mokd analyze mad | consistency | tsne | cka | attention | rank`: the paper's Sec. 4.6 analyses and three more
for any checkpoints the loader reads (each `PATH` or `PATH::TIMM_ARCH`, each with its own `--label`).

Each command loads models through mokd_eval's loader (a MOKD checkpoint gives both models), uses the
embedded digits unless --data says otherwise, writes figures and numbers into --out, and one result record
per analysed model (consistency: per pair).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from mokd.cli_common import data_options, debug_option, device_option, out_option, resolve_data, seed_option
from mokd.data import build_dataset
from mokd.errors import UserError
from mokd.naming import data_name
from mokd_eval.common import _cifar_stem_flag, _pos_resample_flag, echo, echo_load_report, load_eval_data, loader_options, \
    pos_resample_option, precision_for, setup_run
from mokd_analysis.images import seeded_subset
from mokd_eval.features import eval_transform, features_for, fit_input_size, spec_transform
from mokd_eval.knn import knn_predict
from mokd_eval.records import write_record
from mokd_eval.report import markdown_table
from mokd_eval.spec import CheckpointSpec, load_spec, parse_checkpoint_args


label_option = click.option(
    "--label", "labels", multiple=True, metavar="TEXT",
    help="Name of a checkpoint in figures, tables and records; repeat it once per checkpoint, in the same order "
         "(a MOKD pair's models get it before their own names). Default: the run (folder) name and model.")


def analysis_options(f):
    """--label, the loader options, --data/--class-list, --out, --device and --seed, shared by every analysis."""
    for option in reversed([label_option, loader_options, data_options, out_option(default="results/analysis"),
                            device_option, seed_option]):
        f = option(f)
    return f


CHECKPOINTS_HELP = ("Each CHECKPOINT is a file, or PATH::TIMM_ARCH for a file that does not name its architecture "
                    "(e.g. dino_vits16.pth::vit_small_patch16_224); --arch applies to the files without one.")


def _specs(args: list[str], labels: tuple[str, ...] | list[str], **opts) -> list[CheckpointSpec]:
    """CLI arguments (PATH or PATH::ARCH) and --labels -> specs with the loader options given once for all."""
    return parse_checkpoint_args(list(args), list(labels), **opts, cifar_stem=_cifar_stem_flag(),
                                 pos_resample=_pos_resample_flag())


def _load_spec_cli(spec: CheckpointSpec) -> list:
    """load_spec, printing one load report per model; each model keeps the label its spec gave (`given_label`)."""
    models = load_spec(spec)
    for m in models:
        echo_load_report(m, spec.path)
        m.given_label = spec.label
    return models


def _load_each(args: list[str], labels, opts: dict) -> list[list]:
    """Each checkpoint's models, file by file. Without --label, names get the checkpoint's run name when several
    files are given; with it, the label (and a pair's model names)."""
    specs = _specs(args, labels, **opts)
    per_file = []
    for spec in specs:
        models = _load_spec_cli(spec)
        for m in models:
            if len(specs) > 1 and not spec.label:
                m.label = f"{m.checkpoint['run']} {m.label}"
        per_file.append(models)
    return per_file


def _load(args: list[str], labels, opts: dict) -> list:
    """Every model of every checkpoint (see _load_each)."""
    return [m for models in _load_each(args, labels, opts) for m in models]


def image_size_option(more: str = ""):
    """--image-size, sized as every command sizes its input (mokd_eval.features.resolve_image_size)."""
    return click.option("--image-size", type=click.IntRange(min=8), default=None,
                        help="Input resolution (default: the data's own size for small images, else the "
                             f"checkpoint's training resolution, else 224{more}).")


figure_width_option = click.option(
    "--figure-width", "figure_width", type=click.Choice(["auto", "column", "page"]), default="auto",
    show_default=True, help="Width of the figures: one column (3.25 in) or the page (6.875 in) of a CVPR paper; "
                            "auto: a column for one panel, the page for more.")




@click.group("analyze")
def analyze_cli():
    """Analyse checkpoints: mean attention distance, prediction consistency, t-SNE (paper Sec. 4.6), layer-by-layer
    CKA, attention maps, and the label-free RankMe and alpha-ReQ."""


@analyze_cli.command("mad")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass.")
@image_size_option("; a ViT-S/16 on 32 px digits then sees a 2x2 grid: give --image-size 224 for a meaningful "
                   "distance")
@click.option("--max-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images of the validation split averaged over (a seeded pick).")
@figure_width_option
@debug_option
def mad_cmd(checkpoints, labels, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device,
            seed, batch_size, image_size, max_images, figure_width):
    """Mean attention distance per layer and head (ViTs) or per residual block (CNNs), the paper's Fig. 5 and
    supplementary Fig. S2.

    Several checkpoints overlay in one figure (e.g. independent against MOKD); a MOKD checkpoint gives both
    models; each run keeps its colour and marker in both panels. Writes mad.png, mad.pdf, mad.svg, mad.json,
    mad.csv and a record per model into --out.

    Each CHECKPOINT is a file, or PATH::TIMM_ARCH for a file that does not name its architecture (--arch applies
    to the others); --label names them, once per checkpoint.
    """
    from mokd_analysis.mad import loaded_mad, save_mad_tables
    from mokd_analysis.plots import plot_mad

    t0 = time.time()
    dev = setup_run(device, seed)
    spec = resolve_data(data, class_list)
    models = _load(list(checkpoints), labels, dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs,
                                                   key=key, allow_partial=allow_partial))
    val = build_dataset(spec, "val")
    images = val.subset(seeded_subset(len(val), max_images, seed))
    results = []
    for m in models:
        r = loaded_mad(m, spec, images, image_size, batch_size, dev)
        r.run, r.mode = m.given_label or m.checkpoint["run"], m.checkpoint.get("mode")
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


def _models_for_pair(specs: list[CheckpointSpec], models_ab: tuple[str | None, str | None]) -> list:
    """Two models: both of a MOKD checkpoint given alone, or one from each of two checkpoints. `models_ab`
    (--model-a/--model-b) picks each file's model where given."""
    for spec, which in zip(specs, models_ab):
        spec.model = which or spec.model
    if len(specs) == 1:
        models = _load_spec_cli(specs[0])
        if len(models) != 2:
            raise UserError(f"{specs[0].path} holds {len(models)} model(s): give a second checkpoint to compare with")
        return models
    pair = []
    for spec in specs:
        found = _load_spec_cli(spec)
        if len(found) != 1:
            raise UserError(f"{spec.path} holds {len(found)} models: say which with --model-a/--model-b (net1 or net2)")
        m = found[0]
        if not spec.label:
            path = Path(spec.path)
            m.label = f"{path.parent.name or path.stem} {m.label}".strip()
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
              help="timm architecture when a file does not name it (PATH::TIMM_NAME sets it for one file).")
@click.option("--allow-partial", "allow_partial", is_flag=True,
              help="Analyse even if not every backbone tensor matched (the rest keep their random init).")
@pos_resample_option
@label_option
@click.option("--k", "k", type=click.IntRange(min=1), default=20, show_default=True, help="k-NN neighbours.")
@click.option("--temperature", type=float, default=0.07, show_default=True,
              help="k-NN vote temperature (DINO's weights exp(similarity / T)).")
@data_options
@out_option(default="results/analysis")
@device_option
@seed_option
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass.")
@image_size_option()
@debug_option
def consistency_cmd(ckpt_a, ckpt_b, replacement, replace, model_a, model_b, model_c, branch, arch, allow_partial,
                    labels, k, temperature, data, class_list, out, device, seed, batch_size, image_size):
    """Fraction of evaluation images on which two models' k-NN predictions agree (Table 9).

    CKPT_A alone (a MOKD checkpoint) compares its two models. --replacement C repeats the comparison with C
    in place of one model, which tells whether higher agreement comes from higher accuracy alone.
    Each checkpoint may be PATH::TIMM_ARCH; --label names them (A, B, then the replacement), once each.
    """
    from mokd_analysis.consistency import prediction_consistency, replacement_consistency

    t0 = time.time()
    dev = setup_run(device, seed)
    prec = precision_for("auto", dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list)
    args = [a for a in (ckpt_a, ckpt_b, replacement) if a]
    specs = _specs(args, labels, branch=branch, arch=arch, allow_partial=allow_partial)
    pair_specs, rep_spec = (specs[:-1], specs[-1]) if replacement else (specs, None)
    models = _models_for_pair(pair_specs, (model_a, model_b))
    if rep_spec is not None:
        rep_spec.model = model_c or rep_spec.model
        found = _load_spec_cli(rep_spec)
        if len(found) != 1:
            raise UserError(f"{rep_spec.path} holds {len(found)} models: say which with --model-c (net1 or net2)")
        if not rep_spec.label:
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
@image_size_option()
@click.option("--side-by-side", "side_by_side", is_flag=True,
              help="Two checkpoints in two panels of one joint embedding (Fig. 4): independent left, MOKD right.")
@figure_width_option
@debug_option
def tsne_cmd(checkpoints, labels, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device,
             seed, num_classes, per_class, perplexity, batch_size, image_size, side_by_side, figure_width):
    """t-SNE of models' features on randomly chosen classes (Fig. 4 / S1): a colour per class, a marker per model.

    One map of one or two models (a MOKD checkpoint given alone contributes both of its models), or with
    --side-by-side the paper's layout: A.pth and B.pth in two panels, independent left and MOKD right, each
    with its own models (net1 circles, net2 triangles), embedded jointly so that the panels compare.
    Writes tsne.png, tsne.pdf, tsne.svg and tsne.npz (coordinates, labels, model ids) into --out.
    Each CHECKPOINT may be PATH::TIMM_ARCH; --label names them, once per checkpoint.
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
        per_file = sorted(_load_each(list(checkpoints), labels, opts), key=_mode_rank)
        models = [m for ms in per_file for m in ms]
    else:
        models = _load(list(checkpoints), labels, opts)
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
    """'r50_vits_indep · independent': the run and, for our checkpoints, the mode its config states; the
    checkpoint's --label instead of the run where one was given."""
    c = m.checkpoint
    if getattr(m, "given_label", None):
        return " · ".join(x for x in (m.given_label, c.get("mode")) if x)
    return " · ".join(x for x in (c.get("run"), c.get("mode")) if x)


def _mode_rank(models: list) -> int:
    """Independent runs left of MOKD runs (Fig. 4), other files after; a stable sort keeps the given order."""
    return {"independent": 0, "mokd": 1}.get(models[0].checkpoint.get("mode"), 2)


def _views(ds, transforms):
    """The images of `ds` once per transform: (x_a, x_b) for two models that see the same images at their own
    sizes, or x alone for one."""
    base = ds.subset(range(len(ds)))
    base.transform = None

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            img = base[i][0]
            xs = tuple(t(img) for t in transforms)
            return xs if len(xs) > 1 else xs[0]

    return Views()


@analyze_cli.command("cka")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--model-a", default=None, help="net1|net2 of the first checkpoint (MOKD files; default: --model).")
@click.option("--model-b", default=None, help="net1|net2 of the second checkpoint (default: --model).")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True,
              help="Split of --data (an unlabelled folder of images is used whole).")
@click.option("--batch-size", type=click.IntRange(min=4), default=256, show_default=True,
              help="Images per CKA minibatch, at least: the images are split into N // BATCH_SIZE batches of equal "
                   "size (within one), so that every batch weighs the same and none is short; unbiased HSIC needs 4.")
@image_size_option()
@click.option("--max-images", type=click.IntRange(min=4), default=2048, show_default=True,
              help="Images used (a seeded pick); memory does not grow with it, time does.")
@figure_width_option
@debug_option
def cka_cmd(checkpoints, labels, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device,
            seed, model_a, model_b, split, batch_size, image_size, max_images, figure_width):
    """Linear CKA between every layer of model A and every layer of model B: CHECKPOINT_A [CHECKPOINT_B].

    ViT layers: each block's patch tokens mean-pooled (blockN.mean) and its CLS token (blockN.cls); CNN
    layers: each stage's output, spatially pooled. Estimated over minibatches with unbiased HSIC (Nguyen et
    al. 2021), one forward pass of each model per batch; for two models also the CKA of their final embeddings
    (the features every protocol uses), by the same estimator and function as `mokd bench`'s cka. Every batch
    holds about --batch-size images (N // BATCH_SIZE equal batches, none short). One file of one model: its self-similarity; a MOKD
    file alone: its two models against each other (--model net1 for one's self-similarity); two files: one
    model of each (--model, or --model-a/--model-b). Each CHECKPOINT may be PATH::TIMM_ARCH; --label names
    them. Writes cka.json, cka.png, cka.pdf, cka.svg and a record into --out.
    """
    from mokd_analysis.cka import ESTIMATOR, cka_batches, cka_settings, feature_cka
    from mokd_analysis.images import analysis_dataset
    from mokd_analysis.layers import model_cka
    from mokd_analysis.plots import plot_cka

    if len(checkpoints) > 2:
        raise UserError(f"cka compares one or two checkpoints (A, or A and B), got {len(checkpoints)}")
    t0 = time.time()
    dev = setup_run(device, seed)
    spec = resolve_data(data, class_list)
    specs = _specs(list(checkpoints), labels, model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs, key=key,
                   allow_partial=allow_partial)
    for s_, which in zip(specs, (model_a, model_b)):
        s_.model = which or s_.model
    per_file = [_load_spec_cli(s_) for s_ in specs]
    if len(per_file) == 2:
        for s_, ms in zip(specs, per_file):
            if len(ms) != 1:
                raise UserError(f"{s_.path} holds {len(ms)} models: pick one with --model (both files) or "
                                f"--model-a/--model-b (net1 or net2)")
        models = [per_file[0][0], per_file[1][0]]
    elif len(per_file[0]) > 2:
        raise UserError(f"{specs[0].path} holds {len(per_file[0])} models: pick one or two with --model")
    else:
        models = per_file[0]
    ds = analysis_dataset(spec, split)
    subset = len(ds) > max_images
    pick = seeded_subset(len(ds), max_images, seed)
    ds = ds.subset(pick)
    transforms = []
    for m in models:
        size = int(image_size or spec.native_size or m.image_size or 224)
        fit_input_size(m.backbone, size)
        transforms.append(spec_transform(spec, size))
    # batches of (about) equal size over a seeded shuffle, the same as feature_cka's, so no batch is short
    batches = [b.tolist() for b in cka_batches(len(ds), batch_size, seed)]
    loader = torch.utils.data.DataLoader(_views(ds, transforms), batch_sampler=batches)
    cka, names_a, names_b = model_cka(models[0].backbone, models[1].backbone if len(models) == 2 else None, loader,
                                      dev)
    matrix = cka.compute()
    final = None
    if len(models) == 2:  # the final embeddings, as the bench compares them: cached features and feature_cka
        prec = precision_for("fp32", dev)
        fs = [features_for(m, spec, split, dataset=ds, device=dev, batch_size=batch_size, precision=prec,
                           image_size=image_size, use_cache=not subset, progress=False, log=echo) for m in models]
        final = feature_cka(fs[0].features, fs[1].features, batch_size, seed)
    label_a, label_b = models[0].label, models[-1].label
    out_dir = Path(out)
    what = f"{data_name(spec)} {split}" if ds.classes != ["unlabelled"] else spec.root.name
    title = f"Linear CKA, {cka.examples} images of {what}"
    figures = plot_cka(matrix.numpy(), names_a, names_b, label_a, label_b, out_dir / "cka", title=title,
                       width=figure_width)
    numbers = {"model_a": label_a, "model_b": label_b, "layers_a": names_a, "layers_b": names_b,
               "matrix": matrix.tolist(), "self_similarity": len(models) == 1, "num_images": cka.examples,
               "batch_sizes": sorted({len(b) for b in batches}), "batches": cka.batches, "final_cka": final,
               **cka_settings(batch_size, seed), "data": str(spec), "split": split}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "cka.json"
    json_path.write_text(json.dumps(numbers, indent=2) + "\n")
    echo(f"\nlinear CKA on {what} ({cka.examples} images in {cka.batches} batch(es) of "
         f"{'-'.join(map(str, sorted({len(b) for b in batches})))})")
    diag = [float(matrix[i, j]) for i, j in _best_matches(matrix)]
    echo(markdown_table([f"layer of {label_a}", f"most similar layer of {label_b}", "CKA"],
                        [[names_a[i], names_b[j], v] for (i, j), v in zip(_best_matches(matrix), diag)]))
    if final is not None:
        echo(f"final embeddings: CKA {final:.4f} ({ESTIMATOR}, {len(ds)} images; the bench's cka protocol "
             "computes the same)")
    path = write_record(out_dir, task="cka",
                        checkpoint={**models[0].checkpoint,
                                    "compared_with": [m.checkpoint for m in models[1:]]},
                        data={"spec": str(spec), "split": split, "num_images": cka.examples},
                        # which model of each file, and B's file, name the record too (two runs' net1 and net2
                        # under the same --labels write two records)
                        settings={"batch_size": batch_size, "max_images": max_images, "image_size": image_size,
                                  "seed": seed, **cka_settings(batch_size, seed),
                                  "models": [m.checkpoint.get("model") for m in models],
                                  "b_sha256": models[-1].checkpoint.get("sha256")},
                        metrics={"headline": "mean_best_match", "mean_best_match": float(np.mean(diag)),
                                 "final_cka": final,
                                 "layers_a": names_a, "layers_b": names_b, "matrix": matrix.tolist(),
                                 "figures": {k: str(v) for k, v in figures.items()}, "numbers": str(json_path)},
                        wall_time_s=time.time() - t0, device=dev)
    echo(f"\nwritten: {', '.join(str(p) for p in figures.values())}, {json_path}, {path}")


def _best_matches(matrix: torch.Tensor) -> list[tuple[int, int]]:
    """For each layer of A, the layer of B with the highest CKA."""
    return [(i, int(matrix[i].argmax())) for i in range(matrix.shape[0])]


@analyze_cli.command("attention")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--images", "images", multiple=True, type=click.Path(exists=False),
              help="An image file or a folder of images (repeatable). Default: --num-images images of --data's val "
                   "split (a seeded pick).")
@click.option("--num-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images taken from --data when --images is not given.")
@image_size_option()
@debug_option
def attention_cmd(checkpoints, labels, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out,
                  device, seed, images, num_images, image_size):
    """Where models look: for a ViT the last block's CLS-to-patch attention per head and the attention rollout
    over all blocks; for a CNN the channel norm of its last feature map. One row per image, one column per map.

    Attention is recomputed from each block's qkv by hooks, so fused attention and register tokens (their
    weights left out of the maps) work with any timm ViT. Each CHECKPOINT may be PATH::TIMM_ARCH; --label
    names them. Writes attention.png, attention.pdf, attention.svg, attention.npz (the images and every map)
    and a record per model into --out.
    """
    from mokd_analysis.attention import cnn_norm_map, vit_attention_maps
    from mokd_analysis.images import files_dataset, image_files
    from mokd_analysis.plots import plot_attention
    from mokd_eval.features import is_vit

    t0 = time.time()
    dev = setup_run(device, seed)
    models = _load(list(checkpoints), labels, dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs,
                                                   key=key, allow_partial=allow_partial))
    if images:
        spec, native = None, False
        ds = files_dataset(image_files(list(images)))
        names = [Path(p).name for p in ds.paths]
    else:
        spec = resolve_data(data, class_list)
        native = spec.native_size is not None
        from mokd_analysis.images import analysis_dataset

        full = analysis_dataset(spec, "val")
        pick = seeded_subset(len(full), num_images, seed)
        ds = full.subset(pick)
        names = [f"{full.classes[full.targets[i]]} #{i}" if full.classes != ["unlabelled"] else Path(full.paths[i]).name
                 for i in pick]
    sizes = [int(image_size or (spec.native_size if spec else None) or m.image_size or 224) for m in models]
    shown = max(max(sizes), 128)  # the images as drawn: the models' crop, at a size that reads in print
    pictures = np.stack([np.asarray(_display_transform(shown, native)(_pil(ds, i))) for i in range(len(ds))])
    panels, arrays, summary = [], {"images": pictures}, []
    for mi, (m, size) in enumerate(zip(models, sizes)):
        fit_input_size(m.backbone, size)
        backbone = m.backbone.to(dev).eval()
        tf = spec_transform(spec, size) if spec is not None else eval_transform(size, native)
        x = torch.stack([tf(_pil(ds, i)) for i in range(len(ds))]).to(dev)
        if is_vit(backbone):
            maps = vit_attention_maps(backbone, x)
            panels.append((m.label, "rollout", maps["rollout"].numpy()))
            panels += [(m.label, f"head {h + 1}", maps["heads"][:, h].numpy()) for h in range(maps["heads"].shape[1])]
            info = {"kind": "vit", "heads": int(maps["heads"].shape[1]), "grid": list(maps["rollout"].shape[1:]),
                    "num_prefix_tokens": int(getattr(backbone, "num_prefix_tokens", 1)),
                    "cls_is_embedding": getattr(backbone, "global_pool", "token") == "token"}
        else:
            maps = cnn_norm_map(backbone, x)
            panels.append((m.label, "feature norm", maps["norm"].numpy()))
            info = {"kind": "cnn", "grid": list(maps["norm"].shape[1:])}
        arrays.update({f"model{mi}_{k}": v.numpy() for k, v in maps.items()})
        summary.append({"label": m.label, "name": m.checkpoint["name"], "image_size": size, **info})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "attention.npz"
    np.savez_compressed(npz, **arrays, model_labels=np.asarray([s_["label"] for s_ in summary]),
                        image_names=np.asarray(names))
    figures = plot_attention(pictures.astype(np.float32) / 255.0, panels, out_dir / "attention",
                             title=f"Where each model looks ({len(ds)} images)")
    for m, s_ in zip(models, summary):
        echo(f"{s_['label']} ({s_['name']}, {s_['kind']}, {s_['image_size']} px): map grid {s_['grid']}"
             + (f", {s_['heads']} heads, {s_['num_prefix_tokens']} prefix token(s)" if s_["kind"] == "vit" else ""))
        if s_["kind"] == "vit" and not s_["cls_is_embedding"]:
            echo(f"note: {s_['label']} pools its patch tokens (timm global_pool={m.backbone.global_pool!r}): its CLS "
                 f"token is not its embedding, so these maps show where that token looks, not what the embedding reads")
        write_record(out_dir, task="attention", checkpoint=m.checkpoint,
                     data={"spec": str(spec) if spec else None, "images": names, "num_images": len(ds)},
                     settings={"image_size": s_["image_size"], "seed": seed},
                     metrics={"headline": None, **s_, "figures": {k: str(v) for k, v in figures.items()},
                              "maps": str(npz)}, wall_time_s=time.time() - t0, device=dev)
    echo(f"written: {', '.join(str(p) for p in figures.values())}, {npz}")


def _pil(ds, i: int):
    """Image i of `ds` as PIL, whatever transform the set holds."""
    keep, ds.transform = ds.transform, None
    try:
        return ds[i][0]
    finally:
        ds.transform = keep


def _display_transform(size: int, native: bool):
    """The evaluation crop without the normalisation: what the model sees, as an RGB array to draw."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if native:
        return T.Resize((size, size), interpolation=bicubic)
    return T.Compose([T.Resize(round(size * 256 / 224), interpolation=bicubic), T.CenterCrop(size)])


@analyze_cli.command("rank")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@analysis_options
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True,
              help="Split of --data (an unlabelled folder of images is used whole).")
@click.option("--max-images", type=click.IntRange(min=2), default=None, show_default="every image, cached",
              help="Score a seeded pick of this many images (uncached) instead of the whole split (cached).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass of feature extraction.")
@image_size_option()
@click.option("--cache-dir", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (default: $MOKD_CACHE or ~/.cache/mokd/features).")
@click.option("--no-cache", "no_cache", is_flag=True, help="Neither read nor write the feature cache.")
@figure_width_option
@debug_option
def rank_cmd(checkpoints, labels, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device,
             seed, split, max_images, batch_size, image_size, cache_dir, no_cache, figure_width):
    """Label-free quality of each model's embedding: RankMe (Garrido et al. 2023; effective rank, 1 for a
    collapsed embedding, at most the width) and alpha-ReQ (Agrawal et al. 2022; power-law decay of the
    eigenspectrum); also RankMe of the centred features, which a large offset shared by every embedding does not
    pull towards 1, and whether the embedding has collapsed (its spread around the mean negligible next to its
    offset, where the centred scores only measure noise). Any --data works, an unlabelled folder of images too; features come from the cache that the
    other protocols share. Each CHECKPOINT may be PATH::TIMM_ARCH; --label names them. Writes rank.json,
    rank.png, rank.pdf, rank.svg (the eigenspectra) and a record per model into --out.
    """
    from mokd_analysis.images import analysis_dataset
    from mokd_analysis.plots import plot_rank
    from mokd_analysis.rank import RANK_KEYS, RANK_SETTINGS, covariance_spectrum, rank_scores

    t0 = time.time()
    dev = setup_run(device, seed)
    prec = precision_for("fp32", dev)
    spec = resolve_data(data, class_list)
    models = _load(list(checkpoints), labels, dict(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs,
                                                   key=key, allow_partial=allow_partial))
    ds = analysis_dataset(spec, split)
    subset = max_images is not None and len(ds) > max_images
    if subset:
        ds = ds.subset(seeded_subset(len(ds), max_images, seed))
    rows, results, spectra = [], [], []
    for m in models:
        fs = features_for(m, spec, split, dataset=ds, device=dev, batch_size=batch_size, precision=prec,
                          image_size=image_size, cache=cache_dir, use_cache=not (no_cache or subset), progress=True,
                          log=echo)
        feats = fs.features
        scores = rank_scores(feats)
        spectrum = covariance_spectrum(feats)
        spectra.append(spectrum.numpy())
        results.append({"label": m.label, "name": m.checkpoint["name"], **scores, "image_size": fs.image_size,
                        "spectrum": spectrum.tolist()})
        fit = scores["alpha_fit"]
        rows.append([m.label, m.checkpoint["name"], scores["rankme"], scores["rankme_centered"],
                     "n/a" if scores["alpha_req"] is None else scores["alpha_req"],
                     f"{fit['first']}-{fit['last']}" + ("" if fit["r2"] is None else f", R² {fit['r2']:.3f}"),
                     "n/a" if scores["spread_to_offset"] is None else f"{scores['spread_to_offset']:.2g}",
                     "YES" if scores["collapsed"] else "no", scores["dim"], scores["n"]])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "rank.json"
    json_path.write_text(json.dumps({"data": str(spec), "split": split, "models": results}, indent=2) + "\n")
    what = f"{data_name(spec)} {split}" if ds.classes != ["unlabelled"] else f"{spec.root} (unlabelled)"
    figures = plot_rank(spectra, [r["label"] for r in results], results, out_dir / "rank",
                        title=f"Covariance eigenspectra on {what} ({len(ds)} images)", width=figure_width)
    echo(f"\nRankMe and alpha-ReQ on {what} ({len(ds)} images):")
    echo(markdown_table(["model", "architecture", "RankMe", "RankMe centred", "alpha-ReQ", "alpha fit (k, R²)",
                         "spread/offset", "collapsed", "dim", "images"], rows))
    for r in results:
        if r["collapsed"]:
            echo(f"warning: {r['label']} has collapsed: {r['collapse_reason']}")
    for m, r in zip(models, results):
        write_record(out_dir, task="rank", checkpoint=m.checkpoint,
                     data={"spec": str(spec), "split": split, "num_images": r["n"],
                           "labelled": ds.classes != ["unlabelled"]},
                     settings={"image_size": r["image_size"], "max_images": max_images, "seed": seed,
                               **RANK_SETTINGS},
                     metrics={"headline": "rankme", **{k: r[k] for k in RANK_KEYS},
                              "figures": {k: str(v) for k, v in figures.items()},
                              "numbers": str(json_path)},
                     wall_time_s=time.time() - t0, device=dev)
    echo(f"\nwritten: {', '.join(str(p) for p in figures.values())}, {json_path}")
