"""`mokd analyze cka | attention | rank` end to end through the CLI on tiny models at 32 px, and --label with
PATH::ARCH on every analyze command (a MOKD pair and third-party files in one figure)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.cli import cli
from mokd.models.backbones import create_backbone
from tests.ckpt_factory import RESNET, VIT32_P4, backbone_state, isolated_cache, make_mokd_checkpoint  # noqa: F401

REG_KWARGS = "img_size=32,patch_size=8,reg_tokens=4"


def _invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def files(tmp_path):
    """A MOKD pair (ResNet + ViT), a DINO-release-like ViT file and a MoCo-v3-like ResNet file (neither names
    its architecture), and a timm ViT with 4 register tokens as a plain state dict."""
    pair = tmp_path / "run" / "last.pth"
    pair.parent.mkdir()
    make_mokd_checkpoint(pair, net1=RESNET, net2=VIT32_P4)
    dino = tmp_path / "dino_deitsmall.pth"
    torch.save(backbone_state({"name": "test_vit", "kwargs": {}, "small_stem": False}, 5), dino)  # a release file
    moco = tmp_path / "mocov3.pth.tar"
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in backbone_state(RESNET, 6).items()}}, moco)
    torch.manual_seed(7)
    reg = tmp_path / "vit_reg.pth"
    torch.save(create_backbone("test_vit", {"img_size": 32, "patch_size": 8, "reg_tokens": 4}).state_dict(), reg)
    return {"pair": pair, "dino": dino, "moco": moco, "reg": reg}


@pytest.mark.slow
def test_cka_of_a_pair_and_self_similarity(files, tmp_path):
    out = tmp_path / "cka"
    _invoke("analyze", "cka", files["pair"], "--out", out, "--max-images", 35, "--batch-size", 16)
    numbers = json.loads((out / "cka.json").read_text())
    m = np.asarray(numbers["matrix"])
    assert numbers["layers_a"] == ["layer1", "layer2", "layer3", "layer4"]
    assert numbers["layers_b"][:2] == ["block1.mean", "block1.cls"] and m.shape == (4, len(numbers["layers_b"]))
    assert np.isfinite(m).all() and numbers["num_images"] == 35 and numbers["batch_sizes"] == [17, 18]  # 35 = 18+17, no short tail
    assert (out / "cka.png").stat().st_size > 0 and (out / "cka.pdf").exists()
    record = json.loads(next(out.glob("cka__*.json")).read_text())
    assert record["task"] == "cka" and record["metrics"]["matrix"] == numbers["matrix"]
    out2 = tmp_path / "self"
    _invoke("analyze", "cka", files["pair"], "--model", "net2", "--out", out2, "--max-images", 32, "--label", "ours")
    self_sim = json.loads((out2 / "cka.json").read_text())
    assert self_sim["self_similarity"] and np.allclose(np.diag(self_sim["matrix"]), 1.0)
    assert self_sim["model_a"] == "ours"


@pytest.mark.slow
def test_cka_across_files_with_path_arch_and_labels(files, tmp_path):
    out = tmp_path / "cka"
    _invoke("analyze", "cka", f"{files['dino']}::test_vit", files["pair"], "--model-b", "net1", "--label", "DINO",
            "--label", "MOKD", "--out", out, "--max-images", 16)
    numbers = json.loads((out / "cka.json").read_text())
    assert numbers["model_a"] == "DINO" and numbers["model_b"] == "MOKD" and len(numbers["layers_b"]) == 4
    res = CliRunner().invoke(cli, ["analyze", "cka", str(files["pair"]), str(files["pair"]), "--out", str(out)])
    assert res.exit_code != 0 and "--model-a/--model-b" in res.output
    res = CliRunner().invoke(cli, ["analyze", "cka", str(files["pair"]), "--label", "a", "--label", "b"])
    assert res.exit_code != 0 and "one label per checkpoint" in res.output and "Traceback" not in res.output


def _pngs(folder, n, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.slow
def test_attention_of_a_register_vit_on_image_files(files, tmp_path):
    imgs = _pngs(tmp_path / "imgs", 3)
    out = tmp_path / "att"
    _invoke("analyze", "attention", f"{files['reg']}::test_vit", "--arch-kwargs", REG_KWARGS, "--images",
            imgs / "img0.png", "--images", imgs / "img1.png", "--image-size", 32, "--label", "registers", "--out", out)
    maps = np.load(out / "attention.npz")
    assert maps["model0_heads"].shape == (2, 2, 4, 4) and maps["model0_rollout"].shape == (2, 4, 4)
    assert list(maps["model_labels"]) == ["registers"] and maps["images"].shape == (2, 128, 128, 3)
    # the CLS row without the 5 prefix tokens: finite, and short of 1 by what went to CLS and the registers
    assert np.isfinite(maps["model0_heads"]).all() and (maps["model0_heads"].sum((-1, -2)) < 1.0 + 1e-5).all()
    with Image.open(out / "attention.png") as im:
        assert im.size[0] > 200
    assert (out / "attention.pdf").exists()
    record = json.loads(next(out.glob("attention__*.json")).read_text())
    assert record["metrics"]["kind"] == "vit" and record["metrics"]["num_prefix_tokens"] == 5
    _invoke("analyze", "attention", f"{files['reg']}::test_vit", "--arch-kwargs", REG_KWARGS, "--images", imgs,
            "--out", out)  # a folder of images
    assert np.load(out / "attention.npz")["images"].shape[0] == 3


def test_attention_of_an_average_pooled_vit_says_its_cls_token_is_not_its_embedding(tmp_path):
    torch.manual_seed(7)
    gap = tmp_path / "vit_gap.pth"
    torch.save(create_backbone("test_vit", {"img_size": 32, "patch_size": 8, "global_pool": "avg"}).state_dict(), gap)
    img = _pngs(tmp_path / "imgs", 1) / "img0.png"
    out = tmp_path / "att"
    res = _invoke("analyze", "attention", f"{gap}::test_vit", "--arch-kwargs",
                  "img_size=32,patch_size=8,global_pool=avg", "--images", img, "--image-size", 32, "--out", out)
    assert "its CLS token is not its embedding" in res.output
    assert json.loads(next(out.glob("attention__*.json")).read_text())["metrics"]["cls_is_embedding"] is False


@pytest.mark.slow
def test_attention_of_a_pair_defaults_to_images_of_the_data(files, tmp_path):
    out = tmp_path / "att"
    _invoke("analyze", "attention", files["pair"], "--num-images", 3, "--out", out)
    maps = np.load(out / "attention.npz")
    assert maps["model0_norm"].shape[0] == 3 and maps["model1_heads"].shape == (3, 2, 8, 8)
    records = [json.loads(p.read_text()) for p in out.glob("attention__*.json")]
    assert sorted(r["metrics"]["kind"] for r in records) == ["cnn", "vit"]
    res = CliRunner().invoke(cli, ["analyze", "attention", str(files["pair"]), "--images", str(tmp_path / "no.png")])
    assert res.exit_code != 0 and "does not exist" in res.output


@pytest.mark.slow
def test_rank_on_an_unlabelled_folder_and_from_the_cache(files, tmp_path):
    folder = _pngs(tmp_path / "unlabelled", 12)
    out = tmp_path / "rank"
    args = ["analyze", "rank", files["pair"], "--data", folder, "--out", out, "--image-size", 32]
    res = _invoke(*args)
    numbers = json.loads((out / "rank.json").read_text())
    assert [m["n"] for m in numbers["models"]] == [12, 12]
    for m in numbers["models"]:
        assert 1.0 <= m["rankme"] <= min(m["n"], m["dim"]) and len(m["spectrum"]) == m["dim"]
    records = [json.loads(p.read_text()) for p in out.glob("rank__*.json")]
    assert len(records) == 2 and all(r["data"]["labelled"] is False for r in records)
    assert "from cache" not in res.output
    assert "from cache" in _invoke(*args).output  # features come from the cache the other protocols share
    assert (out / "rank.png").stat().st_size > 0 and (out / "rank.pdf").exists()


@pytest.mark.slow
def test_rank_on_labelled_data_with_labels_and_path_arch(files, tmp_path):
    out = tmp_path / "rank"
    _invoke("analyze", "rank", files["pair"], f"{files['dino']}::test_vit", "--label", "MOKD", "--label", "DINO",
            "--max-images", 64, "--out", out)
    labels = [m["label"] for m in json.loads((out / "rank.json").read_text())["models"]]
    assert labels == ["MOKD net1-teacher", "MOKD net2-teacher", "DINO"]


@pytest.mark.slow
def test_labels_and_path_arch_on_mad_tsne_and_consistency(files, tmp_path):
    out = tmp_path / "out"
    _invoke("analyze", "mad", files["pair"], f"{files['dino']}::test_vit", f"{files['moco']}::test_resnet",
            "--label", "MOKD", "--label", "DINO", "--label", "MoCo v3", "--out", out, "--max-images", 8,
            "--image-size", 32)
    mad = json.loads((out / "mad.json").read_text())
    assert [m["label"] for m in mad] == ["MOKD net1-teacher", "MOKD net2-teacher", "DINO", "MoCo v3"]
    assert {m.get("run") for m in mad} == {"MOKD", "DINO", "MoCo v3"}
    _invoke("analyze", "tsne", f"{files['dino']}::test_vit", f"{files['moco']}::test_resnet", "--label", "DINO",
            "--label", "MoCo v3", "--out", out, "--per-class", 3, "--image-size", 32)
    names = list(np.load(out / "tsne.npz")["model_names"])
    assert names[0].startswith("DINO") and names[1].startswith("MoCo v3")
    _invoke("analyze", "consistency", files["pair"], f"{files['moco']}::test_resnet", "--model-a", "net1",
            "--label", "MOKD", "--label", "MoCo v3", "--out", out)
    record = json.loads(next(out.glob("consistency__*.json")).read_text())
    assert record["checkpoint"]["label"] == "MOKD" and record["checkpoint"]["compared_with"][0]["label"] == "MoCo v3"
