"""Gradient accumulation (optim.accum_steps): k micro-batches of B/k make one optimiser step of B.

Two ViTs (no batch norm, whose statistics would be per micro-batch), SGD (AdamW's first steps are sign-like,
so float noise in near-zero gradients would flip whole updates), fp32. Tolerance: atol 1e-6, rtol 1e-5 on
every weight, teacher weight, centre and momentum buffer (docs/cluster.md says the same).
"""

import os
import signal

import pytest
import torch
from click.testing import CliRunner

from mokd import distributed
from mokd.checkpoint import load_file, seed_everything
from mokd.cli import cli
from mokd.errors import UserError
from mokd.trainer import build_loader, build_state, train_step
from tests.tiny import TINY_OVERRIDES

VIT_PAIR = ["net1.arch=test_vit", "net1.kwargs={img_size: 32, patch_size: 8}", "net1.small_stem=false",
            "net1.optimizer=sgd", "net2.optimizer=sgd"]
ATOL, RTOL = 1e-6, 1e-5


def crops(batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]


def fresh_state(cfg):
    seed_everything(cfg.train.seed)
    return build_state(cfg, torch.device("cpu"), 3, distributed.DistInfo())


def assert_states_close(a, b):
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(v, w, atol=ATOL, rtol=RTOL), k
    for n in ("net1", "net2"):
        for i, slots in a.optimizers[n].state_dict()["state"].items():
            for slot, v in slots.items():
                w = b.optimizers[n].state_dict()["state"][i][slot]
                assert torch.allclose(v, w, atol=ATOL, rtol=RTOL), (n, i, slot)


def test_two_half_batches_make_the_step_of_the_whole_batch(tiny_cfg):
    cfg = tiny_cfg(*VIT_PAIR)
    whole, split = fresh_state(cfg), fresh_state(cfg)
    assert_states_close(whole, split)
    centres_moved = False
    for step in range(3):  # step 0 moves the centres from zero; steps 1 and 2 centre with them
        batch = crops(8, seed=step)
        la = train_step(whole, batch, step, freeze_last_layer=step == 0, cfg=cfg)
        halves = [[c[:4] for c in batch], [c[4:] for c in batch]]
        lb = train_step(split, halves, step, freeze_last_layer=step == 0, cfg=cfg)
        for k in ("sm1", "st1", "cm1", "ct1", "sm2", "ct2", "loss1", "loss2"):
            # every term is a mean over images (ct: over image pairs of equal count), so micro-batch means average
            assert float(la[k].detach()) == pytest.approx(float(lb[k]), rel=1e-5), (step, k)
        assert_states_close(whole, split)
        centres_moved |= bool(whole.model.centers["net1_mlp"].center.abs().sum() > 0)
    assert centres_moved


def test_the_schedules_count_optimiser_steps_whatever_the_split(tiny_cfg):
    one = tiny_cfg(*VIT_PAIR)
    loader1, _ = build_loader(one, distributed.DistInfo())
    s1 = build_state(one, torch.device("cpu"), len(loader1), distributed.DistInfo())
    for accum in (2, 4):
        cfg = tiny_cfg(*VIT_PAIR, f"optim.accum_steps={accum}")
        loader, _ = build_loader(cfg, distributed.DistInfo())
        assert loader.batch_size == 16 // accum and len(loader) == accum * len(loader1)
        s = build_state(cfg, torch.device("cpu"), len(loader) // accum, distributed.DistInfo())
        assert s.steps_per_epoch == s1.steps_per_epoch == 3
        for n in ("net1", "net2"):
            for name in ("lr", "wd", "momentum", "thead_lr", "thead_wd"):
                assert (getattr(s.schedules[n], name) == getattr(s1.schedules[n], name)).all(), (accum, n, name)
        for k, v in s.teacher_temp.items():
            assert (v == s1.teacher_temp[k]).all()


def test_a_batch_that_does_not_split_is_refused(tiny_cfg):
    with pytest.raises(UserError, match=r"optim.batch_size 16 is not divisible by 1 process\(es\) x "
                                        r"optim.accum_steps 3 = 3"):
        build_loader(tiny_cfg("optim.accum_steps=3"), distributed.DistInfo())
    with pytest.raises(UserError, match="optim.accum_steps must be >= 1"):
        tiny_cfg("optim.accum_steps=0")


def cli_args(out, *extra):
    args = [a for o in [*TINY_OVERRIDES, *VIT_PAIR, *extra] for a in ("--set", o)]
    return ["train", *args, "--out", str(out), "--device", "cpu"]


@pytest.mark.slow
def test_accumulated_training_equals_whole_batches_and_a_cut_cycle_is_redone(tmp_path, monkeypatch):
    """Through the CLI, 2 epochs of 3 steps: accum_steps 2 ends where accum_steps 1 does (the loader's order and
    crops do not depend on the split). Checkpoints are written at optimiser-step boundaries only: a stop that
    arrives inside a cycle lets it finish and saves after it;
    a run that dies inside a cycle saved nothing of it, and the resume redoes that cycle from its first
    micro-batch, ending bit for bit where the uninterrupted accumulated run does."""
    import mokd.trainer as trainer

    runner = CliRunner()
    assert runner.invoke(cli, cli_args(tmp_path / "whole")).exit_code == 0
    res = runner.invoke(cli, cli_args(tmp_path / "accum", "optim.accum_steps=2"))
    assert res.exit_code == 0, res.output
    assert "batch 16 = 1 process(es) x 2 accumulated micro-batches x 8" in res.output
    a, b = load_file(tmp_path / "whole" / "last.pth"), load_file(tmp_path / "accum" / "last.pth")
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=ATOL, rtol=RTOL), k

    real = trainer._check_finite

    def at(step_wanted, micro, action):
        calls = []

        def check(losses, step, epoch):
            calls.append(step)
            if step == step_wanted and calls.count(step) == micro:
                action()
            real(losses, step, epoch)
        return check

    def crash():
        raise RuntimeError("simulated crash inside an accumulation cycle")

    cut = tmp_path / "cut"
    # SIGTERM in micro-batch 1 of step 4 (epoch 2's second step): the cycle finishes, the save is at its end
    monkeypatch.setattr(trainer, "_check_finite", at(4, 1, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    res = runner.invoke(cli, cli_args(cut, "optim.accum_steps=2"))
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "(step 5, batch 2 of 3 in epoch 2)" in res.output
    # The resume dies in micro-batch 2 of step 5, its gradients and centres half accumulated, nothing saved
    monkeypatch.setattr(trainer, "_check_finite", at(5, 2, crash))
    res = runner.invoke(cli, ["train", "--out", str(cut), "--resume"])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert load_file(cut / "last.pth")["step"] == 5
    # and the next resume redoes step 5 from its first micro-batch
    monkeypatch.setattr(trainer, "_check_finite", real)
    res = runner.invoke(cli, ["train", "--out", str(cut), "--resume"])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "step 5, batch 2 of 3 in epoch 2" in res.output
    c = load_file(cut / "last.pth")
    for k, v in b["model"].items():
        assert torch.equal(v, c["model"][k]), k
    for n in ("net1", "net2"):
        for i, slots in b["optimizer"][n]["state"].items():
            for slot, v in slots.items():
                assert torch.equal(v, c["optimizer"][n]["state"][i][slot]), (n, i, slot)
