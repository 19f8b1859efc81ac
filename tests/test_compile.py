"""train.compile: the fast step under torch.compile (inductor, here on the CPU with gcc) equals the eager step.

The default pair (configs/default.yaml: ResNet-10 + ViT-Tiny, BatchNorm heads) at 32 px, fp32, one step from
the same weights on the same batch. Tolerance (docs/training.md says the same): every loss term within
rel 1e-4; every student gradient within 1e-3 of its tensor's largest eager value plus 1e-5 of its model's
largest (inductor fuses and reorders float sums; a bias before a BatchNorm has a gradient that is zero but
for rounding); after the optimiser step every weight within 1e-6 + 2 x the step's largest lr (AdamW's first
update is about lr x sign(gradient), so a gradient within rounding of zero may flip it).
"""

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule

from mokd import distributed
from mokd.checkpoint import seed_everything
from mokd.config import load_config
from mokd.trainer import build_state, train_step

STEP = 5  # a step inside the warm-up whose lrs are not 0


def one_step(compile_setting: str, batch: list[torch.Tensor]):
    cfg = load_config(None, ["optim.precision=fp32", "train.device=cpu", f"train.compile={compile_setting}",
                             "train.fast_step=true", "optim.batch_size=8"])
    seed_everything(0)
    state = build_state(cfg, torch.device("cpu"), 10, distributed.DistInfo())
    compiled = any(isinstance(f, OptimizedModule)
                   for f in state.model.student_forward.values())
    assert compiled == (compile_setting == "true")
    grads = {}

    def keep_grads(opt, *_):
        for n in ("net1", "net2"):
            for name, p in state.model.student[n].named_parameters():
                if p.grad is not None:
                    grads[f"{n}.{name}"] = p.grad.detach().clone()

    hooks = [state.optimizers[n].register_step_pre_hook(keep_grads) for n in ("net1",)]
    torch.manual_seed(1)  # the students' stochastic parts (none in this pair) and anything else drawn
    losses = {k: float(v.detach()) for k, v in train_step(state, batch, STEP, freeze_last_layer=False, cfg=cfg).items()}
    for h in hooks:
        h.remove()
    lr = max(g["lr"] for n in ("net1", "net2") for g in state.optimizers[n].param_groups)
    return losses, grads, state.model.state_dict(), lr


@pytest.mark.slow
def test_the_compiled_fast_step_equals_the_eager_one():
    g = torch.Generator().manual_seed(0)
    batch = [torch.rand(8, 3, 32, 32, generator=g) for _ in range(2)] + \
            [torch.rand(8, 3, 16, 16, generator=g) for _ in range(4)]
    eager = one_step("false", batch)
    compiled = one_step("true", batch)
    for k, v in eager[0].items():
        assert compiled[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert eager[1].keys() == compiled[1].keys() and len(eager[1]) > 0
    largest = {n: max(v.abs().max() for k, v in eager[1].items() if k.startswith(n)) for n in ("net1", "net2")}
    for k, v in eager[1].items():
        assert (compiled[1][k] - v).abs().max() <= 1e-3 * v.abs().max() + 1e-5 * largest[k[:4]], k
    tol = 1e-6 + 2 * eager[3]
    for k, v in eager[2].items():
        if v.is_floating_point():
            assert torch.allclose(compiled[2][k], v, atol=tol, rtol=1e-4), k
