"""Result records, `mokd report`, and `mokd eval knn` end to end on the embedded digits."""

from __future__ import annotations

import csv
import io
import json

import torch
from click.testing import CliRunner

from mokd.cli import cli
from mokd_eval.records import read_records, write_record
from tests.ckpt_factory import isolated_cache, make_mokd_checkpoint  # noqa: F401


def record(out, task, mode, model, value, pair="resnet50+vit_small_patch16_224", arch="resnet50"):
    ckpt = {"path": f"/runs/{mode}/last.pth", "sha256": f"{mode}{model}", "format": "mokd", "model": model,
            "branch": "teacher", "arch": arch, "label": f"{model}-teacher", "mode": mode, "pair": pair}
    metrics = ({"top1": {10: value, 20: value - 1}, "top5": {10: 99.0, 20: 98.0}, "best_top1": value, "best_k": 10}
               if task == "knn" else {"top1": value, "top5": 95.0})
    return write_record(out, task=task, checkpoint=ckpt, data={"spec": "imagenet"}, settings={"seed": 0},
                        metrics=metrics, wall_time_s=1.5)


def test_write_record_fields(tmp_path):
    p = record(tmp_path, "knn", "mokd", "net1", 67.1)
    r = json.loads(p.read_text())
    assert set(r) >= {"task", "checkpoint", "data", "settings", "metrics", "env", "wall_time_s"}
    assert r["metrics"]["top1"] == {"10": 67.1, "20": 66.1} and r["metrics"]["best_k"] == 10
    assert "torch" in r["env"]["packages"] and r["env"]["device"] and "git_commit" in r["env"]
    assert record(tmp_path, "knn", "mokd", "net1", 67.1) == p  # the same evaluation overwrites its record
    assert record(tmp_path, "knn", "mokd", "net2", 70.8) != p
    assert len(read_records(tmp_path)) == 2


def test_report_renders_table1_grid_and_csv(tmp_path):
    values = {("knn", "independent"): (62.8, 69.9), ("knn", "mokd"): (67.1, 70.8),
              ("linear", "independent"): (72.1, 73.8), ("linear", "mokd"): (74.1, 74.4)}
    for (task, mode), (v1, v2) in values.items():
        record(tmp_path, task, mode, "net1", v1)
        record(tmp_path, task, mode, "net2", v2, arch="vit_small_patch16_224")
    (tmp_path / "notes.json").write_text('{"not": "a record"}')
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    assert md in result.output
    grid_line = next(line for line in md.splitlines() if line.startswith("| resnet50 ") and "vit_small" in line)
    cells = [c.strip() for c in grid_line.strip("|").split("|")]
    assert cells[3:] == ["62.80", "69.90", "67.10", "70.80", "72.10", "73.80", "74.10", "74.40"]
    assert "k-NN Independent Net1" in md and "Linear MOKD Net2" in md
    assert "10.00 / " not in md and "67.10 / 99.00" in md  # per-k k-NN table
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert len(rows) == 8 and {r["task"] for r in rows} == {"knn", "linear"}
    knn_net1 = next(r for r in rows if r["task"] == "knn" and r["model"] == "net1 (teacher)" and r["mode"] == "mokd")
    assert float(knn_net1["value"]) == 67.1 and float(knn_net1["metrics.top1.20"]) == 66.1


def test_report_errors(tmp_path):
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "no result records" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "not a folder" in r.output


def test_knn_end_to_end_on_digits(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth", mode="independent")
    out, dump = tmp_path / "results", tmp_path / "dump"
    args = ["eval", "knn", str(tmp_path / "ours.pth"), "--out", str(out), "--ks", "10,20,2000",
            "--dump-features", str(dump), "--batch-size", "512"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "matched 78/78 backbone tensors" in result.output and "k=2000 is larger" in result.output
    assert "| k " in result.output and "best: top-1" in result.output
    records = read_records(out)
    assert sorted(r["checkpoint"]["label"] for r in records) == ["net1-teacher", "net2-teacher"]
    for r in records:
        assert r["task"] == "knn" and r["checkpoint"]["mode"] == "independent"
        assert r["data"]["train_size"] == 1437 and r["data"]["val_size"] == 360
        assert set(r["metrics"]["top1"]) == {"10", "20", "1437"} and 10.0 < r["metrics"]["best_top1"] <= 100.0
        assert not r["settings"]["features_cached"]
    feats = torch.load(dump / "net1-teacher" / "train_features.pt", weights_only=True)
    labels = torch.load(dump / "net1-teacher" / "test_labels.pt", weights_only=True)
    assert feats.shape == (1437, 64) and labels.shape == (360,)
    again = CliRunner().invoke(cli, args[:3] + ["--out", str(out), "--model", "net2", "--backend", "torch"])
    assert again.exit_code == 0, again.output
    assert "from cache" in again.output
    rep = CliRunner().invoke(cli, ["report", str(out)])
    assert rep.exit_code == 0 and "Table 1" in rep.output


def make_folder(root, train_classes, val_classes):
    from PIL import Image

    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 20, 30)).save(root / split / c / "a.png")


def test_knn_bad_data(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    make_folder(tmp_path / "mixed", ["cat", "dog"], ["cat", "emu"])
    for data, message in ((tmp_path / "empty", "holds no class folders"),
                          (tmp_path / "mixed", "different classes"),
                          (tmp_path / "nowhere", "does not exist")):
        r = CliRunner().invoke(cli, ["eval", "knn", str(tmp_path / "ours.pth"), "--data", str(data)])
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
