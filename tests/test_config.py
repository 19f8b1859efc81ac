import pytest
import timm
import yaml

from mokd.config import PACKAGE_CONFIGS, Config, load_config, parse_override, to_dict
from mokd.errors import UserError

PAPER_CONFIGS = sorted(p for p in PACKAGE_CONFIGS.glob("mokd_*.yaml"))


def test_every_table_1_and_s1_pair_has_a_config():
    names = {p.stem for p in PAPER_CONFIGS}
    expected = {"mokd_r50_vits16", "mokd_r50_vitb16", "mokd_r101_vits16", "mokd_r101_vitb16", "mokd_r50_r34",
                "mokd_r50_r18", "mokd_r101_r34", "mokd_r101_r18", "mokd_r50_r50", "mokd_r18_r18",
                "mokd_vits16_vitt16", "mokd_vits16_vits16", "mokd_r50_effb0", "mokd_r50_mnv3l",
                "mokd_r101_effb0", "mokd_r101_mnv3l"}
    assert expected <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_load_with_the_paper_settings(path):
    cfg = load_config(path)
    for n in (cfg.net1, cfg.net2):
        assert n.arch in timm.list_models()
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.warmup_epochs) == (100, 256, 10)
    assert (cfg.augment.global_size, cfg.augment.local_size, cfg.augment.local_crops) == (224, 96, 8)
    vit_b = "vit_base_patch16_224" in (cfg.net1.arch, cfg.net2.arch)  # the release: T-Head at the ViT's width
    assert cfg.head.out_dim == 65536 and cfg.thead.depth == 3 and cfg.thead.dim == (768 if vit_b else 384)
    assert cfg.thead.num_heads == 6
    assert (cfg.loss.student_temp, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp) == (0.1, 0.04, 0.07)
    lams = sorted([cfg.net1.lam, cfg.net2.lam])
    assert lams == ([1.0, 1.0] if cfg.net1.arch == cfg.net2.arch else [0.1, 1.0])


def test_r50_vits16_gives_the_smaller_weight_to_vit_s():
    cfg = load_config("mokd_r50_vits16")  # a shipped config by name
    assert (cfg.net1.arch, cfg.net1.lam, cfg.net2.arch, cfg.net2.lam) == \
        ("resnet50", 1.0, "vit_small_patch16_224", 0.1)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["optim.epochs=3", "loss.ct=false", "net2.kwargs={img_size: 64}",
                             "augment.global_scale=[0.3, 1.0]", "net1.lr=0.05", "data.class_list=null"])
    assert cfg.optim.epochs == 3 and cfg.loss.ct is False and cfg.net2.kwargs == {"img_size": 64}
    assert cfg.augment.global_scale == (0.3, 1.0) and cfg.net1.lr == 0.05 and cfg.data.class_list is None
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)


@pytest.mark.parametrize("override, message", [
    ("optim.epoch=3", "unknown config key 'optim.epoch'"),
    ("optim.epochs=abc", "expects int"),
    ("loss.mode=both", "loss.mode must be"),
    ("loss.sm=false", "cannot be switched off"),
    ("epochs", "expects KEY=VALUE"),
])
def test_bad_overrides_say_what_was_expected(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_missing_config_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match="mokd_r50_vits16.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.epochs=7"])
    d = to_dict(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert to_dict(load_config(tmp_path / "c.yaml")) == d
    assert isinstance(Config(), Config)
