"""k-NN: equal to a brute-force weighted vote written here independently, on both search backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mokd_eval.knn import certified_search, clamp_ks, knn_evaluate, knn_predict, resolve_backend, search


def brute_force_knn(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, t: float,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops in float64: cosine similarity, k most similar, class score = sum exp(s / t).

    Returns (top-5 classes [M, 5], their scores [M, 5]); classes with score 0 are tied, so not ranked.
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out, out_scores = [], []
    for q in test:
        sims = train @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in nearest:
            scores[train_labels[i]] += math.exp(sims[i] / t)
        top = np.argsort(-scores, kind="stable")[: min(5, num_classes)]
        out.append(top)
        out_scores.append(scores[top])
    return np.stack(out), np.stack(out_scores)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(400, 24, generator=g)
    labels = torch.randint(0, 9, (400,), generator=g)
    test = torch.randn(60, 24, generator=g)
    test_labels = torch.randint(0, 9, (60,), generator=g)
    return train, labels, test, test_labels


@pytest.mark.parametrize("backend", ["faiss", "torch", "certified"])
def test_matches_brute_force(data, backend):
    train, labels, test, _ = data
    ks = (1, 10, 20, 100, 200)
    preds = knn_predict(train, labels, test, ks=ks, temperature=0.07, num_classes=9, backend=backend,
                        chunk_size=7, log=None)
    assert list(preds) == list(ks)
    for k in ks:
        expected, scores = brute_force_knn(train.numpy().astype(np.float64), labels.numpy(),
                                           test.numpy().astype(np.float64), k, 0.07, 9)
        assert preds[k].shape == (60, 5)
        np.testing.assert_array_equal(preds[k][:, 0].numpy(), expected[:, 0], err_msg=f"top-1, k={k}")
        ranked = scores > 0  # zero-score classes (fewer than 5 classes among the neighbours) are ties
        if k >= 20:
            assert ranked.all()
        np.testing.assert_array_equal(preds[k].numpy()[ranked], expected[ranked], err_msg=f"top-5, k={k}")


def test_faiss_and_torch_agree_and_search_is_exact(data):
    train, labels, test, test_labels = data
    s_f, i_f = search(torch.nn.functional.normalize(train), torch.nn.functional.normalize(test), 50,
                      backend="faiss", log=None)
    s_t, i_t = search(torch.nn.functional.normalize(train), torch.nn.functional.normalize(test), 50,
                      backend="torch", chunk_size=16, log=None)
    torch.testing.assert_close(s_f, s_t, atol=1e-5, rtol=0)
    assert torch.equal(i_f, i_t)
    a = knn_evaluate(train, labels, test, test_labels, num_classes=9, backend="faiss", log=None)
    b = knn_evaluate(train, labels, test, test_labels, num_classes=9, backend="torch", log=None)
    assert a == b


def test_near_perfect_on_separable_classes():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 32, generator=g) * 5
    ytr, yte = torch.arange(1000) % 10, torch.arange(300) % 10
    train = centres[ytr] + torch.randn(1000, 32, generator=g)
    test = centres[yte] + torch.randn(300, 32, generator=g)
    m = knn_evaluate(train, ytr, test, yte, num_classes=10, log=None)
    assert set(m["top1"]) == {10, 20, 100, 200}
    assert m["best_top1"] >= 99.0 and all(v == 100.0 for v in m["top5"].values())
    assert m["best_top1"] == max(m["top1"].values()) and m["top1"][m["best_k"]] == m["best_top1"]


def test_k_larger_than_bank_is_clamped_with_a_note(data):
    train, labels, test, test_labels = data
    messages = []
    m = knn_evaluate(train[:30], labels[:30], test, test_labels, ks=(10, 100, 200), num_classes=9, log=messages.append)
    assert list(m["top1"]) == [10, 30]
    assert any("k=100" in n for n in m["notes"]) and any("note: k=100" in s for s in messages)
    assert clamp_ks((5, 50, 60), 40) == ([5, 40], ["k=50 is larger than the training set (40 images): using k=40",
                                                  "k=60 is larger than the training set (40 images): using k=40"])


def test_memory_needed_is_printed_before_search(data):
    train, labels, test, _ = data
    messages = []
    knn_predict(train, labels, test, ks=(10,), num_classes=9, backend="torch", chunk_size=8, log=messages.append)
    assert "similarity blocks of 8 x 400" in messages[0] and "MiB" in messages[0]
    messages.clear()
    knn_predict(train, labels, test, ks=(10,), num_classes=9, backend="faiss", log=messages.append)
    assert "bank 400 x 24" in messages[0]


def test_fewer_than_five_classes():
    train, labels = torch.randn(50, 8), torch.arange(50) % 3
    preds = knn_predict(train, labels, torch.randn(4, 8), ks=(5,), num_classes=3, log=None)
    assert preds[5].shape == (4, 3)


def near_tie_bank(n=1500, d=48, seed=1):
    """Unit rows, half of them near-duplicates of the other half: their similarities to a query differ by far
    less than bf16 resolves (~1e-3), far more than fp32 rounding (~1e-7)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n // 2, d, generator=g)
    bank = torch.cat([base, base + 3e-4 * torch.randn(n // 2, d, generator=g)])
    queries = base[:40] + 0.3 * torch.randn(40, d, generator=g)
    return torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)


@pytest.mark.parametrize("margin", [None, 0])
def test_certified_search_returns_exactly_the_fp32_top_k_on_near_ties(margin):
    bank, queries = near_tie_bank()
    ref_sims, ref_idx = search(bank, queries, 25, backend="torch", log=None)
    sims, idx, redone = certified_search(bank, queries, 25, margin=margin, log=None)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-6)
    if margin == 0:  # no spare candidates: near-ties at the k-th place cannot be certified, so they fall back
        assert redone > 0
    # plain bf16 would not get them right: it is the re-rank and the bound that make the search exact
    low = (queries.bfloat16() @ bank.bfloat16().t()).float().topk(25, dim=1).indices
    assert not torch.equal(low, ref_idx)


def test_certified_fallback_is_logged_and_auto_names_its_backend(data):
    train, labels, test, _ = data
    messages = []
    bank, queries = near_tie_bank(400, 24)
    certified_search(bank, queries, 10, margin=0, log=messages.append)
    assert "MiB" in messages[0] and "re-searched in fp32" in messages[-1]
    messages.clear()
    knn_predict(train, labels, test, ks=(10,), num_classes=9, backend="auto", log=messages.append)
    chosen = resolve_backend("auto", "cpu")
    assert chosen in ("torch", "certified")
    assert messages[0] == f"k-NN backend auto -> {chosen} (on cpu)"


def bunched_bank(n=600, m=40, d=32, seed=0, spread=0.02):
    """Unit rows all close to one direction: every cosine is about 0.99, and a query's neighbours differ by far
    less than bf16 resolves, so almost no query can be certified."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, d, generator=g)
    centre = centre / centre.norm()
    bank, queries = centre + spread * torch.randn(n, d, generator=g), centre + spread * torch.randn(m, d, generator=g)
    return torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)


def searched_rows(monkeypatch) -> dict:
    """Count the query rows that go through the chunked search, by the bank's dtype (bf16: the low-precision
    candidate search; fp32: the plain search)."""
    import mokd_eval.knn as knn

    counts, plain = {}, knn._torch_search

    def counting(bank, queries, k, chunk_size=None):
        counts[bank.dtype] = counts.get(bank.dtype, 0) + queries.shape[0]
        return plain(bank, queries, k, chunk_size)

    monkeypatch.setattr(knn, "_torch_search", counting)
    return counts


@pytest.mark.parametrize("blocks", [None, [250, 100, 250]])
def test_certified_search_falls_back_to_fp32_when_its_first_tile_mostly_fails(monkeypatch, blocks):
    bank, queries = bunched_bank()
    ref_sims, ref_idx = search(bank, queries, 10, backend="torch", log=None)
    counts, messages = searched_rows(monkeypatch), []
    given = bank if blocks is None else list(bank.split(blocks))
    # in memory the first tile is the first chunk of 8 queries; streamed, all 40 queries against the first block
    sims, idx, redone = certified_search(given, queries, 10, chunk_size=8 if blocks is None else None,
                                         log=messages.append)
    assert torch.equal(idx, ref_idx) and torch.equal(sims, ref_sims) and redone == 40
    assert "fell back to the plain fp32 search" in messages[-1]
    if blocks is None:  # only the first tile went through bf16; the plain fp32 search did the whole bank
        assert counts == {torch.bfloat16: 8, torch.float32: 40}
    else:  # bf16 for the first block only, then fp32 for every block: the bank was read once
        assert counts == {torch.bfloat16: 40, torch.float32: 3 * 40}


def test_certified_search_keeps_going_when_its_first_tile_certifies(monkeypatch):
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(600, 32, generator=g), dim=1)  # cosines spread over [-1, 1]
    queries = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1)
    ref_sims, ref_idx = search(bank, queries, 10, backend="torch", log=None)
    counts, messages = searched_rows(monkeypatch), []
    sims, idx, redone = certified_search(bank, queries, 10, chunk_size=8, log=messages.append)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-6)
    assert not any("fell back" in s for s in messages) and "proven equal" in messages[-1]
    assert counts[torch.bfloat16] == 40 and counts.get(torch.float32, 0) == redone < 20
