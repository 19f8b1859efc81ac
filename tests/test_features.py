"""Features: transform sizes, the modes against hand-run ViT blocks, rank-sharded order, the cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mokd.data import DataSpec, build_dataset, parse_data_spec
from mokd.models.backbones import create_backbone
from mokd_eval.features import IMAGENET_MEAN, IMAGENET_STD, cache_dir, eval_transform, extract_features, \
    features_for, forward_features, load_sharded
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


def test_modes_on_an_average_pooled_vit_read_its_embedding_not_its_cls_token():
    """A ViT that pools its patch tokens (timm global_pool="avg") keeps a CLS token that its embedding never
    reads: every mode takes the model's own pooled feature per block (its mean patch token through fc_norm, or
    through the final norm when fc_norm is off), and a ViT without a CLS token works too."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    for kwargs in ({"global_pool": "avg"}, {"global_pool": "avg", "class_token": False},
                   {"global_pool": "avg", "fc_norm": False}):
        vit = create_backbone("test_vit", {**VIT32["kwargs"], **kwargs}).eval()
        p = vit.num_prefix_tokens
        with torch.no_grad():
            tokens = [t[:, p:] for t in manual_vit_tokens(vit, x)]  # after vit.norm, the identity under fc_norm
            embed = [vit.fc_norm(t.mean(1)) for t in tokens]
            torch.testing.assert_close(forward_features(vit, x, "cls"), vit(x))
            torch.testing.assert_close(forward_features(vit, x, "lastn", n_last_blocks=1), vit(x))
            torch.testing.assert_close(forward_features(vit, x, "lastn", n_last_blocks=2), torch.cat(embed[-2:], -1))
            torch.testing.assert_close(forward_features(vit, x, "lastn_avgpool", n_last_blocks=2),
                                       torch.cat([*embed[-2:], tokens[-1].mean(1)], dim=-1))


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


# --------------------------------------------------------------------------------------------------------------
# transfer sets: the resize ratio and multi-hot labels (issue 31 item 1)


@dataclass(frozen=True)
class TransferSpec(DataSpec):
    """A folder spec with the transfer sets' fields (as mokd.data's readers give them)."""
    resize_ratio: float = 1.0
    multilabel: bool = False


def test_transfer_sets_keep_the_whole_short_side():
    img = Image.new("RGB", (448, 300), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 448, 10))  # a red band along the top edge
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    red = lambda x: (x[:, 0] * std + mean)[0].mean().item()  # noqa: E731  (the red of the top row)
    whole = eval_transform(224, native=False, resize_ratio=1.0)(img)  # short side 224, then the centre 224
    cropped = eval_transform(224, native=False)(img)  # short side 256: the top 16 rows fall outside the crop
    assert whole.shape == cropped.shape == (3, 224, 224)
    assert red(whole) > 0.9 and red(cropped) < 0.6


def _folder_set(root: Path, n: int = 6, size: tuple[int, int] = (48, 32)) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                img = Image.new("RGB", size, (40 * i, 200 if c == "a" else 20, 90))
                img.paste((255, 255, 255), (0, 0, size[0], 3))
                img.save(root / split / c / f"{i}.png")


def test_features_for_takes_the_specs_resize_ratio(tmp_path):
    _folder_set(tmp_path / "imgs")
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    plain = parse_data_spec(str(tmp_path / "imgs"))
    transfer = TransferSpec("folder", plain.root)
    ds = build_dataset(plain, "val")
    a = features_for(m, plain, "val", dataset=ds, device="cpu", image_size=32)
    b = features_for(m, transfer, "val", dataset=ds, device="cpu", image_size=32)
    assert not b.from_cache and b.cache_path != a.cache_path  # the ratio names its own entry
    want, _ = extract_features(m.backbone, build_dataset(plain, "val", eval_transform(32, False, 1.0)), device="cpu")
    assert torch.equal(b.features, want) and not torch.allclose(a.features, want)
    assert features_for(m, transfer, "val", dataset=ds, device="cpu", image_size=32).from_cache
    assert load_sharded(b.cache_path)[2]["resize_ratio"] == 1.0


def _multi_hot(targets: list[int], classes: int) -> list[torch.Tensor]:
    out = []
    for t in targets:
        y = torch.zeros(classes, dtype=torch.uint8)
        y[t] = y[(t + 1) % classes] = 1
        out.append(y)
    return out


def test_multi_hot_labels_go_through_memory_shards_and_the_cache(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    spec = TransferSpec("digits", multilabel=True)
    ds = build_dataset(parse_data_spec("digits"), "val").subset(range(7))
    ds.targets = _multi_hot(ds.targets, 10)
    want = torch.stack(ds.targets)
    kw = dict(dataset=ds, device="cpu", batch_size=3, shard_rows=2)
    mem = features_for(m, spec, "val", use_cache=False, **kw)
    assert mem.labels.dtype == torch.uint8 and torch.equal(mem.labels, want)
    a = features_for(m, spec, "val", **kw)
    assert not a.from_cache and a.bank.rows == (2, 2, 2, 1)
    assert a.labels.dtype == torch.uint8 and torch.equal(a.labels, want) and torch.equal(a.features, mem.features)
    b = features_for(m, spec, "val", **kw)
    assert b.from_cache and torch.equal(b.labels, want) and torch.equal(b.features, mem.features)
    index = load_sharded(a.cache_path)[2]
    assert index["label_shape"] == [10] and index["label_dtype"] == "uint8" and index["multilabel"]
    ds.targets = _multi_hot([(t + 3) % 10 for t in range(7)], 10)  # relabelled (a changed annotation file)
    c = features_for(m, spec, "val", **kw)
    assert not c.from_cache and c.cache_path != a.cache_path and torch.equal(c.labels, torch.stack(ds.targets))
    # class indices stay int64 [N] (the earlier layout reads the same)
    d = features_for(m, parse_data_spec("digits"), "val", dataset=build_dataset(parse_data_spec("digits"), "val")
                     .subset(range(7)), device="cpu", shard_rows=2)
    assert d.labels.dtype == torch.int64 and d.labels.shape == (7,)


# --------------------------------------------------------------------------------------------------------------
# under torchrun (issue 31 item 2)

ROOT = Path(__file__).resolve().parents[1]


def worker_env(**extra: str) -> dict:
    """The environment of a spawned features worker: this checkout first, one thread (bit-identical runs)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_worker(args: list[str], nproc: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    return subprocess.run([*launch, "-m", "tests.dist_features_worker", *args], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_processes_give_one_process_features_bit_for_bit(tmp_path):
    """In memory (gathered), in the sharded cache (class indices and multi-hot labels): 2 gloo ranks = 1 process."""
    make_mokd_checkpoint(tmp_path / "ours.pth")
    ckpt = str(tmp_path / "ours.pth")
    one = run_worker([ckpt, str(tmp_path / "one"), "--cache", str(tmp_path / "c1")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_worker([ckpt, str(tmp_path / "two"), "--cache", str(tmp_path / "c2")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = torch.load(tmp_path / "one.0", weights_only=True)
    for what in ("multilabel-memory", "multilabel"):
        assert ref[what]["labels"].shape == (20, 10) and ref[what]["labels"].dtype == torch.uint8
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two.{rank}", weights_only=True)
        for what in ("memory", "cache", "multilabel-memory", "multilabel"):
            assert torch.equal(got[what]["features"], ref[what]["features"]), (rank, what)
            assert torch.equal(got[what]["labels"], ref[what]["labels"]), (rank, what)
            assert got[what]["labels"].dtype == ref[what]["labels"].dtype
            assert not got[what]["from_cache"]
    entry = Path(torch.load(tmp_path / "two.1", weights_only=True)["cache"]["cache_path"])
    assert entry.parent == tmp_path / "c2"
    # each rank cut its own slice (rows 0-9, 10-19) into shards of 3 rows
    assert load_sharded(entry)[2]["rows"] == [3, 3, 3, 1, 3, 3, 3, 1]
    assert sorted(p.name for p in (tmp_path / "c2").iterdir() if not p.name.startswith(".")) == sorted(
        Path(ref[w]["cache_path"]).name for w in ("cache", "multilabel"))  # nothing but the two entries


# --------------------------------------------------------------------------------------------------------------
# bounded memory on the write path (issue 31 item 2)


def test_cached_extraction_writes_each_shard_before_reading_on(tmp_path, monkeypatch):
    """With 2-row shards, each shard is saved before more than a batch beyond it was read: the write path holds
    one shard and one batch, never the whole bank (a gather or a full-size buffer would fail this)."""
    from mokd import distributed
    from mokd_eval import features

    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(12))
    loaded = []
    load = ds._load
    ds._load = lambda i: (loaded.append(i), load(i))[1]
    saved = []  # (rows in the shard, rows saved so far, images read so far)
    save = features._save_shard

    def counting(blob, path):
        saved.append((len(blob["features"]), sum(r for r, _, _ in saved) + len(blob["features"]), len(loaded)))
        save(blob, path)

    def never(*a, **k):
        raise AssertionError("the cached path gathered or held the whole bank")

    monkeypatch.setattr(features, "_save_shard", counting)
    monkeypatch.setattr(features, "extract_features", never)
    monkeypatch.setattr(distributed, "all_gather_cat", never)
    monkeypatch.setenv("MOKD_SHARD_ROWS", "2")
    fs = features_for(m, spec, "val", dataset=ds, device="cpu", batch_size=3)
    assert len(saved) == 6 and all(rows == 2 for rows, _, _ in saved)
    assert all(read <= done + 3 for _, done, read in saved), saved
    assert len(fs) == 12 and fs.bank.rows == (2,) * 6
