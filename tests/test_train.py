"""The trainer end to end on CPU: learning, exact resume, 2-process gloo == 1 process, the CLI, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tests.tiny import TINY_OVERRIDES, assert_same_run, read_log
from mokd import distributed
from mokd.cli import cli
from mokd.checkpoint import load_file
from mokd.trainer import build_loader, build_state, train


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(tiny_cfg):
    # The T-Heads' weight-norm gains train (the release's default); under this test's fixed SGD step of 0.05
    # the CNN's gain makes its loss swing, so it is frozen here as DINO freezes an MLP head's.
    cfg = tiny_cfg("net1.lr=0.5", "net2.lr=0.005", "optim.warmup_epochs=0", "net1.momentum_teacher=0.9",
                   "net2.momentum_teacher=0.9", "net1.norm_last_layer_thead=true")
    torch.manual_seed(0)
    loader, _ = build_loader(cfg, distributed.DistInfo())
    state = build_state(cfg, torch.device("cpu"), len(loader), distributed.DistInfo())
    crops, _ = next(iter(loader))
    model = state.model
    history = []
    for step in range(8):
        losses = model(crops, 0.04)
        totals = model.total_losses(losses)
        history.append((totals["loss1"].item(), totals["loss2"].item()))
        for n, opt in state.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = 0.05 if n == "net1" else 0.002
            opt.zero_grad()
        (totals["loss1"] + totals["loss2"]).backward()
        for opt in state.optimizers.values():
            opt.step()
        model.update_teachers({"net1": 0.9, "net2": 0.9})
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1], history


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch):
    full = tiny_cfg(out=str(tmp_path / "full"))
    train(full)
    import mokd.trainer as trainer

    real_check = trainer._check_finite

    def crash_in_second_epoch(losses, step, epoch):
        if step == 4:  # 3 steps per epoch: the middle of epoch 2, after some of its log lines were written
            raise KeyboardInterrupt("simulated preemption")
        real_check(losses, step, epoch)

    cut = tiny_cfg(out=str(tmp_path / "cut"))
    monkeypatch.setattr(trainer, "_check_finite", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    assert load_file(tmp_path / "cut" / "last.pth")["epoch"] == 1
    monkeypatch.setattr(trainer, "_check_finite", real_check)
    train(cut, resume_run=True)

    a, b = load_file(tmp_path / "full" / "last.pth"), load_file(tmp_path / "cut" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert read_log(tmp_path / "full" / "log.jsonl") == read_log(tmp_path / "cut" / "log.jsonl")


def test_non_finite_loss_stops_with_the_term_and_step_and_keeps_the_last_checkpoint(tiny_cfg, monkeypatch):
    import mokd.models.mokd as mokd_model

    calls = {"n": 0}
    real = mokd_model.paired_cross_entropy

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] == 7 else out  # 2 calls a step (ct1, ct2); 3 steps an epoch

    monkeypatch.setattr(mokd_model, "paired_cross_entropy", poisoned)
    cfg = tiny_cfg()
    with pytest.raises(Exception, match=r"non-finite loss ct1 at step 3 \(epoch 2\)"):
        train(cfg)
    ckpt = load_file(os.path.join(cfg.train.output_dir, "last.pth"))
    assert ckpt["epoch"] == 1


def tiny_cli_args(out):
    args = []
    for o in TINY_OVERRIDES:
        args += ["--set", o]
    return args + ["--out", str(out)]


def test_cli_help_and_one_epoch(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "--set" in res.output
    res = runner.invoke(cli, ["train", *tiny_cli_args(tmp_path / "r"), "--epochs", "1", "--seed", "3"])
    assert res.exit_code == 0, res.output
    ckpt = load_file(tmp_path / "r" / "last.pth")
    assert {"format", "version", "epoch", "step", "config", "arch", "model", "optimizer", "scaler", "rng",
            "metrics"} <= set(ckpt)
    assert ckpt["format"] == "mokd" and ckpt["epoch"] == 1 and ckpt["config"]["train"]["seed"] == 3
    assert ckpt["arch"]["net2"] == {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8},
                                    "small_stem": False}
    assert any(k.startswith("teacher.net1.backbone.") for k in ckpt["model"])
    steps = [r for r in read_log(tmp_path / "r" / "log.jsonl") if r["type"] == "step"]
    assert {"sm1", "st1", "cm1", "ct1", "sm2", "st2", "cm2", "ct2", "lr_net1", "momentum_net2",
            "teacher_temp_net1_self", "teacher_temp_net2_cross"} <= set(steps[0])
    assert (tmp_path / "r" / "config.yaml").exists()


def test_bad_data_path_and_unknown_architecture(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", *tiny_cli_args(tmp_path / "r"), "--data", str(tmp_path / "nope")])
    assert res.exit_code != 0
    assert "does not exist" in res.output and "ROOT/train/<class>/<image>" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["train", *tiny_cli_args(tmp_path / "r"), "--set", "net1.arch=resnet51"])
    assert res.exit_code != 0 and "unknown architecture 'resnet51'" in res.output and "resnet50" in res.output
    res = runner.invoke(cli, ["train", *tiny_cli_args(tmp_path / "r"), "--set", "optim.epoch=3"])
    assert res.exit_code != 0 and "optim.epoch" in res.output and "epochs" in res.output


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes and the same global batch ends where 1 process does."""
    common = [a for o in TINY_OVERRIDES for a in ("--set", o)] + [
        "--set", "net1.arch=test_vit", "--set", "net1.kwargs={img_size: 32, patch_size: 8}",
        "--set", "net1.small_stem=false", "--set", "data.subset=32", "--epochs", "1", "--device", "cpu",
        # SGD: AdamW's first steps are sign-like, so float noise in near-zero gradients flips whole updates.
        "--set", "net1.optimizer=sgd", "--set", "net2.optimizer=sgd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "mokd", "train", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mokd", "train", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rtol=1e-4, log_rtol=1e-4)


def test_resume_through_the_cli_uses_the_runs_own_config(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", *tiny_cli_args(tmp_path / "r"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    # No --config: the run's config.yaml (tiny pair), not configs/default.yaml, and --epochs extends it.
    res = runner.invoke(cli, ["train", "--out", str(tmp_path / "r"), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output
    assert load_file(tmp_path / "r" / "last.pth")["epoch"] == 2
    assert "test_resnet" in (tmp_path / "r" / "config.yaml").read_text()
    # A config that builds a different model is refused with the reason, and the run's files stay.
    res = runner.invoke(cli, ["train", "--out", str(tmp_path / "r"), "--resume", "--set", "loss.mode=independent"])
    assert res.exit_code != 0 and "does not fit the model" in res.output
    assert "mokd" in load_file(tmp_path / "r" / "last.pth")["config"]["loss"]["mode"]


def test_optimiser_groups_freezing_and_clipping(tiny_cfg):
    from mokd.trainer import clip_gradients, last_layer_params, train_step

    cfg = tiny_cfg("optim.warmup_epochs=0", "net1.thead_lr=null")
    loader, _ = build_loader(cfg, distributed.DistInfo())
    state = build_state(cfg, torch.device("cpu"), len(loader), distributed.DistInfo())
    crops, _ = next(iter(loader))
    frozen = {n: [p.clone() for p in last_layer_params(state.model.student[n])] for n in ("net1", "net2")}
    backbone_before = next(state.model.student["net1"].backbone.parameters()).clone()
    train_step(state, crops, 0, freeze_last_layer=True, cfg=cfg)
    for n in ("net1", "net2"):
        for before, p in zip(frozen[n], last_layer_params(state.model.student[n])):
            assert torch.equal(before, p), "the last layer moved during the frozen epoch"
    assert not torch.equal(backbone_before, next(state.model.student["net1"].backbone.parameters()))
    for n, opt in state.optimizers.items():  # the step set the scheduled values
        for g in opt.param_groups:
            if g["apply_wd"] and (n, g["tag"]) == ("net1", "thead"):  # the CNN's T-Head: everything decays
                assert any(p.ndim <= 1 for p in g["params"]) and g["weight_decay"] > 0
            elif g["apply_wd"]:
                assert all(p.ndim > 1 for p in g["params"]) and g["weight_decay"] > 0
            else:
                assert all(p.ndim <= 1 for p in g["params"]) and g["weight_decay"] == 0.0
        assert {g["tag"] for g in opt.param_groups} == {"main", "thead"}
    # The CNN's (SGD) T-Head runs on the AdamW schedules, as in the official code; its backbone on SGD's.
    sgd = {g["tag"]: g for g in state.optimizers["net1"].param_groups if g["apply_wd"]}
    assert sgd["main"]["lr"] == pytest.approx(cfg.net1.lr * 16 / 256) and sgd["main"]["weight_decay"] == pytest.approx(1e-4)
    assert sgd["thead"]["lr"] == pytest.approx(0.0003 * 16 / 256) and sgd["thead"]["weight_decay"] == pytest.approx(0.04)

    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.full((2, 3), 10.0)
    layer.bias.grad = torch.tensor([0.1, 0.1])
    clip_gradients(layer, 3.0)
    assert layer.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)  # capped on its own
    assert torch.allclose(layer.bias.grad, torch.tensor([0.1, 0.1]))  # below the cap: untouched


def test_crop_sizes_the_models_cannot_take_are_named(tiny_cfg):
    from mokd.errors import UserError
    from mokd.models.mokd import MOKDModel

    with pytest.raises(UserError, match=r"net2 \(test_vit\) cannot take 36 px crops.*patch size 8"):
        MOKDModel(tiny_cfg("augment.global_size=36"))
