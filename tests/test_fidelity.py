"""Training as the authors' release trains (docs/fidelity.md), each choice against a hand-built expectation:
position-embedding resampling, trainable last-layer gains, the CNN T-Head's optimiser groups, per-net
teacher-temperature warm-ups, the final learning rates and the ViT-B T-Head width."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from mokd.config import PACKAGE_CONFIGS, NetConfig, load_config
from mokd.errors import UserError
from mokd.models.backbones import create_backbone
from mokd.models.heads import THead
from mokd.models.mokd import NETS, MOKDModel
from mokd.models.pos_embed import pos_resample_of, resample_grid
from mokd.optim import apply_schedules, build_optimizer, build_schedules, param_groups, resolve_optimizer
from mokd.schedules import teacher_temp_schedules
from mokd_eval.loader import load_models
from tests.ckpt_factory import backbone_state, isolated_cache, make_mokd_checkpoint  # noqa: F401


# ------------------------------------------------------------------------------------------------------------
# 1. position embedding: DINO's rule, written out as the bicubic weights it implies


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic-convolution weights of the 4 taps around a source point at fraction t (PyTorch's a = -0.75)."""
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def dino_matrix(big: int, small: int) -> np.ndarray:
    """[small, big] interpolation matrix of the rule scale = (n + 0.1) / N: output i samples the input at
    (i + 0.5) / scale - 0.5 (half-pixel centres, the scale itself, not n / N), taps clamped at the border."""
    scale = (small + 0.1) / big
    m = np.zeros((small, big))
    for i in range(small):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        for tap, w in zip(range(x0 - 1, x0 + 3), cubic_weights(src - x0)):
            m[i, min(max(tap, 0), big - 1)] += w
    return m


def dino_reference(pe: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """pe [1, old*old, C] -> [1, new*new, C] by the hand-built matrix, per channel."""
    grid = pe[0].double().numpy().reshape(old, old, -1)
    m = dino_matrix(old, new)
    out = np.einsum("ih,hwc,jw->ijc", m, grid, m)
    return torch.from_numpy(out.reshape(1, new * new, -1)).float()


@pytest.mark.parametrize("old,new", [(14, 6), (4, 2), (5, 7)])
def test_dino_rule_equals_the_n_plus_0_1_over_n_bicubic(old, new):
    pe = torch.randn(1, old * old, 3, generator=torch.Generator().manual_seed(old))
    got = resample_grid(pe, (old, old), (new, new), "dino")
    assert torch.allclose(got, dino_reference(pe, old, new), atol=1e-5)
    timm_rule = resample_grid(pe, (old, old), (new, new), "timm")
    assert torch.allclose(timm_rule, resample_abs_pos_embed(pe, [new, new], [old, old], num_prefix_tokens=0))
    if old == 14:  # the paper's local crops: the two rules are far apart
        assert (timm_rule - got).norm() / got.norm() > 0.2
    assert resample_grid(pe, (old, old), (old, old), "dino") is pe


def test_vit_backbone_and_t_head_resample_by_the_chosen_rule():
    vit = create_backbone("test_vit", {"img_size": 32, "patch_size": 8}, pos_resample="dino").eval()
    assert pos_resample_of(vit) == "dino"
    pe = vit.pos_embed.detach()
    tokens = vit._pos_embed(torch.zeros(1, 2, 2, vit.embed_dim))  # a 16 px input: 2x2 patches
    assert torch.allclose(tokens[:, :1], vit.cls_token + pe[:, :1])
    assert torch.allclose(tokens[:, 1:], dino_reference(pe[:, 1:], 4, 2), atol=1e-5)
    assert vit(torch.zeros(2, 3, 16, 16)).shape == (2, vit.embed_dim)
    timm_vit = create_backbone("test_vit", {"img_size": 32, "patch_size": 8})
    assert pos_resample_of(timm_vit) == "timm"
    timm_vit.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(vit(x), timm_vit.eval()(x))  # same weights, another embedding at 16 px
        assert torch.allclose(vit(torch.zeros(1, 3, 32, 32)), timm_vit(torch.zeros(1, 3, 32, 32)))

    head = THead(8, 16, (4, 4), dim=8, depth=1, num_heads=2, pos_resample="dino")
    assert torch.allclose(head.pos_embed_for(4), dino_reference(head.pos_embed.detach(), 4, 2), atol=1e-5)
    head.pos_resample = "timm"
    assert torch.allclose(head.pos_embed_for(4), resample_abs_pos_embed(head.pos_embed, [2, 2], [4, 4], 0))


def test_training_uses_each_nets_rule(tiny_cfg):
    model = MOKDModel(tiny_cfg("net2.pos_resample=timm"))
    assert pos_resample_of(model.student["net2"].backbone) == pos_resample_of(model.teacher["net2"].backbone) == "timm"
    assert model.student["net2"].thead.pos_resample == "timm" and model.student["net1"].thead.pos_resample == "dino"
    model = MOKDModel(tiny_cfg())
    assert pos_resample_of(model.teacher["net2"].backbone) == "dino"
    with pytest.raises(UserError, match="net2.pos_resample must be dino or timm"):
        tiny_cfg("net2.pos_resample=nearest")


def test_eval_loads_dino_mocov3_and_mokd_vits_with_the_rule_they_trained_with(tmp_path):
    vit = {"name": "test_vit", "kwargs": {}, "small_stem": False}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone_state(vit, 1).items()},
                "args": argparse.Namespace(arch="test_vit", patch_size=16)}, tmp_path / "dino.pth")
    torch.save(backbone_state(vit, 2), tmp_path / "plain.pth")
    (dino,) = load_models(tmp_path / "dino.pth")
    (plain,) = load_models(tmp_path / "plain.pth", arch="test_vit")
    assert (dino.checkpoint["pos_resample"], pos_resample_of(dino.backbone)) == ("dino", "dino")
    assert (plain.checkpoint["pos_resample"], pos_resample_of(plain.backbone)) == ("timm", "timm")
    (forced,) = load_models(tmp_path / "plain.pth", arch="test_vit", pos_resample="dino")
    assert forced.checkpoint["pos_resample"] == "dino"
    make_mokd_checkpoint(tmp_path / "ours.pth")  # a run from before the setting: timm's rule
    assert [m.checkpoint["pos_resample"] for m in load_models(tmp_path / "ours.pth")] == ["timm", "timm"]
    ckpt = torch.load(tmp_path / "ours.pth", weights_only=True)
    ckpt["config"]["net2"] = {"pos_resample": "dino"}
    torch.save(ckpt, tmp_path / "ours.pth")
    assert [m.checkpoint["pos_resample"] for m in load_models(tmp_path / "ours.pth")] == ["timm", "dino"]
    cnn = {"name": "test_resnet", "kwargs": {}, "small_stem": False}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone_state(cnn, 3).items()},
                "args": argparse.Namespace(arch="test_resnet")}, tmp_path / "dino_rn.pth")
    assert "pos_resample" not in load_models(tmp_path / "dino_rn.pth")[0].checkpoint  # CNNs have none


def test_dino_backbone_only_file_with_pos_resample_dino_gives_the_full_checkpoints_features(tmp_path):
    """DINO's backbone-only release is a plain state dict (timm's rule by default); --pos-resample dino gives it
    the features of DINO's full training checkpoint holding the same weights, at 32 px (issue 28, item 7)."""
    from mokd_eval.features import forward_features

    vit = {"name": "test_vit", "kwargs": {}, "small_stem": False}  # 160 px, patch 16: a 10x10 grid, 2x2 at 32 px
    sd = backbone_state(vit, 5)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "student": {},
                "args": argparse.Namespace(arch="test_vit", patch_size=16)}, tmp_path / "full.pth")
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    (full,) = load_models(tmp_path / "full.pth")
    (plain,) = load_models(tmp_path / "dino_deitsmall16_pretrain.pth", arch="test_vit")
    (asked,) = load_models(tmp_path / "dino_deitsmall16_pretrain.pth", arch="test_vit", pos_resample="dino")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b, c = (forward_features(m.backbone, x) for m in (full, plain, asked))
    assert torch.equal(a, c)
    assert (a - b).norm() / a.norm() > 1e-3  # the default for a plain file (timm's rule) differs: the fault
    assert [m.checkpoint["pos_resample"] for m in (full, plain, asked)] == ["dino", "timm", "dino"]
    # the load report says which rule and why, whenever a ViT is resampled
    assert any("away from 160 px (10x10 grid) by DINO's rule" in n and "the rule DINO trained with" in n
               for n in full.report.notes)
    assert any("by timm's rule" in n and "--pos-resample dino for them" in n for n in plain.report.notes)
    assert any("by DINO's rule" in n and ": --pos-resample dino" in n for n in asked.report.notes)


def test_every_command_that_loads_a_checkpoint_takes_pos_resample(tmp_path):
    import click
    from click.testing import CliRunner

    from mokd.cli import cli

    ctx = click.Context(cli)
    loaders = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        subs = [(f"{name} {n}", cmd.get_command(ctx, n)) for n in cmd.list_commands(ctx)] \
            if isinstance(cmd, click.Group) else [(name, cmd)]
        for full_name, sub in subs:
            params = {p.name for p in sub.params}
            if params & {"checkpoint", "checkpoints", "ckpt_a", "sources"}:
                loaders.append(full_name)
                assert "pos_resample" in params, full_name
    assert {"export", "eval knn", "eval linear", "analyze consistency", "analyze mad", "bench"} <= set(loaders)

    torch.save(backbone_state({"name": "test_vit", "kwargs": {}, "small_stem": False}, 6), tmp_path / "vit.pth")
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "vit.pth"), "--arch", "test_vit", "--pos-resample",
                                   "dino", "--to", "timm", str(tmp_path / "vit.safetensors")])
    assert res.exit_code == 0, res.output
    assert "note: position embedding resampled away from 160 px (10x10 grid) by DINO's rule" in res.output
    assert "--pos-resample dino" in res.output


# ------------------------------------------------------------------------------------------------------------
# 2. last-layer weight-norm gains


def gains(model: MOKDModel, branch: str = "student") -> dict[tuple[str, str], bool]:
    """(net, head) -> requires_grad of that head's weight-norm gain."""
    out = {}
    for n in NETS:
        b = getattr(model, branch)[n]
        out[(n, "mlp")] = b.mlp_head.last_layer.parametrizations.weight.original0.requires_grad
        out[(n, "thead")] = b.thead.fc.parametrizations.weight.original0.requires_grad
    return out


def test_release_gains_cnn_mlp_frozen_vit_mlp_and_t_heads_trained(tiny_cfg):
    model = MOKDModel(tiny_cfg())  # net1: a CNN, net2: a ViT
    assert gains(model) == {("net1", "mlp"): False, ("net1", "thead"): True,
                            ("net2", "mlp"): True, ("net2", "thead"): True}
    assert not any(gains(model, "teacher").values())
    cfg = tiny_cfg()
    settings = resolve_optimizer(cfg.net2, vit=True)
    in_opt = {id(p) for g in build_optimizer(model.student["net2"], settings, cfg.optim).param_groups
              for p in g["params"]}
    assert id(model.student["net2"].mlp_head.last_layer.parametrizations.weight.original0) in in_opt
    settings = resolve_optimizer(cfg.net1, vit=False)
    in_opt = {id(p) for g in build_optimizer(model.student["net1"], settings, cfg.optim).param_groups
              for p in g["params"]}
    assert id(model.student["net1"].mlp_head.last_layer.parametrizations.weight.original0) not in in_opt


def test_gains_per_net_and_per_head_and_the_single_legacy_key(tiny_cfg):
    model = MOKDModel(tiny_cfg("head.norm_last_layer=true"))  # the old single switch: every head frozen
    assert not any(gains(model).values())
    model = MOKDModel(tiny_cfg("head.norm_last_layer=true", "net2.norm_last_layer_thead=false",
                               "net1.norm_last_layer_mlp=false"))  # a net's own key wins over it
    assert gains(model) == {("net1", "mlp"): True, ("net1", "thead"): False,
                            ("net2", "mlp"): False, ("net2", "thead"): True}
    model = MOKDModel(tiny_cfg("net1.norm_last_layer_thead=true", "net2.norm_last_layer_mlp=true"))
    assert gains(model) == {("net1", "mlp"): False, ("net1", "thead"): False,
                            ("net2", "mlp"): False, ("net2", "thead"): True}


# ------------------------------------------------------------------------------------------------------------
# 3. the CNN's T-Head parameter groups


def groups_by_tag(module, decay_all: bool) -> dict[tuple[str, bool], set[int]]:
    return {(g["tag"], g["apply_wd"]): {id(p) for p in g["params"]} for g in param_groups(module, decay_all)}


def test_cnn_t_head_decays_everything_by_default_and_splits_on_request(tiny_cfg):
    cfg = tiny_cfg()
    model = MOKDModel(cfg)
    cnn, vit = model.student["net1"], model.student["net2"]
    thead = {name: p for name, p in cnn.thead.named_parameters() if p.requires_grad}
    flat = {name for name, p in thead.items() if p.ndim <= 1 or name.endswith(".bias")}
    assert {"norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= flat  # LayerNorm and biases are there
    settings = resolve_optimizer(cfg.net1, vit=False)
    assert settings["thead_decay_all"]
    groups = groups_by_tag(cnn, settings["thead_decay_all"])
    assert groups[("thead", True)] == {id(p) for p in thead.values()} and ("thead", False) not in groups
    main_flat = {id(p) for name, p in cnn.named_parameters()
                 if not name.startswith("thead.") and p.requires_grad and (p.ndim <= 1 or name.endswith(".bias"))}
    assert groups[("main", False)] == main_flat  # the backbone and MLP head keep biases and norms undecayed

    split = groups_by_tag(cnn, resolve_optimizer(NetConfig(thead_decay="weights"), vit=False)["thead_decay_all"])
    assert split[("thead", False)] == {id(thead[n]) for n in flat}
    assert split[("thead", True)] == {id(p) for n, p in thead.items() if n not in flat}
    assert not resolve_optimizer(cfg.net2, vit=True)["thead_decay_all"]  # the ViT's T-Head: weights only
    vit_groups = groups_by_tag(vit, False)
    assert all(p.ndim > 1 for p in vit.thead.parameters() if id(p) in vit_groups[("thead", True)])

    # The schedules the step applies: the CNN T-Head's whole group on the ViT's lr and weight decay.
    opt = build_optimizer(cnn, settings, cfg.optim)
    sched = build_schedules(settings, cfg.net1, cfg.optim, steps_per_epoch=3)
    last = len(sched.lr) - 1
    apply_schedules(opt, sched, last)
    g = next(g for g in opt.param_groups if g["tag"] == "thead")
    assert g["lr"] == pytest.approx(sched.thead_lr[last]) and g["weight_decay"] == pytest.approx(sched.thead_wd[last])
    assert sched.thead_wd[0] == pytest.approx(0.04) and sched.wd[0] == pytest.approx(1e-4)
    with pytest.raises(UserError, match="net1.thead_decay must be auto, all or weights"):
        tiny_cfg("net1.thead_decay=biases")


# ------------------------------------------------------------------------------------------------------------
# 4. teacher-temperature warm-up per net and per term group


def test_r50_vits16_warms_the_cnns_self_terms_over_50_epochs_and_the_rest_over_30():
    cfg = load_config("mokd_r50_vits16")
    s = teacher_temp_schedules(cfg, steps_per_epoch=2)
    assert set(s) == {"net1_self", "net1_cross", "net2_self", "net2_cross"}
    at = {k: (lambda e, v=v: v[2 * e + 1]) for k, v in s.items()}  # last step of epoch e
    for key, warmup in (("net1_self", 50), ("net1_cross", 30), ("net2_self", 30), ("net2_cross", 30)):
        assert at[key](0) == pytest.approx(0.04) and s[key][0] == pytest.approx(0.04)
        assert at[key](warmup - 2) == pytest.approx(0.04 + 0.03 * (warmup - 2) / (warmup - 1))
        assert at[key](warmup - 1) == pytest.approx(0.07) and at[key](99) == pytest.approx(0.07)
    short = teacher_temp_schedules(load_config("mokd_r50_vits16", ["optim.epochs=10"]), 1)
    assert short["net1_self"][-1] == pytest.approx(0.07) and short["net1_self"][8] < 0.07  # shortened to the run


def test_per_term_temperatures_reach_the_right_terms(tiny_cfg):
    from mokd.losses import dino_cross_entropy, paired_cross_entropy, sharpen
    from tests.test_model import crops_for

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MOKDModel(cfg)
    crops = crops_for(cfg)
    for c in model.centers.values():
        c.center.normal_()
    centers = {k: c.center.clone() for k, c in model.centers.items()}

    def run(temp):
        for k, c in model.centers.items():
            c.center.copy_(centers[k])
        return model(crops, temp)

    same = run({"net1_self": 0.05, "net1_cross": 0.05, "net2_self": 0.05, "net2_cross": 0.05})
    plain = run(0.05)
    assert all(torch.equal(same[k], plain[k]) for k in plain)  # equal lengths: the maths of one schedule
    temps = {"net1_self": 0.04, "net1_cross": 0.06, "net2_self": 0.05, "net2_cross": 0.07}
    got = run(temps)
    with torch.no_grad():
        s = {n: model.student[n](crops) for n in NETS}
        t = {n: model.teacher[n](crops[:2]) for n in NETS}
    V, tau = len(crops), cfg.loss.student_temp
    for i, j in (("net1", "net2"), ("net2", "net1")):
        k, own, cross = i[-1], temps[f"{i}_self"], temps[f"{i}_cross"]
        expect = {
            f"sm{k}": dino_cross_entropy(s[i].mlp, sharpen(t[i].mlp, own, centers[f"{i}_mlp"]), tau, V, 2),
            f"st{k}": dino_cross_entropy(s[i].thead, sharpen(t[i].thead, own, centers[f"{i}_thead"]), tau, V, 2),
            f"cm{k}": dino_cross_entropy(s[i].mlp, sharpen(t[j].mlp, cross, centers[f"{j}_mlp"]), tau, V, 2),
        }
        q = model.student[i].thead.query(torch.cat([s[i].query_feature(v) for v in range(2, V)]))
        target = sharpen(model.teacher[j].thead(t[j].local[0].repeat(V - 2, 1, 1), query=q), cross)
        expect[f"ct{k}"] = paired_cross_entropy(torch.cat(s[i].thead.chunk(V)[2:]), target, tau)
        for term, value in expect.items():
            assert got[term].item() == pytest.approx(value.item(), rel=1e-5), term


# ------------------------------------------------------------------------------------------------------------
# 5. final learning rates, 6. T-Head width with ViT-B


def cosine_end(base: float, final: float, steps: int) -> float:
    """The value of DINO's cosine at its last step (it approaches `final` one step after the end)."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (steps - 1) / steps))


def test_r50_vits16_lr_schedules_end_where_the_release_ends_them():
    cfg = load_config("mokd_r50_vits16")
    spe, cosine_steps = 3, (100 - 10) * 3
    cnn = build_schedules(resolve_optimizer(cfg.net1, vit=False), cfg.net1, cfg.optim, spe)
    vit = build_schedules(resolve_optimizer(cfg.net2, vit=True), cfg.net2, cfg.optim, spe)
    assert cnn.lr[10 * spe] == pytest.approx(0.1) and vit.lr[10 * spe] == pytest.approx(3e-4)
    assert cnn.lr[-1] == pytest.approx(cosine_end(0.1, 0.0048, cosine_steps))
    assert cnn.thead_lr[-1] == pytest.approx(cosine_end(3e-4, 1e-5, cosine_steps))
    assert vit.lr[-1] == pytest.approx(cosine_end(3e-4, 1e-5, cosine_steps))
    assert vit.thead_lr[-1] == pytest.approx(cosine_end(3e-4, 1e-5, cosine_steps))
    # Our defaults, for configs that name no final lr: 0.016 x lr for SGD (DINO's R50), 1e-6 for AdamW.
    assert resolve_optimizer(NetConfig(), vit=False)["min_lr"] == pytest.approx(0.0016)
    assert resolve_optimizer(NetConfig(), vit=True)["min_lr"] == pytest.approx(1e-6)


@pytest.mark.parametrize("path", sorted(PACKAGE_CONFIGS.glob("mokd_*.yaml")), ids=lambda p: p.stem)
def test_every_release_config_ends_each_kind_where_the_release_does(path):
    cfg = load_config(path)
    for n in NETS:
        net = getattr(cfg, n)
        vit = net.arch.startswith("vit_")
        s = resolve_optimizer(net, vit=vit)
        assert (s["min_lr"], s["thead"]["min_lr"]) == pytest.approx((1e-5, 1e-5) if vit else (0.0048, 1e-5))
        assert (net.warmup_teacher_temp_epochs or cfg.loss.warmup_teacher_temp_epochs) == (30 if vit else 50)
        assert (net.warmup_teacher_temp_epochs_cross or cfg.loss.warmup_teacher_temp_epochs) == 30
    if "vit_base_patch16_224" in (cfg.net1.arch, cfg.net2.arch):
        assert (cfg.thead.dim, cfg.thead.num_heads) == (768, 6)
    text = path.read_text()
    assert "docs/fidelity.md" in text


# ------------------------------------------------------------------------------------------------------------
# found in the release besides: local crops are blurred by DINO's 0.1-2 px, as the global ones


def test_local_crops_blur_by_the_global_crops_radius_as_the_release():
    from mokd.augment import GaussianBlur, MultiCrop
    from mokd.config import AugmentConfig

    def radii(compose):
        (b,) = [t for t in compose.transforms if isinstance(t, GaussianBlur)]
        return b.lo, b.hi

    release = MultiCrop(AugmentConfig(global_size=224, local_size=96))
    assert radii(release.local) == pytest.approx((0.1, 2.0)) and radii(release.global1) == pytest.approx((0.1, 2.0))
    own = MultiCrop(AugmentConfig(global_size=224, local_size=96, blur_scale="crop"))
    assert radii(own.local) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))
    small = MultiCrop(AugmentConfig(global_size=32, local_size=16))
    assert radii(small.local) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
