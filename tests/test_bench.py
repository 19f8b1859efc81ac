"""`mokd bench`: a manifest of third-party files (DINO, MoCo v3, solo-learn) end to end on a tiny ImageFolder,
a broken entry failing alone, resuming without recomputing, unlabelled data, manifest errors, and the
provenance and deviations every record carries."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.cli import cli
from mokd_eval.records import deviations, write_record
from tests.ckpt_factory import RESNET, backbone_state, isolated_cache, make_mokd_checkpoint  # noqa: F401

VIT = {"name": "test_vit", "kwargs": {}, "small_stem": False}  # third-party files name no kwargs: timm's defaults
PROVENANCE_KEYS = ("protocol", "params", "seed", "precision", "device_type", "world_size", "checkpoint_sha256",
                   "checkpoint_format", "load_report", "mokd_version", "git_commit", "torch", "timm", "faiss",
                   "wall_time_s", "deviations")
FAST = {"linear": {"epochs": 2, "warmup_epochs": 0, "lr_grid": [0.01, 0.1]}, "mad": {"max_images": 6}}


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 4, labelled: bool = True) -> Path:
    """32 px PNGs whose colour depends on the class; ROOT/{train,val}/<class>/ or, unlabelled, ROOT/*.png."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for split, n in (("train", train), ("val", val)):
            folder = root / split / f"c{c}" if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 60, (32, 32, 3)) + np.array([80 * c, 40, 200 - 80 * c])
                Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{c}_{i}.png")
    return root


def third_party_files(folder: Path) -> dict[str, Path]:
    """A DINO training checkpoint (teacher/student, args), a MoCo v3 file (base/momentum encoders, arch) and a
    solo-learn file (backbone., projector), as their code saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"dino": folder / "dino_vits16_full.pth", "mocov3": folder / "vit-s-300ep.pth.tar",
             "solo": folder / "byol-solo.ckpt"}
    torch.save({"teacher": {**prefixed(backbone_state(VIT, 1), "backbone."), "head.last_layer.weight_g": torch.ones(3)},
                "student": prefixed(backbone_state(VIT, 2), "module.backbone."),
                "args": argparse.Namespace(arch="test_vit", patch_size=16), "epoch": 10}, files["dino"])
    torch.save({"epoch": 300, "arch": "test_vit", "optimizer": {},
                "state_dict": {**prefixed(backbone_state(VIT, 3), "module.base_encoder."),
                               **prefixed(backbone_state(VIT, 4), "module.momentum_encoder."),
                               "module.predictor.0.weight": torch.ones(2)}}, files["mocov3"])
    torch.save({"state_dict": {**prefixed(backbone_state(RESNET, 5), "backbone."),
                               "projector.0.weight": torch.ones(2, 2)}, "epoch": 400}, files["solo"])
    return files


def write_manifest(path: Path, data: Path, entries: list[dict], **extra) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"data": str(data), "features": {"image_size": 32}, "settings": FAST,
                                    "checkpoints": entries, **extra}))
    return path


def bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def records_of(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def stamps(out: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "records").glob("*.json")}


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory):
    """One bench of three third-party files and a broken one over all protocols, shared by the tests below."""
    root = tmp_path_factory.mktemp("bench")
    data = image_folder(root / "data")
    files = third_party_files(root / "ckpts")
    (root / "ckpts" / "broken.pth").write_bytes(b"not a checkpoint")
    manifest = write_manifest(root / "ckpts" / "bench.yaml", data, [
        {"path": "dino_vits16_full.pth", "label": "DINO ViT"},
        {"path": "vit-s-300ep.pth.tar", "label": "MoCo v3 ViT"},
        {"path": str(files["solo"]), "label": "solo-learn R", "arch": "test_resnet"},
        {"path": "broken.pth", "label": "broken"},
    ], protocols=["knn", "linear", "rank", "mad", "cka"])
    out = root / "out"
    # the cache named on the command line: each test's own $MOKD_CACHE (isolated_cache) would start empty
    cache = ("--cache-dir", str(root / "cache"))
    result = bench(str(manifest), "--out", str(out), *cache)
    yield {"root": root, "out": out, "result": result, "manifest": manifest, "cache": cache}


@pytest.mark.slow
def test_manifest_end_to_end_report_figures_provenance(manifest_run):
    out, result = manifest_run["out"], manifest_run["result"]
    assert result.exit_code == 1, result.output  # the broken entry fails, the run still finishes
    recs = records_of(out)
    assert {(r["checkpoint"]["label"], r["task"]) for r in recs} == {
        (m, p) for m in ("DINO ViT", "MoCo v3 ViT", "solo-learn R") for p in ("knn", "linear", "rank", "mad", "cka")}
    assert {r["checkpoint"]["label"]: r["checkpoint"]["format"] for r in recs} == {
        "DINO ViT": "dino", "MoCo v3 ViT": "mocov3", "solo-learn R": "solo-learn"}
    for r in recs:
        p = r["provenance"]
        assert set(PROVENANCE_KEYS) <= set(p), r["task"]
        assert p["protocol"] == r["task"] and p["seed"] == 0 and p["device_type"] == "cpu" and p["world_size"] == 1
        assert len(p["checkpoint_sha256"]) == 64 and p["load_report"]["matched"] == p["load_report"]["total"] > 0
        assert torch.__version__.startswith(p["torch"])
        assert p["timm"] and p["mokd_version"] and p["wall_time_s"] > 0 and isinstance(p["deviations"], list)
    knn = next(r for r in recs if r["task"] == "knn")
    assert "centre crop 32 px" in "; ".join(knn["provenance"]["deviations"])
    lin = next(r for r in recs if r["task"] == "linear")
    assert any(d.startswith("fast probe") for d in lin["provenance"]["deviations"])
    assert any(d.startswith("epochs 2") for d in lin["provenance"]["deviations"])
    cka = {r["checkpoint"]["label"]: r["metrics"]["cka"] for r in recs if r["task"] == "cka"}
    assert cka["DINO ViT"]["DINO ViT"] == 1.0 and cka["DINO ViT"]["solo-learn R"] == cka["solo-learn R"]["DINO ViT"]

    md = (out / "report.md").read_text()
    # bytes that are no pickle are "not a checkpoint", not a refused code payload (issue 28, item 5)
    assert "broken" in md.split("## Failures")[1] and "not a checkpoint (unreadable" in md.split("## Failures")[1]
    for label in ("DINO ViT", "MoCo v3 ViT", "solo-learn R"):
        assert md.count(f"| {label} ") >= 5  # summary, per-protocol tables, provenance rows
    html = (out / "report.html").read_text()
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} == {"mad", "cka", "ranks_knn", "ranks_linear", "ranks_rankme", "ranks_rankme-centred"}
    for png in pngs:  # every figure embedded, nothing fetched from outside
        assert base64.b64encode(png.read_bytes()).decode() in html
    assert html.count("<img") == len(pngs) and "http://" not in html and "https://" not in html
    rows = list(csv.DictReader(io.StringIO((out / "records.csv").read_text())))  # report.csv is long form
    assert len(rows) == len(recs)
    for row in rows:
        for col in ("seed", "device", "sha256", "format", "load", "version", "versions", "wall_s", "deviations"):
            assert row[f"provenance.{col}"], (row["model"], row["protocol"], col)
    assert "broken" in result.output and "1 failure(s)" in result.output


@pytest.mark.slow
def test_resumed_bench_recomputes_nothing(manifest_run):
    out, manifest = manifest_run["out"], manifest_run["manifest"]
    before = stamps(out)
    again = bench(str(manifest), "--out", str(out), *manifest_run["cache"])
    assert again.exit_code == 1 and "broken" in again.output
    assert stamps(out) == before  # not one record rewritten
    assert "0 record(s) written, 13 job(s) already done (resumed), 0 feature set(s) extracted" in again.output
    # an interrupted run: one record missing is the one job run again, from cached features
    knn_solo = next(p for p in (out / "records").glob("knn__byol-solo*.json"))
    knn_solo.unlink()
    third = bench(str(manifest), "--out", str(out), *manifest_run["cache"])
    assert "1 record(s) written, 12 job(s) already done (resumed), 0 feature set(s) extracted" in third.output
    after = stamps(out)
    assert {k: v for k, v in after.items() if k != knn_solo.name} == \
        {k: v for k, v in before.items() if k != knn_solo.name}
    assert json.loads(knn_solo.read_text())["metrics"] == json.loads(before[knn_solo.name][1])["metrics"]


@pytest.mark.slow
def test_mokd_report_lists_third_party_files(manifest_run):
    records_dir = manifest_run["out"] / "records"
    result = CliRunner().invoke(cli, ["report", str(records_dir)])
    assert result.exit_code == 0, result.output
    table = result.output.split("## Checkpoints: k-NN and linear (%)")[1].split("##")[0]
    for label, fmt in (("DINO ViT", "dino"), ("MoCo v3 ViT", "mocov3"), ("solo-learn R", "solo-learn")):
        line = next(x for x in table.splitlines() if x.startswith(f"| {label} "))
        assert f"| {fmt} " in line and line.count("| -") == 0  # both k-NN and linear figures present
    assert "## Provenance" in result.output
    refused = CliRunner().invoke(cli, ["report", str(manifest_run["out"])])  # would overwrite the bench's report
    assert refused.exit_code == 1 and "output of `mokd bench`" in refused.output and "records" in refused.output


def test_unlabelled_folder_and_cli_checkpoints(tmp_path):
    """Checkpoints named on the command line (PATH::ARCH, --label); on images without class folders k-NN is
    planned out with its reason and the label-free protocols run."""
    data = image_folder(tmp_path / "unlabelled", classes=2, train=4, val=0, labelled=False)
    files = third_party_files(tmp_path / "ckpts")
    make_mokd_checkpoint(tmp_path / "ckpts" / "pair.pth", net1=RESNET)
    out = tmp_path / "out"
    result = bench(f"{files['solo']}::test_resnet", str(tmp_path / "ckpts" / "pair.pth"), "--label", "solo",
                   "--label", "ours", "--protocols", "knn,rank,cka", "--data", str(data), "--image-size", "32",
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "not run: knn on unlabelled (knn needs class labels and a val split" in result.output
    recs = records_of(out)
    assert sorted((r["checkpoint"]["label"], r["task"]) for r in recs) == sorted(
        (m, t) for m in ("solo", "ours net1-teacher", "ours net2-teacher") for t in ("rank", "cka"))
    rank = next(r for r in recs if r["task"] == "rank" and r["checkpoint"]["label"] == "solo")
    assert rank["data"]["labelled"] is False and rank["data"]["train_size"] == 8 and rank["metrics"]["n"] == 8
    assert rank["metrics"]["rankme"] > 1
    md = (out / "report.md").read_text()
    assert "## Not run" in md and "unlabelled" in md


def test_bad_entry_and_setting_errors(tmp_path):
    data = image_folder(tmp_path / "data", classes=2, train=2, val=1)
    files = third_party_files(tmp_path / "c")
    bad_key = write_manifest(tmp_path / "a.yaml", data, [{"path": str(files["solo"]), "lable": "x"}])
    r = bench(str(bad_key))
    assert r.exit_code == 1 and "unknown key(s) lable" in r.output and "valid keys: path, label" in r.output
    bad_setting = write_manifest(tmp_path / "b.yaml", data, [{"path": str(files["solo"])}],
                                 settings={"knn": {"k": 20}})
    r = bench(str(bad_setting))
    assert r.exit_code == 1 and "settings.knn: unknown key(s) k; valid keys: ks, temperature, backend" in r.output
    r = bench(str(bad_key), "--arch", "resnet50")
    assert r.exit_code == 1 and "with a manifest, set these per checkpoint" in r.output
    r = bench(str(files["solo"]), "--protocols", "knn,speed")
    assert r.exit_code == 1 and "unknown protocol(s) speed" in r.output
    r = bench(str(files["solo"]), "--set", "linear.warmup_epochs=20", "--set", "linear.epochs=5", "--data", str(data))
    assert r.exit_code == 1 and "warmup_epochs 20 is more than epochs 5" in r.output
    r = bench(str(files["solo"]), str(files["dino"]), "--label", "same", "--label", "same", "--data", str(data))
    assert r.exit_code == 1 and "label(s) 'same' given to more than one checkpoint" in r.output
    r = bench(str(files["solo"]), str(files["dino"]), "--label", "only-one", "--data", str(data))
    assert r.exit_code == 1 and "--label was given 1 time(s) for 2 checkpoint(s)" in r.output


def test_missing_file_fails_alone_before_loading(tmp_path):
    data = image_folder(tmp_path / "data", classes=2, train=3, val=2)
    files = third_party_files(tmp_path / "c")
    out = tmp_path / "out"
    r = bench(f"{files['solo']}::test_resnet", str(tmp_path / "gone.pth"), "--protocols", "knn", "--data", str(data),
              "--image-size", "32", "--out", str(out))
    assert r.exit_code == 1 and "gone.pth: no such file" in r.output
    assert [x["task"] for x in records_of(out)] == ["knn"]
    status = json.loads((out / "bench_status.json").read_text())
    assert status["failures"][0]["checkpoint"] == "gone.pth"


def test_deviations_from_the_published_protocols():
    folder = {"spec": "folder:/imagenet", "kind": "folder"}
    published_knn = {"ks": [10, 20, 100, 200], "temperature": 0.07, "image_size": 224, "precision": "fp32"}
    assert deviations("knn", published_knn, folder) == []
    got = deviations("knn", {**published_knn, "ks": [20], "temperature": 0.1, "image_size": 96,
                             "precision": "bf16"}, folder)
    assert len(got) == 4 and got[0].startswith("k in [20]") and "T=0.1" in got[1]
    assert "centre crop 96 px of 110" in got[2] and "bf16" in got[3]
    assert deviations("knn", published_knn, {"spec": "digits", "kind": "digits"})[0].startswith("images at their own")
    paper_linear = {"mode": "full", "epochs": 100, "batch_size": 2048, "lr": 0.008, "warmup_epochs": 10,
                    "momentum": 0.9, "weight_decay": 0.0, "n_last_blocks": 4, "image_size": 224}
    assert deviations("linear", paper_linear, folder, {"arch": "vit_small_patch16_224"}) == []
    assert deviations("linear", {**paper_linear, "lr": 0.08}, folder, {"arch": "resnet50"}) == []
    assert deviations("linear", paper_linear, folder, {"arch": "resnet50"}) == [
        "base lr 0.008 (published: 0.08 for a CNN)"]
    assert deviations("mad", {"image_size": 32}, folder) == []


def test_every_record_carries_provenance(tmp_path):
    """Also the records of `mokd eval` and `mokd analyze`, which write through the same write_record."""
    ckpt = {"path": "/x/a.pth", "sha256": "ab" * 32, "format": "dino", "label": "a",
            "load_report": {"matched": 3, "total": 3, "missing": 0}}
    p = write_record(tmp_path, task="knn", checkpoint=ckpt, data={"spec": "digits", "kind": "digits"},
                     settings={"ks": [20], "temperature": 0.07, "seed": 3, "precision": "fp32", "image_size": 32,
                               "features_cached": True}, metrics={"top1": {}, "top5": {}}, wall_time_s=2.0,
                     device="cpu")
    prov = json.loads(p.read_text())["provenance"]
    assert set(PROVENANCE_KEYS) <= set(prov)
    assert prov["seed"] == 3 and prov["checkpoint_format"] == "dino" and prov["load_report"]["matched"] == 3
    assert "features_cached" not in prov["params"] and prov["wall_time_s"] == 2.0
    assert [d[:9] for d in prov["deviations"]] == ["k in [20]", "images at"]
    # the loader puts its report into the checkpoint field, so `mokd analyze` records carry it too
    from mokd_eval.loader import load_models

    (m,) = load_models(third_party_files(tmp_path / "c")["solo"], arch="test_resnet")
    assert m.checkpoint["load_report"] == m.report.as_dict_brief() and m.checkpoint["load_report"]["missing"] == 0


def test_mokd_report_tables_third_party_records_beside_the_grid(tmp_path):
    """The Table-1 grid holds our pairs only; third-party records get their own k-NN / linear table."""
    ours = {"path": "/runs/m/last.pth", "sha256": "m1", "format": "mokd", "model": "net1", "branch": "teacher",
            "arch": "resnet50", "label": "net1-teacher", "mode": "mokd", "pair": "resnet50+vit_small_patch16_224"}
    dino = {"path": "/w/dino_vits16.pth", "sha256": "d1", "format": "dino", "arch": "vit_small_patch16_224",
            "label": "DINO ViT-S/16", "name": "vit_small_patch16_224"}
    for ckpt, knn, lin in ((ours, 67.1, 74.1), (dino, 74.5, 77.0)):
        write_record(tmp_path, task="knn", checkpoint=ckpt, data={"spec": "imagenet"}, settings={"seed": 0},
                     metrics={"top1": {"20": knn}, "top5": {"20": 90.0}, "best_top1": knn, "best_k": 20},
                     wall_time_s=1.0)
        write_record(tmp_path, task="linear", checkpoint=ckpt, data={"spec": "imagenet"}, settings={"seed": 0},
                     metrics={"top1": lin, "top5": 93.0}, wall_time_s=1.0)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    others = result.output.split("## Other checkpoints: k-NN and linear (%)")[1].split("##")[0]
    row = next(line for line in others.splitlines() if line.startswith("| DINO ViT-S/16 "))
    assert [c.strip() for c in row.strip("|").split("|")] == ["DINO ViT-S/16", "vit_small_patch16_224", "dino",
                                                             "imagenet", "74.50", "77.00"]
    assert "net1-teacher" not in others  # ours stays in the grid
    prov = result.output.split("## Provenance")[1]
    rows = [line for line in prov.splitlines() if line.startswith("| DINO ViT-S/16 ")]
    assert len(rows) == 2 and all("| dino " in r and "@" in r and "x1" in r for r in rows)


def test_interrupted_bench_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C during the second checkpoint's job: the rerun keeps the first's record and runs the rest."""
    import dataclasses

    from mokd_bench import protocols

    data = image_folder(tmp_path / "data", classes=2, train=3, val=2)
    files = third_party_files(tmp_path / "c")
    args = (f"{files['solo']}::test_resnet", str(files["dino"]), "--protocols", "rank", "--data", str(data),
            "--image-size", "32", "--out", str(tmp_path / "out"))
    real, calls = protocols.PROTOCOLS["rank"], []

    def interrupted(inputs, settings):
        calls.append(inputs.models[0].loaded.label)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real.run(inputs, settings)

    monkeypatch.setitem(protocols.PROTOCOLS, "rank", dataclasses.replace(real, run=interrupted))
    first = bench(*args)
    assert first.exit_code != 0 and calls == ["byol-solo", "dino_vits16_full"]
    done = stamps(tmp_path / "out")
    assert len(done) == 1
    monkeypatch.setitem(protocols.PROTOCOLS, "rank", real)
    second = bench(*args)
    assert second.exit_code == 0, second.output
    # the interrupted job had read its features (cached) before the interrupt: the rerun reads them back
    assert "1 record(s) written, 1 job(s) already done (resumed), 0 feature set(s) extracted" in second.output
    after = stamps(tmp_path / "out")
    assert len(after) == 2 and all(after[name] == stamp for name, stamp in done.items())


def test_vit_features_extracted_once_and_equal_to_mokd_eval(tmp_path):
    """A ViT's k-NN and linear probe read one extraction per split (its embedding is a slice of the probe's
    features), and give exactly what `mokd eval knn` and `mokd eval linear --fast` give."""
    data = image_folder(tmp_path / "data", classes=3, train=6, val=3)
    dino = third_party_files(tmp_path / "c")["dino"]
    common = ["--data", str(data), "--image-size", "32", "--seed", "0"]
    r = bench(str(dino), "--protocols", "knn,linear", "--set", "linear.epochs=2", "--set", "linear.warmup_epochs=0",
              "--out", str(tmp_path / "bench"), "--cache-dir", str(tmp_path / "cache-bench"), *common)
    assert r.exit_code == 0, r.output
    assert "2 feature set(s) extracted" in r.output  # train and val, once each for both protocols
    for cmd in (["knn"], ["linear", "--fast", "--epochs", "2", "--warmup-epochs", "0"]):
        e = CliRunner().invoke(cli, ["eval", *cmd, str(dino), "--out", str(tmp_path / "eval"), "--cache-dir",
                                     str(tmp_path / "cache-eval"), *common])
        assert e.exit_code == 0, e.output
    by_task = lambda folder: {r["task"]: r["metrics"] for r in map(json.loads, map(Path.read_text,  # noqa: E731
                                                                                   folder.glob("*.json")))}
    assert by_task(tmp_path / "bench" / "records") == by_task(tmp_path / "eval")


def test_summary_reports_k_20_not_the_best_k_on_val():
    """Picking k on the evaluation split would tune on it: the summary gives DINO's k = 20, and names the k when
    no k = 20 result exists."""
    from mokd_bench.render import summary_table

    def rec(label, top1):
        best_k = max(top1, key=top1.get)
        return {"task": "knn", "checkpoint": {"label": label, "name": "resnet18", "format": "dino"},
                "metrics": {"top1": top1, "top5": {k: 99.0 for k in top1}, "best_top1": top1[best_k],
                            "best_k": int(best_k)}}

    headers, rows = summary_table([rec("A", {"10": 71.0, "20": 70.0}), rec("B", {"10": 60.0, "200": 62.5})])
    assert headers[4] == "k-NN top-1, k=20 (%)"
    assert rows[0][4] == 70.0
    assert rows[1][4] == "62.50 (best k=200, not 20)"
