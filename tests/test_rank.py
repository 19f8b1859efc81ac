"""RankMe and alpha-ReQ on embeddings whose spectra are known exactly."""

import math

import pytest
import torch

from mokd.errors import UserError
from mokd_analysis.rank import alpha_fit, alpha_req, covariance_spectrum, rank_scores, rankme


def _with_spectrum(eigenvalues: torch.Tensor, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """[n, D] centred features whose covariance has exactly these eigenvalues, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.numel()
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    evals, evecs = torch.linalg.eigh(z.T @ z / (n - 1))
    white = z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # sample covariance exactly I
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return white @ torch.diag(eigenvalues.double().sqrt()) @ q


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_a_power_law_spectrum_gives_its_exponent(alpha):
    k = torch.arange(1, 65, dtype=torch.float64)
    x = _with_spectrum(k ** -alpha)
    assert torch.allclose(covariance_spectrum(x), k ** -alpha, rtol=1e-8)
    assert alpha_req(x) == pytest.approx(alpha, abs=1e-6)
    assert alpha_req(5.0 * x + 3.0) == pytest.approx(alpha, abs=1e-6)  # scale and offset do not matter
    # 64 eigenvalues: the fit runs over 6 .. 64 (fewer than the authors' 100 exist), and says so
    assert alpha_fit(x) == {"alpha": pytest.approx(alpha, abs=1e-6), "first": 6, "last": 64,
                            "r2": pytest.approx(1.0, abs=1e-9), "points": 59}


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_is_fitted_over_eigenvalues_6_to_100_as_the_authors_do(alpha):
    """Sampled Gaussian features whose covariance follows k^-alpha over k = 6..100, with a head 20x too large and
    a tail beyond 100 that falls off as k^-6: the authors' fit range sees the power law alone."""
    d, n = 256, 8000
    k = torch.arange(1, d + 1, dtype=torch.float64)
    lam = k ** -alpha
    lam[:5] *= 20.0
    lam[100:] = lam[99] * (k[100:] / 100.0) ** -6.0
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * lam.sqrt()) @ q
    fit = alpha_fit(x)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.05)
    assert (fit["first"], fit["last"], fit["points"]) == (6, 100, 95) and fit["r2"] > 0.99
    assert rank_scores(x)["alpha_req"] == fit["alpha"] and rank_scores(x)["alpha_fit"]["last"] == 100


def test_fewer_examples_than_dimensions_fit_only_the_non_zero_eigenvalues():
    k = torch.arange(1, 201, dtype=torch.float64)
    x = _with_spectrum(k ** -1.0, n=2000)[:50]  # 50 examples of 200 dims: rank 49 after centring
    assert covariance_spectrum(x)[49:].max() < 1e-10 * covariance_spectrum(x)[0]
    fit = alpha_fit(x)
    assert fit["last"] == 49 and fit["points"] == 44 and math.isfinite(alpha_req(x)) and alpha_req(x) > 0
    few = _with_spectrum(k[:9] ** -1.0)  # 9 eigenvalues: 6..9 is 4 points, too few for a fit
    assert alpha_fit(few)["alpha"] is None and alpha_fit(few)["last"] == 9 and math.isnan(alpha_req(few))
    assert rank_scores(few)["alpha_req"] is None


def test_jittered_collapse_is_flagged_although_the_centred_scores_look_healthy():
    g = torch.Generator().manual_seed(3)
    point = torch.randn(1, 64, generator=g, dtype=torch.float64)
    x = point.repeat(500, 1) + 1e-12 * torch.randn(500, 64, generator=g, dtype=torch.float64)
    s = rank_scores(x)
    assert s["rankme_centered"] > 60  # centring leaves only the noise, which is isotropic
    assert s["collapsed"] is True and "same point" in s["collapse_reason"]
    assert s["spread_to_offset"] < 1e-11
    assert set(s) >= {"rankme", "rankme_centered", "alpha_req", "alpha_fit", "spread_to_offset", "collapsed", "n",
                      "dim"}
    assert set(s["alpha_fit"]) >= {"first", "last", "r2"}
    assert rank_scores(torch.zeros(8, 4))["collapsed"] is True
    assert rank_scores(torch.zeros(8, 4))["spread_to_offset"] is None


def test_spread_to_offset_is_the_rms_distance_to_the_mean_over_the_norm_of_the_mean():
    x = torch.tensor([[3.0, 1.0], [3.0, -1.0], [5.0, 1.0], [5.0, -1.0]], dtype=torch.float64)  # mean (4, 0)
    s = rank_scores(x)
    assert s["spread_to_offset"] == pytest.approx(2.0 ** 0.5 / 4.0, rel=1e-12)
    assert s["collapsed"] is False and s["collapse_reason"] is None


def test_isotropic_features_have_rankme_d_and_alpha_0():
    x = _with_spectrum(torch.ones(32, dtype=torch.float64))
    assert rankme(x) == pytest.approx(32.0, rel=1e-4)  # all singular values equal (eps moves it by ~1e-5)
    assert alpha_req(x) == pytest.approx(0.0, abs=1e-8)
    g = torch.Generator().manual_seed(1)
    gaussian = torch.randn(20000, 16, generator=g)  # not whitened: singular values within ~3% of each other
    assert rankme(gaussian) == pytest.approx(16.0, rel=0.01)


def test_a_rank_1_embedding_scores_rankme_1():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 1, generator=g) @ torch.randn(1, 64, generator=g)
    assert rankme(x) == pytest.approx(1.0, abs=1e-3)
    assert math.isnan(alpha_req(x))
    scores = rank_scores(x)
    assert scores["alpha_req"] is None and scores["n"] == 500 and scores["dim"] == 64
    assert rankme(torch.zeros(10, 4)) == 1.0


def test_a_shared_offset_collapses_rankme_but_not_its_centred_form():
    x = _with_spectrum(torch.ones(16, dtype=torch.float64))  # centred, isotropic: RankMe 16 either way
    assert rankme(x, center=True) == pytest.approx(16.0, rel=1e-4)
    shifted = x + 1000.0 * torch.ones(16, dtype=torch.float64)  # every embedding moved far along one direction
    assert rankme(shifted) < 1.1 and rankme(shifted, center=True) == pytest.approx(16.0, rel=1e-4)
    assert rank_scores(shifted)["rankme_centered"] == pytest.approx(16.0, rel=1e-4)


def test_rankme_of_known_singular_values():
    # singular values 3, 1, 0, 0: p = (0.75, 0.25) -> exp(H) = 0.75^-0.75 * 0.25^-0.25
    x = torch.zeros(6, 4)
    x[0, 0], x[1, 1] = 3.0, 1.0
    assert rankme(x, eps=0.0) == pytest.approx(0.75 ** -0.75 * 0.25 ** -0.25, rel=1e-12)
    assert rankme(x) == pytest.approx(0.75 ** -0.75 * 0.25 ** -0.25, rel=1e-5)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match=r"\[N, D\]"):
        rankme(torch.zeros(3))
    with pytest.raises(UserError, match="NaN"):
        rank_scores(torch.full((4, 2), float("nan")))
    with pytest.raises(UserError, match="at least 2"):
        alpha_req(torch.ones(1, 3))


@pytest.mark.slow
def test_the_online_monitor_logs_rank_scores_in_its_knn_record(tmp_path):
    import json

    from click.testing import CliRunner

    from mokd.cli import cli
    from tests.tiny import TINY_OVERRIDES

    out = tmp_path / "r"
    args = ["train", "--out", str(out)]
    for o in TINY_OVERRIDES + ["train.knn_every=1", "train.monitor_rank=true", "optim.epochs=1",
                                "train.knn_max_train=64"]:
        args += ["--set", o]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.count("online rank at") == 2 and "RankMe" in res.output
    records = [json.loads(ln) for ln in open(out / "log.jsonl") if '"type": "knn"' in ln]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        for n in ("net1", "net2"):
            assert 1.0 <= r[f"rankme_{n}"] and "knn_top1_" + n in r
            assert r[f"alpha_req_{n}"] is None or math.isfinite(r[f"alpha_req_{n}"])


def test_monitor_rank_without_the_monitor_is_a_config_error(tmp_path):
    from click.testing import CliRunner

    from mokd.cli import cli

    res = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "r"), "--set", "train.knn_every=0",
                                   "--set", "train.monitor_rank=true"])
    assert res.exit_code != 0 and "train.knn_every > 0" in res.output


def test_the_bench_rank_protocol_records_rank_scores_as_they_are():
    from types import SimpleNamespace

    from mokd_bench.protocols import PROTOCOLS, Inputs, ModelInputs

    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 64, generator=g, dtype=torch.float64).repeat(300, 1) \
        + 1e-12 * torch.randn(300, 64, generator=g, dtype=torch.float64)
    fs = SimpleNamespace(features=feats, mode="cls", image_size=32)
    inp = Inputs(models=[ModelInputs(loaded=SimpleNamespace(label="m"), features=lambda split, *a, **k: fs)],
                 data=SimpleNamespace(free_split="val", record=lambda split=None: {}), device=torch.device("cpu"),
                 precision="fp32", image_size=None, batch_size=64, seed=0, log=lambda s: None)
    body = PROTOCOLS["rank"].run(inp, {})[0]
    assert body["metrics"] == {**rank_scores(feats), "headline": "rankme"}
    assert body["metrics"]["collapsed"] is True and body["settings"]["alpha_fit"].startswith("weighted (1/k)")


@pytest.mark.slow
def test_analyze_rank_prints_both_rankmes_and_flags_a_collapsed_model(tmp_path, monkeypatch):
    """`mokd analyze rank` on a MOKD pair whose features are replaced: net1 a jittered single point, net2 healthy."""
    import json
    from types import SimpleNamespace

    from click.testing import CliRunner

    import mokd_analysis.cli as analysis_cli
    from mokd.cli import cli
    from tests.ckpt_factory import RESNET, VIT32_P4, make_mokd_checkpoint

    g = torch.Generator().manual_seed(5)
    calls = []

    def features(loaded, spec, split, *, dataset, **kw):
        n = len(dataset)
        x = torch.randn(n, 64, generator=g, dtype=torch.float64)
        if not calls:
            x = torch.randn(1, 64, generator=g, dtype=torch.float64).repeat(n, 1) + 1e-12 * x
        calls.append(loaded.label)
        return SimpleNamespace(features=x, image_size=32)

    monkeypatch.setattr(analysis_cli, "features_for", features)
    pair = tmp_path / "run" / "last.pth"
    pair.parent.mkdir()
    make_mokd_checkpoint(pair, net1=RESNET, net2=VIT32_P4)
    out = tmp_path / "rank"
    res = CliRunner().invoke(cli, ["analyze", "rank", str(pair), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "RankMe centred" in res.output and "collapsed" in res.output and "alpha fit (k, R²)" in res.output
    assert res.output.count("has collapsed") == 1 and "same point" in res.output
    records = {r["checkpoint"]["model"]: r for r in (json.loads(p.read_text()) for p in out.glob("rank__*.json"))}
    assert records["net1"]["metrics"]["collapsed"] is True and records["net2"]["metrics"]["collapsed"] is False
    for r in records.values():
        assert {"rankme", "rankme_centered", "alpha_req", "alpha_fit", "spread_to_offset", "collapsed", "n",
                "dim"} <= set(r["metrics"])
        assert r["settings"]["collapse_tol"] == 1e-4
    assert (out / "rank.png").stat().st_size > 0
