"""`mokd bench` as the transfer suite's front door: several data sets in one run (an embedded set and synthetic
copies of the transfer sets' layouts), the many-shot (logreg) and few-shot protocols, tables of checkpoints x data
sets with mean and average rank (ties, missing cells), the long report.csv, resuming, a data set that fails alone,
labels and record names that stay unique and stable across a resume, a version bump that recomputes, and torchrun.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mokd.cli import cli
from tests.ckpt_factory import RESNET, backbone_state, isolated_cache  # noqa: F401
from tests.test_bench import VIT, image_folder, records_of, stamps
from tests.transfer_layouts import write_layout


def bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def _recorded_logreg_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, metric, num_classes, lambdas,
                           device="cpu", log=None):
    """A stand-in of mokd_eval.logreg.logreg_probe's contract (nearest class mean; multi-label: cosine scores and
    average precision), for data the real probe rightly refuses (classes without a positive)."""
    def scores(x, centres):
        return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(centres, dim=1).T

    from sklearn.metrics import average_precision_score

    centres = (train_y.float().T @ train_x) / train_y.float().sum(0).clamp(min=1)[:, None]
    s = scores(test_x, centres)
    aps = [average_precision_score(test_y[:, c].numpy(), s[:, c].numpy()) for c in range(num_classes)
           if test_y[:, c].any()]
    lam = float(lambdas[len(lambdas) // 2])
    return {"headline": metric, metric: 100.0 * float(np.mean(aps)), "lambda": lam, "C": 1.0 / lam,
            "iterations": 0, "grad_norm": 0.0, "converged": True}


def third_party(path: Path, arch: dict, seed: int) -> Path:
    """A plain timm state dict (the loader's `timm` format), as many released checkpoints are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone_state(arch, seed), path)
    return path


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_transfer_suite_bench_end_to_end(tmp_path):
    """Two checkpoints x (digits, DTD's layout, a missing folder) x knn, logreg, fewshot, rank, from the CLI; then
    the same command again recomputes nothing."""
    dtd = write_layout("dtd", tmp_path / "dtd")
    r18 = third_party(tmp_path / "c" / "cnn.pth", RESNET, 1)
    vit = third_party(tmp_path / "c" / "vit.pth", VIT, 2)
    out = tmp_path / "out"
    args = (f"{r18}::test_resnet", f"{vit}::test_vit", "--label", "R", "--label", "V",
            "--data", "digits", "--data", f"dtd:{dtd}", "--data", f"dtd:{tmp_path / 'gone'}", "--protocols", "knn,logreg,fewshot,rank",
            "--set", "logreg.lambdas=[0.01,1.0,100.0]", "--set", "fewshot.ways=3", "--set", "fewshot.shots=[1]",
            "--set", "fewshot.queries=1", "--set", "fewshot.episodes=4", "--image-size", "32", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"))
    first = bench(*args)
    assert first.exit_code == 1, first.output  # the missing data set fails, alone
    gone = [line for line in first.output.splitlines() if "gone" in line and "failed" in line]
    assert len(gone) == 1 and "does not exist" in gone[0]
    recs = records_of(out)
    got = {(r["checkpoint"]["label"], r["bench"]["dataset"], r["task"]) for r in recs}
    assert got == {(m, d, p) for m in "RV" for d in ("digits", "dtd") for p in ("knn", "logreg", "fewshot", "rank")}

    by = {(r["checkpoint"]["label"], r["bench"]["dataset"], r["task"]): r for r in recs}
    lr = by[("R", "dtd", "logreg")]
    assert lr["metrics"]["headline"] == lr["settings"]["metric"] == lr["data"]["metric"]
    assert lr["settings"]["lambdas"] == [0.01, 1.0, 100.0]
    assert (lr["settings"]["fit_size"], lr["settings"]["val_size"], lr["settings"]["test_size"]) == (9, 6, 6)
    assert lr["metrics"]["lambda"] in (0.01, 1.0, 100.0) and "iterations" in lr["metrics"]
    assert lr["provenance"]["deviations"][0].startswith("lambda from 3 value(s)")
    fs = by[("V", "digits", "fewshot")]
    assert fs["settings"]["episodes"] == 4 and 0 <= fs["metrics"]["3way_1shot"]["mean"] <= 100
    assert all(r["provenance"]["mokd_version"] and r["bench"]["code"].startswith("0.") for r in recs)

    md = (out / "report.md").read_text()
    logreg = md.split("## Many-shot logistic regression: each data set's metric")[1].split("##")[0]
    header = next(line for line in logreg.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "digits", "dtd", "mean", "avg rank",
                                                                "data sets"]
    for line in (x for x in logreg.splitlines() if x.startswith("| R ") or x.startswith("| V ")):
        for link in [part.split("](")[1].split(")")[0] for part in line.split("[")[1:]]:
            assert (out / link).is_file()  # every number links to its record
    assert "## Few-shot 3-way 1-shot accuracy (%)" in md and "## RankMe (uncentred, as published)" in md
    assert "(figures/ranks_logreg.png)" in md
    html = (out / "report.html").read_text()
    assert '<a href="records/' in html and html.count("<img") >= 4

    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert list(rows[0]) == ["checkpoint", "dataset", "protocol", "metric", "value", "record"]
    one = [r for r in rows if (r["checkpoint"], r["dataset"], r["protocol"]) == ("V", "dtd", "logreg")]
    assert {r["metric"] for r in one} >= {lr["data"]["metric"], "lambda", "iterations"}
    k20 = next(r for r in rows if (r["checkpoint"], r["dataset"], r["metric"]) == ("R", "digits", "top1.20"))
    assert float(k20["value"]) == pytest.approx(by[("R", "digits", "knn")]["metrics"]["top1"]["20"])

    before = stamps(out)
    again = bench(*args)
    assert again.exit_code == 1 and "0 record(s) written" in again.output and "0 feature set(s) extracted" in again.output
    assert stamps(out) == before


def test_multilabel_voc_plans_out_single_label_protocols_and_scores_map11(tmp_path, monkeypatch):
    """VOC 2007 (multi-hot labels): knn, linear and few-shot are planned out with the reason; logreg gets the
    multi-hot labels of the official split's parts and metric map11. (The synthetic layout's 13 images leave most
    of the 20 classes without a positive, which the real probe rightly refuses to fit: the probe is a stand-in
    here that checks what the bench hands it.)"""
    from mokd_eval import logreg

    seen = {}

    def probe(train_x, train_y, val_x, val_y, test_x, test_y, **kw):
        seen.update(shapes=[tuple(t.shape) for t in (train_y, val_y, test_y)], metric=kw["metric"],
                    classes=kw["num_classes"], dims={train_x.shape[1], val_x.shape[1], test_x.shape[1]})
        return _recorded_logreg_probe(train_x, train_y, val_x, val_y, test_x, test_y, **kw)

    monkeypatch.setattr(logreg, "logreg_probe", probe)
    voc = write_layout("voc2007", tmp_path / "voc")
    ckpt = third_party(tmp_path / "c" / "r.pth", RESNET, 1)
    out = tmp_path / "out"
    r = bench(f"{ckpt}::test_resnet", "--data", f"voc2007:{voc}", "--protocols", "knn,linear,fewshot,logreg",
              "--set", "logreg.lambdas=[1.0]", "--image-size", "32", "--out", str(out))
    assert r.exit_code == 0, r.output
    for p in ("knn", "linear", "fewshot"):
        assert f"not run: {p} on voc2007 ({p} needs one class per image; voc2007 has multi-label images" in r.output
    (rec,) = records_of(out)
    assert seen["shapes"] == [(7, 20), (3, 20), (3, 20)] and seen["metric"] == "map11" and seen["classes"] == 20
    assert len(seen["dims"]) == 1
    assert rec["task"] == "logreg" and rec["settings"]["metric"] == rec["metrics"]["headline"] == "map11"
    assert (rec["settings"]["fit_size"], rec["settings"]["val_size"], rec["settings"]["test_size"]) == (7, 3, 3)
    assert 0 <= rec["metrics"]["map11"] <= 100 and rec["data"]["multilabel"] is True
    assert "## Not run" in (out / "report.md").read_text()
    assert rec["settings"]["features_cached"] is False and "0 record(s) written" in bench(
        f"{ckpt}::test_resnet", "--data", f"voc2007:{voc}", "--protocols", "logreg", "--set", "logreg.lambdas=[1.0]",
        "--image-size", "32", "--out", str(out)).output


def test_bad_data_fails_alone_with_one_line(tmp_path):
    data = image_folder(tmp_path / "data", classes=2, train=3, val=2)
    ckpt = third_party(tmp_path / "c" / "r.pth", RESNET, 1)
    out = tmp_path / "out"
    r = bench(f"{ckpt}::test_resnet", "--data", str(tmp_path / "nowhere"), "--data", str(data), "--data",
              f"dtd:{data}", "--protocols", "rank", "--image-size", "32", "--out", str(out))
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.startswith("data set ")]
    assert len(lines) == 2 and "nowhere does not exist" in lines[0] and lines[1].startswith(f"data set dtd:{data}")
    assert [(x["task"], x["bench"]["dataset"]) for x in records_of(out)] == [("rank", "data")]
    status = json.loads((out / "bench_status.json").read_text())
    assert [f["dataset"] for f in status["failures"]] == [str(tmp_path / "nowhere"), f"dtd:{data}"]
    both = CliRunner().invoke(cli, ["bench", str(_manifest(tmp_path, {"data": "digits", "datasets": ["digits"]}))])
    assert both.exit_code == 1 and "give `data` (one data set) or `datasets` (a list), not both" in both.output
    empty = CliRunner().invoke(cli, ["bench", str(_manifest(tmp_path, {"datasets": []}))])
    assert empty.exit_code == 1 and "`datasets` must be a non-empty list" in empty.output


def _manifest(tmp_path: Path, extra: dict) -> Path:
    import yaml

    ckpt = third_party(tmp_path / "m" / "r.pth", RESNET, 1)
    path = tmp_path / "m" / "bench.yaml"
    path.write_text(yaml.safe_dump({"checkpoints": [{"path": str(ckpt), "arch": "test_resnet"}], **extra}))
    return path


def test_manifest_datasets_list_runs_each(tmp_path):
    data = image_folder(tmp_path / "m" / "folder", classes=2, train=3, val=2)
    other = image_folder(tmp_path / "m" / "other", classes=2, train=2, val=2)
    manifest = _manifest(tmp_path, {"datasets": ["folder", str(other)], "protocols": ["rank"],
                                    "features": {"image_size": 32}})
    r = bench(str(manifest), "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert sorted(x["bench"]["dataset"] for x in records_of(tmp_path / "out")) == ["folder", "other"]
    assert data.is_dir()


# ------------------------------------------------------------------------------------------------ tables


def _rec(label: str, data: str, value: float | None, task: str = "logreg", entry: int = 0) -> dict:
    metrics = {"headline": "top1", "top1": value} if task == "logreg" else {
        "top1": {"20": value}, "top5": {"20": value}, "best_top1": value, "best_k": 20}
    return {"task": task, "checkpoint": {"label": label}, "data": {"name": data}, "metrics": metrics,
            "settings": {}, "bench": {"dataset": data, "entry": entry}, "_file": f"/o/records/{label}_{data}.json"}


def test_cross_table_mean_and_average_rank_with_ties_and_missing_cells():
    from mokd_bench.render import MISSING_NOTE, average_ranks, cross_table, measures

    records = [_rec("A", "d1", 80.0), _rec("B", "d1", 70.0), _rec("C", "d1", 70.0), _rec("D", "d1", 60.0),
               _rec("A", "d2", 50.0), _rec("B", "d2", 90.0), _rec("C", "d2", 50.0),  # D has no d2 number
               _rec("A", "d3", 10.0), _rec("B", "d3", 10.0), _rec("C", "d3", 10.0), _rec("D", "d3", 10.0)]
    assert average_ranks({"d": {"A": 3.0, "B": 1.0, "C": 3.0}}) == {"d": {"A": 1.5, "B": 3.0, "C": 1.5}}
    assert average_ranks({"d": {"A": 3.0, "B": 1.0}}, better="lower") == {"d": {"A": 2.0, "B": 1.0}}
    (m,) = measures(records)
    (headers, rows), ranks = cross_table(records, m)
    assert headers == ["model", "d1", "d2", "d3", "mean", "avg rank", "data sets"]
    assert ranks == {"d1": {"A": 1.0, "B": 2.5, "C": 2.5, "D": 4.0}, "d2": {"A": 2.5, "B": 1.0, "C": 2.5},
                     "d3": {"A": 2.5, "B": 2.5, "C": 2.5, "D": 2.5}}
    table = {row[0]: row for row in rows}
    assert table["A"][4] == pytest.approx(140 / 3) and table["A"][5] == pytest.approx(6 / 3)
    assert table["B"][5] == pytest.approx(6 / 3) and table["C"][5] == pytest.approx(7.5 / 3)
    assert table["D"][2].value is None and table["D"][4] == pytest.approx(35.0)  # over the data sets it has
    assert table["D"][5] == pytest.approx(6.5 / 2) and table["D"][6] == "2/3"
    assert [row[0] for row in rows] == ["A", "B", "C", "D"]  # by average rank
    assert str(table["A"][1]) == "[80.00](records/A_d1.json)" and "missing cell" in MISSING_NOTE
    # k-NN ranks k = 20 only; MAD is shown, not ranked
    knn = [_rec("A", "d1", 70.0, "knn"), _rec("B", "d1", 75.0, "knn")]
    (km,) = measures(knn)
    (_, krows), kranks = cross_table(knn, km)
    assert kranks == {"d1": {"A": 2.0, "B": 1.0}} and krows[0][0] == "B"
    mad = [{**_rec("A", "d1", 0.0), "task": "mad", "metrics": {"headline": "mean", "mean": 12.0}}]
    (mm,) = measures(mad)
    assert mm.better is None and cross_table(mad, mm)[0][0] == ["model", "d1", "mean"]


def test_rank_table_shows_both_rankmes_and_the_collapse_flag():
    from mokd_bench.render import measures, rank_table

    rec = {"task": "rank", "checkpoint": {"label": "A"}, "data": {"name": "d"}, "settings": {},
           "metrics": {"rankme": 1.0, "rankme_centered": 40.0, "alpha_req": 2.0, "collapsed": True, "n": 9, "dim": 8}}
    headers, rows = rank_table([rec])
    assert headers[:6] == ["model", "data", "RankMe (uncentred)", "RankMe (centred)", "alpha-ReQ", "collapsed"]
    assert rows[0][2:6] == [1.0, 40.0, 2.0, "yes"]
    assert [m.key for m in measures([rec])] == ["rankme", "rankme-centred"]


# ------------------------------------------------------------------------------------------------ issue 32: 6, 7


def test_labels_and_record_names_unique_and_stable_across_a_resume(tmp_path):
    """Two files named checkpoint.pth in two folders, and one file read with two keys: four models, four labels,
    four records; after a resume that loads only one entry, its label (and record) is what it was."""
    data = image_folder(tmp_path / "data", classes=2, train=3, val=2)
    a = third_party(tmp_path / "a" / "checkpoint.pth", RESNET, 1)
    b = third_party(tmp_path / "b" / "checkpoint.pth", RESNET, 2)
    two = tmp_path / "two.pth"
    torch.save({"online": backbone_state(RESNET, 3), "target": backbone_state(RESNET, 4)}, two)
    import yaml

    manifest = tmp_path / "bench.yaml"
    manifest.write_text(yaml.safe_dump({
        "data": str(data), "protocols": ["rank"], "features": {"image_size": 32},
        "checkpoints": [{"path": str(a), "arch": "test_resnet"}, {"path": str(b), "arch": "test_resnet"},
                        {"path": str(two), "arch": "test_resnet", "key": "online"},
                        {"path": str(two), "arch": "test_resnet", "key": "target"}]}))
    out = tmp_path / "out"
    first = bench(str(manifest), "--out", str(out))
    assert first.exit_code == 0, first.output
    recs = {r["bench"]["entry"]: r for r in records_of(out)}
    labels = {i: r["checkpoint"]["label"] for i, r in recs.items()}
    assert labels == {0: "checkpoint #1", 1: "checkpoint #2", 2: "two #3", 3: "two #4"}
    assert len(stamps(out)) == 4  # no record overwrote another
    assert recs[2]["metrics"]["rankme"] != recs[3]["metrics"]["rankme"]
    victim = Path(recs[1]["_file"] if "_file" in recs[1] else next(
        p for p in (out / "records").glob("*.json") if json.loads(p.read_text())["bench"]["entry"] == 1))
    victim.unlink()
    second = bench(str(manifest), "--out", str(out))
    assert "1 record(s) written, 3 job(s) already done" in second.output, second.output
    again = {r["bench"]["entry"]: r["checkpoint"]["label"] for r in records_of(out)}
    assert again == labels and victim.is_file() and len(stamps(out)) == 4
    md = (out / "report.md").read_text().split("## RankMe (uncentred, as published)")[1].split("##")[0]
    assert sum(line.startswith("| checkpoint #") or line.startswith("| two #") for line in md.splitlines()) == 4


def test_a_protocol_version_bump_recomputes_its_jobs(tmp_path, monkeypatch):
    from mokd_bench import protocols

    data = image_folder(tmp_path / "data", classes=2, train=3, val=2)
    ckpt = third_party(tmp_path / "c" / "r.pth", RESNET, 1)
    args = (f"{ckpt}::test_resnet", "--data", str(data), "--protocols", "rank", "--image-size", "32",
            "--out", str(tmp_path / "out"))
    assert bench(*args).exit_code == 0
    assert "0 record(s) written, 1 job(s) already done" in bench(*args).output
    old = records_of(tmp_path / "out")[0]["bench"]
    monkeypatch.setitem(protocols.PROTOCOLS, "rank", dataclasses.replace(protocols.PROTOCOLS["rank"],
                                                                        version=protocols.PROTOCOLS["rank"].version + 1))
    bumped = bench(*args)
    assert "1 record(s) written, 0 job(s) already done" in bumped.output, bumped.output
    new = records_of(tmp_path / "out")[0]["bench"]
    assert new["job"] != old["job"] and new["code"] != old["code"]
    import mokd

    monkeypatch.setattr(mokd, "__version__", "9.9.9")
    assert "1 record(s) written, 0 job(s) already done" in bench(*args).output


# ------------------------------------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m mokd bench`: each rank extracts its shard, rank 0 computes and writes; the
    records' numbers equal a one-process bench's."""
    data = image_folder(tmp_path / "data", classes=3, train=5, val=3)
    other = image_folder(tmp_path / "other", classes=2, train=4, val=3)
    r = third_party(tmp_path / "c" / "r.pth", RESNET, 1)
    v = third_party(tmp_path / "c" / "v.pth", VIT, 2)
    common = [f"{r}::test_resnet", f"{v}::test_vit", "--data", str(data), "--data", str(other),
              "--protocols", "knn,linear,rank,cka", "--set", "linear.epochs=2", "--set", "linear.warmup_epochs=0",
              "--set", "linear.lr_grid=[0.1]", "--image-size", "32", "--device", "cpu", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MOKD_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    one = subprocess.run([sys.executable, "-m", "mokd", "bench", *common, "--out", str(tmp_path / "one"),
                          "--cache-dir", str(tmp_path / "cache1")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mokd", "bench", *common, "--out", str(tmp_path / "two"), "--cache-dir",
                          str(tmp_path / "cache2")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = records_of(tmp_path / "one"), records_of(tmp_path / "two")
    assert len(a) == len(b) == 2 * 2 * 4
    key = lambda rec: (rec["checkpoint"]["label"], rec["bench"]["dataset"], rec["task"])  # noqa: E731
    b = {key(x): x for x in b}
    for x in a:
        y = b[key(x)]
        assert y["provenance"]["world_size"] == 2 and x["provenance"]["world_size"] == 1
        assert json.dumps(x["metrics"], sort_keys=True) == json.dumps(y["metrics"], sort_keys=True) or \
            _close(x["metrics"], y["metrics"]), key(x)
    assert (tmp_path / "two" / "report.md").is_file() and two.stdout.count("written:") == 1


def _close(a, b) -> bool:
    """Equal up to float rounding (a sum over rows in another order)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return a == b


def test_fewshot_tables_read_each_shot():
    from mokd_bench.render import fewshot_table, measures, summary_table

    def rec(label, means):
        metrics = {"headline": "5way_5shot", "ways": 5, "shots": [1, 5], "episodes": 600,
                   **{f"5way_{k}shot": {"mean": m, "ci95": 0.5, "episodes": 600} for k, m in means.items()}}
        return {"task": "fewshot", "checkpoint": {"label": label}, "data": {"name": "d"}, "metrics": metrics,
                "settings": {"ways": 5, "episodes": 600}, "bench": {"dataset": "d"}}

    records = [rec("A", {1: 40.0, 5: 60.0}), rec("B", {1: 45.0, 5: 55.0})]
    ms = measures(records)
    assert [m.key for m in ms] == ["fewshot-1", "fewshot-5"] and ms[1].title.startswith("Few-shot 5-way 5-shot")
    assert [ms[1].value(r) for r in records] == [60.0, 55.0]
    headers, rows = fewshot_table(records)
    assert headers[2:4] == ["5-way 1-shot (%, ± 95%)", "5-way 5-shot (%, ± 95%)"] and rows[0][2] == "40.00 ± 0.50"
    headers, rows = summary_table(records)
    assert rows[0][-1] == 60.0  # the record's headline, 5-shot


def test_transfer_deviations_name_what_differs_from_ssl_transfer():
    from mokd_eval.records import deviations

    grid = list(np.logspace(-6, 5, 45))
    assert deviations("logreg", {"lambdas": grid, "image_size": 224, "precision": "fp32"}) == []
    got = deviations("logreg", {"lambdas": [0.01, 1.0, 100.0], "image_size": 32, "precision": "bf16"})
    assert got == ["lambda from 3 value(s) in [0.01, 100] (published: 45 log-spaced in [1e-06, 100000])",
                   "images at 32 px (published: 224)", "features in bf16 (published: fp32)"]
    published = {"ways": 5, "shots": [1, 5, 20], "queries": 15, "episodes": 600, "image_size": 224}
    assert deviations("fewshot", published) == []
    assert deviations("fewshot", {**published, "episodes": 4, "shots": [1]}) == [
        "episodes 4 (published: 600)", "shots [1] (published: [1, 5, 20])"]
