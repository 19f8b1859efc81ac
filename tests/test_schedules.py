import numpy as np
import pytest

from mokd.optim import build_schedules, resolve_optimizer
from mokd.config import NetConfig, OptimConfig
from mokd.schedules import cosine_schedule, teacher_temp_schedule


def test_cosine_with_warmup_boundaries():
    s = cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0
    assert s[9] == pytest.approx(0.9)  # last warm-up step: 9/10 of the way
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
