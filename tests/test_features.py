"""Features: transform sizes, the modes against hand-run ViT blocks, rank-sharded order, the cache."""

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
        torch.testing.assert_close(forward_features(vit, x, "lastn_avgpool", n_last_blocks=2),
                                   torch.cat([tokens[-2][:, 0], tokens[-1][:, 0], tokens[-1][:, 1:].mean(1)], dim=-1))


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
    assert not a.from_cache and (a.cache_path / "index.json").is_file() and a.cache_path.parent == cache_dir()
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


# --------------------------------------------------------------------------------------------------------------
# the cache key holds everything that changes the features (issue 13 item 2, issue 8 item 6)


def test_cache_key_holds_arch_kwargs_resampling_precision_and_size(tmp_path):
    torch.manual_seed(0)
    torch.save(create_backbone("test_vit", {"img_size": 32, "patch_size": 8}).state_dict(), tmp_path / "v.pth")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(6))
    (two,) = load_models(tmp_path / "v.pth", arch="test_vit", arch_kwargs={"img_size": 32, "patch_size": 8})
    (four,) = load_models(tmp_path / "v.pth", arch="test_vit",
                          arch_kwargs={"img_size": 32, "patch_size": 8, "num_heads": 4})  # same shapes
    a = features_for(two, spec, "val", dataset=ds, device="cpu", precision="fp32")
    b = features_for(four, spec, "val", dataset=ds, device="cpu", precision="fp32")
    assert not b.from_cache and b.cache_path != a.cache_path  # a corrected command is not served stale features
    assert not torch.allclose(a.features, b.features)
    keys = {features_for(two, spec, "val", dataset=ds, device="cpu", precision="fp32", **kw).cache_path
            for kw in ({}, {"pos_resample": "dino"}, {"image_size": 48})}
    keys.add(features_for(two, spec, "val", dataset=ds, device="cpu", precision="bf16").cache_path)
    assert len(keys) == 4 and a.cache_path in keys


def _image_folder(root, n=3):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * i, 200 if c == "a" else 20, 90)).save(root / split / c / f"{i}.png")


def test_image_replaced_in_place_is_re_extracted(tmp_path):
    import os

    _image_folder(tmp_path / "imgs")
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    spec = parse_data_spec(str(tmp_path / "imgs"))
    ds = build_dataset(spec, "val")
    said = []
    a = features_for(m, spec, "val", dataset=ds, device="cpu", image_size=32, log=said.append)
    assert any(f"cached in {a.cache_path}" in s for s in said)  # the first extraction says where it caches
    assert features_for(m, spec, "val", dataset=ds, device="cpu", image_size=32).from_cache
    target = tmp_path / "imgs" / "val" / "a" / "0.png"
    st = os.stat(target)
    Image.new("RGB", (32, 32), (250, 0, 250)).save(target)  # same name, same size on disk is not needed
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime restored
    b = features_for(m, spec, "val", dataset=ds, device="cpu", image_size=32)
    assert not b.from_cache and b.cache_path != a.cache_path
    assert not torch.allclose(a.features[0], b.features[0]) and torch.allclose(a.features[1:], b.features[1:])


def test_large_sets_use_size_and_mtime(tmp_path, monkeypatch):
    import os

    from mokd_eval import features

    _image_folder(tmp_path / "imgs", n=1)
    spec = parse_data_spec(str(tmp_path / "imgs"))
    ds = build_dataset(spec, "val")
    monkeypatch.setattr(features, "CONTENT_HASH_MAX_FILES", 0)  # as for a set too big to read
    before = features.data_fingerprint(spec, ds)
    target = tmp_path / "imgs" / "val" / "a" / "0.png"
    os.utime(target, ns=(1, 10**18))
    assert features.data_fingerprint(spec, ds) != before
    assert features.data_fingerprint(parse_data_spec("digits"), build_dataset(parse_data_spec("digits"), "val")) is None


def test_the_photos_fingerprint_follows_the_recipe(monkeypatch):
    from mokd import data
    from mokd_eval import features

    spec = parse_data_spec("photos")
    ds = build_dataset(spec, "val")
    before = features.data_fingerprint(spec, ds)
    assert before is not None and features.data_fingerprint(spec, ds) == before
    monkeypatch.setattr(data, "PHOTOS_VERSION", "photos-next")
    data.photos_fingerprint.cache_clear()
    try:
        assert features.data_fingerprint(spec, ds) != before
    finally:
        data.photos_fingerprint.cache_clear()  # no fingerprint of the patched recipe outlives the test
