"""Features: transform sizes, the three modes against hand-run ViT blocks, rank-sharded order, the cache."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mokd.data import build_dataset, parse_data_spec
from mokd.models.backbones import create_backbone
from mokd_eval.features import cache_dir, eval_transform, extract_features, features_for, forward_features
from mokd_eval.loader import load_models
from tests.ckpt_factory import VIT32, isolated_cache, make_mokd_checkpoint  # noqa: F401
from tests.dist_worker import MeanNet, Numbers, sharded_worker


def test_eval_transform_sizes():
    big = Image.new("RGB", (400, 300), (124, 116, 104))  # ~ the ImageNet mean colour
    x = eval_transform(224, native=False)(big)
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.05
    small = Image.new("RGB", (32, 32), (255, 255, 255))
    assert eval_transform(32, native=True)(small).shape == (3, 32, 32)
    assert eval_transform(64, native=True)(small).shape == (3, 64, 64)


def manual_vit_tokens(vit: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output [B, 1+N, C] after the final norm, by running timm's pieces by hand."""
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for block in vit.blocks:
        t = block(t)
        outs.append(vit.norm(t))
    return outs


def test_modes_on_a_vit():
    torch.manual_seed(0)
    vit = create_backbone("test_vit", VIT32["kwargs"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = manual_vit_tokens(vit, x)
        torch.testing.assert_close(forward_features(vit, x, "cls"), tokens[-1][:, 0])
        torch.testing.assert_close(forward_features(vit, x, "lastn", n_last_blocks=4),
                                   torch.cat([t[:, 0] for t in tokens[-4:]], dim=-1))
        torch.testing.assert_close(forward_features(vit, x, "avgpool"),
                                   torch.cat([tokens[-1][:, 0], tokens[-1][:, 1:].mean(1)], dim=-1))


def test_cnn_gives_pooled_output_in_every_mode():
    torch.manual_seed(0)
    cnn = create_backbone("test_resnet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = cnn.forward_features(x).mean((2, 3))
        for mode in ("cls", "lastn", "avgpool"):
            torch.testing.assert_close(forward_features(cnn, x, mode), pooled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_extraction_keeps_single_process_order(tmp_path):
    n, world = 5, 2
    single = extract_features(MeanNet(), Numbers(n), device="cpu", batch_size=2, precision="fp32")
    mp.spawn(sharded_worker, args=(world, _free_port(), n, str(tmp_path / "f")), nprocs=world, join=True)
    for rank in range(world):
        feats, labels = torch.load(tmp_path / f"f.{rank}", weights_only=True)
        assert torch.equal(feats, single[0]) and torch.equal(labels, single[1])
    assert single[0][:, 0].tolist() == list(range(n))


def test_features_for_caches_by_checkpoint_data_and_mode(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(20))
    a = features_for(m, spec, "val", dataset=ds, device="cpu", batch_size=8)
    assert not a.from_cache and a.cache_path.is_file() and a.cache_path.parent == cache_dir()
    assert a.features.shape == (20, 64) and a.labels.tolist() == ds.targets and a.image_size == 32
    b = features_for(m, spec, "val", dataset=ds, device="cpu", batch_size=8)
    assert b.from_cache and b.cache_path == a.cache_path and torch.equal(a.features, b.features)
    c = features_for(m, spec, "val", dataset=ds, device="cpu", mode="lastn", n_last_blocks=2)
    assert c.cache_path != a.cache_path and c.features.shape == (20, 128)
    d = features_for(m, spec, "train", dataset=ds, device="cpu")
    assert d.cache_path != a.cache_path
    e = features_for(m, spec, "val", dataset=ds, device="cpu", use_cache=False)
    assert e.cache_path is None and not e.from_cache
    f = features_for(m, spec, "val", dataset=ds, device="cpu", cache=tmp_path / "elsewhere")
    assert f.cache_path.parent == tmp_path / "elsewhere"
    assert ds.transform is None  # the caller's data set is left as it was


def test_third_party_vit_is_resized_to_the_evaluation_size(tmp_path):
    torch.manual_seed(0)
    torch.save(create_backbone("test_vit").state_dict(), tmp_path / "vit160.pth")  # a 160 px model
    (m,) = load_models(tmp_path / "vit160.pth", arch="test_vit")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(4))
    fs = features_for(m, spec, "val", dataset=ds, device="cpu", use_cache=False)
    assert fs.features.shape == (4, 64) and fs.image_size == 32
