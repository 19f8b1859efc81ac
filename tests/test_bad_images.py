"""Evaluation on image folders with files that do not decode: a one-line error without --skip-bad-images; with it
the files are left out, counted, listed in the records, and the features cached apart from the full set's."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from mokd.cli import cli
from tests.ckpt_factory import isolated_cache  # noqa: F401
from tests.test_linear import colour_folder, make_mokd_checkpoint


def records(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def test_knn_fails_clearly_without_the_flag_and_leaves_the_file_out_with_it(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "pair.pth")
    data = colour_folder(tmp_path / "data")  # 32 train, 16 val images
    bad = data / "train" / "c1" / "train_9.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:50])  # truncated
    base = ["eval", "knn", str(ckpt), "--model", "net1", "--data", str(data), "--ks", "5", "--device", "cpu",
            "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]

    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "plain")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    (line,) = [ln for ln in res.output.splitlines() if "cannot read image" in ln]
    assert str(bad) in line and "--skip-bad-images" in line and line.startswith("Error: ")

    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "skip"), "--skip-bad-images"])
    assert res.exit_code == 0, res.output
    assert f"left out 1 unreadable image file(s) (--skip-bad-images): {bad}" in res.output
    (record,) = records(tmp_path / "skip")
    assert record["data"]["skipped_images"] == 1 and record["data"]["skipped_files"] == [str(bad)]
    assert record["data"]["train_size"] == 31 and record["data"]["val_size"] == 16

    # the file repaired: the full set is a new cache entry, never the 31 images' features; val is shared
    bad.write_bytes(good)
    shutil.rmtree(tmp_path / "plain", ignore_errors=True)
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert "(net1-teacher, train): extracting 32 images" in res.output
    assert "(net1-teacher, val): from cache" in res.output
    (record,) = records(tmp_path / "plain")
    assert record["data"]["skipped_images"] == 0 and record["data"]["train_size"] == 32


def test_semisup_leaves_out_listed_images_that_do_not_decode(tmp_path):
    ckpt = make_mokd_checkpoint(tmp_path / "pair.pth")
    data = colour_folder(tmp_path / "data")
    listed = sorted((data / "train").rglob("*.png"))[::4]  # 8 images
    listed[0].write_bytes(b"not an image")
    split = tmp_path / "10percent.txt"
    split.write_text("\n".join(p.name for p in listed) + "\n")
    res = CliRunner().invoke(cli, ["eval", "semisup", str(ckpt), "--data", str(data), "--split-file", str(split),
                                   "--model", "net2", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "7",
                                   "--out", str(tmp_path / "res"), "--device", "cpu", "--num-workers", "0",
                                   "--skip-bad-images"])
    assert res.exit_code == 0, res.output
    assert "1 image(s) of the split file did not decode: left out" in res.output
    (record,) = records(tmp_path / "res")
    assert record["data"]["train_size"] == 7 and record["data"]["train_size_full"] == 31
    assert record["data"]["skipped_files"] == [str(listed[0])]
