"""The bench's protocols: a plain dict of name -> Protocol, each `run(inputs, settings) -> [record body]`.

`inputs` holds the model(s) of one job, each with `features(split, mode, n_last_blocks)`: features_for through
the cache, asked once per (model, split, mode) in a bench run and shared by every protocol. A record body is
{"model": ModelInputs, "metrics", "settings", "data"}; the runner adds the checkpoint and provenance and writes it.
Every number comes from mokd_eval (k-NN, linear probe) or mokd_analysis (rank, mean attention distance, CKA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from mokd.errors import UserError
from mokd.models.backbones import is_vit


@dataclass
class ModelInputs:
    loaded: object  # mokd_eval.loader.LoadedModel
    features: Callable  # (split, mode="cls", n_last_blocks=4) -> mokd_eval.features.FeatureSet


@dataclass
class Inputs:
    models: list[ModelInputs]
    data: object  # mokd_bench.data.BenchData
    device: torch.device
    precision: str
    image_size: int | None
    batch_size: int
    seed: int
    log: Callable[[str], None]


def _body(m: ModelInputs, metrics: dict, settings: dict, data: dict) -> dict:
    return {"model": m, "metrics": metrics, "settings": settings, "data": data}


def _kind(m: ModelInputs) -> str:
    return "vit" if is_vit(m.loaded.backbone) else "cnn"


def run_knn(inp: Inputs, s: dict) -> list[dict]:
    """Weighted k-NN (mokd_eval.knn): train features as the bank, val features as queries."""
    from mokd_eval.knn import knn_evaluate, resolve_backend

    out = []
    for m in inp.models:
        train, val = m.features("train"), m.features("val")
        metrics = knn_evaluate(train.bank, train.labels, val.features, val.labels, ks=s["ks"],
                               temperature=s["temperature"], num_classes=len(inp.data.classes), backend=s["backend"],
                               device=inp.device, log=inp.log)
        settings = {"ks": list(metrics["top1"]), "temperature": s["temperature"],
                    "backend": resolve_backend(s["backend"], inp.device), "feature_mode": train.mode,
                    "image_size": train.image_size, "precision": inp.precision, "batch_size": inp.batch_size,
                    "seed": inp.seed, "features_cached": train.from_cache and val.from_cache}
        out.append(_body(m, metrics, settings, inp.data.record()))
    return out


def _check_linear(s: dict) -> None:
    if s["warmup_epochs"] > s["epochs"]:
        raise UserError(f"settings.linear: warmup_epochs {s['warmup_epochs']} is more than epochs {s['epochs']}")
    if s["lr_grid"] is not None and (not s["lr_grid"] or min(s["lr_grid"]) <= 0):
        raise UserError(f"settings.linear: lr_grid must be positive learning rates, got {s['lr_grid']!r}")


def run_linear(inp: Inputs, s: dict) -> list[dict]:
    """The fast linear probe (mokd_eval.linear.fast_linear_probe): a grid of lrs on cached features, the lr picked
    on a held-out part of train, its val accuracy reported. ViT features as the paper's: last blocks' CLS tokens."""
    from mokd_eval.linear import DEFAULT_LR_GRID, LinearSettings, effective_blocks, fast_linear_probe

    out = []
    for m in inp.models:
        bb = m.loaded.backbone
        n = effective_blocks(bb, s["n_last_blocks"])
        mode = "cls" if not is_vit(bb) else ("lastn_avgpool" if n > 1 else "avgpool") if s["avgpool"] else "lastn"
        tr, va = m.features("train", mode, n), m.features("val", mode, n)
        ls = LinearSettings(epochs=s["epochs"], batch_size=s["batch_size"], warmup_epochs=s["warmup_epochs"],
                            momentum=s["momentum"], weight_decay=s["weight_decay"], n_last_blocks=s["n_last_blocks"],
                            avgpool=s["avgpool"], image_size=tr.image_size,
                            lr_grid=tuple(s["lr_grid"] or DEFAULT_LR_GRID), holdout=s["holdout"])
        metrics = fast_linear_probe(tr.bank, tr.labels, va.bank, va.labels, num_classes=len(inp.data.classes),
                                    settings=ls, seed=inp.seed, device=inp.device, log=inp.log)
        settings = {**asdict(ls), "mode": "fast", "n_last_blocks": n, "feature_dim": tr.dim,
                    "feature_mode": tr.mode, "precision": inp.precision, "seed": inp.seed, "backbone_kind": _kind(m)}
        for full_only in ("lr", "eval_every", "workers"):  # settings of the full protocol, unused by the fast one
            settings.pop(full_only)
        out.append(_body(m, metrics, settings, inp.data.record()))
    return out


def run_rank(inp: Inputs, s: dict) -> list[dict]:
    """RankMe (plain and centred), alpha-ReQ with its fit range and R^2, and the collapse flag of the final embedding:
    mokd_analysis.rank.rank_scores, the function `mokd analyze rank` calls, its output recorded as it is."""
    from mokd_analysis.rank import RANK_SETTINGS, rank_scores

    out = []
    split = inp.data.free_split
    for m in inp.models:
        f = m.features(split)
        scores = rank_scores(f.features)
        settings = {"split": split, "feature_mode": f.mode, "image_size": f.image_size, "precision": inp.precision,
                    "seed": inp.seed, **RANK_SETTINGS}
        out.append(_body(m, {**scores, "headline": "rankme"}, settings, inp.data.record(split)))
    return out


def run_mad(inp: Inputs, s: dict) -> list[dict]:
    """Mean attention distance per layer and head (ViT) or residual block (CNN), mokd_analysis.mad, on a seeded
    pick of the label-free split's images at the features' size."""
    from mokd_analysis.images import seeded_subset
    from mokd_analysis.mad import model_mad
    from mokd_eval.features import eval_transform, fit_input_size, resolve_image_size

    out = []
    split = inp.data.free_split
    full = inp.data.splits[split]
    pick = seeded_subset(len(full), s["max_images"], inp.seed)
    for m in inp.models:
        size = resolve_image_size(inp.data.spec, inp.image_size, m.loaded.image_size)
        fit_input_size(m.loaded.backbone, size)
        ds = full.subset(pick)
        ds.transform = eval_transform(size, inp.data.spec.native_size is not None)
        loader = torch.utils.data.DataLoader(ds, batch_size=s["batch_size"], shuffle=False)
        r = model_mad(m.loaded.backbone, loader, inp.device, label=m.loaded.label, arch=m.loaded.checkpoint["name"],
                      progress=False)
        r.run, r.mode = m.loaded.label, m.loaded.checkpoint.get("mode")
        means = r.layer_means()
        metrics = {"headline": "mean", "mean": float(np.mean(means)), "layer_mean": means, "result": r.as_dict()}
        settings = {"split": split, "image_size": size, "max_images": s["max_images"], "batch_size": s["batch_size"],
                    "precision": "fp32", "seed": inp.seed}  # model_mad forwards in float32
        out.append(_body(m, metrics, settings, {**inp.data.record(split), "num_images": r.num_images}))
    return out


def run_cka(inp: Inputs, s: dict) -> list[dict]:
    """Linear CKA between every pair of models' final embeddings of the label-free split, from the cached features:
    mokd_analysis.cka.feature_cka (unbiased minibatch HSIC), the function `mokd analyze cka` calls on final
    embeddings, its value recorded as it is; one record per model with its row of the matrix."""
    from mokd_analysis.cka import DEFAULT_BATCH_SIZE, cka_settings, feature_cka

    if len(inp.models) < 2:
        raise UserError(f"cka compares models: {len(inp.models)} loaded, two or more needed")
    split = inp.data.free_split
    batch = s.get("batch_size", DEFAULT_BATCH_SIZE)
    feats = [m.features(split) for m in inp.models]
    labels = [m.loaded.label for m in inp.models]
    matrix = [[1.0 if i == j else None for j in range(len(feats))] for i in range(len(feats))]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            matrix[i][j] = matrix[j][i] = feature_cka(feats[i].features, feats[j].features, batch, inp.seed)
    out = []
    for i, m in enumerate(inp.models):
        others = [matrix[i][j] for j in range(len(feats)) if j != i]
        metrics = {"headline": "mean_cka_others", "mean_cka_others": float(np.mean(others)),
                   "cka": dict(zip(labels, matrix[i])), "labels": labels}
        settings = {"split": split, "feature_mode": feats[i].mode, "image_size": feats[i].image_size,
                    "precision": inp.precision, "seed": inp.seed, "compared": labels, **cka_settings(batch, inp.seed)}
        out.append(_body(m, metrics, settings, inp.data.record(split)))
    return out


@dataclass(frozen=True)
class Protocol:
    run: Callable[[Inputs, dict], list[dict]]
    defaults: dict
    needs_labels: bool = False  # train and val splits with class labels
    across_models: bool = False  # one job over every model of the bench, not one per checkpoint
    check: Callable[[dict], None] | None = None  # validates resolved settings at planning time
    headline: str = ""  # what the report's summary column says


PROTOCOLS: dict[str, Protocol] = {
    "knn": Protocol(run_knn, {"ks": [10, 20, 100, 200], "temperature": 0.07, "backend": "auto"}, needs_labels=True,
                    headline="k-NN top-1, k=20 (%)"),
    "linear": Protocol(run_linear, {"epochs": 100, "batch_size": 2048, "warmup_epochs": 10, "momentum": 0.9,
                                    "weight_decay": 0.0, "n_last_blocks": 4, "avgpool": False, "lr_grid": None,
                                    "holdout": 0.1}, needs_labels=True, check=_check_linear,
                       headline="linear top-1 (%)"),
    "rank": Protocol(run_rank, {}, headline="RankMe"),
    "mad": Protocol(run_mad, {"max_images": 256, "batch_size": 32}, headline="MAD (px)"),
    "cka": Protocol(run_cka, {}, across_models=True, headline="mean CKA to others"),
}
