"""The bench's protocols: a plain dict of name -> Protocol, each `run(inputs, settings) -> [record body]`.

`inputs` holds the model(s) of one job and its data set, each model with `features(split, mode, n_last_blocks)`:
features_for through the cache, asked once per (model, data set, split, mode) in a bench run and shared by every
protocol. A record body is {"model": ModelInputs, "metrics", "settings", "data"}; the runner adds the checkpoint and
provenance and writes it. Every number comes from mokd_eval (k-NN, linear probe, many-shot logistic regression,
few-shot episodes) or mokd_analysis (rank, mean attention distance, CKA).

`Protocol.needs(backbone, settings, data)` lists the feature sets a job reads, so that under torchrun every rank
extracts its shard of them before rank 0 runs the protocol. `Protocol.version` is the implementation's version:
a fix that changes a protocol's numbers bumps it, and the job ids of a bench (which hold it) change with it, so a
resumed bench recomputes those records instead of reusing the old numbers.
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


def _linear_features(backbone, s: dict) -> tuple[str, int]:
    """(mode, n_last_blocks) of the linear probe's features: a ViT's embedding at each of its last blocks, CNN
    pooled."""
    from mokd_eval.linear import effective_blocks, probe_mode

    n = effective_blocks(backbone, s["n_last_blocks"])
    if not is_vit(backbone):
        return "cls", n
    return probe_mode(s["avgpool"], n), n


def run_linear(inp: Inputs, s: dict) -> list[dict]:
    """The fast linear probe (mokd_eval.linear.fast_linear_probe): a grid of lrs on cached features, the lr picked
    on a held-out part of train, its val accuracy reported. ViT features as the paper's: last blocks' CLS tokens."""
    from mokd_eval.linear import DEFAULT_LR_GRID, LinearSettings, fast_linear_probe

    out = []
    for m in inp.models:
        mode, n = _linear_features(m.loaded.backbone, s)
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


def _check_logreg(s: dict) -> None:
    if s["lambdas"] is not None and (not isinstance(s["lambdas"], list) or not s["lambdas"]
                                     or min(float(x) for x in s["lambdas"]) <= 0):
        raise UserError(f"settings.logreg: lambdas must be a list of positive L2 weights (or null for the "
                        f"published grid), got {s['lambdas']!r}")


def run_logreg(inp: Inputs, s: dict) -> list[dict]:
    """Many-shot transfer (mokd_eval.logreg.logreg_probe, the ssl-transfer protocol): L2-regularised multinomial
    logistic regression on the final embedding; lambda chosen on the training pool's held-out part (the official
    val split, else a seeded 20%: BenchData.holdout), then refit on the whole pool and scored on the test split
    with the data set's own metric (top-1, mean per-class accuracy, or 11-point mAP for VOC2007)."""
    from mokd_eval.logreg import LAMBDA_GRID, logreg_probe

    fit_rows, val_rows = inp.data.holdout(inp.seed)
    fit, val = torch.as_tensor(fit_rows, dtype=torch.long), torch.as_tensor(val_rows, dtype=torch.long)
    lambdas = tuple(float(x) for x in (s["lambdas"] or LAMBDA_GRID))
    out = []
    for m in inp.models:
        pool, test = m.features("train"), m.features("val")
        x, y = pool.features, pool.labels
        metrics = logreg_probe(x[fit], y[fit], x[val], y[val], test.features, test.labels, metric=inp.data.metric,
                               num_classes=len(inp.data.classes), lambdas=lambdas, device=inp.device, log=inp.log)
        metrics = {"headline": inp.data.metric, **metrics}
        settings = {"lambdas": list(lambdas), "metric": inp.data.metric, "fit_size": len(fit_rows),
                    "val_size": len(val_rows), "test_size": len(test), "feature_mode": pool.mode,
                    "feature_dim": pool.dim, "image_size": pool.image_size, "precision": inp.precision,
                    "seed": inp.seed, "features_cached": pool.from_cache and test.from_cache}
        out.append(_body(m, metrics, settings, inp.data.record()))
    return out


def _check_fewshot(s: dict) -> None:
    shots = s["shots"]
    if not isinstance(shots, list) or not shots or not all(isinstance(k, int) and k > 0 for k in shots):
        raise UserError(f"settings.fewshot: shots must be a list of positive integers such as [1, 5, 20], got {shots!r}")
    for key in ("ways", "queries", "episodes"):
        if not isinstance(s[key], int) or s[key] < (2 if key == "ways" else 1):
            raise UserError(f"settings.fewshot: {key} must be an integer of at least {2 if key == 'ways' else 1}, "
                            f"got {s[key]!r}")


def run_fewshot(inp: Inputs, s: dict) -> list[dict]:
    """Few-shot transfer (mokd_eval.fewshot.fewshot_episodes): N-way K-shot episodes drawn (seeded) from the test
    split's final embeddings; per K the mean accuracy over episodes and its 95% interval."""
    from mokd_eval.fewshot import fewshot_episodes

    out = []
    for m in inp.models:
        test = m.features("val")
        metrics = fewshot_episodes(test.features, test.labels, ways=s["ways"], shots=tuple(s["shots"]),
                                   queries=s["queries"], episodes=s["episodes"], seed=inp.seed)
        settings = {"ways": s["ways"], "shots": list(s["shots"]), "queries": s["queries"], "episodes": s["episodes"],
                    "split": "val", "feature_mode": test.mode, "feature_dim": test.dim, "image_size": test.image_size,
                    "precision": inp.precision, "seed": inp.seed, "features_cached": test.from_cache}
        out.append(_body(m, metrics, settings, inp.data.record("val")))
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
    from mokd_analysis.mad import loaded_mad

    out = []
    split = inp.data.free_split
    full = inp.data.splits[split]
    images = full.subset(seeded_subset(len(full), s["max_images"], inp.seed))
    for m in inp.models:
        r = loaded_mad(m.loaded, inp.data.spec, images, inp.image_size, s["batch_size"], inp.device, progress=False)
        size = r.image_size
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


Need = tuple[str, str, int]  # (split, mode, n_last_blocks) of one feature set


def _embedding(*splits: str) -> Callable[[object, dict, object], list[Need]]:
    return lambda backbone, s, data: [(split, "cls", 4) for split in splits]


def _free_embedding(backbone, s: dict, data) -> list[Need]:
    return [(data.free_split, "cls", 4)]


def _linear_needs(backbone, s: dict, data) -> list[Need]:
    mode, n = _linear_features(backbone, s)
    return [("train", mode, n), ("val", mode, n)]


@dataclass(frozen=True)
class Protocol:
    run: Callable[[Inputs, dict], list[dict]]
    defaults: dict
    needs_labels: bool = False  # train and val splits with class labels
    across_models: bool = False  # one job over every model of the bench, not one per checkpoint
    check: Callable[[dict], None] | None = None  # validates resolved settings at planning time
    headline: str = ""  # what the report's summary column says
    needs: Callable[[object, dict, object], list[Need]] = lambda backbone, s, data: []  # feature sets read
    single_label: bool = False  # one class per image: planned out on multi-label data (VOC2007)
    version: int = 1  # bump when a fix changes the protocol's numbers: its jobs are then recomputed


PROTOCOLS: dict[str, Protocol] = {
    "knn": Protocol(run_knn, {"ks": [10, 20, 100, 200], "temperature": 0.07, "backend": "auto"}, needs_labels=True,
                    headline="k-NN top-1, k=20 (%)", needs=_embedding("train", "val"), single_label=True),
    "linear": Protocol(run_linear, {"epochs": 100, "batch_size": 2048, "warmup_epochs": 10, "momentum": 0.9,
                                    "weight_decay": 0.0, "n_last_blocks": 4, "avgpool": False, "lr_grid": None,
                                    "holdout": 0.1}, needs_labels=True, check=_check_linear,
                       headline="linear top-1 (%), fast lr-grid probe on cached features, not the paper's "
                                "100-epoch protocol", needs=_linear_needs, single_label=True),
    "logreg": Protocol(run_logreg, {"lambdas": None}, needs_labels=True, check=_check_logreg,
                       headline="many-shot logistic regression (the data set's metric)",
                       needs=_embedding("train", "val")),
    "fewshot": Protocol(run_fewshot, {"ways": 5, "shots": [1, 5, 20], "queries": 15, "episodes": 600},
                        needs_labels=True, check=_check_fewshot, headline="few-shot accuracy (%)",
                        needs=_embedding("val"), single_label=True),
    # rank 2: alpha-ReQ on eigenvalues 6..100 with a 1/k-weighted fit (issue 32); cka 2: unbiased minibatch CKA
    "rank": Protocol(run_rank, {}, headline="RankMe", needs=_free_embedding, version=2),
    "mad": Protocol(run_mad, {"max_images": 256, "batch_size": 32}, headline="MAD (px)"),
    "cka": Protocol(run_cka, {}, across_models=True, headline="mean CKA to others", needs=_free_embedding,
                    version=2),
}
