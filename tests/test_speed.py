"""The fast training step computes what the plain one does; low-precision teacher copies track their master;
the device choices (compile, precision) resolve as documented."""

import pytest
import torch

from mokd import distributed
from mokd.device import native_bf16, resolve_compile, resolve_precision
from mokd.errors import UserError
from mokd.models.lowp import LowPrecisionCopy
from mokd.trainer import build_loader, build_state, train_step


def run_steps(cfg, crops, n_steps=3):
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"), 3, distributed.DistInfo())
    state.model.train()
    history = []
    for step in range(n_steps):
        losses = train_step(state, crops, step, freeze_last_layer=False, cfg=cfg)
        history.append({k: v.item() for k, v in losses.items()})
    return state, history


@pytest.fixture
def crops(tiny_cfg):
    # One fixed batch for both step implementations. The fp32 tolerances below were measured on the PIL chain's
    # batch; on the fast pipeline's the two steps' rounding differs by up to 2.3e-6 in a near-zero conv1 weight
    # (3e-3 of the largest BatchNorm bias), the same rounding on other numbers, not another computation.
    loader, _ = build_loader(tiny_cfg("augment.pipeline=pil"), distributed.DistInfo())
    return next(iter(loader))[0]


def assert_same_run(a, b, rtol, atol):
    (state_a, hist_a), (state_b, hist_b) = a, b
    for step, (la, lb) in enumerate(zip(hist_a, hist_b)):
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], rel=rtol, abs=atol), (step, k, la[k], lb[k])
    sa, sb = state_a.model.state_dict(), state_b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        a, b = sa[k], sb[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias adds q.b_k to every score of a row, which the softmax cancels: its gradient is 0 in
            # exact arithmetic, and AdamW turns the rounding noise left there into lr-sized steps of either
            # sign. Compare the query and value biases only.
            a, b = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (a, b))
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("l2_norm, atol", [("false", 1e-6), ("true", 5e-6)])
def test_fast_step_fp32_equals_plain_step_after_3_steps(tiny_cfg, crops, l2_norm, atol):
    """The release's T-Head and the L2-normalised one (the default recipe's), whose normalisation passes the
    two paths' different rounding on a little amplified (measured: 1.8e-6 beyond 1e-6 + 1e-5 |x| in one conv)."""
    cfg = ("train.compile=false", f"thead.l2_norm={l2_norm}")
    plain = run_steps(tiny_cfg("train.fast_step=false", *cfg), crops)
    fast = run_steps(tiny_cfg("train.fast_step=true", *cfg), crops)
    assert fast[0].model.fused_ema and not plain[0].model.fused_ema
    assert fast[0].optimizers["net1"].defaults["foreach"] and not plain[0].optimizers["net1"].defaults["foreach"]
    assert_same_run(plain, fast, rtol=1e-5, atol=atol)


@pytest.mark.slow  # bf16 is slow on CPUs without AMX (emulated on AVX2)
def test_fast_step_bf16_uses_teacher_copies_and_matches_the_plain_bf16_step(tiny_cfg, crops):
    cfg = ("optim.precision=bf16", "train.compile=false")
    plain = run_steps(tiny_cfg("train.fast_step=false", *cfg), crops, 1)
    fast = run_steps(tiny_cfg("train.fast_step=true", *cfg), crops, 1)
    copy = fast[0].model.teacher_forward["net1"]
    assert isinstance(copy, LowPrecisionCopy)
    # the copies' matmul weights are bf16; the checkpointed teacher stays fp32 (state dict unchanged)
    assert all(b.dtype == torch.bfloat16 for n, b in copy.module.named_buffers() if n.endswith("weight"))
    # autocast rounds a weight to bf16 the same way the copy does: the numbers agree to bf16 noise
    assert_same_run(plain, fast, rtol=2e-2, atol=2e-3)


def test_low_precision_copy_follows_its_master_after_ema_and_load_state_dict(tiny_cfg):
    from mokd.models.mokd import MOKDModel

    torch.manual_seed(0)
    model = MOKDModel(tiny_cfg())
    teacher = model.teacher["net2"]
    copy = LowPrecisionCopy(teacher, torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)

    def same_as_master():
        teacher.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = teacher([x]).mlp, copy([x]).mlp
        return torch.equal(a.float(), b.float())

    assert same_as_master()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)  # the version counters move: the copy refreshes on its next call
    assert same_as_master()
    # norm parameters are shared with the master, not copied
    assert copy.module.backbone.norm.weight is teacher.backbone.norm.weight


def test_compile_and_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu) is False and resolve_compile("true", cpu) is True
    assert resolve_compile(False, cpu) is False
    with pytest.raises(UserError, match="train.compile"):
        resolve_compile("sometimes", cpu)
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")


def test_gpu_check_says_why_and_exits_cleanly_without_cuda(capsys, monkeypatch):
    import runpy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_check = runpy.run_path("benchmarks/gpu_check.py", run_name="gpu_check")
    assert gpu_check["main"]([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_runs_and_matches_the_uncompiled_one(tiny_cfg, crops, monkeypatch, precision):
    """train.compile=true wraps students and teachers (fp32: the teacher itself; bf16: its low-precision copy);
    the EMA must still refresh the copies and nothing else. Dynamo's eager backend keeps the test fast: what
    is checked is the wiring, not inductor's kernels."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    cfg = (f"optim.precision={precision}", "train.fast_step=true")
    compiled = run_steps(tiny_cfg("train.compile=true", *cfg), crops, 2)
    plain = run_steps(tiny_cfg("train.compile=false", *cfg), crops, 2)
    teacher = compiled[0].model.teacher_forward["net1"]
    assert isinstance(teacher, LowPrecisionCopy) if precision == "bf16" else hasattr(teacher, "_orig_mod")
    assert_same_run(plain, compiled, rtol=1e-4 if precision == "fp32" else 2e-2,
                    atol=1e-5 if precision == "fp32" else 2e-3)


@pytest.mark.parametrize("cores, world, kind, expected", [(2, 1, "folder", 0), (16, 1, "folder", 8),
                                                          (16, 4, "folder", 3), (16, 1, "digits", 0),
                                                          (16, 1, "photos", 0)])
def test_default_workers_leave_small_machines_to_the_model(monkeypatch, cores, world, kind, expected):
    import os

    from mokd_eval import supervised

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(supervised.dist, "world_size", lambda: world)
    assert supervised.default_workers(kind) == expected
