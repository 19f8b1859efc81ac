"""Weighted k-NN classification on frozen features, as in DINO's evaluation (Wu et al. 2018).

For a query q and its k nearest training features (cosine similarity s_i on L2-normalised features),
class c scores sum_i [y_i = c] exp(s_i / T); the top-5 classes by score are the predictions. The neighbours
are searched once for the largest k, with FAISS (exact inner-product index, on the GPU when faiss-gpu and
CUDA are present), a chunked torch matmul, or the certified reduced-precision search (below); the full
queries x bank similarity matrix is never built.

Certified search: similarities in bf16 (CPU) / fp16 (GPU) give each query its top-(k + margin) candidates,
which are re-ranked in fp32. The bound uses the rounding actually done: with q~, b~ the rounded inputs and
dq = |q - q~|, db = max over the bank of |b - b~| (exact residual norms, computed once), every fp32-accumulated
low-precision product is within E = |q~| db + dq max|b~| + dq db + 2g |q~| max|b~| of the exact q.b
(Cauchy-Schwarz on the residuals; g = D 2^-24 / (1 - D 2^-24) for the sums, doubled for accumulators that
truncate), and its rounding to the low precision moves it by at most u |s| (u: unit roundoff). No bank row
outside the candidates has a low-precision score above the last candidate's, c, so its exact similarity is at
most c + u |c| / (1 - u) + E. When the k-th re-ranked fp32 similarity exceeds that by 3 g |q| max|b| (the
rounding of the two fp32 evaluations compared), the k found are exactly the fp32 top-k. Queries that cannot
be certified are searched again in fp32.

A bank given as row blocks (the sharded feature cache) is streamed: each block is normalised and searched as
it is read and the per-query top-k merged with global row indices. The certified search takes candidates and
E per block; a query is certified only when its final k-th similarity clears the bound of every block (the
largest over blocks, with max|b| over the whole bank in the 3 g |q| max|b| term).

The low precision pays only when most queries certify. When the first tile the search computes (the first chunk
of queries against the first bank block) certifies under half of its queries, the similarities bunch closer
than the low precision resolves, and the rest is searched with the plain fp32 search instead (and logged).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import click
import torch
import torch.nn.functional as F

from mokd import distributed as dist
from mokd.cli_common import batch_size_option, data_options, debug_option, device_option, out_option, seed_option, \
    skip_bad_images_option
from mokd.errors import UserError
from mokd_eval.common import checkpoint_options, data_record, echo, feature_options, load_eval_data, \
    load_models_cli, precision_for, setup_run
from mokd_eval.features import features_for
from mokd_eval.records import write_record
from mokd_eval.supervised import default_workers
from mokd_eval.report import markdown_table

DEFAULT_KS = (10, 20, 100, 200)
BACKENDS = ("auto", "faiss", "torch", "certified")
TORCH_CHUNK_BYTES = 256 * 2**20  # similarity block per chunk of queries in the torch backend
RERANK_CHUNK_BYTES = 64 * 2**20  # gathered candidate rows per chunk of queries in the certified re-rank
FALLBACK_BELOW = 0.5  # certified share of the first tile under which the certified search turns to plain fp32
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> the fastest exact search measured for the device (benchmarks/knn.py): the certified
    reduced-precision search where low-precision matmuls beat fp32 (CUDA fp16; CPUs with AMX), else the
    chunked fp32 torch matmul (on 2 CPU cores 1.7x (AVX-512) to 3.3x (AVX2) faster than FAISS's flat index;
    the certified search was 1.75x slower there, bf16 matmuls being slower than fp32 without AMX)."""
    if backend not in BACKENDS:
        raise UserError(f"k-NN backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    from mokd.device import native_bf16

    device = torch.device(device)
    return "certified" if device.type == "cuda" or native_bf16(device) else "torch"


def bank_layout(bank: torch.Tensor | Iterable[torch.Tensor]) -> tuple[list[int], int]:
    """(rows of each block, D) of a bank given as one tensor [N, D] or as re-iterable row blocks [n_i, D]:
    a list of tensors, or a lazy set with `rows` and `shape` such as features.ShardedFeatures."""
    if isinstance(bank, torch.Tensor):
        return [bank.shape[0]], bank.shape[1]
    if iter(bank) is bank:
        raise TypeError("a bank of row blocks is read more than once: give a list of tensors or a ShardedFeatures, "
                        "not a one-shot iterator")
    if hasattr(bank, "rows"):
        return list(bank.rows), int(bank.shape[1])
    blocks = list(bank)
    if not blocks:
        raise ValueError("a bank of row blocks needs at least one block")
    return [b.shape[0] for b in blocks], blocks[0].shape[1]


def _blocks(bank: torch.Tensor | Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """The bank's row blocks as float32 on `device`, read one at a time (a tensor is a single block)."""
    for block in (bank,) if isinstance(bank, torch.Tensor) else bank:
        yield block.float().to(device)


class NormalisedBlocks:
    """Row blocks of a bank, each L2-normalised on `device` as it is read: never a normalised copy of the bank."""

    def __init__(self, blocks: Iterable[torch.Tensor], device: torch.device | str):
        self.blocks, self.device = blocks, torch.device(device)
        self.rows, dim = bank_layout(blocks)
        self.shape = (sum(self.rows), dim)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for block in self.blocks:
            yield F.normalize(block.float().to(self.device), dim=1)


def _merge_topk(sims: torch.Tensor, idx: torch.Tensor, new_sims: torch.Tensor, new_idx: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k [M, <=k] and one block's best [M, k_i] (global indices) -> the top-k of both."""
    if sims.shape[1] == 0:
        return new_sims, new_idx
    s, i = torch.cat([sims, new_sims], dim=1), torch.cat([idx, new_idx], dim=1)
    top = s.topk(min(k, s.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)


def _query_chunk(n: int, m: int, element_size: int, chunk_size: int | None = None) -> int:
    """Queries per similarity block [chunk, n] of the chunked search: `chunk_size`, else TORCH_CHUNK_BYTES' worth."""
    return chunk_size or max(1, min(m, TORCH_CHUNK_BYTES // (element_size * max(n, 1))))


def _streamed(rows: list[int], d: int) -> str:
    """The part of a search's log line that says how a bank of several blocks is read."""
    if len(rows) == 1:
        return ""
    r = max(rows)
    return f", streamed in {len(rows)} blocks of up to {r} rows ({_mib(4 * r * d)} each, one in memory at a time)"


def search(bank: torch.Tensor | Iterable[torch.Tensor], queries: torch.Tensor, k: int, *, backend: str = "auto",
           chunk_size: int | None = None, margin: int | None = None, log: Callable[[str], None] | None = print
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: bank [N, D], queries [M, D] -> (similarities [M, k], indices [M, k]), best first.

    The bank may also be given as row blocks [n_i, D] (see `bank_layout`): each block is searched as it is
    read and the per-query top-k merged with global row indices, so that memory holds one block, not the bank.
    backend: "faiss", "torch" (chunked fp32 matmul), "certified" (reduced precision, proven equal to fp32,
    see the module docstring) or "auto" (see `resolve_backend`; the choice is logged). All run on the
    bank's device, for blocks the queries' (FAISS: a GPU index when on CUDA and faiss-gpu is installed).
    """
    device = bank.device if isinstance(bank, torch.Tensor) else queries.device
    chosen = resolve_backend(backend, device)
    if backend == "auto" and log:
        log(f"k-NN backend auto -> {chosen} (on {device.type})")
    backend = chosen
    rows, d = bank_layout(bank)
    n, m, r = sum(rows), queries.shape[0], max(rows)
    if backend == "faiss":
        if not faiss_available():
            raise UserError("k-NN backend faiss: the faiss package is not installed (pip install faiss-cpu)")
        if log:
            log(f"k-NN search (faiss): bank {n} x {d} float32 = {_mib(4 * n * d)}{_streamed(rows, d)}, "
                f"results {m} x {k}")
        return _faiss_search(_blocks(bank, device), queries, k)
    if backend == "certified":
        sims, idx, _ = certified_search(bank, queries, k, margin=margin, chunk_size=chunk_size, log=log)
        return sims, idx
    if log:
        chunk = _query_chunk(r, m, 4, chunk_size)
        log(f"k-NN search (torch, chunked): bank {n} x {d} float32 = {_mib(4 * n * d)}{_streamed(rows, d)}, "
            f"similarity blocks of {chunk} x {r} = {_mib(4 * chunk * r)}")
    sims, idx = _stream_torch(_blocks(bank, device), queries.to(device), k, chunk_size)
    return sims.cpu(), idx.cpu()


def _faiss_search(blocks: Iterable[torch.Tensor], queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat inner-product index per block, results merged: [M, k] similarities and global indices (CPU)."""
    import faiss

    q = queries.detach().float().cpu().contiguous().numpy()
    sims, idx, offset = torch.zeros(len(q), 0), torch.zeros(len(q), 0, dtype=torch.long), 0
    for block in blocks:
        index = faiss.IndexFlatIP(block.shape[1])
        if block.is_cuda and hasattr(faiss, "StandardGpuResources"):  # faiss-gpu build and a CUDA device
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), block.device.index or 0, index)
        index.add(block.detach().cpu().contiguous().numpy())
        s, i = index.search(q, min(k, len(block)))
        sims, idx = _merge_topk(sims, idx, torch.from_numpy(s), torch.from_numpy(i).long() + offset, k)
        offset += len(block)
    return sims, idx


def _stream_torch(blocks: Iterable[torch.Tensor], queries: torch.Tensor, k: int, chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of queries @ bank.T over the bank's row blocks, merged: [M, k] values and global indices."""
    sims = queries.new_zeros(queries.shape[0], 0)
    idx, offset = torch.zeros(queries.shape[0], 0, dtype=torch.long, device=queries.device), 0
    for block in blocks:
        if len(block):
            s, i = _torch_search(block, queries, min(k, len(block)), chunk_size)
            sims, idx = _merge_topk(sims, idx, s, i + offset, k)
        offset += len(block)
    return sims, idx


def _torch_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of queries @ bank.T by chunks of queries (in the bank's dtype): [M, k] values and indices."""
    n, m = bank.shape[0], queries.shape[0]
    chunk = _query_chunk(n, m, bank.element_size(), chunk_size)
    bank_t = bank.t()  # a view: BLAS multiplies by the transpose without a copy
    sims, idx = [], []
    for start in range(0, m, chunk):
        s = queries[start:start + chunk].to(bank.dtype) @ bank_t  # [chunk, N]
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
        del s
    if not sims:
        return bank.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=bank.device)
    return torch.cat(sims), torch.cat(idx)


def _rounded_norms(x32: torch.Tensor, dtype: torch.dtype, rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (|round_dtype(x)|, |x - round_dtype(x)|, an exact difference in fp32), one cast per block of rows."""
    if not len(x32):
        return x32.new_zeros(0), x32.new_zeros(0)
    norms, residuals = [], []
    for x in x32.split(rows):
        low = x.to(dtype).float()
        norms.append(low.norm(dim=1))
        residuals.append((x - low).norm(dim=1))
    return torch.cat(norms), torch.cat(residuals)


def _sum_error(d: int) -> float:
    """g: the relative error bound of an fp32 sum of d products (see the module docstring)."""
    return d * 2.0 ** -24 / (1 - d * 2.0 ** -24)


def bank_rounding(bank32: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bank's side of `rounding_bound`, computed once per block [N, D]: (max |round(b)|, max |b - round(b)|,
    both enlarged for the fp32 sums that give the norms; max |b|)."""
    if not len(bank32):
        zero = bank32.new_zeros(())
        return zero, zero, zero
    fudge = 1 + 4 * _sum_error(bank32.shape[1])
    low, residual = _rounded_norms(bank32, dtype)
    return low.max() * fudge, residual.max() * fudge, bank32.norm(dim=1).max()


def rounding_bound(q32: torch.Tensor, bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of q32 [M, D], given the bank's `bank_rounding`: (E, the bound on |low-precision product before
    its output rounding - exact q.b| over every bank row; F = |q| max|b|, the scale of one fp32 evaluation's
    error g F). See the module docstring."""
    b_low_max, db, b_max = bank
    g = _sum_error(q32.shape[1])
    fudge = 1 + 4 * g  # the norms themselves are fp32 sums
    q_low_norm, dq = (t * fudge for t in _rounded_norms(q32, dtype))
    e = q_low_norm * db + dq * b_low_max + dq * db + 2 * g * q_low_norm * b_low_max
    f = q32.norm(dim=1) * b_max * fudge
    return e, f


def _certified_block(block32: torch.Tensor, query_parts: Iterable[torch.Tensor], k: int, margin: int,
                     dtype: torch.dtype, chunk_size: int | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One block [n, D] of the certified search, for each part [M_p, D] of the queries in turn -> (fp32
    top-min(k, n) of its candidates [M_p, .], their indices in the block, `beyond` [M_p]: the bound on the exact
    similarity of every row of the block outside the candidates (-inf when all rows are candidates), F [M_p]: the
    block's scale of fp32 rounding, see `rounding_bound`). The block is cast and bounded once, for every part."""
    n, d = block32.shape
    cands = min(k + margin, n)
    u = UNIT_ROUNDOFF[dtype]
    # An output below the normal range rounds by at most a subnormal step (tiny 2u); bf16 kernels may flush
    # subnormal inputs, and fp32 accumulators subnormal products, to zero: at most d of each per score.
    tiny = torch.finfo(dtype).tiny * 2 * u + d * torch.finfo(torch.float32).tiny
    if dtype == torch.bfloat16:
        tiny += d * torch.finfo(dtype).tiny
    low, bank_terms = block32.to(dtype), bank_rounding(block32, dtype)
    per = max(1, RERANK_CHUNK_BYTES // (4 * d * cands))
    for queries32 in query_parts:
        m = queries32.shape[0]
        e_in, scale = rounding_bound(queries32, bank_terms, dtype)
        cand_vals, cand_idx = _torch_search(low, queries32, cands, chunk_size)
        # fp32 re-rank of the candidates, in chunks of queries that bound the gathered rows' memory
        sims, idx = [], []
        for a in range(0, m, per):
            rows = block32[cand_idx[a:a + per]]  # [c, cands, D]
            exact = torch.bmm(rows, queries32[a:a + per, :, None])[..., 0]  # [c, cands]
            top = exact.topk(min(k, cands), dim=1)
            sims.append(top.values)
            idx.append(cand_idx[a:a + per].gather(1, top.indices))
        # outside the candidates no low-precision score exceeds the last candidate's
        if cands < n:
            c = cand_vals[:, -1].float()
            beyond = c + u * c.abs() / (1 - u) + tiny + e_in
        else:
            beyond = torch.full((m,), -float("inf"), device=block32.device)
        yield torch.cat(sims), torch.cat(idx), beyond, scale


def _proven(sims: torch.Tensor, beyond: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    """Per query [M] bool: its k-th fp32 similarity (last column of sims [M, k]) clears the bound on every row
    outside its candidates by more than the two fp32 evaluations compared can be off."""
    return sims[:, -1] - 3 * _sum_error(d) * scale > beyond


@torch.no_grad()
def certified_search(bank: torch.Tensor | Iterable[torch.Tensor], queries: torch.Tensor, k: int, *,
                     dtype: torch.dtype | None = None, margin: int | None = None, chunk_size: int | None = None,
                     log: Callable[[str], None] | None = print) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fp32 top-k found through a reduced-precision search: bank [N, D] (or its row blocks, see
    `bank_layout`), queries [M, D] -> (similarities [M, k] fp32, indices [M, k], number of queries searched in
    fp32: the uncertified ones, or all M after a fallback).

    Row blocks are searched one at a time: each gives its candidates, re-ranked in fp32 and merged, and its
    own bound; a query is certified only if its final k-th similarity clears the bound of every block (the
    largest `beyond`, with F the largest over blocks). Uncertified queries are searched again in fp32, streamed.
    When under half of the first tile's queries certify, everything is searched in plain fp32 instead (the
    fallback, logged). dtype: bf16 on the CPU, fp16 on CUDA by default. margin: extra candidates per query
    (default k/2 + 16). chunk_size: queries per similarity block, hence per tile.
    """
    device = bank.device if isinstance(bank, torch.Tensor) else queries.device
    rows, d = bank_layout(bank)
    n, m = sum(rows), queries.shape[0]
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
    margin = min(n - k, margin if margin is not None else k // 2 + 16)
    queries32 = queries.float().to(device)
    if m == 0:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), 0
    name = str(dtype).replace("torch.", "")
    low_size = torch.finfo(dtype).bits // 8
    if log and len(rows) == 1:
        log(f"k-NN search (certified {name} -> fp32 re-rank): bank {n} x {d} {name} = "
            f"{_mib(low_size * n * d)} (+ the fp32 bank {_mib(4 * n * d)} for the re-rank), "
            f"{k} + {margin} candidates per query")
    elif log:
        r = max(rows)
        log(f"k-NN search (certified {name} -> fp32 re-rank): bank {n} x {d} float32 = {_mib(4 * n * d)}, streamed "
            f"in {len(rows)} blocks of up to {r} rows, one in memory at a time ({_mib(4 * r * d)} fp32 + "
            f"{_mib(low_size * r * d)} {name}), {k} + {margin} candidates per query and block")
    sims, idx = queries32.new_zeros(m, 0), torch.zeros(m, 0, dtype=torch.long, device=device)
    beyond, scale = torch.full((m,), -float("inf"), device=device), torch.zeros(m, device=device)
    tried, fallback, offset = False, False, 0
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # the bound assumes fp32 sums
    try:
        for block32 in _blocks(bank, device):
            if len(block32) and not fallback:
                if tried:
                    s, i, b, f = next(_certified_block(block32, (queries32,), k, margin, dtype, chunk_size))
                else:
                    # The first tile (the first chunk of queries against the first block) decides whether the low
                    # precision pays. A chunk of queries, not all of them, so that an in-memory bank (one block)
                    # can still stop early; the first block, not the whole bank, so that a streamed bank is not
                    # read twice. Against one block of several, a query's certification is judged on that block
                    # alone: an estimate of the final share. Either way the results stay exact.
                    tried, trial = True, _query_chunk(len(block32), m, low_size, chunk_size)
                    parts = _certified_block(block32, (queries32[:trial], queries32[trial:]), k, margin, dtype,
                                             chunk_size)
                    s, i, b, f = next(parts)
                    proven = int(_proven(s, b, f, d).sum())
                    # (a tile that is the whole search leaves nothing to save: its uncertified queries are redone)
                    if proven < FALLBACK_BELOW * trial and (trial < m or len(rows) > 1):
                        fallback = True
                    elif trial < m:
                        s, i, b, f = (torch.cat(both) for both in zip((s, i, b, f), next(parts)))
                if not fallback:
                    sims, idx = _merge_topk(sims, idx, s, i + offset, k)
                    beyond, scale = torch.maximum(beyond, b), torch.maximum(scale, f)
            if len(block32) and fallback:  # plain fp32 from the first block on: exact by construction
                s, i = _torch_search(block32, queries32, min(k, len(block32)), chunk_size)
                sims, idx = _merge_topk(sims, idx, s, i + offset, k)
            offset += len(block32)
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
    if fallback:
        if log:
            log(f"k-NN certified: fell back to the plain fp32 search: {proven} of the first {trial} queries "
                f"certified against the first block, under {FALLBACK_BELOW:.0%} (the similarities bunch closer than "
                f"{name} resolves); all {m} searched in fp32")
        return sims.cpu(), idx.cpu(), m
    redo = (~_proven(sims, beyond, scale, d)).nonzero()[:, 0]
    if len(redo):
        s32, i32 = _stream_torch(_blocks(bank, device), queries32[redo], k, chunk_size)
        sims[redo], idx[redo] = s32, i32
    if log:
        log(f"k-NN certified: {m - len(redo)} of {m} queries proven equal to the fp32 top-{k}; "
            f"{len(redo)} re-searched in fp32")
    return sims.cpu(), idx.cpu(), len(redo)


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


def knn_predict(train_features: torch.Tensor | Iterable[torch.Tensor], train_labels: torch.Tensor,
                test_features: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07,
                num_classes: int, backend: str = "auto", chunk_size: int | None = None,
                device: torch.device | str | None = None, log: Callable[[str], None] | None = print,
                margin: int | None = None) -> dict[int, torch.Tensor]:
    """Features [N, D] / labels [N] / queries [M, D] -> {k: top-5 predicted labels [M, min(5, C)]} (column 0 = top-1).

    The features may be row blocks (a ShardedFeatures from the cache, a list of tensors): they are streamed,
    each block normalised as it is read, so the bank is never in memory. Ks larger than N are clamped to N
    (see `clamp_ks`); the dict is keyed by the k actually used. The search runs on `device` (default: where
    `train_features` are; for blocks, where `test_features` are).
    """
    rows, d = bank_layout(train_features)
    if sum(rows) == 0:
        raise UserError("k-NN needs a non-empty training set")
    if d != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {d}, test {test_features.shape[1]}")
    ks, notes = clamp_ks(ks, sum(rows))
    for note in notes:
        if log:
            log(f"note: {note}")
    if isinstance(train_features, torch.Tensor):
        bank = F.normalize(train_features.float().to(device or train_features.device), dim=1)
        queries = F.normalize(test_features.float().to(bank.device), dim=1)
    else:
        queries = F.normalize(test_features.float().to(device or test_features.device), dim=1)
        bank = NormalisedBlocks(train_features, queries.device)
    sims, idx = search(bank, queries, max(ks), backend=backend, chunk_size=chunk_size, margin=margin, log=log)
    labels = train_labels.cpu().long()[idx]  # [M, kmax]
    return {k: vote(sims, labels, k, temperature, num_classes) for k in ks}


def knn_evaluate(train_features: torch.Tensor | Iterable[torch.Tensor], train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = 0.07, num_classes: int, backend: str = "auto", chunk_size: int | None = None,
                 device: torch.device | str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Accuracies in % -> {"top1": {k: %}, "top5": {k: %}, "best_top1": %, "best_k": k, "notes": [...]}.

    `train_features` as in `knn_predict`: a tensor or row blocks (streamed)."""
    _, notes = clamp_ks(ks, sum(bank_layout(train_features)[0]))
    preds = knn_predict(train_features, train_labels, test_features, ks=ks, temperature=temperature,
                        num_classes=num_classes, backend=backend, chunk_size=chunk_size, device=device, log=log)
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
@skip_bad_images_option("the result records")
@out_option(default="results")
@device_option
@seed_option
@batch_size_option(default_text="256")
@feature_options
@click.option("--ks", default="10,20,100,200", show_default=True, help="Comma-separated numbers of neighbours.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True,
              help="Vote weights are exp(similarity / T).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True,
              help="Neighbour search (all exact): FAISS flat index, chunked fp32 torch matmul, or the certified "
                   "bf16/fp16 search with fp32 re-rank; auto picks the fastest for the device and says which.")
@click.option("--dump-features", "dump_features", type=click.Path(file_okay=False), default=None,
              show_default="none: not saved",
              help="Also save train/test features and labels (.pt) into this folder (per model sub-folder "
                   "when the checkpoint holds two models; the whole bank is then read into memory).")
@debug_option
def knn_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, data, class_list, skip_bad_images, out,
            device, seed, batch_size, image_size, precision, num_workers, cache_dir, no_cache, ks, temperature, backend,
            dump_features):
    """Weighted k-NN accuracy (DINO protocol) of CHECKPOINT's frozen features.

    The training split is the memory bank, the validation split the queries. The bank is cached in shards
    ($MOKD_SHARD_ROWS rows each, default about 1 GiB) and searched one shard at a time, so it need not fit
    in memory. Runs unchanged under torchrun: each rank extracts and writes its own slice; rank 0 searches
    and writes the records.
    """
    ks_list = _parse_ks(ks)
    if backend == "faiss" and not faiss_available():
        raise UserError("--backend faiss: the faiss package is not installed (pip install faiss-cpu)")
    dev = setup_run(device, seed)
    prec = precision_for(precision, dev)
    spec, train_ds, val_ds = load_eval_data(data, class_list, skip_bad_images)
    echo(f"data: {spec}: {len(train_ds)} train / {len(val_ds)} val images, {len(train_ds.classes)} classes")
    num_workers = default_workers(spec.kind) if num_workers is None else num_workers
    models = load_models_cli(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial)
    bs = batch_size or 256  # global; each rank extracts bs / world_size at a time
    common = dict(device=dev, batch_size=max(1, bs // dist.world_size()), precision=prec, image_size=image_size,
                  num_workers=num_workers, cache=cache_dir, use_cache=not no_cache, progress=True, log=echo)
    # Every rank extracts (sharded) for every model first; only then does rank 0 search, so that no rank
    # waits in a collective while another one runs a long search.
    extracted = []
    for m in models:
        t0 = time.time()
        train = features_for(m, spec, "train", dataset=train_ds, **common)
        test = features_for(m, spec, "val", dataset=val_ds, **common)
        extracted.append((m, train, test, time.time() - t0))
    if not dist.is_main():
        return
    for m, train, test, extract_s in extracted:
        t0 = time.time()
        if dump_features:
            folder = Path(dump_features) / (m.label if len(models) > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            for name, t in (("train_features", train.features), ("train_labels", train.labels),
                            ("test_features", test.features), ("test_labels", test.labels)):
                torch.save(t.clone(), folder / f"{name}.pt")
            echo(f"features saved to {folder}")
        # a bank from the sharded cache is streamed shard by shard; only the queries are held whole
        metrics = knn_evaluate(train.bank, train.labels, test.features, test.labels, ks=ks_list,
                               temperature=temperature, num_classes=len(train_ds.classes), backend=backend,
                               device=dev, log=echo)
        echo(f"\nk-NN {m.label} ({m.checkpoint['arch']}, features {train.dim}-d, "
             f"{train.image_size} px):")
        echo(markdown_table(["k", "top-1 (%)", "top-5 (%)"],
                            [[k, metrics["top1"][k], metrics["top5"][k]] for k in metrics["top1"]]))
        echo(f"best: top-1 {metrics['best_top1']:.2f}% at k={metrics['best_k']}")
        settings = {"ks": list(metrics["top1"]), "temperature": temperature,
                    "backend": resolve_backend(backend, dev),
                    "feature_mode": train.mode, "image_size": train.image_size, "precision": prec,
                    "batch_size": bs, "seed": seed, "features_cached": train.from_cache and test.from_cache}
        path = write_record(out, task="knn", checkpoint={**m.checkpoint, "load_report": m.report.as_dict_brief()},
                            data=data_record(spec, train_ds, val_ds), settings=settings, metrics=metrics,
                            wall_time_s=extract_s + time.time() - t0, device=dev)
        echo(f"record: {path}\n")
