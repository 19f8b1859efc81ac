"""Weighted k-NN classification on frozen features, as in DINO's evaluation (Wu et al. 2018).

For a query q and its k nearest training features (cosine similarity s_i on L2-normalised features),
class c scores sum_i [y_i = c] exp(s_i / T); the top-5 classes by score are the predictions. The neighbours
are searched once for the largest k, with FAISS (exact inner-product index, on the GPU when faiss-gpu and
CUDA are present) or a chunked torch matmul; the full queries x bank similarity matrix is never built.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import click
import torch
import torch.nn.functional as F

from mokd import distributed as dist
from mokd.cli_common import batch_size_option, data_options, debug_option, device_option, out_option, seed_option
from mokd.errors import UserError
from mokd_eval.common import checkpoint_options, data_record, echo, feature_options, load_eval_data, \
    load_models_cli, precision_for, setup_run
from mokd_eval.features import features_for
from mokd_eval.records import write_record
from mokd_eval.report import markdown_table

DEFAULT_KS = (10, 20, 100, 200)
TORCH_CHUNK_BYTES = 256 * 2**20  # similarity block per chunk of queries in the torch backend


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search(bank: torch.Tensor, queries: torch.Tensor, k: int, *, backend: str = "auto",
           chunk_size: int | None = None, log: Callable[[str], None] | None = print
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: bank [N, D], queries [M, D] -> (similarities [M, k], indices [M, k]), best first.

    backend: "faiss", "torch" (chunked matmul, on the tensors' device) or "auto" (FAISS when installed).
    """
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    n, d = bank.shape
    m = queries.shape[0]
    if backend == "faiss":
        import faiss

        if log:
            log(f"k-NN search (faiss): bank {n} x {d} float32 = {_mib(4 * n * d)}, results {m} x {k}")
        index = faiss.IndexFlatIP(d)
        if bank.is_cuda and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), bank.device.index or 0, index)
        index.add(bank.detach().float().cpu().contiguous().numpy())
        sims, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    if backend != "torch":
        raise UserError(f"k-NN backend must be auto, faiss or torch, got {backend!r}")
    chunk = chunk_size or max(1, min(m, TORCH_CHUNK_BYTES // (4 * max(n, 1))))
    if log:
        log(f"k-NN search (torch, chunked): bank {n} x {d} float32 = {_mib(4 * n * d)}, "
            f"similarity blocks of {chunk} x {n} = {_mib(4 * chunk * n)}")
    bank_t = bank.float().t().contiguous()
    sims, idx = [], []
    for start in range(0, m, chunk):
        s = queries[start:start + chunk].float() @ bank_t  # [chunk, N]
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
        del s
    return torch.cat(sims).cpu(), torch.cat(idx).cpu()


def clamp_ks(ks: Sequence[int], bank_size: int) -> tuple[list[int], list[str]]:
    """Ks larger than the bank become the bank size (deduplicated, order kept), with a note for each."""
    out, notes = [], []
    for k in ks:
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        if k > bank_size:
            notes.append(f"k={k} is larger than the training set ({bank_size} images): using k={bank_size}")
            k = bank_size
        if k not in out:
            out.append(k)
    return out, notes


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, temperature: float,
         num_classes: int) -> torch.Tensor:
    """Weighted vote over the first k neighbours: sims, labels [M, >=k] -> top-5 classes [M, min(5, C)]."""
    w = (neighbour_sims[:, :k].double() / temperature).exp()  # [M, k]
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, neighbour_labels[:, :k], w)
    return scores.topk(min(5, num_classes), dim=1).indices


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07, num_classes: int, backend: str = "auto",
                chunk_size: int | None = None, log: Callable[[str], None] | None = print) -> dict[int, torch.Tensor]:
    """Features [N, D] / labels [N] / queries [M, D] -> {k: top-5 predicted labels [M, min(5, C)]} (column 0 = top-1).

    Ks larger than N are clamped to N (see `clamp_ks`); the dict is keyed by the k actually used.
    """
    if train_features.shape[0] == 0:
        raise UserError("k-NN needs a non-empty training set")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    ks, notes = clamp_ks(ks, train_features.shape[0])
    for note in notes:
        if log:
            log(f"note: {note}")
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float().to(bank.device), dim=1)
    sims, idx = search(bank, queries, max(ks), backend=backend, chunk_size=chunk_size, log=log)
    labels = train_labels.cpu().long()[idx]  # [M, kmax]
    return {k: vote(sims, labels, k, temperature, num_classes) for k in ks}


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07,
                 num_classes: int, backend: str = "auto", chunk_size: int | None = None,
                 log: Callable[[str], None] | None = print) -> dict:
    """Accuracies in % -> {"top1": {k: %}, "top5": {k: %}, "best_top1": %, "best_k": k, "notes": [...]}."""
    _, notes = clamp_ks(ks, train_features.shape[0])
    preds = knn_predict(train_features, train_labels, test_features, ks=ks, temperature=temperature,
                        num_classes=num_classes, backend=backend, chunk_size=chunk_size, log=log)
    y = test_labels.cpu().long()[:, None]
    top1 = {k: 100.0 * (p[:, :1] == y).any(1).float().mean().item() for k, p in preds.items()}
    top5 = {k: 100.0 * (p[:, :5] == y).any(1).float().mean().item() for k, p in preds.items()}
    best_k = max(top1, key=lambda k: (top1[k], -k))
    return {"top1": top1, "top5": top5, "best_top1": top1[best_k], "best_k": best_k, "notes": notes}


# --------------------------------------------------------------------------------------------------------------
# CLI


def _parse_ks(value: str) -> list[int]:
    try:
        ks = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers such as 10,20,100,200, got {value!r}") from e
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return ks


@click.command("knn")
@checkpoint_options
@data_options
@out_option(default="results")
@device_option
@seed_option
@batch_size_option
@feature_options
@click.option("--ks", default="10,20,100,200", show_default=True, help="Comma-separated numbers of neighbours.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True,
              help="Vote weights are exp(similarity / T).")
@click.option("--backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto", show_default=True,
              help="Neighbour search: FAISS exact index, or chunked torch matmul.")
@click.option("--dump-features", "dump_features", type=click.Path(file_okay=False), default=None,
              help="Also save train/test features and labels (.pt) into this folder (per model sub-folder "
                   "when the checkpoint holds two models).")
@debug_option
def knn_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, out, device, seed,
            batch_size, image_size, precision, num_workers, cache_dir, no_cache, ks, temperature, backend,
            dump_features):
    """Weighted k-NN accuracy (DINO protocol) of CHECKPOINT's frozen features.

    The training split is the memory bank, the validation split the queries. Runs unchanged under torchrun:
    features are extracted in shards; rank 0 searches and writes the records.
    """
    ks_list = _parse_ks(ks)
    if backend == "faiss" and not faiss_available():
        raise UserError("--backend faiss: the faiss package is not installed (pip install faiss-cpu)")
    dev = setup_run(device, seed)
    prec = precision_for(precision, dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list)
    echo(f"data: {spec}: {len(train_ds)} train / {len(val_ds)} val images, {len(train_ds.classes)} classes")
    models = load_models_cli(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial)
    bs = batch_size or 256
    for m in models:
        t0 = time.time()
        common = dict(device=dev, batch_size=bs, precision=prec, image_size=image_size, num_workers=num_workers,
                      cache=cache_dir, use_cache=not no_cache, progress=True, log=echo)
        train = features_for(m, spec, "train", dataset=train_ds, **common)
        test = features_for(m, spec, "val", dataset=val_ds, **common)
        if not dist.is_main():
            continue
        if dump_features:
            folder = Path(dump_features) / (m.label if len(models) > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            for name, t in (("train_features", train.features), ("train_labels", train.labels),
                            ("test_features", test.features), ("test_labels", test.labels)):
                torch.save(t.clone(), folder / f"{name}.pt")
            echo(f"features saved to {folder}")
        metrics = knn_evaluate(train.features, train.labels, test.features, test.labels, ks=ks_list,
                               temperature=temperature, num_classes=len(train_ds.classes), backend=backend,
                               log=echo)
        echo(f"\nk-NN {m.label} ({m.checkpoint['arch']}, features {train.features.shape[1]}-d, "
             f"{train.image_size} px):")
        echo(markdown_table(["k", "top-1 (%)", "top-5 (%)"],
                            [[k, metrics["top1"][k], metrics["top5"][k]] for k in metrics["top1"]]))
        echo(f"best: top-1 {metrics['best_top1']:.2f}% at k={metrics['best_k']}")
        settings = {"ks": list(metrics["top1"]), "temperature": temperature, "backend": backend,
                    "feature_mode": train.mode, "image_size": train.image_size, "precision": prec,
                    "batch_size": bs, "seed": seed, "features_cached": train.from_cache and test.from_cache}
        path = write_record(out, task="knn", checkpoint={**m.checkpoint, "load_report": m.report.as_dict_brief()},
                            data=data_record(spec, train_ds, val_ds), settings=settings, metrics=metrics,
                            wall_time_s=time.time() - t0, device=dev)
        echo(f"record: {path}\n")
    dist.barrier()
