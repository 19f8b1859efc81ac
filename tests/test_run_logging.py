"""Runs one can follow: TensorBoard scalars, `mokd plot-log`, and `mokd train --print-config`."""

import json

import pytest
import yaml
from click.testing import CliRunner

from mokd.cli import cli
from mokd.config import load_config, to_dict
from mokd.errors import UserError
from mokd.runlog import scalar_tag
from tests.tiny import TINY_OVERRIDES


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 1-epoch tiny run with the online k-NN (small bank) and TensorBoard on."""
    from mokd.trainer import train

    out = tmp_path_factory.mktemp("logged") / "run"
    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out}", "optim.epochs=1", "data.subset=32",
                             "train.knn_every=1", "train.knn_max_train=64", "train.loggers=[jsonl, tensorboard]"])
    train(cfg)
    return out


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_tensorboard_has_every_logged_number(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    records = _records(logged_run)
    assert {r["type"] for r in records} >= {"step", "epoch", "knn"}
    expected = {scalar_tag(r["type"], k) for r in records for k, v in r.items()
                if k not in ("type", "epoch", "step") and isinstance(v, (int, float))}
    assert expected <= tags, sorted(expected - tags)
    # the list, by name: every loss term, lr, wd, momentum, temperatures, health, k-NN, img/s, memory
    for tag in ("loss/sm1", "loss/st1", "loss/cm1", "loss/ct1", "loss/sm2", "loss/st2", "loss/cm2", "loss/ct2",
                "loss/loss1", "loss/loss2", "schedule/lr_net1", "schedule/wd_net2", "schedule/momentum_net1",
                "schedule/teacher_temp_net1_self", "health/entropy_net1", "health/mean_entropy_thead_net2",
                "health/agreement_search_net1", "knn/knn_top1_net1", "knn/knn_top1_net2", "speed/img_per_s",
                "speed/peak_mem_mb", "epoch/loss/loss"):
        assert tag in tags, tag
    first_step = next(r for r in records if r["type"] == "step")
    event = acc.Scalars("loss/sm1")[0]
    assert event.step == first_step["step"]
    assert event.value == pytest.approx(first_step["sm1"], rel=1e-6)
    knn_steps = [e.step for e in acc.Scalars("knn/knn_top1_net2")]
    assert len(knn_steps) == 2  # at initialisation and after the epoch


def test_plot_log_writes_a_figure(logged_run, tmp_path):
    from mokd_analysis.training_curves import read_run

    curves = read_run(logged_run)
    steps = [r for r in _records(logged_run) if r["type"] == "step"]
    assert list(curves.steps) == [r["step"] for r in steps]
    assert curves.values["ct2"].tolist() == pytest.approx([r["ct2"] for r in steps])
    assert curves.knn_epochs.tolist() == [0.0, 1.0] and curves.out_dim == 64

    result = CliRunner().invoke(cli, ["plot-log", str(logged_run), str(logged_run / "log.jsonl"),
                                      "--out", str(tmp_path / "both"), "--format", "png"])
    assert result.exit_code == 0, result.output
    png = tmp_path / "both.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_log_names_a_folder_without_a_log(tmp_path):
    result = CliRunner().invoke(cli, ["plot-log", str(tmp_path)])
    assert result.exit_code != 0 and "no log.jsonl" in result.output


def test_print_config_round_trips(tmp_path):
    runner = CliRunner()
    args = ["train", "--config", "photos", "--set", "loss.ct=false", "--set", "net2.kwargs={depth: 2}",
            "--set", "train.loggers=[jsonl, tensorboard]", "--epochs", "3", "--out", str(tmp_path / "never")]
    first = runner.invoke(cli, [*args, "--print-config"])
    assert first.exit_code == 0, first.output
    assert not (tmp_path / "never").exists()  # printed, nothing run
    printed = yaml.safe_load(first.output)
    assert printed["optim"]["epochs"] == 3 and printed["loss"]["ct"] is False
    (tmp_path / "resolved.yaml").write_text(first.output)
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == printed
    expected = load_config("photos", ["loss.ct=false", "net2.kwargs={depth: 2}", "train.loggers=[jsonl, tensorboard]",
                                      "optim.epochs=3", f"train.output_dir={tmp_path / 'never'}"])
    assert to_dict(again) == to_dict(expected)
    second = runner.invoke(cli, ["train", "--config", str(tmp_path / "resolved.yaml"), "--print-config"])
    assert second.output == first.output


def test_loggers_are_checked():
    with pytest.raises(UserError, match="train.loggers"):
        load_config(None, ["train.loggers=[tensorboard]"])
    with pytest.raises(UserError, match="train.loggers"):
        load_config(None, ["train.loggers=[jsonl, wandb]"])
    assert load_config(None, ["train.loggers=jsonl"]).train.loggers == ["jsonl"]
