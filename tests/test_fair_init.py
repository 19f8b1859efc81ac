"""Fair comparisons: with one seed, each module starts from the same weights whatever else is built."""

import pytest
import torch

from mokd.models.mokd import NETS, MOKDModel

VARIANTS = {
    "mokd": [],
    "independent": ["loss.mode=independent"],
    "no_st": ["loss.st=false"],
    "no_cm": ["loss.cm=false"],
    "no_ct": ["loss.ct=false"],
    "no_thead": ["loss.st=false", "loss.ct=false"],
    "global_search": ["loss.ct_views=global"],
    "deeper_thead": ["thead.depth=2"],
}


def _state(model: MOKDModel, net: str, part: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in getattr(model.student[net], part).state_dict().items()}


def test_backbones_and_mlp_heads_equal_across_modes_and_ablations(tiny_cfg):
    ref = MOKDModel(tiny_cfg())
    for name, extra in VARIANTS.items():
        model = MOKDModel(tiny_cfg(*extra))
        for n in NETS:
            for part in ("backbone", "mlp_head"):
                a, b = _state(ref, n, part), _state(model, n, part)
                assert a.keys() == b.keys()
                for k in a:
                    assert torch.equal(a[k], b[k]), f"{name}: {n}.{part}.{k} differs from the mokd run's"


def test_thead_equal_when_built_and_independent_of_the_other_model(tiny_cfg):
    ref = MOKDModel(tiny_cfg())
    no_cm = MOKDModel(tiny_cfg("loss.cm=false"))
    for n in NETS:
        for k, v in _state(ref, n, "thead").items():
            assert torch.equal(v, _state(no_cm, n, "thead")[k])
    # Another net1 (a different architecture) leaves net2's initial weights unchanged.
    other = MOKDModel(tiny_cfg("net1.arch=resnet18", "net1.kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 16, 16]}"))
    for part in ("backbone", "mlp_head"):
        for k, v in _state(ref, "net2", part).items():
            assert torch.equal(v, _state(other, "net2", part)[k]), f"net2.{part}.{k} depends on net1"


def test_weights_follow_the_config_seed_not_the_global_stream(tiny_cfg):
    a, b = MOKDModel(tiny_cfg()), MOKDModel(tiny_cfg("train.seed=1"))
    wa, wb = next(iter(_state(a, "net2", "backbone").values())), next(iter(_state(b, "net2", "backbone").values()))
    assert not torch.equal(wa, wb)
    torch.manual_seed(1)
    c = MOKDModel(tiny_cfg())
    torch.manual_seed(2)
    d = MOKDModel(tiny_cfg())
    for n in NETS:
        sc, sd = c.student[n].state_dict(), d.student[n].state_dict()
        assert all(torch.equal(sc[k], sd[k]) for k in sc)


@pytest.mark.parametrize("net", NETS)
def test_teacher_starts_as_student(tiny_cfg, net):
    model = MOKDModel(tiny_cfg())
    s, t = model.student[net].state_dict(), model.teacher[net].state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
