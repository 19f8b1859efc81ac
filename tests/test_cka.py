"""Linear CKA: the full-batch reference against its defining properties, the unbiased HSIC against Song et al.'s
sum written out term by term, and the minibatch estimator (Nguyen et al. 2021) against the full-batch one."""

import itertools

import pytest
import torch

from mokd.errors import UserError
from mokd_analysis.cka import DEFAULT_BATCH_SIZE, MinibatchCKA, _gram_stats, _unbiased_hsic, cka_batches, feature_cka, linear_cka


def _features(n=512, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic, so that a general linear map changes the geometry
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)


def _orthogonal(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_cka_of_x_with_itself_is_1():
    x = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = _features()
    y = torch.tanh(x @ torch.randn(24, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    ref = linear_cka(x, y)
    assert 0.1 < ref < 0.99
    assert linear_cka(x @ _orthogonal(24), y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, y @ _orthogonal(10, seed=3)) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x @ _orthogonal(24), x) == pytest.approx(1.0, abs=1e-10)


def test_cka_is_not_invariant_to_a_general_invertible_linear_map():
    x = _features()
    g = torch.Generator().manual_seed(4)
    stretch = torch.diag(torch.logspace(0, 2, 24, dtype=torch.float64))
    a = torch.randn(24, 24, generator=g, dtype=torch.float64) @ stretch
    assert torch.linalg.matrix_rank(a) == 24
    assert linear_cka(x, x @ a) < 0.9


def test_cka_does_not_depend_on_a_shared_offset_and_is_symmetric():
    x, y = _features(seed=5), _features(seed=6)[:, :7]
    assert linear_cka(x + 100.0, y - 3.0) == pytest.approx(linear_cka(x, y), abs=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


def _hsic1_by_the_book(k, l):
    """Song et al. 2012, eq. 5, with the sums written out (K~, L~: the Grams with a zero diagonal)."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    trace = sum(k[i, j] * l[j, i] for i in range(n) for j in range(n))
    sum_k, sum_l = k.sum(), l.sum()
    ones_kl_ones = sum(k[i, j] * l[j, m] for i, j, m in itertools.product(range(n), repeat=3))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl_ones) / (n * (n - 3))


def test_unbiased_hsic_equals_song_et_al_eq_5():
    x, y = _features(n=9, d=5, seed=7), _features(n=9, d=3, seed=8)
    ka, ra, sa, _ = _gram_stats([x])
    kb, rb, sb, _ = _gram_stats([y])
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = _hsic1_by_the_book(xc @ xc.T, yc @ yc.T)
    assert _unbiased_hsic(ka, ra, sa, kb, rb, sb)[0, 0].item() == pytest.approx(expected.item(), rel=1e-10)
    # and unbiased HSIC does not care about centring: the uncentred Grams give the same value
    assert _hsic1_by_the_book(x @ x.T, y @ y.T).item() == pytest.approx(expected.item(), rel=1e-8)


def _layers(n=2048, seed=0):
    """Four 'layers' of one model: a base, a rotated and scaled copy, a noisy non-linear map of it, an unrelated one."""
    g = torch.Generator().manual_seed(seed)
    x = _features(n, 24, seed)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    noisy = torch.relu(x @ w) + 0.3 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    return [x, 3.0 * x @ _orthogonal(24), noisy, torch.randn(n, 12, generator=g, dtype=torch.float64)]


def _full(a, b):
    return torch.tensor([[linear_cka(x, y) for y in b] for x in a], dtype=torch.float64)


# measured <= 0.01 (seeds 0-2), mostly the biased full-batch value of unrelated layers (~0.004 where the truth is 0)
MINIBATCH_TOL = 0.02


def test_minibatch_estimate_is_within_tolerance_of_the_full_batch_one():
    a, b = _layers(seed=0), _layers(seed=0)[1:3] + [_features(2048, 8, seed=9)]
    cka = MinibatchCKA(len(a), len(b))
    for i in range(0, 2048, 128):
        cka.update([f[i:i + 128] for f in a], [f[i:i + 128] for f in b])
    est = cka.compute()
    assert est.shape == (4, 3) and est.dtype == torch.float64
    assert (est - _full(a, b)).abs().max().item() < MINIBATCH_TOL
    assert cka.batches == 16 and cka.examples == 2048


def test_self_similarity_has_a_diagonal_of_1_and_is_symmetric():
    a = _layers(n=512, seed=1)
    cka = MinibatchCKA(len(a))
    for i in range(0, 512, 64):
        cka.update([f[i:i + 64].float() for f in a])  # float32 in: computed in float64 all the same
    est = cka.compute()
    assert torch.equal(est.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(est, est.T, atol=1e-12)
    assert est[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # rotation and scale of the same layer
    assert abs(est[0, 3].item()) < 0.1  # unrelated: near 0 (the unbiased estimate can dip below it)
    assert (est - _full(a, a)).abs().max().item() < 0.05


def test_the_estimator_itself_gives_1_for_a_layer_against_itself():
    """The self-similarity diagonal is set to 1; computed as two models, the estimate must reach it by itself."""
    a = _layers(n=512, seed=1)
    cka = MinibatchCKA(len(a), len(a))
    for i in range(0, 512, 64):
        batch = [f[i:i + 64] for f in a]
        cka.update(batch, batch)
    est = cka.compute()
    assert (est.diagonal() - 1).abs().max().item() < 1e-9


def test_small_batches_are_skipped_and_never_give_nan():
    a = _layers(n=64, seed=2)
    cka = MinibatchCKA(len(a))
    cka.update([f[:3] for f in a])
    with pytest.raises(UserError, match="B >= 4"):
        cka.compute()
    cka.update([f[3:7] for f in a])  # B = 4: the smallest batch unbiased HSIC is defined for
    cka.update([f[7:8] for f in a])
    est = cka.compute()
    assert torch.isfinite(est).all() and cka.batches == 1 and cka.skipped_batches == 2


def test_constant_features_have_cka_0_and_no_nan():
    x = _features(n=256, seed=3)
    const = torch.full((256, 5), 2.7, dtype=torch.float64)
    zeros = torch.zeros(256, 4, dtype=torch.float64)
    assert linear_cka(x, const) == 0.0 and linear_cka(const, const) == 0.0 and linear_cka(zeros, x) == 0.0
    cka = MinibatchCKA(3, 2)
    for i in range(0, 256, 32):
        cka.update([x[i:i + 32], const[i:i + 32], zeros[i:i + 32]], [x[i:i + 32] * 2, const[i:i + 32]])
    est = cka.compute()
    assert torch.isfinite(est).all()
    assert est[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert est[1:].abs().max().item() == 0.0 and est[:, 1].abs().max().item() == 0.0
    self_cka = MinibatchCKA(2)
    self_cka.update([x[:32], const[:32]])
    assert self_cka.compute().tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_wrong_layer_counts_and_mismatched_batches_are_user_errors():
    x = _features(n=16, d=4)
    cka = MinibatchCKA(2, 1)
    with pytest.raises(UserError, match="expected 2 layer"):
        cka.update([x], [x])
    with pytest.raises(UserError, match="different numbers of examples"):
        cka.update([x, x], [x[:8]])
    with pytest.raises(UserError, match="needs feats_b"):
        cka.update([x, x])
    with pytest.raises(UserError, match="same examples"):
        linear_cka(x, x[:8])


# ---- feature_cka: the one CKA of final embeddings (analyze cka and the bench) ---------------------------------


def _independent(n=360, d=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_independent_random_embeddings_score_near_0_where_biased_cka_scores_half():
    x, y = _independent()
    assert linear_cka(x, y) > 0.4  # the biased full-batch estimator: 0.52 for two unrelated embeddings
    for seed in range(3):
        assert abs(feature_cka(x, y, seed=seed)) < 0.02
    assert feature_cka(x, x) == pytest.approx(1.0, abs=1e-9)


def test_cka_batches_are_equal_within_one_and_use_every_example():
    sizes = lambda n, b: sorted(len(i) for i in cka_batches(n, b, seed=0))  # noqa: E731
    assert sizes(1029, 256) == [257, 257, 257, 258]  # no 5-image tail
    assert sizes(360, 256) == [360] and sizes(40, 256) == [40]
    assert sizes(35, 16) == [17, 18]
    batches = cka_batches(1029, 256, seed=3)
    assert sorted(torch.cat(batches).tolist()) == list(range(1029))
    assert not torch.equal(torch.cat(batches), torch.arange(1029))  # shuffled: batches do not follow the data's order
    assert all(torch.equal(a, b) for a, b in zip(batches, cka_batches(1029, 256, seed=3)))
    with pytest.raises(UserError, match="at least 4"):
        cka_batches(3, 256, 0)


def test_feature_cka_has_no_short_tail_to_overweight():
    """1,029 rows at batch 256, built so that the last 5 rows are unrelated and 100x louder: batching in order
    with a 5-row tail counting as much as a full batch (the old loader's way) is pulled far from 1; feature_cka's
    four balanced batches are not."""
    x = _features(n=1029, d=24, seed=11)
    y = 2.0 * x @ _orthogonal(24, seed=12)
    x[1024:] = 100.0 * torch.randn(5, 24, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    hsic = torch.zeros(3, dtype=torch.float64)  # (xy, xx, yy) summed over what a plain loader yields, tail counted
    for i in range(0, 1029, 256):
        ka, ra, sa, _ = _gram_stats([x[i:i + 256]])
        kb, rb, sb, _ = _gram_stats([y[i:i + 256]])
        hsic += torch.stack([_unbiased_hsic(ka, ra, sa, kb, rb, sb)[0, 0], _unbiased_hsic(ka, ra, sa, ka, ra, sa)[0, 0],
                             _unbiased_hsic(kb, rb, sb, kb, rb, sb)[0, 0]])
    counted_tail = float(hsic[0] / (hsic[1] * hsic[2]).sqrt())
    balanced = feature_cka(x, y, batch_size=256, seed=5)
    assert counted_tail < 0.9 and balanced > counted_tail + 0.05
    assert feature_cka(x[:1024], y[:1024], batch_size=256) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(UserError, match="at least 4"):
        feature_cka(x[:3], y[:3])
    with pytest.raises(UserError, match="same examples"):
        feature_cka(x, y[:8])


def test_minibatch_cka_drops_a_short_last_batch_and_refuses_a_larger_one():
    a = _features(n=1029, d=16, seed=14)
    b = a @ _orthogonal(16, seed=15)
    loud = 100.0 * torch.randn(5, 16, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    cka = MinibatchCKA(1, 1)
    for i in range(0, 1024, 256):
        cka.update([a[i:i + 256]], [b[i:i + 256]])
    cka.update([loud], [b[1024:]])  # a loader's tail: unrelated and loud; it must not move the estimate
    assert cka.compute()[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert (cka.batches, cka.skipped_batches, cka.skipped_examples, cka.examples) == (4, 1, 5, 1024)
    cka.update([a[:255]], [b[:255]])  # one fewer: a balanced batch, counted
    assert cka.batches == 5
    with pytest.raises(UserError, match="about the same number"):
        cka.update([a[:300]], [b[:300]])


def _fake_bench_inputs(features: list[torch.Tensor]):
    from types import SimpleNamespace

    from mokd_bench.protocols import Inputs, ModelInputs

    def model(i, f):
        fs = SimpleNamespace(features=f, mode="cls", image_size=32)
        return ModelInputs(loaded=SimpleNamespace(label=f"m{i}"), features=lambda split, *a, **k: fs)

    data = SimpleNamespace(free_split="val", record=lambda split=None: {"split": split})
    return Inputs(models=[model(i, f) for i, f in enumerate(features)], data=data, device=torch.device("cpu"),
                  precision="fp32", image_size=None, batch_size=64, seed=0, log=lambda s: None)


def test_the_bench_cka_protocol_is_feature_cka_and_records_its_estimator():
    from mokd_bench.protocols import PROTOCOLS

    x, y = _independent()
    bodies = PROTOCOLS["cka"].run(_fake_bench_inputs([x, y]), {})
    value = bodies[0]["metrics"]["cka"]["m1"]
    assert abs(value) < 0.02 and value == feature_cka(x, y, DEFAULT_BATCH_SIZE, 0)
    settings = bodies[0]["settings"]
    assert settings["estimator"] == "unbiased minibatch HSIC (Nguyen et al. 2021)"
    assert settings["cka_batch_size"] == DEFAULT_BATCH_SIZE and "no short tail" in settings["tail"]


@pytest.mark.slow
def test_analyze_cka_final_embeddings_go_through_feature_cka(tmp_path, monkeypatch):
    """`mokd analyze cka` on a MOKD pair, its features replaced by two independent random embeddings of the digits
    validation images: the final-embedding CKA it prints and records is feature_cka's, near 0."""
    import json
    from types import SimpleNamespace

    from click.testing import CliRunner

    import mokd_analysis.cli as analysis_cli
    from mokd.cli import cli
    from tests.ckpt_factory import RESNET, VIT32_P4, make_mokd_checkpoint  # noqa: F401

    made = []

    def random_features(loaded, spec, split, *, dataset, **kw):
        g = torch.Generator().manual_seed(100 + len(made))
        made.append(torch.randn(len(dataset), 384, generator=g))
        return SimpleNamespace(features=made[-1])

    monkeypatch.setattr(analysis_cli, "features_for", random_features)
    pair = tmp_path / "run" / "last.pth"
    pair.parent.mkdir()
    make_mokd_checkpoint(pair, net1=RESNET, net2=VIT32_P4)
    out = tmp_path / "cka"
    res = CliRunner().invoke(cli, ["analyze", "cka", str(pair), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(made) == 2 and made[0].shape[0] == 360
    record = json.loads(next(out.glob("cka__*.json")).read_text())
    final = record["metrics"]["final_cka"]
    assert abs(final) < 0.02 and final == feature_cka(made[0], made[1], DEFAULT_BATCH_SIZE, 0)
    assert record["settings"]["estimator"] == "unbiased minibatch HSIC (Nguyen et al. 2021)"
    assert "final embeddings: CKA" in res.output


def test_no_command_reports_the_biased_full_batch_cka():
    """linear_cka is the tests' reference only: every command's CKA goes through feature_cka or MinibatchCKA."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    callers = [str(p.relative_to(root)) for pkg in ("mokd", "mokd_eval", "mokd_analysis", "mokd_bench")
               for p in (root / pkg).rglob("*.py") if "linear_cka(" in p.read_text() and p.name != "cka.py"]
    assert callers == []
