"""MOKDModel: which parameters learn from which term, the EMA, and the terms against the equations."""

import pytest
import torch

from mokd.losses import dino_cross_entropy, paired_cross_entropy, sharpen
from mokd.models.mokd import NETS, MOKDModel


def crops_for(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    return [torch.randn(batch, 3, a.global_size, a.global_size, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, a.local_size, a.local_size, generator=g) for _ in range(a.local_crops)]


@pytest.fixture
def model_and_crops(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return MOKDModel(cfg), crops_for(cfg), cfg


def test_all_eight_terms_and_gradients(model_and_crops):
    model, crops, _ = model_and_crops
    losses = model(crops, teacher_temp=0.04)
    assert set(losses) == {f"{t}{k}" for t in ("sm", "st", "cm", "ct") for k in "12"}
    totals = model.total_losses(losses)
    (totals["loss1"] + totals["loss2"]).backward()
    for n in NETS:
        for name, p in model.student[n].named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"student.{n}.{name} has no gradient"
        for name, p in model.teacher[n].named_parameters():
            assert not p.requires_grad and p.grad is None, f"teacher.{n}.{name} got a gradient"


@pytest.mark.parametrize("term", ["cm1", "ct1"])
def test_cross_terms_of_model_1_send_no_gradient_into_model_2(model_and_crops, term):
    model, crops, _ = model_and_crops
    losses = model(crops, teacher_temp=0.04)
    losses[term].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student["net1"].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student["net2"].parameters())


def test_terms_match_the_equations(model_and_crops):
    """Recompute L_sm, L_st, L_cm, L_ct of both models from the branches' outputs, with non-zero centres."""
    model, crops, cfg = model_and_crops
    model.train()
    for c in model.centers.values():
        c.center.normal_()
    centers = {k: c.center.clone() for k, c in model.centers.items()}
    torch.manual_seed(1)
    losses = model(crops, teacher_temp=0.05)
    torch.manual_seed(1)
    s = {n: model.student[n](crops) for n in NETS}
    with torch.no_grad():
        t = {n: model.teacher[n](crops[:2]) for n in NETS}
    V, tau = len(crops), cfg.loss.student_temp
    for i, j in (("net1", "net2"), ("net2", "net1")):
        k = i[-1]
        own_mlp = sharpen(t[i].mlp, 0.05, centers[f"{i}_mlp"])
        other_mlp = sharpen(t[j].mlp, 0.05, centers[f"{j}_mlp"])
        own_thead = sharpen(t[i].thead, 0.05, centers[f"{i}_thead"])
        assert losses[f"sm{k}"].item() == pytest.approx(dino_cross_entropy(s[i].mlp, own_mlp, tau, V, 2).item(), rel=1e-4)
        assert losses[f"cm{k}"].item() == pytest.approx(dino_cross_entropy(s[i].mlp, other_mlp, tau, V, 2).item(), rel=1e-4)
        assert losses[f"st{k}"].item() == pytest.approx(dino_cross_entropy(s[i].thead, own_thead, tau, V, 2).item(), rel=1e-4)
        # L_ct, official choice: every local crop v of student i queries teacher j's global view 1.
        terms = []
        for v in range(2, V):
            feat = s[i].local[v].mean(1) if not s[i].is_vit else s[i].glob[v]
            with torch.no_grad():
                q = model.student[i].thead.query(feat)
                target = sharpen(model.teacher[j].thead(t[j].local[0], query=q), 0.05)
            terms.append(paired_cross_entropy(s[i].thead.chunk(V)[v], target, tau))
        assert losses[f"ct{k}"].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)
    totals = model.total_losses(losses)
    lam = cfg.net2.lam
    assert totals["loss2"].item() == pytest.approx(
        (losses["sm2"] + losses["st2"] + lam * (losses["cm2"] + losses["ct2"])).item(), rel=1e-6)


def test_ct_global_views_follow_algorithm_1(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("loss.ct_views=global", "augment.local_crops=0")
    model = MOKDModel(cfg)
    crops = crops_for(cfg)
    losses = model(crops, 0.04)
    s = model.student["net1"](crops)
    with torch.no_grad():
        t2 = model.teacher["net2"](crops)
        # query from view a, keys from the other view b, target for student view a (and symmetrically)
        q = model.student["net1"].thead.query(torch.cat([s.local[0].mean(1), s.local[1].mean(1)]))
        target = sharpen(model.teacher["net2"].thead(torch.cat([t2.local[1], t2.local[0]]), query=q), 0.04)
    assert losses["ct1"].item() == pytest.approx(paired_cross_entropy(s.thead, target, 0.1).item(), rel=1e-4)


def test_independent_mode_is_two_plain_dino_runs(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("loss.mode=independent")
    model = MOKDModel(cfg)
    assert all(model.student[n].thead is None for n in NETS)
    crops = crops_for(cfg)
    losses = model(crops, 0.04)
    assert set(losses) == {"sm1", "sm2"}
    for n in NETS:
        # Plain DINO: backbone on the global crops together, then on the local crops together (DINO's
        # multi-crop wrapper), MLP head on all of them; the teacher on the 2 global crops, centred at 0.
        student, teacher = model.student[n], model.teacher[n]
        # the head sees every crop's feature at once, as DINO's wrapper runs it (its BatchNorm, head.use_bn, too)
        logits = student.mlp_head(torch.cat([student.backbone(torch.cat(crops[:2])),
                                             student.backbone(torch.cat(crops[2:]))]))
        with torch.no_grad():
            t_logits = teacher.mlp_head(teacher.backbone(torch.cat(crops[:2])))
        expected = dino_cross_entropy(logits, torch.softmax(t_logits / 0.04, -1), 0.1, len(crops), 2)
        assert losses[f"sm{n[-1]}"].item() == pytest.approx(expected.item(), rel=1e-4)
        totals = model.total_losses(losses)
        assert totals[f"loss{n[-1]}"] is losses[f"sm{n[-1]}"] or \
            totals[f"loss{n[-1]}"].item() == losses[f"sm{n[-1]}"].item()


def test_ema_update(model_and_crops):
    model, _, _ = model_and_crops
    with torch.no_grad():
        for p in model.student["net1"].parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in model.teacher["net1"].parameters()]
    student = [p.clone() for p in model.student["net1"].parameters()]
    before_t2 = [p.clone() for p in model.teacher["net2"].parameters()]
    model.update_teachers({"net1": 0.9, "net2": 1.0})
    for t0, s, t1 in zip(before_t, student, model.teacher["net1"].parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)
    for t0, t1 in zip(before_t2, model.teacher["net2"].parameters()):
        assert torch.equal(t0, t1)


def test_switching_terms_off(tiny_cfg):
    cfg = tiny_cfg("loss.ct=false", "loss.st=false")
    model = MOKDModel(cfg)
    losses = model(crops_for(cfg), 0.04)
    assert set(losses) == {"sm1", "cm1", "sm2", "cm2"}
    assert model.student["net1"].thead is None


def test_thead_l2_norm_bounds_its_logits_as_the_mlp_head_does():
    from mokd.models.heads import THead

    torch.manual_seed(0)
    local = 3 * torch.randn(4, 16, 24)
    plain = THead(24, 50, (4, 4), dim=32, depth=1, num_heads=4)
    normed = THead(24, 50, (4, 4), dim=32, depth=1, num_heads=4, l2_norm=True)
    normed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        pooled = plain.norm(plain.blocks(plain.proj(local) + plain.pos_embed)).mean(dim=1)
        torch.testing.assert_close(plain(local), plain.fc(pooled))  # the release's head: the pooled feature as is
        torch.testing.assert_close(normed(local), plain.fc(torch.nn.functional.normalize(pooled, dim=-1)))
        assert normed(local).abs().max() <= 1 + 1e-5  # unit feature, unit-norm rows, gain 1
        assert pooled.norm(dim=-1).min() > 1  # what the release feeds its last layer is not a unit vector


def test_st_and_ct_weights_scale_their_terms(model_and_crops):
    """L_i = L_sm + w_st L_st + lambda_i (L_cm + w_ct L_ct): the weights touch only their own terms."""
    model, crops, cfg = model_and_crops
    losses = model(crops, teacher_temp=0.04)
    cfg.loss.st_weight, cfg.loss.ct_weight = 0.25, 3.0
    totals = model.total_losses(losses)
    for n in NETS:
        k, lam = n[-1], getattr(cfg, n).lam
        want = losses[f"sm{k}"] + 0.25 * losses[f"st{k}"] + lam * (losses[f"cm{k}"] + 3.0 * losses[f"ct{k}"])
        assert totals[f"loss{k}"].item() == pytest.approx(want.item(), rel=1e-6)
