"""Analyses: mean attention distance on attention with known answers, attention capture against timm's own
weights, CNN block distances, consistency, t-SNE, and the three commands end to end."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.cli import cli
from mokd.models.backbones import create_backbone, set_fused_attention
from mokd_analysis.attention import capture_vit_attention
from mokd_analysis.consistency import prediction_consistency, replacement_consistency
from mokd_analysis.distance import mean_attention_distance, patch_attention, pixel_distance_matrix
from mokd_analysis.mad import cnn_mad
from mokd_analysis.tsne import joint_tsne, save_embedding
from mokd_analysis.plots import plot_tsne
from tests.ckpt_factory import RESNET, VIT32_P4, isolated_cache, make_mokd_checkpoint  # noqa: F401
from tests.attention_reference import timm_attention_weights

GRID, PATCH = (14, 14), 16


def test_uniform_attention_over_a_14x14_grid_is_116_49_px():
    n = GRID[0] * GRID[1]
    attn = torch.full((n, n), 1.0 / n)
    d = mean_attention_distance(attn, pixel_distance_matrix(GRID, PATCH))
    assert d.item() == pytest.approx(116.49, abs=0.01)


def test_attention_on_itself_is_0_and_on_the_right_neighbour_is_one_patch():
    n = GRID[0] * GRID[1]
    dist = pixel_distance_matrix(GRID, PATCH)
    assert mean_attention_distance(torch.eye(n), dist).item() == 0.0
    right = torch.zeros(n, n)
    has_right = [q for q in range(n) if q % GRID[1] < GRID[1] - 1]
    for q in has_right:
        right[q, q + 1] = 1.0
    per_query = (right * dist).sum(-1)[has_right]
    assert torch.allclose(per_query, torch.full_like(per_query, 16.0))


def test_cls_token_is_left_out_as_query_and_key():
    n = 4  # 2x2 grid, 1 CLS token
    attn = torch.zeros(1, 1, n + 1, n + 1)
    attn[..., :, 0] = 0.5  # half of every row on CLS
    attn[..., 1:, 1:] += torch.eye(n) * 0.5  # the other half on itself
    p, prefix_mass = patch_attention(attn, 1)
    assert torch.allclose(p[0, 0], torch.eye(n)) and prefix_mass.item() == pytest.approx(0.5)


@pytest.mark.parametrize("fused", [True, False])
def test_capture_equals_timms_own_attention_weights(fused):
    torch.manual_seed(0)
    vit = create_backbone("test_vit", {"img_size": 32, "patch_size": 4}).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = timm_attention_weights(vit, x)
    set_fused_attention(vit, fused)
    captured = {}
    with torch.no_grad(), capture_vit_attention(vit, lambda layer, a: captured.__setitem__(layer, a)):
        vit(x)
    assert set(captured) == set(reference) == set(range(len(vit.blocks)))
    for i in reference:
        assert torch.allclose(captured[i], reference[i], atol=1e-5)


def test_cnn_distance_gives_one_finite_value_per_block():
    torch.manual_seed(0)
    net = create_backbone("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}, small_stem=True)
    data = [(torch.randn(3, 3, 32, 32), torch.zeros(3))]
    r = cnn_mad(net, data, torch.device("cpu"), label="r", arch="resnet18", progress=False)
    assert len(r.distances) == 4 and all(len(row) == 1 and np.isfinite(row[0]) and row[0] > 0 for row in r.distances)
    assert r.grid[0] == [32, 32] and r.grid[-1] == [4, 4]


def test_consistency_on_hand_made_predictions():
    a = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 0, 0])  # agrees on 6 of 10
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    r = prediction_consistency(a, b, labels)
    assert r["consistency"] == pytest.approx(0.6)
    assert r["accuracy_a"] == pytest.approx(80.0) and r["accuracy_b"] == pytest.approx(70.0)
    c = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])  # agrees with b on 8 of 10
    rep = replacement_consistency(a, b, c, labels, replace="a")
    assert rep["replaced"]["consistency"] == pytest.approx(0.8) and rep["delta"] == pytest.approx(0.2)


def test_tsne_writes_a_png_that_opens_and_the_embedding(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(30, 16, generator=g), torch.randn(30, 8, generator=g)]
    coords, ids = joint_tsne(feats, seed=0)
    assert coords.shape == (60, 2) and np.isfinite(coords).all() and list(np.bincount(ids)) == [30, 30]
    labels = np.tile(np.arange(3).repeat(10), 2)
    paths = plot_tsne(coords, labels, ids, ["a", "b", "c"], ["m1", "m2"], tmp_path / "t")
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    npz = np.load(save_embedding(tmp_path / "t.npz", coords, labels, ids, ["a", "b", "c"], ["m1", "m2"]))
    assert npz["coords"].shape == (60, 2) and list(npz["model_names"]) == ["m1", "m2"]


@pytest.mark.slow
def test_the_three_commands_end_to_end(tmp_path):
    ckpt = tmp_path / "pair.pth"
    make_mokd_checkpoint(ckpt, net1=RESNET, net2=VIT32_P4)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(cli, ["analyze", "mad", str(ckpt), "--out", str(out), "--max-images", "16"])
    assert res.exit_code == 0, res.output
    mad = json.loads((out / "mad.json").read_text())
    assert [m["kind"] for m in mad] == ["cnn", "vit"] and len(mad[1]["distances"][0]) == 2  # heads of test_vit
    assert (out / "mad.png").stat().st_size > 0 and (out / "mad.pdf").exists() and (out / "mad.csv").exists()
    res = runner.invoke(cli, ["analyze", "consistency", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads(next(out.glob("consistency__*.json")).read_text())
    assert 0.0 <= record["metrics"]["consistency"] <= 1.0 and record["metrics"]["pair"]["num_images"] == 360
    res = runner.invoke(cli, ["analyze", "tsne", str(ckpt), "--out", str(out), "--per-class", "5"])
    assert res.exit_code == 0, res.output
    assert np.load(out / "tsne.npz")["coords"].shape == (100, 2)
    res = runner.invoke(cli, ["analyze", "consistency", str(tmp_path / "missing.pth")])
    assert res.exit_code != 0 and "does not exist" in res.output and "Traceback" not in res.output
