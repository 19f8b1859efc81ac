import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd import data
from mokd.augment import MultiCrop, SeededCrops
from mokd.cli import cli
from mokd.config import AugmentConfig
from mokd.data import build_dataset, build_photos, parse_data_spec
from mokd.errors import UserError
from tests.tiny import TINY_OVERRIDES
from tests.transfer_layouts import write_cifar10


def test_digits_is_the_embedded_default():
    spec = parse_data_spec(None)
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert (len(train), len(val), len(train.classes)) == (1437, 360, 10)
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10


def test_image_folder_with_class_list_and_bad_layouts(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / c / f"{c}_1.JPEG")
    (tmp_path / "classes.txt").write_text("n03\nn01\n")
    ds = build_dataset(parse_data_spec(str(tmp_path), tmp_path / "classes.txt"), "train")
    assert ds.classes == ["n01", "n03"] and len(ds) == 2
    with pytest.raises(UserError, match="ROOT/train/<class>/<image>"):
        parse_data_spec(str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no class folders"):
        build_dataset(parse_data_spec(str(tmp_path / "empty")), "train")


def test_cifar10_archive_folder(tmp_path):
    folder = write_cifar10(tmp_path) / "cifar-10-batches-py"
    train = build_dataset(parse_data_spec(f"cifar10:{tmp_path}"), "train")
    val = build_dataset(parse_data_spec(f"cifar10:{folder}"), "val")
    assert len(train) == 20 and len(val) == 4 and train.classes[3] == "c3" and train[0][0].size == (32, 32)
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="missing test_batch"):
        build_dataset(parse_data_spec(f"cifar10:{tmp_path}"), "val")


def test_multicrop_shapes_and_per_sample_determinism():
    cfg = AugmentConfig(global_size=32, local_size=16, local_crops=3, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))
    ds = SeededCrops(build_dataset(parse_data_spec("digits"), "train"), MultiCrop(cfg), seed=0)
    crops, _ = ds[5]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    torch.manual_seed(123)  # the global RNG neither matters nor moves
    state = torch.get_rng_state()
    again, _ = ds[5]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert torch.equal(state, torch.get_rng_state())
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0][0], crops[0])


def test_photos_is_an_embedded_set_of_32px_rgb_patches_with_every_class_in_both_splits():
    spec = parse_data_spec("photos")
    assert spec.native_size == 32 and spec.root is None
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert len(train.classes) >= 10 and train.classes == val.classes == sorted(train.classes)
    assert len(train) == 300 * len(train.classes) and len(val) == 100 * len(train.classes)
    assert set(train.targets) == set(val.targets) == set(range(len(train.classes)))
    for ds in (train, val):
        img, label = ds[len(ds) - 1]
        assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB"
        assert label == len(ds.classes) - 1
    with pytest.raises(UserError, match="class list only applies to ImageFolder data, not to the embedded photos"):
        parse_data_spec("photos", __file__)


def test_photos_build_the_same_set_twice():
    first = build_photos()
    build_photos.cache_clear()  # a second build from scratch, as in another process
    second = build_photos()
    assert second is not first
    for split in ("train", "val"):
        for a, b in zip(first[split], second[split]):
            assert np.array_equal(a, b)


def test_photos_train_and_val_windows_never_share_a_pixel():
    built = build_photos()
    for label, name in enumerate(sorted(data.PHOTOS)):
        w, h = data._photo(name).size
        painted = {}
        for split in ("train", "val"):
            top, left, side = built[split].windows[built[split].labels == label].T
            assert (top >= 0).all() and (left >= 0).all() and (top + side <= h).all() and (left + side <= w).all()
            assert side.min() >= min(h, w) // 8 and side.max() <= min(h, w) // 4 and side.min() < side.max()
            mask = np.zeros((h, w), dtype=bool)
            for y, x, s in zip(top, left, side):
                mask[y:y + s, x:x + s] = True
            painted[split] = mask
        assert not (painted["train"] & painted["val"]).any(), name
        assert 0.15 < painted["val"].sum() / painted["train"].sum() < 0.5, name  # about a quarter of the area


def test_photos_without_scikit_image_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    with pytest.raises(UserError, match="pip install scikit-image"):
        data._photo("moon")


def test_one_epoch_of_training_on_photos(tmp_path):
    args = []
    for o in TINY_OVERRIDES:
        args += ["--set", o]
    res = CliRunner().invoke(cli, ["train", *args, "--data", "photos", "--epochs", "1", "--set", "data.subset=64",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    steps = [json.loads(ln) for ln in open(tmp_path / "r" / "log.jsonl")]
    assert [r for r in steps if r["type"] == "step"] and (tmp_path / "r" / "last.pth").is_file()
    assert "photos" in (tmp_path / "r" / "config.yaml").read_text()
