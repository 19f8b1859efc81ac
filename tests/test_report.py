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
    # k-NN cells: top-1 at k=20 (value - 1), not the best k (k=10 here), which is tuned on the evaluation split
    assert cells[3:] == ["61.80", "68.90", "66.10", "69.80", "72.10", "73.80", "74.10", "74.40"]
    assert "k-NN Independent Net1" in md and "Linear MOKD Net2" in md
    assert "10.00 / " not in md and "67.10 / 99.00" in md  # per-k k-NN table
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert len(rows) == 8 and {r["task"] for r in rows} == {"knn", "linear"}
    knn_net1 = next(r for r in rows if r["task"] == "knn" and r["model"] == "net1 (teacher)" and r["mode"] == "mokd")
    assert float(knn_net1["value"]) == 66.1 and knn_net1["metric"] == "top1 k=20"
    assert float(knn_net1["metrics.top1.20"]) == 66.1 and "67.10 (k=10)" in md
    assert "best top-1 (k tuned on the evaluation split)" in md


def _bench_knn_record(out, label, top1):
    """A k-NN record as `mokd bench` writes it (mokd_eval.knn.knn_evaluate's metrics, a bench label)."""
    best_k = max(top1, key=top1.get)
    metrics = {"top1": top1, "top5": {k: 99.0 for k in top1}, "best_top1": top1[best_k], "best_k": best_k}
    ckpt = {"path": f"/ckpts/{label}.pth", "sha256": label * 8, "format": "dino", "label": label,
            "name": "vit_small_patch16_224"}
    return write_record(out, task="knn", checkpoint=ckpt, data={"spec": "digits"}, settings={"seed": 0},
                        metrics=metrics, wall_time_s=1.0)


def test_report_headlines_the_same_knn_figure_as_the_bench_summary(tmp_path):
    from mokd_bench.render import summary_table
    from mokd_eval.records import scan_records
    from mokd_eval.report import headline

    _bench_knn_record(tmp_path, "A", {10: 91.0, 20: 88.5, 100: 80.0})  # best k is 10, not 20
    _bench_knn_record(tmp_path, "B", {10: 70.0, 20: 72.25, 200: 60.0})
    records = scan_records(tmp_path)[0]
    headers, rows = summary_table(records)
    bench = {row[0]: row[headers.index("k-NN top-1, k=20 (%)")] for row in rows}
    assert bench == {"A": 88.5, "B": 72.25}
    assert {r["checkpoint"]["label"]: headline(r)[1] for r in records} == bench
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Checkpoints: k-NN and linear"):]
    line = next(x for x in section.splitlines() if x.startswith("| A "))
    assert "88.50" in line and "91.00" not in line  # k-NN at k=20
    line = next(x for x in md[md.index("## All results"):].splitlines() if x.startswith("| knn ") and " A " in x)
    assert "top1 k=20" in line and "88.50" in line


def test_report_says_which_k_when_20_was_not_run(tmp_path):
    from mokd_eval.records import scan_records
    from mokd_eval.report import headline

    _bench_knn_record(tmp_path, "C", {10: 91.0, 50: 88.0})
    name, value = headline(scan_records(tmp_path)[0][0])
    assert value == 91.0 and "k=10" in name and "not 20" in name and "tuned on the evaluation split" in name
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "not 20" in (tmp_path / "report.md").read_text()


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
