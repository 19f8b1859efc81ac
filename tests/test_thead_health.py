"""The T-Head's health: its figures are logged and warned on like the MLP head's, L_ct's target can be centred,
and the T-Head can normalise its pooled feature over the batch (the two cures of its collapse)."""

import math

import pytest
import torch

from mokd.config import load_config
from mokd.losses import paired_cross_entropy, sharpen
from mokd.models.mokd import NETS, MOKDModel
from mokd.trainer import health_warnings
from tests.test_model import crops_for
from tests.test_reproduce import HEALTHY, fake_run, load_harness
from tests.tiny import TINY_OVERRIDES

# The digits runs' T-Head before the cures: uniform targets for L_st, one dimension for every input in L_ct's.
T_COLLAPSED = {**HEALTHY, "entropy_thead_net1": 4.15, "mean_entropy_thead_net1": 4.16,
               "entropy_thead_net2": 2.0, "mean_entropy_thead_net2": 3.9,
               "entropy_search_net1": 2.0, "mean_entropy_search_net1": 3.9,
               "entropy_search_net2": 0.10, "mean_entropy_search_net2": 0.11}


def test_every_teacher_output_of_a_mokd_model_gets_health_figures(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MOKDModel(cfg)
    model(crops_for(cfg), teacher_temp=0.04)
    log_k = math.log(cfg.head.out_dim)
    for n in NETS:
        for infix in ("", "thead_", "search_"):
            assert 0.0 <= model.health[f"entropy_{infix}{n}"].item() <= log_k + 1e-4
            assert 0.0 <= model.health[f"mean_entropy_{infix}{n}"].item() <= log_k + 1e-4
            assert 0.0 <= model.health[f"agreement_{infix}{n}"].item() <= 1.0
    plain = MOKDModel(tiny_cfg("loss.mode=independent"))
    plain(crops_for(cfg), teacher_temp=0.04)
    assert not any("thead" in k or "search" in k for k in plain.health)


def test_a_collapsed_t_head_warns_and_names_the_cure():
    cfg = load_config(None, TINY_OVERRIDES)
    assert health_warnings(HEALTHY, cfg) == []
    warned = health_warnings(T_COLLAPSED, cfg)
    assert len(warned) == 2
    assert "net1 (test_resnet) T-Head looks collapsed to uniform outputs" in warned[0]
    assert "net2 (test_vit) L_ct target" in warned[1] and "loss.ct_center=true" in warned[1]


def test_harness_counts_a_t_head_collapse_and_prints_its_figures(tmp_path):
    rp = load_harness()
    h = rp.run_health(fake_run(tmp_path / "r", [HEALTHY, T_COLLAPSED]))
    assert h["net1"]["warned_epochs"] == [2] and h["net2"]["warned_epochs"] == [2]
    assert h["net2"]["heads"]["L_ct target"] == (0.10, 0.11)
    line = rp.health_line("mokd", 0, h)
    assert "T-Head 4.15 / 4.16" in line and "L_ct target 0.10 / 0.11" in line and "epoch(s) 2" in line


def test_ct_center_centres_the_target_and_moves_after_the_terms(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("loss.ct_center=true")
    model = MOKDModel(cfg)
    assert {f"{n}_search" for n in NETS} <= set(model.centers)
    assert "net1_search" not in MOKDModel(tiny_cfg()).centers  # the release's target: not centred
    for c in model.centers.values():
        c.center.normal_()
    before = {n: model.centers[f"{n}_search"].center.clone() for n in NETS}
    losses = model(crops_for(cfg), teacher_temp=0.05)
    m = cfg.loss.center_momentum
    for n in NETS:
        target, logits, student_logits = model._search[n]
        torch.testing.assert_close(target, sharpen(logits, 0.05, before[n]))
        want = paired_cross_entropy(student_logits, target, cfg.loss.student_temp)
        assert losses[f"ct{n[-1]}"].item() == pytest.approx(want.item(), rel=1e-5)
        moved = before[n] * m + logits.float().mean(dim=0, keepdim=True) * (1 - m)
        torch.testing.assert_close(model.centers[f"{n}_search"].center, moved)


def test_thead_batch_norm_standardises_the_pooled_feature():
    from mokd.models.heads import THead

    torch.manual_seed(0)
    # nearly the same tokens for every sample: the pooled feature barely varies, as in the collapsed runs
    local = torch.randn(1, 16, 24).repeat(8, 1, 1) + 0.01 * torch.randn(8, 16, 24)
    plain = THead(24, 50, (4, 4), dim=32, depth=1, num_heads=4, l2_norm=True)
    normed = THead(24, 50, (4, 4), dim=32, depth=1, num_heads=4, l2_norm=True, use_bn=True)
    normed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        pooled = plain.norm(plain.blocks(plain.proj(local) + plain.pos_embed)).mean(dim=1)
        bn = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + normed.bn.eps)
        torch.testing.assert_close(normed(local), plain.fc(torch.nn.functional.normalize(bn, dim=-1)))
        # across samples the plain head's outputs hardly differ; the normalised head's do
        assert plain(local).std(dim=0).mean() < 0.1 * normed(local).std(dim=0).mean()


def test_thead_temp_scale_sharpens_only_the_t_head_targets(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("loss.thead_temp_scale=0.5")
    model = MOKDModel(cfg)
    temps = {"net1_self": 0.04, "net1_cross": 0.06, "net2_self": 0.04, "net2_cross": 0.06}
    assert model._term_temps(temps, "net1") == pytest.approx({"sm": 0.04, "st": 0.02, "cm": 0.06, "ct": 0.03})
    crops = crops_for(cfg)
    same = MOKDModel(tiny_cfg())
    same.load_state_dict(model.state_dict())
    losses = model(crops, teacher_temp=0.04)
    target = model._search["net1"][0]
    torch.testing.assert_close(target, sharpen(model._search["net1"][1], 0.02))  # not centred: the release's
    plain = same(crops, teacher_temp=0.04)
    assert losses["sm1"].item() == pytest.approx(plain["sm1"].item(), rel=1e-5)
    assert losses["st1"].item() != pytest.approx(plain["st1"].item(), rel=1e-3)
