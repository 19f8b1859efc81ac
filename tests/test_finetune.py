"""Fine-tuning: an epoch on tiny data moves the backbone; split files select exactly the listed images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mokd.data import DataSpec, build_dataset
from mokd.errors import UserError
from mokd.models.backbones import create_backbone
from mokd_eval.finetune import (FinetuneSettings, finetune, infer_percent, percent_subset, read_split_file,
                                split_indices)
from mokd_eval.features import eval_transform
from mokd_eval.supervised import train_transform

from tests.test_linear import colour_folder, colour_set, make_mokd_checkpoint, read_records, run_cli


def make_image_folder(root, classes=("n01", "n02", "n03"), per_class=4, size=16) -> dict[str, list[str]]:
    """ROOT/{train,val}/<class>/<class>_<i>.JPEG, solid colours; returns the train file names by class."""
    rng = np.random.default_rng(0)
    names = {}
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.JPEG")
                if split == "train":
                    names.setdefault(c, []).append(f"{c}_{i}.JPEG")
    return names


def test_finetune_epoch_changes_backbone():
    backbone = create_backbone("test_resnet", {}, small_stem=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items() if v.is_floating_point()}
    train = colour_set(4, 0, train_transform(16))  # 16 px keeps the stride-1 ResNet cheap
    val = colour_set(2, 1, eval_transform(16, native=True))
    s = FinetuneSettings(epochs=1, batch_size=8, lr=0.05, warmup_epochs=0, image_size=16)
    m = finetune(backbone, train, val, 4, settings=s, device=torch.device("cpu"), precision="bf16", seed=0,
                 log=lambda _: None)
    assert 0.0 <= m["top1"] <= 100.0 and m["best_epoch"] == 1
    after = backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # the stem and the last block moved (timm zero-inits each block's last BN, so a block's inner conv
    # only gets a gradient once that BN weight has moved: not every tensor changes in two steps)
    assert {"conv1.0.weight", "layer4.0.conv2.weight", "layer4.0.bn2.weight"} <= set(changed)
    assert len(changed) >= 0.8 * len(before)


def test_split_file_selects_exactly_listed_images(tmp_path):
    names = make_image_folder(tmp_path)
    listed = [names["n01"][1], names["n03"][0], names["n03"][3]]
    split = tmp_path / "1percent.txt"
    split.write_text("\n".join([listed[0], "", f"n03/{listed[1]}", listed[2], "# comment"]) + "\n")
    train = build_dataset(DataSpec("folder", tmp_path), "train")
    idx = split_indices(train.paths, read_split_file(split))
    sub = train.subset(idx)
    assert sorted(p.rsplit("/", 1)[-1] for p in sub.paths) == sorted(listed)
    assert [train.classes[t] for t in sub.targets] == ["n01", "n03", "n03"]
    assert infer_percent(split) == 1 and infer_percent("10percent.txt") == 10 and infer_percent("x.txt") is None


def test_split_file_unknown_names_error(tmp_path):
    names = make_image_folder(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text(f"{names['n01'][0]}\nn09999999_1.JPEG\nmissing_2.JPEG\n")
    train = build_dataset(DataSpec("folder", tmp_path), "train")
    with pytest.raises(UserError, match=r"2 of the 3 names.*n09999999_1\.JPEG, missing_2\.JPEG"):
        split_indices(train.paths, read_split_file(split))
    with pytest.raises(UserError, match="needs ImageFolder"):
        split_indices(None, ["a.JPEG"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="lists no images"):
        read_split_file(empty)


def test_percent_subset_per_class_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 3
    a, b = percent_subset(targets, 10, seed=1), percent_subset(targets, 10, seed=1)
    assert a == b and a != percent_subset(targets, 10, seed=2)
    assert np.bincount([targets[i] for i in a]).tolist() == [5, 3, 1]


# ----------------------------------------------------------------------------------------------- CLI

def write_cifar10(root, per_class_train: int = 1, per_class_test: int = 1):
    """A tiny CIFAR-10 python archive (cifar-10-batches-py) of noisy solid colours, 4 used classes of 10."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 230, 40)]

    def batch(n_per_class):
        data, labels = [], []
        for c, rgb in enumerate(colours):
            for _ in range(n_per_class):
                img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
                data.append(img.transpose(2, 0, 1).reshape(-1))  # CIFAR rows: R plane, G plane, B plane
                labels.append(c)
        return {"data": np.stack(data), "labels": labels}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_class_train)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(per_class_test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def test_cli_semisup_split_file(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    data = colour_folder(tmp_path / "data")
    names = sorted(p.name for p in (data / "train").rglob("*.png"))[::4]
    split = tmp_path / "10percent.txt"
    split.write_text("\n".join(names) + "\n")
    out = tmp_path / "res"
    res = run_cli(["eval", "semisup", str(ckpt), "--data", str(data), "--split-file", str(split), "--model", "net2",
                   "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--out", str(out),
                   "--device", "cpu", "--num-workers", "0"])
    (r,) = read_records(out)
    assert r["task"] == "semisup" and r["data"]["train_size"] == len(names) == 8
    assert r["data"]["percent"] == 10 and r["settings"]["epochs"] == 1 and r["metrics"]["headline"] == "top1"
    assert "net2-teacher" in res.output


def test_cli_semisup_defaults_on_digits(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "res"
    run_cli(["eval", "semisup", str(ckpt), "--model", "net2", "--percent", "1", "--batch-size", "16",
             "--warmup-epochs", "0", "--epochs", "1", "--out", str(out), "--device", "cpu"])
    (r,) = read_records(out)
    assert 10 <= r["data"]["train_size"] <= 20 and r["data"]["train_size_full"] == 1437  # 1% of each digit
    assert r["data"]["percent"] == 1 and r["data"]["split_file"] is None
    assert r["settings"]["lr"] == 0.01 and r["settings"]["image_size"] == 32 and r["settings"]["batch_size"] == 16


def test_cli_semisup_bad_split_file(tmp_path):
    from click.testing import CliRunner

    from mokd.cli import cli

    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    data = colour_folder(tmp_path / "data", n_train=2, n_val=1)
    split = tmp_path / "subset.txt"
    split.write_text("n01440764_10026.JPEG\n")
    res = CliRunner().invoke(cli, ["eval", "semisup", str(ckpt), "--data", str(data), "--split-file", str(split)])
    assert res.exit_code == 1 and "n01440764_10026.JPEG" in res.output and "Traceback" not in res.output
    split.write_text(sorted(p.name for p in (data / "train").rglob("*.png"))[0] + "\n")
    res = CliRunner().invoke(cli, ["eval", "semisup", str(ckpt), "--data", str(data), "--split-file", str(split)])
    assert res.exit_code == 1 and "--percent 1 or 10" in res.output


def test_cli_cifar_both_models(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "ckpt.pth")
    data = write_cifar10(tmp_path / "cifar")
    out = tmp_path / "res"
    res = run_cli(["eval", "cifar", str(ckpt), "--data", f"cifar10:{data}", "--epochs", "1", "--warmup-epochs", "0",
                   "--batch-size", "10", "--image-size", "16", "--out", str(out), "--device", "cpu",
                   "--num-workers", "0"])
    recs = read_records(out)
    assert [r["checkpoint"]["label"] for r in recs] == ["net1-teacher", "net2-teacher"]
    for r in recs:
        assert r["task"] == "cifar" and r["data"]["num_classes"] == 10
        assert r["data"]["train_size"] == 20 and r["data"]["val_size"] == 4
        assert r["settings"]["image_size"] == 16 and r["settings"]["warmup_epochs"] == 0
        assert 0.0 <= r["metrics"]["top1"] <= 100.0 and r["metrics"]["top5"] >= r["metrics"]["top1"]
    assert "best epoch" in res.output
