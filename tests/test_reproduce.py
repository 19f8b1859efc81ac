"""benchmarks/reproduce.py: --epochs reaches every training, and each run's health is read and reported."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from mokd.trainer import health_warnings
from mokd.config import load_config
from tests.tiny import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parent.parent


def load_harness():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(path: Path, epochs: list[dict], out_dim: int = 64) -> Path:
    """A run folder holding only what the harness's health reading needs: config.yaml and epoch records."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"head": {"out_dim": out_dim}}))
    with open(path / "log.jsonl", "w") as f:
        for i, e in enumerate(epochs, start=1):
            f.write(json.dumps({"type": "epoch", "epoch": i, **e}) + "\n")
    return path


HEALTHY = {"entropy_net1": 2.0, "mean_entropy_net1": 3.9, "entropy_net2": 1.5, "mean_entropy_net2": 3.5}
COLLAPSED = {"entropy_net1": 4.15, "mean_entropy_net1": 4.16,  # uniform: log 64 = 4.16
             "entropy_net2": 2.0, "mean_entropy_net2": 2.1}  # the same output for every input


def test_trainer_warns_for_a_collapsed_teacher_and_not_for_a_healthy_one():
    cfg = load_config(None, TINY_OVERRIDES)
    assert health_warnings(HEALTHY, cfg) == []
    warned = health_warnings(COLLAPSED, cfg)
    assert len(warned) == 2
    assert "net1 (test_resnet) MLP head looks collapsed to uniform outputs" in warned[0]
    assert "net2 (test_vit) MLP head gives nearly the same output for every input" in warned[1]


def test_harness_reports_last_entropies_and_which_epochs_warned(tmp_path):
    rp = load_harness()
    ok = rp.run_health(fake_run(tmp_path / "ok", [HEALTHY, HEALTHY]))
    assert ok["net1"]["entropy"] == 2.0 and ok["net1"]["mean_entropy"] == 3.9
    assert ok["net1"]["warned_epochs"] == [] and ok["net2"]["warned_epochs"] == []
    assert "no warning" in rp.health_line("mokd", 0, ok) and "collapse" not in rp.health_line("mokd", 0, ok)
    # collapsed in epoch 2, recovered by epoch 3: the last figures are healthy, but the warning is still named
    bad = rp.run_health(fake_run(tmp_path / "bad", [HEALTHY, COLLAPSED, HEALTHY]))
    assert bad["net1"]["warned_epochs"] == [2] and bad["net2"]["warned_epochs"] == [2]
    assert bad["net1"]["entropy"] == 2.0
    assert "collapse warning at epoch(s) 2" in rp.health_line("independent", 3, bad)


@pytest.mark.slow
def test_epochs_flag_reaches_every_training(tmp_path, monkeypatch, capsys):
    rp = load_harness()
    out = tmp_path / "h"
    argv = ["--seeds", "1", "--jobs", "1", "--no-linear", "--mad", "--epochs", "1", "--out", str(out)]
    for o in TINY_OVERRIDES + ["data.subset=32", "optim.batch_size=16"]:
        argv += ["--set", o]
    monkeypatch.setattr(sys, "argv", ["reproduce.py"])
    assert rp.main(argv) == 0
    printed = capsys.readouterr().out
    for mode in ("mokd", "independent"):
        run = out / mode / "seed0"
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 1
        epochs = [json.loads(ln) for ln in open(run / "log.jsonl") if '"type": "epoch"' in ln]
        assert [e["epoch"] for e in epochs] == [1]  # TINY_OVERRIDES says 2: --epochs won
        assert f"health {mode} seed 0 (last epoch): net1 H" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert {"entropy", "mean_entropy", "runs_warned"} <= set(summary["table"][0]["health"])
    assert {r["kind"] for r in summary["mad"]["table"]} == {"vit", "cnn"}  # --mad: both teachers, per layer
    assert (out / "mad.md").is_file() and (out / "mad_seeds.png").is_file()


def test_attention_distance_gap_is_paired_and_flagged_inside_or_outside_the_seed_noise():
    rp = load_harness()
    # ViT: MOKD 1 px further in layer 1 on every seed (outside the noise); layer 2 differs by seed only
    per_mode = {"mokd": {"vit": [[11.0, 20.0], [12.0, 21.0], [13.0, 19.0]]},
                "independent": {"vit": [[10.0, 21.0], [11.0, 19.0], [12.0, 20.0]]}}
    rows = rp.mad_summary(per_mode)
    assert [(r["kind"], r["layer"]) for r in rows] == [("vit", 1), ("vit", 2)]
    m, lo, hi = rows[0]["gap"]
    assert m == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert not rows[0]["inside_noise"]
    assert rows[1]["gap"][0] == pytest.approx(0.0) and rows[1]["inside_noise"]
    assert rows[0]["mokd"][0] == pytest.approx(12.0) and rows[0]["independent"][0] == pytest.approx(11.0)


def test_device_cuda_refuses_in_one_line_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    rp = load_harness()
    assert rp.main(["--device", "cuda", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "CUDA is not available" in err


def test_budget_picks_the_epochs_that_fit_from_the_calibration(tmp_path):
    rp = load_harness()
    out = tmp_path / "seed0.train.out"
    out.write_text("epoch 1/2: sm1=1.0000 (20.5s)\n  teacher health ...\nepoch 2/2: sm1=0.9000 (12.0s)\n")
    assert rp.epoch_seconds(out) == [20.5, 12.0]
    # 600 s budget: 480 for training, 60 already spent, fixed cost 50 - 32.5 = 17.5 s, 12 s an epoch -> 33
    assert rp.pick_epochs(600, 60, [(50.0, [20.5, 12.0]), (40.0, [18.0, 11.0])]) == 33
    assert rp.pick_epochs(60, 59, [(50.0, [20.5, 12.0])]) == 1  # never fewer than one
    cuda = rp.device_settings("cuda", jobs=10)
    assert {"train.device=cuda", "optim.precision=bf16", "data.gpu_augment=true"} <= set(cuda)
    assert rp.device_settings(None, jobs=2) == ()


def test_harness_counts_a_flat_teacher_as_a_note_and_a_flat_constant_one_as_collapsed(tmp_path):
    rp = load_harness()
    flat = {**HEALTHY, "entropy_net2": 3.87, "mean_entropy_net2": 4.10}  # 0.93 log 64, gap 0.23 of 0.29 left
    flat_constant = {**HEALTHY, "entropy_net2": 3.87, "mean_entropy_net2": 3.90}  # gap 0.03 of 0.29
    h = rp.run_health(fake_run(tmp_path / "r", [flat, flat_constant]))
    assert h["net2"]["flat_epochs"] == [1] and h["net2"]["warned_epochs"] == [2]
    line = rp.health_line("mokd", 0, h)
    assert "collapse warning at epoch(s) 2" in line and "flat-teacher note at epoch(s) 1" in line
