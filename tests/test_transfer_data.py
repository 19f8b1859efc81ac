"""The transfer suite's readers on synthetic copies of their layouts (tests/transfer_layouts.py)."""

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader

from mokd.cli import cli
from mokd.data import build_dataset, holdout_split, parse_data_spec
from mokd.errors import UserError
from mokd.transfer_data import CALTECH_TRAIN_PER_CLASS, TRANSFER_SETS, VOC_CLASSES
from tests.transfer_layouts import COLOURS, EXPECTED, WRITERS, voc_expected, write_cifar10, write_layout


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every synthetic layout, written once: name -> path."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(name, base / name) for name in WRITERS}


def _class_of(img: Image.Image) -> int:
    """The class whose colour an image of transfer_layouts.image is closest to."""
    mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS]))


@pytest.mark.parametrize("name", sorted(set(WRITERS) - {"voc2007"}))
def test_reader_sizes_classes_and_labels(layouts, name):
    spec = parse_data_spec(f"{name}:{layouts[name]}")
    exp = EXPECTED[name]
    train, test = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert (len(train), len(test)) == (exp["train"], exp["test"])
    if exp["classes"] is not None:
        assert train.classes == test.classes == exp["classes"]
    assert train.classes == test.classes and not train.multilabel
    n_classes = len(exp["classes"] or [0, 1, 2])
    for ds, n in ((train, exp["train"]), (test, exp["test"])):
        # every class in both splits, as many images each as were written
        assert sorted(collections.Counter(ds.targets).values()) == [n // n_classes] * n_classes
    # the label each reader gives is the class the image was drawn in
    for ds in (train, test):
        for i in range(0, len(ds), max(1, len(ds) // 6)):
            img, y = ds[i]
            assert img.mode == "RGB" and _class_of(img) == y
    if name == "stl10":
        assert train.paths is None and train[0][0].size == (96, 96)
    else:
        assert train.paths and all(os.path.isfile(p) for p in train.paths + test.paths)
        assert not set(train.paths) & set(test.paths)


def test_spec_properties():
    metrics = {k: v.metric for k, v in TRANSFER_SETS.items()}
    assert metrics == {"stl10": "top1", "food101": "top1", "sun397": "top1", "cars": "top1", "dtd": "top1",
                       "eurosat": "top1", "aircraft": "mean_per_class", "pets": "mean_per_class",
                       "caltech101": "mean_per_class", "flowers102": "mean_per_class", "voc2007": "map11"}
    assert {k for k, v in TRANSFER_SETS.items() if v.multilabel} == {"voc2007"}
    assert {k for k, v in TRANSFER_SETS.items() if v.official_val} == {"aircraft", "dtd", "flowers102", "voc2007"}
    digits = parse_data_spec("digits")
    assert (digits.metric, digits.multilabel, digits.official_val) == ("top1", False, False)
    assert digits.resize_ratio == pytest.approx(256 / 224) and digits.native_size == 32


def test_transfer_spec_properties(layouts):
    for name, path in layouts.items():
        spec = parse_data_spec(f"{name}:{path}")
        assert spec.resize_ratio == 1.0 and spec.native_size is None and spec.transfer
        assert spec.metric == TRANSFER_SETS[name].metric and str(spec) == f"{name}:{path}"


def test_voc2007_multi_hot_ignores_difficult(layouts):
    spec = parse_data_spec(f"voc2007:{layouts['voc2007']}")
    train, test = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert spec.multilabel and train.multilabel and test.multilabel and train.classes == list(VOC_CLASSES)
    expected = {**voc_expected("train"), **voc_expected("val")}
    assert len(train) == len(expected) == EXPECTED["voc2007"]["train"]
    for ds, exp in ((train, expected), (test, voc_expected("test"))):
        for path, y in zip(ds.paths, ds.targets):
            assert y.dtype == torch.uint8 and y.shape == (20,)
            assert {VOC_CLASSES[i] for i in torch.nonzero(y).flatten().tolist()} == exp[Path(path).stem]
    car = VOC_CLASSES.index("car")
    row = [Path(p).stem for p in train.paths].index("000003")  # a difficult car only
    assert train.targets[row][car] == 0 and train.targets[row][VOC_CLASSES.index("bus")] == 1
    train.transform = lambda img: torch.zeros(3, 4, 4)
    x, y = next(iter(DataLoader(train, batch_size=4)))
    assert x.shape == (4, 3, 4, 4) and y.shape == (4, 20) and y.dtype == torch.uint8
    assert train.subset([0, 1]).multilabel


@pytest.mark.parametrize("name", ["aircraft", "dtd", "flowers102", "voc2007"])
def test_holdout_is_the_official_val_split(layouts, name):
    spec = parse_data_spec(f"{name}:{layouts[name]}")
    train = build_dataset(spec, "train")
    fit, val = holdout_split(spec, train)
    assert len(val) == EXPECTED[name]["val"] and len(fit) == len(train) - len(val)
    assert sorted(fit + val) == list(range(len(train)))
    assert holdout_split(spec, train, seed=5) == (fit, val)  # official: no draw
    if name == "dtd":
        root = layouts[name] / "dtd"
        val_files = {str(root / "images" / ln) for ln in (root / "labels" / "val1.txt").read_text().split()}
        assert {train.paths[i] for i in val} == val_files


@pytest.mark.parametrize("name", ["food101", "caltech101", "digits", "cifar10"])
def test_holdout_seeded_20_percent(layouts, tmp_path, name):
    if name == "digits":
        spec = parse_data_spec("digits")
    elif name == "cifar10":
        spec = parse_data_spec(f"cifar10:{write_cifar10(tmp_path)}")
    else:
        spec = parse_data_spec(f"{name}:{layouts[name]}")
    train = build_dataset(spec, "train")
    fit, val = holdout_split(spec, train)
    n = len(train)
    assert len(val) == int(np.floor(0.2 * n)) and sorted(fit + val) == list(range(n))
    assert holdout_split(spec, train) == (fit, val)  # stable
    assert holdout_split(spec, build_dataset(spec, "train"), seed=0) == (fit, val)
    assert holdout_split(spec, train, seed=1)[1] != val
    # ssl-transfer's draw: numpy's legacy generator shuffles range(n), the first 20% are held out
    idx = list(range(n))
    np.random.seed(0)
    np.random.shuffle(idx)
    assert val == sorted(idx[:int(np.floor(0.2 * n))])


def test_caltech_draw_is_seeded_without_replacement(layouts, tmp_path):
    spec = parse_data_spec(f"caltech101:{layouts['caltech101']}")
    train, test = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert len(train.classes) == 3 and "BACKGROUND_Google" in train.classes  # kept, as Kornblith and ssl-transfer
    assert len(set(train.paths)) == len(train.paths) == 3 * CALTECH_TRAIN_PER_CLASS  # no repeats
    assert collections.Counter(train.targets) == {c: CALTECH_TRAIN_PER_CLASS for c in range(3)}
    assert len(test) == 3 * 3 and not set(train.paths) & set(test.paths)  # the rest of each class, no cap
    assert build_dataset(spec, "train").paths == train.paths  # the same draw each time
    # a different draw than the first 30 files: the pick is random, not the file order
    firsts = {str(Path(p).parent / f"image_{i + 1:04d}.jpg") for p in train.paths for i in range(30)}
    assert set(train.paths) != firsts
    # the same files in another folder are split the same way (the seed, not the path, decides)
    other = write_layout("caltech101", tmp_path / "copy")
    again = build_dataset(parse_data_spec(f"caltech101:{other}"), "train")
    assert [Path(p).relative_to(other) for p in again.paths] == \
        [Path(p).relative_to(layouts["caltech101"]) for p in train.paths]


def test_eurosat_split_is_stratified_and_seeded(layouts):
    spec = parse_data_spec(f"eurosat:{layouts['eurosat']}")
    train, test = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert collections.Counter(test.targets) == {0: 2, 1: 2, 2: 2}
    assert build_dataset(spec, "val").paths == test.paths


def test_root_given_as_the_inner_folder(layouts):
    """The set's own folder (food-101/, dtd/, VOCdevkit/VOC2007) works as PATH too."""
    for name, inner in (("food101", "food-101"), ("dtd", "dtd"), ("voc2007", "VOCdevkit/VOC2007"),
                        ("aircraft", "fgvc-aircraft-2013b"), ("caltech101", "caltech101"), ("eurosat", "eurosat/2750")):
        spec = parse_data_spec(f"{name}:{layouts[name] / inner}")
        assert len(build_dataset(spec, "train")) == EXPECTED[name]["train"]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line(layouts, tmp_path):
    with pytest.raises(UserError) as e:
        parse_data_spec(f"dtd:{tmp_path / 'nowhere'}")
    assert "does not exist" in _one_line(e) and "dtd/labels/{train,val,test}1.txt" in str(e.value)

    with pytest.raises(UserError) as e:  # an empty folder
        build_dataset(parse_data_spec(f"food101:{tmp_path}"), "train")
    assert "missing" in _one_line(e) and "food-101/meta/{train,test}.json" in str(e.value)

    with pytest.raises(UserError) as e:
        parse_data_spec(f"dtd:{layouts['dtd']}", class_list=__file__)
    assert "class list" in _one_line(e)


@pytest.mark.parametrize("name, missing", [
    ("dtd", "dtd/labels/test1.txt"), ("aircraft", "fgvc-aircraft-2013b/data/images_variant_val.txt"),
    ("sun397", "Partitions/Testing_01.txt"), ("pets", "oxford-iiit-pet/annotations/test.txt"),
    ("flowers102", "flowers-102/setid.mat"), ("voc2007", "VOCdevkit/VOC2007/ImageSets/Main/val.txt"),
    ("cars", "stanford_cars/cars_test_annos_withlabels.mat"), ("stl10", "stl10_binary/test_y.bin"),
    ("food101", "food-101/meta/test.json")])
def test_missing_split_file(tmp_path, name, missing):
    root = write_layout(name, tmp_path / name)
    (root / missing).unlink()
    spec = parse_data_spec(f"{name}:{root}")
    with pytest.raises(UserError) as e:
        build_dataset(spec, "train")  # the pool is checked against the test split too
    msg = _one_line(e)
    assert Path(missing).name in msg and "expected" in msg and msg.startswith(f"{name}:")


def test_class_count_differs_between_splits(tmp_path):
    root = write_layout("dtd", tmp_path / "dtd")
    test = root / "dtd" / "labels" / "test1.txt"
    test.write_text("\n".join(ln for ln in test.read_text().split() if not ln.startswith("bubbly/")) + "\n")
    with pytest.raises(UserError) as e:
        build_dataset(parse_data_spec(f"dtd:{root}"), "val")
    msg = _one_line(e)
    assert "3 classes" in msg and "2" in msg and "bubbly" in msg

    root = write_layout("food101", tmp_path / "food")
    meta = root / "food-101" / "meta" / "test.json"
    import json

    m = json.loads(meta.read_text())
    del m["beignets"]
    meta.write_text(json.dumps(m))
    with pytest.raises(UserError) as e:
        build_dataset(parse_data_spec(f"food101:{root}"), "train")
    assert "beignets" in _one_line(e)


def test_caltech_class_too_small(tmp_path):
    root = write_layout("caltech101", tmp_path / "c")
    for p in sorted((root / "caltech101" / "101_ObjectCategories" / "Faces").iterdir())[:5]:
        p.unlink()
    with pytest.raises(UserError) as e:
        build_dataset(parse_data_spec(f"caltech101:{root}"), "train")
    assert "Faces has 28 images" in _one_line(e)


def test_unreadable_image(tmp_path):
    root = write_layout("pets", tmp_path / "pets")
    spec = parse_data_spec(f"pets:{root}")
    bad = Path(build_dataset(spec, "train").paths[0])
    bad.write_bytes(b"not a jpeg")
    ds = build_dataset(spec, "train")
    with pytest.raises(UserError) as e:
        ds[0]
    assert str(bad) in _one_line(e)
    kept = build_dataset(spec, "train", skip_unreadable=True)
    assert len(kept) == len(ds) - 1 and kept.skipped == [str(bad)]
    r = CliRunner().invoke(cli, ["data", "check", f"pets:{root}", "--decode"])
    assert r.exit_code == 1 and f"unreadable images: 1 ({bad})" in r.output and "train pool: 11" in r.output


def test_fingerprint_follows_the_files(tmp_path):
    from mokd_eval.features import data_fingerprint

    for name in ("stl10", "dtd"):
        root = write_layout(name, tmp_path / name)
        spec = parse_data_spec(f"{name}:{root}")
        ds = build_dataset(spec, "val")
        before = data_fingerprint(spec, ds)
        assert before is not None
        target = root / "stl10_binary" / "test_X.bin" if name == "stl10" else Path(ds.paths[0])
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(1, 1))
        assert data_fingerprint(spec, build_dataset(spec, "val")) != before


def test_data_check_command(layouts, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["data", "check", f"dtd:{layouts['dtd']}"])
    assert r.exit_code == 0, r.output
    assert "DTD" in r.output and "metric: top1" in r.output and "classes: 3 (banded, blotchy, bubbly)" in r.output
    assert "train pool: 15" in r.output and "fit: 9" in r.output and "val: 6 (official)" in r.output
    assert "test: 6" in r.output

    r = runner.invoke(cli, ["data", "check", f"caltech101:{layouts['caltech101']}"])
    assert r.exit_code == 0, r.output
    assert "mean_per_class" in r.output and "train pool: 90" in r.output and "val: 18 (seeded 20%" in r.output

    r = runner.invoke(cli, ["data", "check", f"voc2007:{layouts['voc2007']}"])
    assert r.exit_code == 0 and "map11" in r.output and "multi-label" in r.output

    r = runner.invoke(cli, ["data", "check", f"sun397:{layouts['sun397']}", "--seed", "3"])
    assert r.exit_code == 0 and "val: 2 (seeded 20% of the pool, seed 3)" in r.output  # floor(0.2 * 12)

    r = runner.invoke(cli, ["data", "check", "digits"])
    assert r.exit_code == 0 and "train pool: 1437" in r.output and "test: 360" in r.output

    r = runner.invoke(cli, ["data", "check", f"pets:{tmp_path}"])
    assert r.exit_code != 0 and "oxford-iiit-pet" in r.output and len(r.output.strip().splitlines()) == 1
