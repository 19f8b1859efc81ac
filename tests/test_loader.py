"""Loader: every supported layout is detected and loads the exact weights; bad files give clear errors."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner

from mokd.cli import cli
from mokd.errors import UserError
from mokd_eval.formats import FORMATS, detect
from mokd_eval.loader import load_models
from tests.ckpt_factory import RESNET, backbone_state, isolated_cache, make_mokd_checkpoint  # noqa: F401

VIT = {"name": "test_vit", "kwargs": {}, "small_stem": False}  # default 160 px: third-party files name no kwargs


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def test_mokd_default_loads_both_teachers(tmp_path):
    states = make_mokd_checkpoint(tmp_path / "ours.pth")
    models = load_models(tmp_path / "ours.pth")
    assert [m.label for m in models] == ["net1-teacher", "net2-teacher"]
    for m, net in zip(models, ("net1", "net2")):
        assert_same_weights(m.backbone, states[(net, "teacher")])
        assert m.checkpoint["format"] == "mokd" and m.checkpoint["mode"] == "mokd"
        assert m.checkpoint["pair"] == "test_vit [patch 8, 32 px]+test_vit [patch 4, 32 px]" and m.image_size == 32
        assert m.report.complete and m.report.ignored == ["mlp_head.mlp.0.weight"]
        assert not m.backbone.training
    assert len(models[0].checkpoint["sha256"]) == 64


def test_mokd_model_and_branch(tmp_path):
    states = make_mokd_checkpoint(tmp_path / "ours.pth", net1=RESNET)
    (m,) = load_models(tmp_path / "ours.pth", model="net1", branch="student")
    assert m.label == "net1-student" and m.arch["name"] == "test_resnet"
    assert_same_weights(m.backbone, states[("net1", "student")])
    with pytest.raises(UserError, match="net1, net2"):
        load_models(tmp_path / "ours.pth", model="net3")


def test_official_mokd_release(tmp_path):
    cnn, vit = backbone_state(RESNET, 1), backbone_state(VIT, 2)
    torch.save({"teacher_cnn": {**prefixed(cnn, "module.backbone."), "module.head.last.weight": torch.ones(2)},
                "teacher_vit": {**prefixed(vit, "backbone."), "head.mlp.0.weight": torch.ones(2)},
                "student_cnn": prefixed(backbone_state(RESNET, 3), "module.backbone."), "epoch": 100},
               tmp_path / "official.pth")
    obj = torch.load(tmp_path / "official.pth", weights_only=True)
    assert detect(obj) == "mokd-official"
    models = load_models(tmp_path / "official.pth", arch="test_resnet,test_vit")
    assert [m.checkpoint["model"] for m in models] == ["cnn", "vit"]
    assert_same_weights(models[0].backbone, cnn)
    assert_same_weights(models[1].backbone, vit)
    (only_vit,) = load_models(tmp_path / "official.pth", arch="test_vit")  # the fitting sub-dict is picked
    assert_same_weights(only_vit.backbone, vit)
    with pytest.raises(UserError, match="--arch"):
        load_models(tmp_path / "official.pth")


def test_dino_training_checkpoint(tmp_path):
    teacher, student = backbone_state(VIT, 1), backbone_state(VIT, 2)
    torch.save({"teacher": {**prefixed(teacher, "backbone."), "head.last_layer.weight_g": torch.ones(3)},
                "student": {**prefixed(student, "module.backbone."), "module.head.mlp.0.bias": torch.ones(3)},
                "args": argparse.Namespace(arch="test_vit", patch_size=16), "epoch": 10},
               tmp_path / "dino.pth")
    (m,) = load_models(tmp_path / "dino.pth")  # arch taken from args, Namespace read with weights_only
    assert m.checkpoint["format"] == "dino" and m.checkpoint["branch"] == "teacher"
    assert_same_weights(m.backbone, teacher)
    assert "head.last_layer.weight_g" in m.report.ignored
    (s,) = load_models(tmp_path / "dino.pth", branch="student", arch="test_vit")
    assert_same_weights(s.backbone, student)


def test_dino_backbone_only_release_is_a_timm_state_dict(tmp_path):
    sd = backbone_state(VIT, 4)
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    (m,) = load_models(tmp_path / "dino_deitsmall16_pretrain.pth", arch="test_vit")
    assert m.checkpoint["format"] == "timm"
    assert_same_weights(m.backbone, sd)


def test_mocov3(tmp_path):
    base, momentum = backbone_state(VIT, 1), backbone_state(VIT, 2)
    sd = {**prefixed(base, "module.base_encoder."), **prefixed(momentum, "module.momentum_encoder."),
          "module.base_encoder.head.0.weight": torch.ones(2, 2), "module.predictor.0.weight": torch.ones(2)}
    torch.save({"epoch": 300, "arch": "test_vit", "state_dict": sd, "optimizer": {}}, tmp_path / "mocov3.pth.tar")
    (m,) = load_models(tmp_path / "mocov3.pth.tar")
    assert m.checkpoint["format"] == "mocov3"
    assert_same_weights(m.backbone, base)
    assert "head.0.weight" in m.report.ignored
    (t,) = load_models(tmp_path / "mocov3.pth.tar", branch="teacher")
    assert_same_weights(t.backbone, momentum)
    torch.save(sd, tmp_path / "mocov3_flat.pth")  # the same weights without the training wrapper
    (f,) = load_models(tmp_path / "mocov3_flat.pth", arch="test_vit")
    assert f.checkpoint["format"] == "mocov3"
    assert_same_weights(f.backbone, base)


def test_mocov2(tmp_path):
    q = backbone_state({"name": "resnet18", "kwargs": {}, "small_stem": False}, 1)
    sd = {**prefixed(q, "module.encoder_q."), "module.encoder_q.fc.0.weight": torch.ones(2, 2),
          **prefixed(backbone_state({"name": "resnet18", "kwargs": {}, "small_stem": False}, 2), "module.encoder_k."),
          "module.queue": torch.zeros(8, 4), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco_v2_200ep.pth.tar")
    (m,) = load_models(tmp_path / "moco_v2_200ep.pth.tar")
    assert m.checkpoint["format"] == "mocov2" and m.arch["name"] == "resnet18"
    assert_same_weights(m.backbone, q)


def test_solo_learn(tmp_path):
    bb = backbone_state(RESNET, 1)
    sd = {**prefixed(bb, "backbone."), "projector.0.weight": torch.ones(2, 2),
          **prefixed(backbone_state(RESNET, 2), "momentum_backbone.")}
    torch.save({"state_dict": sd, "epoch": 400, "global_step": 10}, tmp_path / "byol-solo.ckpt")
    (m,) = load_models(tmp_path / "byol-solo.ckpt", arch="test_resnet")
    assert m.checkpoint["format"] == "solo-learn"
    assert_same_weights(m.backbone, bb)


def test_swav_style_module_prefix(tmp_path):
    bb = backbone_state(RESNET, 1)
    torch.save({**prefixed(bb, "module."), "module.projection_head.0.weight": torch.ones(2, 2),
                "module.prototypes.weight": torch.ones(3, 2)}, tmp_path / "swav_800ep_pretrain.pth.tar")
    (m,) = load_models(tmp_path / "swav_800ep_pretrain.pth.tar", arch="test_resnet")
    assert m.checkpoint["format"] == "module"
    assert_same_weights(m.backbone, bb)
    assert sorted(m.report.ignored) == ["projection_head.0.weight", "prototypes.weight"]


def test_torchvision_resnet_maps_one_to_one_to_timm(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18-tv.pth")
    (m,) = load_models(tmp_path / "resnet18-tv.pth", arch="resnet18")
    assert m.checkpoint["format"] == "torchvision"
    assert_same_weights(m.backbone, {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    assert sorted(m.report.ignored) == ["fc.bias", "fc.weight"]
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), tv(x))  # same keys and the same computation


def test_timm_state_dict_and_classifier_ignored(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("test_vit", num_classes=5)
    torch.save({"model": full.state_dict()}, tmp_path / "deit_style.pth")  # DeiT/timm releases wrap in "model"
    (m,) = load_models(tmp_path / "deit_style.pth", arch="test_vit")
    assert m.checkpoint["format"] == "timm"
    assert_same_weights(m.backbone, {k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    assert sorted(m.report.ignored) == ["head.bias", "head.weight"]


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = backbone_state(RESNET, 5)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (m,) = load_models(tmp_path / "model.safetensors", arch="test_resnet")
    assert m.checkpoint["format"] == "safetensors"
    assert_same_weights(m.backbone, sd)


def test_key_selects_sub_dict_or_prefix(tmp_path):
    sd = backbone_state(RESNET, 6)
    torch.save({"weights": {"ema": prefixed(sd, "module.")}, "misc": 1}, tmp_path / "odd.pth")
    assert detect(torch.load(tmp_path / "odd.pth", weights_only=True)) is None
    (m,) = load_models(tmp_path / "odd.pth", key="weights.ema", arch="test_resnet")
    assert_same_weights(m.backbone, sd)
    torch.save({**prefixed(sd, "net.encoder."), **prefixed(backbone_state(RESNET, 7), "net.target.")},
               tmp_path / "prefixed.pth")
    (p,) = load_models(tmp_path / "prefixed.pth", key="net.encoder", arch="test_resnet")
    assert_same_weights(p.backbone, sd)
    with pytest.raises(UserError, match="top-level keys"):
        load_models(tmp_path / "odd.pth", key="nothing", arch="test_resnet")


def test_every_format_has_a_test():
    tested = {"mokd", "mokd-official", "dino", "mocov3", "mocov2", "solo-learn", "module", "torchvision", "timm"}
    assert set(FORMATS) == tested


# --------------------------------------------------------------------------------------------------------------
# bad input


def test_partial_match_is_an_error_unless_allowed(tmp_path):
    sd = backbone_state(RESNET, 1)
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="layer1.0.conv1.weight"):
        load_models(tmp_path / "partial.pth", arch="test_resnet")
    (m,) = load_models(tmp_path / "partial.pth", arch="test_resnet", allow_partial=True)
    assert m.report.missing == ["layer1.0.conv1.weight"] and m.report.notes


def run_cli(*args):
    result = CliRunner().invoke(cli, ["eval", "knn", *map(str, args)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    return result.output


def test_cli_missing_checkpoint(tmp_path):
    assert "does not exist" in run_cli(tmp_path / "nope.pth")


def test_cli_truncated_and_empty_checkpoint(tmp_path):
    torch.save(backbone_state(RESNET, 1), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in run_cli(tmp_path / "cut.pth", "--arch", "test_resnet")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in run_cli(tmp_path / "empty.pth", "--arch", "test_resnet")


def test_cli_unknown_format_lists_keys_and_formats(tmp_path):
    torch.save({"encoder_weights": {"a": 1}, "step": 3}, tmp_path / "strange.pth")
    out = run_cli(tmp_path / "strange.pth")
    assert "encoder_weights, step" in out and "mocov3" in out and "--key" in out


def test_cli_arch_mismatch(tmp_path):
    torch.save(backbone_state(RESNET, 1), tmp_path / "r.pth")
    out = run_cli(tmp_path / "r.pth", "--arch", "test_vit")
    assert "does not fit architecture 'test_vit'" in out and "ResNet" in out


def test_cli_missing_arch_and_unknown_arch(tmp_path):
    torch.save(backbone_state(RESNET, 1), tmp_path / "r.pth")
    assert "--arch" in run_cli(tmp_path / "r.pth")
    assert "resnet50" in run_cli(tmp_path / "r.pth", "--arch", "resnet5O")  # close timm names suggested


# --------------------------------------------------------------------------------------------------------------
# the file's own architecture against --arch / --arch-kwargs (issue 13, item 1)


def zeros_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """Correctly shaped zero weights (no init cost) for a timm model."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(name, num_classes=0, **kwargs).state_dict().items()}
    return {k: torch.zeros(s) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def mocov3_vits(tmp_path_factory):
    """A MoCo v3 ViT-S file as main_moco.py writes it (arch 'vit_small', 12 heads), and the same without arch."""
    folder = tmp_path_factory.mktemp("mocov3")
    sd = prefixed(zeros_state("vit_small_patch16_224"), "module.base_encoder.")
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, folder / "vit-s-300ep.pth.tar")
    torch.save({"state_dict": sd}, folder / "noarch.pth.tar")
    return folder


def heads(m) -> int:
    return m.backbone.blocks[0].attn.num_heads


@pytest.mark.slow  # builds a real ViT-S three times
def test_mocov3_vit_small_keeps_its_12_heads(mocov3_vits):
    (m,) = load_models(mocov3_vits / "vit-s-300ep.pth.tar")
    assert m.arch["name"] == "vit_small_patch16_224" and heads(m) == 12
    (m,) = load_models(mocov3_vits / "vit-s-300ep.pth.tar", arch="vit_small_patch16_224")  # the README's flag
    assert heads(m) == 12 and m.checkpoint["arch_kwargs"] == {"num_heads": 12}
    assert any("num_heads=12" in n and "MoCo v3" in n for n in m.report.notes)
    (m,) = load_models(mocov3_vits / "noarch.pth.tar", arch="vit_small_patch16_224")  # convention, no arch stored
    assert heads(m) == 12 and any("MoCo v3" in n for n in m.report.notes)


def test_mocov3_contradicting_heads_is_refused_naming_both(mocov3_vits):
    with pytest.raises(UserError) as e:
        load_models(mocov3_vits / "vit-s-300ep.pth.tar", arch="vit_small_patch16_224", arch_kwargs={"num_heads": 6})
    msg = str(e.value)
    assert "num_heads=12" in msg and "num_heads=6" in msg and "'vit_small'" in msg and "heads 6 vs 12" in msg


def test_vit_heads_note_says_where_they_come_from(tmp_path):
    torch.save(backbone_state(VIT, 1), tmp_path / "v.pth")
    (m,) = load_models(tmp_path / "v.pth", arch="test_vit")
    assert any(n.startswith("num_heads=2 (timm's default for test_vit)") for n in m.report.notes)
    (m,) = load_models(tmp_path / "v.pth", arch="test_vit", arch_kwargs={"num_heads": 4})  # no file arch: user's
    assert heads(m) == 4 and any("from --arch-kwargs" in n for n in m.report.notes)


def test_dino_args_contradicted_by_arch_or_kwargs(tmp_path):
    torch.save({"teacher": prefixed(backbone_state(VIT, 1), "backbone."),
                "args": argparse.Namespace(arch="test_vit", patch_size=16)}, tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"--arch test_resnet contradicts the file: its args.arch 'test_vit'"):
        load_models(tmp_path / "dino.pth", arch="test_resnet")
    with pytest.raises(UserError, match="attention heads 4 vs 2"):
        load_models(tmp_path / "dino.pth", arch_kwargs={"num_heads": 4})
    (m,) = load_models(tmp_path / "dino.pth", arch="test_vit", arch_kwargs={"num_heads": 2})  # agrees: fine
    assert heads(m) == 2


def test_mokd_checkpoint_arch_flags_are_checked_not_ignored(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth", net1=RESNET)
    with pytest.raises(UserError, match="contradicts the file: its arch.net1 'test_resnet'"):
        load_models(tmp_path / "ours.pth", model="net1", arch="resnet18")
    (m,) = load_models(tmp_path / "ours.pth", model="net1", arch="test_resnet")
    assert m.arch["name"] == "test_resnet"


def test_official_mokd_reads_arch_cnn_and_arch_vit(tmp_path):
    cnn, vit = backbone_state(RESNET, 1), backbone_state(VIT, 2)
    torch.save({"teacher_cnn": prefixed(cnn, "module.backbone."), "teacher_vit": prefixed(vit, "backbone."),
                "arch_cnn": "test_resnet", "arch_vit": "test_vit", "epoch": 100}, tmp_path / "mokd_official.pth")
    models = load_models(tmp_path / "mokd_official.pth")  # no --arch needed: the file names both
    assert [m.arch["name"] for m in models] == ["test_resnet", "test_vit"]
    assert_same_weights(models[0].backbone, cnn)
    assert_same_weights(models[1].backbone, vit)
    with pytest.raises(UserError, match="its arch_cnn 'test_resnet'"):
        load_models(tmp_path / "mokd_official.pth", arch="resnet18,test_vit")


def test_short_vit_names_take_the_patch_from_the_weights():
    from mokd_eval.formats import arch_from_name

    state = {"patch_embed.proj.weight": torch.zeros(384, 3, 8, 8)}
    assert arch_from_name("vit_small", state=state)["name"] == "vit_small_patch8_224"
    assert arch_from_name("vit_small")["name"] == "vit_small_patch16_224"
    assert arch_from_name("vit_conv_small") is None


# --------------------------------------------------------------------------------------------------------------
# CIFAR-style stems (item 3)

NARROW18 = {"channels": [16, 32, 64, 128]}


def cifar_resnet(padding: int = 1) -> torch.nn.Module:
    """A CIFAR ResNet-18 as solo-learn and most CIFAR SSL code build it: conv1 3x3 stride 1, no max-pool."""
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=0, **NARROW18)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=padding, bias=False)
    m.maxpool = torch.nn.Identity()
    return m.eval()


def test_cifar_stem_detected_from_shapes_and_built(tmp_path):
    ref = cifar_resnet()
    torch.save(ref.state_dict(), tmp_path / "cifar_r18.pth")
    (m,) = load_models(tmp_path / "cifar_r18.pth", arch="resnet18", arch_kwargs=NARROW18)
    assert m.report.complete and m.arch["stem_conv"] == {"kernel": 3, "padding": 1} and m.arch["small_stem"]
    assert any("CIFAR-style stem" in n for n in m.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), ref(x))


def test_solo_learn_cifar_stem_uses_its_padding(tmp_path):
    ref = cifar_resnet(padding=2)
    torch.save({"state_dict": prefixed(ref.state_dict(), "backbone.")}, tmp_path / "solo.ckpt")
    (m,) = load_models(tmp_path / "solo.ckpt", arch="resnet18", arch_kwargs=NARROW18)
    assert m.arch["stem_conv"] == {"kernel": 3, "padding": 2}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), ref(x))


def test_cifar_stem_flag_forces_a_stride_one_stem(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", num_classes=0, **NARROW18).state_dict(), tmp_path / "r.pth")
    (m,) = load_models(tmp_path / "r.pth", arch="resnet18", arch_kwargs=NARROW18, cifar_stem=True)
    assert m.backbone.conv1.stride == (1, 1) and isinstance(m.backbone.maxpool, torch.nn.Identity)
    assert m.arch["small_stem"] and m.arch["stem_conv"] is None
    out = tmp_path / "r.safetensors"
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "r.pth"), "--arch", "resnet18", "--arch-kwargs",
                                   '{"channels": [16, 32, 64, 128]}', "--cifar-stem", "--to", "timm", str(out)])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(out.with_suffix(".json").read_text())["small_stem"] is True


# --------------------------------------------------------------------------------------------------------------
# files without a backbone, empty examples, non-finite weights (item 4; issue 8 item 1)


def test_head_only_file_says_it_holds_no_backbone(tmp_path):
    torch.save({"projector.0.weight": torch.ones(4, 4), "head.weight": torch.ones(2, 4)}, tmp_path / "proj.pth")
    out = run_cli(tmp_path / "proj.pth")
    assert "holds no backbone weights: every tensor is under head.*/projector.* (a projector" in out
    assert "--arch" not in out and ". (" not in out


def test_mismatch_message_never_prints_an_empty_example():
    from pathlib import Path

    from mokd_eval.loader import LoadReport, _check

    report = LoadReport(0, ["conv1.weight", "bn1.weight"], [], [], 2)
    with pytest.raises(UserError) as e:
        _check(report, "test_resnet", Path("x.pth"), "x", False)
    msg = str(e.value)
    assert "such as ." not in msg and "example: ." not in msg and "conv1.weight" in msg


def test_non_finite_backbone_is_refused_by_eval_and_export(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth", net1=RESNET)
    ckpt = torch.load(tmp_path / "ours.pth", weights_only=True)
    ckpt["model"]["teacher.net1.backbone.layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    ckpt["model"]["teacher.net1.backbone.fc.weight"] = torch.full((2, 2), float("inf"))  # a head: not checked
    torch.save(ckpt, tmp_path / "nan.pth")
    for args in (["eval", "knn", str(tmp_path / "nan.pth")],
                 ["export", str(tmp_path / "nan.pth"), "--model", "net1", "--to", "timm", str(tmp_path / "o.st")]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert "non-finite values (NaN or inf) in 1 tensor(s): layer1.0.conv1.weight" in res.output, res.output
    assert not (tmp_path / "o.st").exists()
    (m,) = load_models(tmp_path / "nan.pth", model="net2")  # the other model is fine
    assert m.label == "net2-teacher"


def test_kwargs_timm_cannot_build_are_a_clear_error(tmp_path):
    torch.save(backbone_state(VIT, 1), tmp_path / "v.pth")
    with pytest.raises(UserError, match=r"timm cannot build test_vit \{num_heads=5\}"):
        load_models(tmp_path / "v.pth", arch="test_vit", arch_kwargs={"num_heads": 5})
