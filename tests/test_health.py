"""Training health: the collapse signals on hand-made teacher outputs, the batch-job progress line, the summary."""

import json
import math

import torch
from click.testing import CliRunner

from mokd.cli import cli
from mokd.health import FLAT_FRACTION, UNIFORM_FRACTION, collapse_warning, health_metrics
from tests.tiny import TINY_OVERRIDES

K, N = 64, 16


def test_uniform_teacher_outputs():
    probs = torch.full((N, K), 1.0 / K)
    h = health_metrics(probs, torch.randn(N, K))
    assert math.isclose(h["entropy"].item(), math.log(K), rel_tol=1e-5)
    assert math.isclose(h["mean_entropy"].item(), math.log(K), rel_tol=1e-5)
    w = collapse_warning("net2 (vit)", h["entropy"].item(), h["mean_entropy"].item(), K)
    assert w is not None and "uniform" in w and "net2 (vit)" in w and "teacher_temp" in w


def test_one_dimension_dominating():
    probs = torch.zeros(N, K)
    probs[:, 3] = 1.0
    student = torch.zeros(N, K)
    student[: N // 4, 3] = 1.0  # a quarter of the students agree with the teacher's argmax
    student[N // 4:, 5] = 1.0
    h = health_metrics(probs, student)
    assert h["entropy"].item() < 1e-6 and h["mean_entropy"].item() < 1e-6
    assert math.isclose(h["agreement"].item(), 0.25)
    w = collapse_warning("net1", h["entropy"].item(), h["mean_entropy"].item(), K)
    assert w is not None and "dominant" in w and "center_momentum" in w


def test_the_same_output_for_every_input():
    row = torch.softmax(torch.linspace(0, 4, K), dim=0)  # neither uniform nor one-hot, but input-independent
    h = health_metrics(row.expand(N, K), torch.randn(N, K))
    assert math.isclose(h["entropy"].item(), h["mean_entropy"].item(), rel_tol=1e-5)
    assert 0.3 * math.log(K) < h["entropy"].item() < 0.9 * math.log(K)
    w = collapse_warning("net1", h["entropy"].item(), h["mean_entropy"].item(), K)
    assert w is not None and "same output for every input" in w and "head.use_bn" in w


def test_healthy_one_hot_outputs_spread_over_dimensions():
    probs = torch.eye(K)[:N]  # each sample its own dimension: sharp per sample, spread over the batch
    h = health_metrics(probs, probs.clone())
    assert h["entropy"].item() < 1e-6
    assert math.isclose(h["mean_entropy"].item(), math.log(N), rel_tol=1e-5)
    assert h["agreement"].item() == 1.0
    assert collapse_warning("net1", h["entropy"].item(), h["mean_entropy"].item(), K) is None


def _flat(protos: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-sample distributions at `fraction` of log K: a small bump on each sample's prototype. [N, K]"""
    lo, hi = 0.0, 20.0
    for _ in range(60):  # bisect the bump's height for the asked entropy
        mid = (lo + hi) / 2
        p = torch.softmax(mid * torch.eye(K)[protos], dim=-1)
        h = -(p * p.log()).sum(-1).mean().item()
        lo, hi = (mid, hi) if h > fraction * math.log(K) else (lo, mid)
    return torch.softmax(lo * torch.eye(K)[protos], dim=-1)


def _said(probs: torch.Tensor) -> str | None:
    h = health_metrics(probs, torch.randn(probs.shape))
    return collapse_warning("net2 (vit)", h["entropy"].item(), h["mean_entropy"].item(), K)


def test_a_flat_teacher_that_still_depends_on_its_input_gets_a_note_not_a_collapse_warning():
    flat = _flat(torch.arange(N) * 5 % K, 0.93)  # between the limits, like the digits ViT's teacher at 0.04
    said = _said(flat)
    assert said is not None and said.startswith("note: net2 (vit) has a flat teacher") and "not collapsed" in said
    assert "collapsed to uniform" not in said and "loss.teacher_temp" in said
    # as flat, but the same bump for every input: collapsed
    same = _flat(torch.full((N,), 7), 0.93)
    said = _said(same)
    assert said is not None and said.startswith("warning:") and "collapsed to uniform outputs" in said


def test_a_nearly_uniform_teacher_is_collapsed_even_when_its_outputs_differ():
    nearly = _flat(torch.arange(N) * 5 % K, 0.985)  # above FLAT_FRACTION: targets hardly differ from uniform
    assert FLAT_FRACTION * math.log(K) < health_metrics(nearly, nearly)["entropy"].item()
    said = _said(nearly)
    assert said is not None and said.startswith("warning:") and "collapsed to uniform outputs" in said


def test_a_healthy_sharp_teacher_is_not_flagged():
    sharp = torch.softmax(8.0 * torch.eye(K)[torch.arange(N) * 3 % K], dim=-1)
    h = health_metrics(sharp, sharp.clone())
    assert h["entropy"].item() < 0.5 * math.log(K) < UNIFORM_FRACTION * math.log(K) < h["mean_entropy"].item() + 1
    assert _said(sharp) is None


def test_batch_job_progress_health_log_and_summary(tmp_path):
    """Under click's runner stderr is no terminal: a progress line per log_every steps, then the k-NN summary."""
    out = tmp_path / "r"
    args = ["train", "--out", str(out)]
    for o in TINY_OVERRIDES + ["train.knn_every=1", "train.log_every=2", "optim.epochs=1"]:
        args += ["--set", o]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("epoch 1/1 step")]
    assert len(lines) == 2  # 48 images / batch 16 = 3 steps: steps 2 and 3 (the epoch's last step)
    assert "step 2/3" in lines[0] and "loss1=" in lines[0] and "img/s" in lines[0] and "eta 0:" in lines[0]
    assert "teacher health" in res.output
    summary = [ln for ln in res.output.splitlines() if ln.startswith("summary: online k-NN")]
    assert len(summary) == 1 and "-> " in summary[0] and "net1 (test_resnet)" in summary[0]
    steps = [json.loads(ln) for ln in open(out / "log.jsonl") if '"type": "step"' in ln]
    for n in ("net1", "net2"):
        assert 0.0 <= steps[0][f"entropy_{n}"] <= math.log(64) + 1e-4
        assert 0.0 <= steps[0][f"mean_entropy_{n}"] <= math.log(64) + 1e-4
        assert 0.0 <= steps[0][f"agreement_{n}"] <= 1.0
