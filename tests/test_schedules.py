import math

import numpy as np
import pytest

from mokd.optim import build_schedules, resolve_optimizer
from mokd.config import NetConfig, OptimConfig
from mokd.schedules import cosine_schedule, teacher_temp_schedule


def test_cosine_with_warmup_boundaries():
    s = cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0
    assert s[9] == pytest.approx(1.0)  # last warm-up step: already the base value (DINO's end point)
    assert s[8] == pytest.approx(8 / 9)
    assert s[10] == pytest.approx(1.0)  # first cosine step is the base value
    assert np.all(np.diff(s[10:]) <= 1e-12)  # then decreasing
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 39 / 40)))


def test_teacher_temperature_warmup_per_epoch():
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=100, steps_per_epoch=3)
    assert len(s) == 300
    assert s[0] == s[2] == pytest.approx(0.04)
    assert s[29 * 3] == pytest.approx(0.07)
    assert np.all(s[29 * 3:] == pytest.approx(0.07))


def test_paper_defaults_and_lr_scaling():
    sgd = resolve_optimizer(NetConfig(arch="resnet50"), vit=False)
    adamw = resolve_optimizer(NetConfig(arch="vit_small_patch16_224"), vit=True)
    assert (sgd["optimizer"], sgd["lr"], sgd["weight_decay"]) == ("sgd", 0.1, 1e-4)
    assert (adamw["optimizer"], adamw["lr"], adamw["weight_decay"], adamw["weight_decay_end"]) == \
        ("adamw", 0.0003, 0.04, 0.4)
    sched = build_schedules(adamw, NetConfig(), OptimConfig(epochs=100, batch_size=512, warmup_epochs=10), 4)
    assert sched.lr[40] == pytest.approx(0.0003 * 512 / 256)
    assert sched.momentum[0] == pytest.approx(0.996)
    assert sched.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    assert sched.wd[0] == pytest.approx(0.04)


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """DINO's utils.cosine_scheduler, written out from its formulas (the authors' MOKD release has the same)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = [start_warmup_value + (base_value - start_warmup_value) * i / (warmup_iters - 1) if warmup_iters > 1
              else start_warmup_value for i in range(warmup_iters)]
    n = epochs * niter_per_ep - warmup_iters
    cosine = [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return np.array(warmup + cosine)


def dino_teacher_temp(warmup_temp, temp, warmup_epochs, epochs, niter_per_ep):
    """DINOLoss.teacher_temp_schedule (per epoch: linear with its end point, then constant), one value per step."""
    per_epoch = [warmup_temp + (temp - warmup_temp) * i / (warmup_epochs - 1) if warmup_epochs > 1 else warmup_temp
                 for i in range(warmup_epochs)] + [temp] * (epochs - warmup_epochs)
    return np.repeat(per_epoch, niter_per_ep)


@pytest.mark.parametrize("epochs, steps, warmup, temp_warmup", [(10, 5, 2, 4), (3, 7, 1, 3), (100, 4, 10, 30),
                                                                (4, 50, 1, 1), (2, 3, 0, 0)])
def test_schedules_equal_dino_cosine_scheduler(epochs, steps, warmup, temp_warmup):
    from mokd.config import Config, LossConfig
    from mokd.schedules import teacher_temp_schedules

    optim = OptimConfig(epochs=epochs, batch_size=512, warmup_epochs=warmup)
    for arch, vit in (("resnet50", False), ("vit_small_patch16_224", True)):
        net = NetConfig(arch=arch)
        s = resolve_optimizer(net, vit=vit)
        got = build_schedules(s, net, optim, steps)
        lr = dino_cosine_scheduler(s["lr"] * 512 / 256, s["min_lr"], epochs, steps, warmup_epochs=warmup)
        wd = dino_cosine_scheduler(s["weight_decay"], s["weight_decay_end"], epochs, steps)
        momentum = dino_cosine_scheduler(net.momentum_teacher, 1.0, epochs, steps)
        np.testing.assert_allclose(got.lr, lr, rtol=1e-12, atol=0)
        np.testing.assert_allclose(got.wd, wd, rtol=1e-12, atol=0)
        np.testing.assert_allclose(got.momentum, momentum, rtol=1e-12, atol=0)
        if warmup:
            assert got.lr[warmup * steps - 1] == pytest.approx(s["lr"] * 2)  # the warm-up ends at the base lr
    cfg = Config(optim=optim, loss=LossConfig(warmup_teacher_temp_epochs=temp_warmup))
    temps = teacher_temp_schedules(cfg, steps)
    assert set(temps) == {"net1_self", "net1_cross", "net2_self", "net2_cross"}
    for t in temps.values():
        np.testing.assert_allclose(t, dino_teacher_temp(0.04, 0.07, temp_warmup, epochs, steps), rtol=1e-12, atol=0)
