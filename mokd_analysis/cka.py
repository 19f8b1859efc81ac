"""Linear centred kernel alignment (CKA) between representations (Kornblith et al. 2019).

`MinibatchCKA` is the minibatch estimator of Nguyen et al. 2021 ("Do wide and deep networks learn the same
things?"): for each minibatch and each pair of layers it adds up the unbiased HSIC estimate (Song et al. 2012)
of the two linear Gram matrices, and CKA is

    CKA(a, b) = sum_batches HSIC_1(K_a, K_b) / sqrt(sum_batches HSIC_1(K_a, K_a) * sum_batches HSIC_1(K_b, K_b)),

so memory is a few B x B Grams per layer, whatever the number of images, and one pass of features serves
every layer pair. Unbiased HSIC makes the estimate independent of the batch size (a biased one inflates CKA of
unrelated representations: two independent random 384-d embeddings of 360 images score 0.52 with full-batch
biased HSIC, -0.006 with this estimator); it needs B >= 4 (the n(n-3) in its normaliser).

`feature_cka(x, y, batch_size)` is this estimator on two feature matrices of the same images: the one function
that `mokd analyze cka` (final embeddings) and the bench's cka protocol call. `mokd analyze cka`'s
layer-by-layer matrix feeds MinibatchCKA from its forward passes directly.

Conventions:
- Batches weigh the same, so they hold (about) the same number of images. Each batch's HSIC counts equally in
  the sums, so a short last batch (5 images after 4 x 256) would weigh as much as a full one while its estimate
  is far noisier: with 1,029 images at batch 256 it raised the spread of the estimate over 40 draws from 0.005
  to 0.053. `cka_batches` therefore splits N images (a seeded shuffle) into max(1, N // B) batches whose sizes
  differ by at most one (1,029 at B = 256: 258, 257, 257, 257; 360: one batch of 360), so every image is used
  and no batch is short; feature_cka and `mokd analyze cka` both batch this way. MinibatchCKA, fed by any
  loader, keeps the rule itself: the first batch sets the size B1; a later batch of fewer than B1 - 1 examples (a
  loader's short tail) is dropped and counted (`skipped_batches`, `skipped_examples`); one of more than B1 + 1 is
  an error.
- everything is computed in float64;
- a layer whose representation has zero HSIC with itself (a constant feature, or all zeros) has CKA 0 with
  every layer, itself included: centred, it carries no signal, so it aligns with nothing. "Zero" is relative:
  at or below `ZERO_TOL` (1e-20) times the squared scale of the uncentred features (centring a constant column
  leaves rounding of ~1e-16 of it, ~1e-64 in this ratio; a real signal 1e-5 the size of its offset is ~1e-20).
- `linear_cka` is the full-batch CKA with the biased HSIC of Kornblith et al.: kept as the tests' reference for
  CKA's invariances (and for MinibatchCKA with one batch of many examples, where the two agree); it is biased
  upwards at small N / large D, so no command reports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mokd.errors import UserError

MIN_BATCH = 4  # unbiased HSIC divides by n(n-3)
DEFAULT_BATCH_SIZE = 256  # the default of `mokd analyze cka --batch-size` and of the bench
ESTIMATOR = "unbiased minibatch HSIC (Nguyen et al. 2021)"
TAIL_RULE = ("max(1, N // batch_size) batches of a seeded shuffle, sizes within one of each other (no short "
             "tail); a loader's short last batch is dropped")
ZERO_TOL = 1e-20  # self-HSIC at or below this fraction of the features' squared scale counts as zero


def _flat64(x: Tensor) -> Tensor:
    """[N, ...] -> [N, D] float64 (tokens or maps already pooled by the caller; anything else flattened)."""
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of x [N, D1] and y [N, D2] (rows are the same N examples), full batch, BIASED HSIC:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc. 0 when either is constant.
    A test reference only (invariances); commands report feature_cka, which is not biased upwards."""
    if x.shape[0] != y.shape[0]:
        raise UserError(f"CKA compares the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    if x.shape[0] < 2:
        raise UserError(f"CKA needs at least 2 examples, got {x.shape[0]}")
    x, y = _flat64(x), _flat64(y)
    scale_x, scale_y = x.square().sum() ** 2, y.square().sum() ** 2
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    xx = torch.linalg.matrix_norm(x.T @ x) ** 2
    yy = torch.linalg.matrix_norm(y.T @ y) ** 2
    if xx <= ZERO_TOL * scale_x or yy <= ZERO_TOL * scale_y:
        return 0.0
    xy = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(xy / torch.sqrt(xx * yy))


def _gram_stats(feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per layer: the linear Gram with its diagonal zeroed [L, B, B], its row sums [L, B], its total [L],
    and the squared scale of the uncentred features [L] (for the zero rule)."""
    grams, scales = [], []
    for f in feats:
        f = _flat64(f)
        scales.append((f.square().sum() / f.shape[0]) ** 2)  # the order of HSIC_1 of uncentred features
        # Centring does not change unbiased HSIC (it is invariant to K -> K + a1^T + 1b^T), but it keeps the Gram's
        # entries at the scale of the signal rather than of a large shared offset, so the sums below cancel less.
        f = f - f.mean(0, keepdim=True)
        k = f @ f.T
        k.diagonal().zero_()
        grams.append(k)
    k = torch.stack(grams)
    rows = k.sum(-1)
    return k, rows, rows.sum(-1), torch.stack(scales)


def _unbiased_hsic(ka: Tensor, ra: Tensor, sa: Tensor, kb: Tensor, rb: Tensor, sb: Tensor) -> Tensor:
    """Song et al. 2012, eq. 5, for every pair of layers: [La, B, B] x [Lb, B, B] -> [La, Lb].

    HSIC_1 = [tr(K~L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)), K~: zero diagonal.
    """
    n = ka.shape[-1]
    trace = torch.einsum("aij,bij->ab", ka, kb)  # tr(K~ L~) for symmetric Grams
    totals = sa[:, None] * sb[None, :] / ((n - 1) * (n - 2))
    cross = ra @ rb.T * (2.0 / (n - 2))
    return (trace + totals - cross) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates linear CKA between n_a layers of model A and n_b layers of model B over minibatches.

        cka = MinibatchCKA(len(layers_a), len(layers_b))
        for batch in loader:
            cka.update([f[B, D_i] for each layer of A], [f[B, D_j] for each layer of B])
        matrix = cka.compute()  # [n_a, n_b]

    With n_b None (and update(feats_a) alone) it is A's self-similarity, [n_a, n_a] with a diagonal of 1.
    Features are pooled by the caller ([B, D] per layer); all sums are in float64.
    """

    def __init__(self, n_a: int, n_b: int | None = None):
        if n_a < 1 or (n_b is not None and n_b < 1):
            raise UserError(f"MinibatchCKA needs at least one layer on each side, got n_a={n_a}, n_b={n_b}")
        self.n_a, self.n_b = n_a, n_b
        self.self_similarity = n_b is None
        nb = n_a if n_b is None else n_b
        z = dict(dtype=torch.float64)
        self.hsic_ab = torch.zeros(n_a, nb, **z)
        self.hsic_aa = torch.zeros(n_a, **z)
        self.hsic_bb = torch.zeros(nb, **z)
        self.scale_a = torch.zeros(n_a, **z)  # summed squared feature scales, for the zero rule
        self.scale_b = torch.zeros(nb, **z)
        self.batches = 0
        self.skipped_batches = 0
        self.skipped_examples = 0
        self.examples = 0
        self.batch_size: int | None = None  # set by the first batch of MIN_BATCH or more (the tail rule)

    def _check(self, feats: list[Tensor], n: int, side: str) -> int:
        if len(feats) != n:
            raise UserError(f"MinibatchCKA: expected {n} layer(s) for model {side}, got {len(feats)}")
        sizes = {int(f.shape[0]) for f in feats}
        if len(sizes) != 1:
            raise UserError(f"MinibatchCKA: model {side}'s layers have different batch sizes {sorted(sizes)}")
        return sizes.pop()

    @torch.no_grad()
    def update(self, feats_a: list[Tensor], feats_b: list[Tensor] | None = None) -> None:
        """Add one minibatch: feats_a[i] is layer i of A on the batch [B, D_i]; feats_b likewise for B (the
        same B examples in the same order), or None for self-similarity. The first batch of 4 or more sets the
        size; a batch more than one smaller (a loader's tail, or B < 4) is skipped, more than one larger an error."""
        if self.self_similarity and feats_b is not None:
            raise UserError("MinibatchCKA was built for self-similarity (n_b=None): call update(feats_a) alone")
        if not self.self_similarity and feats_b is None:
            raise UserError(f"MinibatchCKA compares two models: update needs feats_b ({self.n_b} layers)")
        b = self._check(feats_a, self.n_a, "A")
        if feats_b is not None and self._check(feats_b, self.n_b, "B") != b:
            raise UserError("MinibatchCKA: the two models' batches hold different numbers of examples")
        if b < MIN_BATCH or (self.batch_size is not None and b < self.batch_size - 1):
            self.skipped_batches += 1
            self.skipped_examples += b
            return
        if self.batch_size is None:
            self.batch_size = b
        elif b > self.batch_size + 1:
            raise UserError(f"MinibatchCKA: a batch of {b} examples after one of {self.batch_size}; batches weigh "
                            "the same, so they must hold about the same number (a short last batch is dropped)")
        ka, ra, sa, scale_a = _gram_stats(feats_a)
        self_a = _self_hsic(ka, ra, sa)
        if feats_b is None:
            kb, rb, sb, scale_b, self_b = ka, ra, sa, scale_a, self_a
        else:
            kb, rb, sb, scale_b = _gram_stats(feats_b)
            self_b = _self_hsic(kb, rb, sb)
        self.hsic_ab += _unbiased_hsic(ka, ra, sa, kb, rb, sb)
        self.hsic_aa += self_a
        self.hsic_bb += self_b
        self.scale_a += scale_a
        self.scale_b += scale_b
        self.batches += 1
        self.examples += b

    def compute(self) -> Tensor:
        """CKA [n_a, n_b] (float64); 0 for a layer with zero self-HSIC (constant features)."""
        if self.batches == 0:
            raise UserError(f"MinibatchCKA saw no batch of {MIN_BATCH} or more examples (unbiased HSIC needs "
                            f"B >= {MIN_BATCH}; {self.skipped_batches} smaller batch(es) were skipped)")
        live_a = self.hsic_aa > ZERO_TOL * self.scale_a
        live_b = self.hsic_bb > ZERO_TOL * self.scale_b
        denom = torch.sqrt(self.hsic_aa.clamp_min(0)[:, None] * self.hsic_bb.clamp_min(0)[None, :])
        live = live_a[:, None] & live_b[None, :]
        out = torch.zeros_like(self.hsic_ab)
        out[live] = self.hsic_ab[live] / denom[live]
        if self.self_similarity:
            out.diagonal()[live_a] = 1.0  # exactly, not up to rounding
        return out


def _self_hsic(k: Tensor, r: Tensor, s: Tensor) -> Tensor:
    """Unbiased HSIC of each layer's Gram with itself [L]."""
    n = k.shape[-1]
    trace = k.square().sum((-2, -1))
    return (trace + s * s / ((n - 1) * (n - 2)) - r.square().sum(-1) * (2.0 / (n - 2))) / (n * (n - 3))


def cka_batches(n: int, batch_size: int, seed: int) -> list[Tensor]:
    """Index batches over n examples: a seeded shuffle split into max(1, n // batch_size) batches whose sizes
    differ by at most one (module docstring), so that no batch is short and every example is used."""
    if n < MIN_BATCH:
        raise UserError(f"CKA needs at least {MIN_BATCH} examples (unbiased HSIC), got {n}")
    if batch_size < MIN_BATCH:
        raise UserError(f"CKA batch size must be at least {MIN_BATCH} (unbiased HSIC), got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(order, max(1, n // batch_size)))


@torch.no_grad()
def feature_cka(x: Tensor, y: Tensor, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> float:
    """Linear CKA of two representations of the same N images, x [N, D1] and y [N, D2], by the unbiased minibatch
    estimator (MinibatchCKA) over cka_batches(N, batch_size, seed). Needs N >= 4. What every command reports as
    the CKA of two embeddings."""
    if x.dim() != 2 or y.dim() != 2:
        raise UserError(f"feature_cka compares feature matrices [N, D]: got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise UserError(f"CKA compares the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    cka = MinibatchCKA(1, 1)
    for idx in cka_batches(int(x.shape[0]), batch_size, seed):
        cka.update([x[idx]], [y[idx]])
    return float(cka.compute()[0, 0])


def cka_settings(batch_size: int, seed: int) -> dict:
    """What a record says about how its CKA was estimated."""
    return {"estimator": ESTIMATOR, "cka_batch_size": batch_size, "tail": TAIL_RULE, "cka_seed": seed}
