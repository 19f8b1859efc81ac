"""Linear probe: full protocol on a frozen tiny backbone, the one-pass lr grid, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mokd.data import ImageDataset
from mokd.models.backbones import create_backbone
from mokd_eval.linear import (LinearSettings, bank_accuracy, fast_linear_probe, probe_dim, probe_features,
                              stratified_holdout, train_linear_bank, train_linear_probe)
from mokd_eval.features import eval_transform
from mokd_eval.supervised import train_transform, warmup_cosine

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 230, 40)]


def colour_set(n_per_class: int, seed: int, transform) -> ImageDataset:
    """Solid-colour 32 px images with pixel noise, one colour per class: separable by any random backbone."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for c, rgb in enumerate(COLOURS):
        for _ in range(n_per_class):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(arr))
            targets.append(c)
    return ImageDataset([str(c) for c in range(len(COLOURS))], targets, lambda i: images[i], transform)


def colour_folder(root, n_train: int = 8, n_val: int = 4):
    """An ImageFolder (ROOT/{train,val}/<class>/*.png) of the noisy solid colours, 32 px."""
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        ds = colour_set(n, seed, None)
        for i in range(len(ds)):
            img, label = ds[i]
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{split}_{i}.png")
    return root


def blobs(n: int, dim: int, classes: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2.5
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, dim, generator=g), y


def test_warmup_cosine_shape():
    s = warmup_cosine(1.0, 100, 10)
    assert s.shape == (100,)
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[10:]) <= 1e-12) and s[-1] < 0.01


def test_vit_features_are_last_blocks_cls_tokens():
    vit = create_backbone("test_vit", {"img_size": 32, "patch_size": 4}).eval()
    x = torch.randn(2, 3, 32, 32)
    f = probe_features(vit, x, n_last_blocks=2, avgpool=True)
    assert f.shape == (2, probe_dim(vit, 2, True)) == (2, 3 * vit.embed_dim)
    # independent: run the blocks by hand
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outs = []
        for blk in vit.blocks:
            t = blk(t)
            outs.append(vit.norm(t))
    expect = torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(1)], dim=-1)
    torch.testing.assert_close(f, expect, atol=1e-5, rtol=1e-5)
    # the last block's CLS after the norm is the model's own global feature
    torch.testing.assert_close(probe_features(vit, x, 1), vit(x), atol=1e-5, rtol=1e-5)
    # a ViT without a CLS token: its own pooled feature (mean token through fc_norm)
    gap = create_backbone("test_vit", {"img_size": 32, "patch_size": 4, "class_token": False, "global_pool": "avg"})
    torch.testing.assert_close(probe_features(gap.eval(), x, 1), gap(x), atol=1e-5, rtol=1e-5)


def test_linear_probe_learns_separable_set():
    backbone = create_backbone("test_vit", {"img_size": 32, "patch_size": 4})
    train = colour_set(16, 0, train_transform(32))
    val = colour_set(8, 1, eval_transform(32, native=True))
    settings = LinearSettings(epochs=3, batch_size=32, lr=0.5, warmup_epochs=1, image_size=32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    m = train_linear_probe(backbone, train, val, 4, settings=settings, device=torch.device("cpu"),
                           precision="bf16", seed=0, log=lambda s: None)
    assert m["top1"] >= 95.0 and m["top5"] == 100.0 and 1 <= m["best_epoch"] <= 3
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # frozen, BN stats too


def test_fast_grid_picks_sensible_lr_and_matches_single_layer():
    x, y = blobs(600, 32, 5, seed=0, spread=2.0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 2.5  # same centres as blobs(seed=0)
    vy = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(9))
    vx = centers[vy] + 2.0 * torch.randn(200, 32, generator=torch.Generator().manual_seed(10))
    grid = (1e-6, 1e-4, 0.01, 0.1, 1.0)
    s = LinearSettings(epochs=8, batch_size=64, warmup_epochs=1, lr_grid=grid, holdout=0.1)
    m = fast_linear_probe(x, y, vx, vy, num_classes=5, settings=s, seed=3, log=lambda _: None)
    assert m["best_lr"] in (0.01, 0.1, 1.0)  # a vanishing lr cannot win
    assert m["grid"]["1e-06"]["holdout_top1"] < m["holdout_top1"]
    assert m["top1"] > 90.0 and 55 <= m["n_holdout"] <= 65

    # independent single layer: nn.Linear + torch.optim.SGD on the same batches, same seed
    fit, _ = stratified_holdout(y, 0.1, 3)
    fx, fy = x[fit], y[fit]
    peak = m["best_lr"] * 64 / 256
    torch.manual_seed(3)
    layer = torch.nn.Linear(32, 5)
    torch.nn.init.normal_(layer.weight, std=0.01)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=peak, momentum=0.9)
    steps = -(-fx.shape[0] // 64)
    lrs = warmup_cosine(peak, 8 * steps, steps)
    gen, k = torch.Generator().manual_seed(3), 0
    for _ in range(8):
        order = torch.randperm(fx.shape[0], generator=gen)
        for i in range(steps):
            idx = order[i * 64:(i + 1) * 64]
            for group in opt.param_groups:
                group["lr"] = lrs[k]
            loss = F.cross_entropy(layer(fx[idx]), fy[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            k += 1
    with torch.no_grad():
        ref_top1 = (layer(vx).argmax(1) == vy).float().mean().item() * 100
    assert ref_top1 == pytest.approx(m["top1"], abs=0.6)

    bank = train_linear_bank(fx, fy, [peak], num_classes=5, epochs=8, batch_size=64, warmup_epochs=1, seed=3)
    torch.testing.assert_close(bank.weight[0].detach(), layer.weight.detach(), atol=1e-5, rtol=1e-4)
    assert bank_accuracy(bank, vx, vy)[0, 0].item() == pytest.approx(ref_top1, abs=0.6)


def test_stratified_holdout_per_class():
    y = torch.tensor([0] * 20 + [1] * 10 + [2] * 2)
    keep, held = stratified_holdout(y, 0.1, 0)
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(32))
    assert torch.bincount(y[held]).tolist() == [2, 1, 1]


# ----------------------------------------------------------------------------------------------- CLI

ARCH = {"net1": {"name": "test_resnet", "kwargs": {}, "small_stem": True},
        "net2": {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 4}, "small_stem": False}}


def make_mokd_checkpoint(path, arch: dict = ARCH, size: int = 32):
    """A MOKD training checkpoint of two tiny backbones (teacher and student share the weights)."""
    model = {}
    for net, a in arch.items():
        torch.manual_seed(0 if net == "net1" else 1)
        sd = create_backbone(a["name"], a["kwargs"], a["small_stem"]).state_dict()
        for branch in ("teacher", "student"):
            model.update({f"{branch}.{net}.backbone.{k}": v.clone() for k, v in sd.items()})
    torch.save({"format": "mokd", "version": 1, "epoch": 1, "step": 10, "arch": arch, "model": model,
                "config": {"augment": {"global_size": size}, "loss": {"mode": "mokd"}}}, path)
    return path


def run_cli(args):
    from click.testing import CliRunner

    from mokd.cli import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_records(out):
    import json

    return sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["checkpoint"]["label"])


def test_cli_linear_fast(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "res"
    data = colour_folder(tmp_path / "data")
    res = run_cli(["eval", "linear", str(ckpt), "--data", str(data), "--fast", "--epochs", "10",
                   "--batch-size", "16", "--warmup-epochs", "1", "--lr-grid", "0.01,0.1,1", "--holdout", "0.25",
                   "--image-size", "32", "--out", str(out), "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    recs = read_records(out)
    assert [r["checkpoint"]["label"] for r in recs] == ["net1-teacher", "net2-teacher"]
    for r in recs:
        assert r["task"] == "linear" and r["metrics"]["headline"] == "top1"
        assert r["metrics"]["best_lr"] in (0.01, 0.1, 1.0) and 0 <= r["metrics"]["top1"] <= 100
        assert r["settings"]["mode"] == "fast" and r["data"]["train_size"] == 32
    assert recs[1]["settings"]["feature_dim"] == 4 * 64  # ViT: CLS of the last 4 blocks
    assert "best lr" in res.output and "net2-teacher" in res.output


def test_cli_linear_full(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "res"
    data = colour_folder(tmp_path / "data")
    run_cli(["eval", "linear", str(ckpt), "--data", str(data), "--model", "net2", "--epochs", "2",
             "--warmup-epochs", "0", "--batch-size", "16", "--lr", "0.5", "--image-size", "32", "--out", str(out),
             "--device", "cpu", "--avgpool", "--n-last-blocks", "2"])
    (r,) = read_records(out)
    assert r["settings"]["mode"] == "full" and r["settings"]["lr"] == 0.5 and r["settings"]["epochs"] == 2
    assert r["settings"]["feature_dim"] == 3 * 64 and r["settings"]["image_size"] == 32
    assert r["metrics"]["top1"] >= 75.0 and r["metrics"]["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_linear_probe_ddp_matches_single_process(tmp_path):
    """Two gloo ranks, each half of one full batch: DDP's averaged gradient is the full-batch gradient, so the
    layer and the all-reduced accuracies equal a single process's."""
    import socket

    import torch.multiprocessing as mp

    from tests.dist_linear_worker import ddp_worker, train

    single, layer = train()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        torch.testing.assert_close(r["weight"], layer.weight.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["bias"], layer.bias.detach(), atol=1e-5, rtol=1e-5)
        assert r["metrics"]["top1"] == pytest.approx(single["top1"]) and r["metrics"]["top5"] == single["top5"]
    assert single["top1"] > 25.0  # it learned something, so the comparison is not between two untouched layers
