"""Figures and tables as a reader needs them: true model names, axis ranges, reference lines, one legend entry
per run with its mode, one colour per run in every panel, PNG/PDF/SVG at CVPR widths, and the report of two
runs of one pair (mean ± std, units, skipped records named)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_hex
from PIL import Image

from mokd.cli import cli
from mokd.naming import data_name, model_name, run_name
from mokd_analysis.distance import uniform_distance
from mokd_analysis.mad import MADResult
from mokd_analysis.plots import mad_figure, plot_mad, plot_tsne, tsne_figure
from mokd_eval.records import write_record
from tests.ckpt_factory import RESNET, VIT32_P4, isolated_cache, make_mokd_checkpoint  # noqa: F401
from tests.tiny import TINY_OVERRIDES


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_model_names_say_what_was_built():
    assert model_name("resnet18", {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}, True) \
        == "resnet18 [layers 1-1-1-1, channels 32-64-128-256, small stem]"
    assert model_name("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 32}) == "vit_tiny [patch 8, 32 px]"
    assert model_name("vit_small_patch16_224", {"img_size": 96}) == "vit_small [patch 16, 96 px]"
    # arguments that do not change the shape, or restate the name, are left out
    assert model_name("vit_small_patch16_224", {"drop_path_rate": 0.1, "patch_size": 16}) == "vit_small_patch16_224"
    assert model_name("test_vit", {"img_size": 32, "patch_size": 4}) == "test_vit [patch 4, 32 px]"
    assert model_name("resnet50", {"width_multiplier": 0.5}) == "resnet50 [width 0.5]"
    assert model_name("resnet18", {"layers": [1, 1, 1, 1]}, True, name="R18-slim") == "R18-slim"
    assert run_name("/runs/r18_vit/last.pth") == "r18_vit" and run_name("/runs/r18_vit/checkpoint_0010.pth") == "r18_vit@10"
    assert run_name("/dl/dino_deitsmall16_pretrain.pth") == "dino_deitsmall16_pretrain"
    assert data_name("folder:/data/imagenet100") == "imagenet100" and data_name("digits") == "digits"
    assert data_name("cifar10:/data/c10") == "CIFAR-10" and data_name("photos") == "photos"


# --------------------------------------------------------------------------------------------------------------
# mean attention distance


def vit_result(run: str, mode: str, shift: float) -> MADResult:
    d = np.linspace(40, 100, 12)[:, None] + np.linspace(-10, 10, 6)[None] - shift * (np.arange(12)[:, None] >= 9)
    return MADResult(label="net2-teacher", kind="vit", arch="vit_small_patch16_224", image_size=224, num_images=64,
                     distances=d.tolist(), grid=[[14, 14]] * 12, stride=[[16.0, 16.0]] * 12, run=run, mode=mode)


def cnn_result(run: str, mode: str, shift: float) -> MADResult:
    grids = [56] * 3 + [28] * 4 + [14] * 6 + [7] * 3
    d = [[30.0 + 3 * i + shift] for i in range(16)]
    return MADResult(label="net1-teacher", kind="cnn", arch="resnet50 [small stem]", image_size=224, num_images=64,
                     distances=d, grid=[[g, g] for g in grids], stride=[[224 / g] * 2 for g in grids], run=run,
                     mode=mode)


def two_runs() -> list[MADResult]:
    return [cnn_result("r50_vits_mokd", "mokd", 8), vit_result("r50_vits_mokd", "mokd", 15),
            cnn_result("r50_vits_indep", "independent", 0), vit_result("r50_vits_indep", "independent", 0)]


def panels(fig):
    """(data axes, legend axes) in drawing order."""
    return [a for a in fig.axes if a.axison], [a for a in fig.axes if not a.axison]


def test_mad_figure_range_reference_line_legend_and_colours():
    results = two_runs()
    fig = mad_figure(results, title="Mean attention distance on imagenet100 val", width="page")
    (vit_ax, cnn_ax), (vit_leg, cnn_leg) = panels(fig)
    uniform = uniform_distance((14, 14), 16)
    assert uniform == pytest.approx(116.49, abs=0.01)
    for ax, kind in ((vit_ax, "vit"), (cnn_ax, "cnn")):
        data = [v for r in results if r.kind == kind for row in r.distances for v in row]
        lo, hi = ax.get_ylim()
        assert 0 < lo <= min(data) and max(data) <= hi  # fits the data, not forced to 0
    # the reference line: uniform attention over the 14x14 grid, spanning the ViT panel
    flat = [ln for ln in vit_ax.get_lines() if np.allclose(ln.get_ydata(), uniform)]
    assert flat and vit_ax.get_ylim()[1] > uniform
    cnn_levels = [uniform_distance((g, g), 224 / g) for g in [56] * 3 + [28] * 4 + [14] * 6 + [7] * 3]
    assert any(np.allclose(ln.get_ydata(), cnn_levels) for ln in cnn_ax.get_lines())
    colours = []
    for leg_ax in (vit_leg, cnn_leg):
        leg = leg_ax.get_legend()
        texts = [t.get_text() for t in leg.get_texts()]
        runs = [t for t in texts if "r50_vits" in t]
        assert len(runs) == 2  # one entry per run ...
        assert runs[0].startswith("r50_vits_indep · independent") and runs[1].startswith("r50_vits_mokd · mokd")
        assert any("uniform attention" in t for t in texts)
        handles = dict(zip(texts, leg.legend_handles))
        colours.append({t.split(" ·")[0]: to_hex(handles[t].get_color()) for t in runs})
    assert any("resnet50 [small stem]" in t.get_text() for t in cnn_leg.get_legend().get_texts())  # true shape
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 2  # a run keeps its colour across panels
    # and the plotted mean lines carry those colours
    for ax in (vit_ax, cnn_ax):
        drawn = {to_hex(ln.get_color()) for ln in ax.get_lines() if ln.get_marker() not in ("None", None, "")}
        assert set(colours[0].values()) <= drawn
    assert fig._suptitle.get_text().endswith("imagenet100 val")


def test_figures_are_written_as_png_pdf_svg_at_column_and_page_width(tmp_path):
    assert mad_figure(two_runs(), width="page").get_size_inches()[0] == 6.875
    assert mad_figure(two_runs()[:2], width="auto").get_size_inches()[0] == 6.875  # two panels: the page
    assert mad_figure(two_runs()[:1], width="auto").get_size_inches()[0] == 3.25  # one panel: a column
    for width, inches in (("column", 3.25),):
        paths = plot_mad(two_runs(), tmp_path / f"mad_{width}", title="t", width=width)
        assert set(paths) == {"png", "pdf", "svg"}
        with Image.open(paths["png"]) as im:
            assert im.size[0] == round(inches * 300)  # 300 dpi, no tight crop that changes the width
        pdf = paths["pdf"].read_bytes()
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
        assert box and float(box[1]) == pytest.approx(inches * 72, abs=0.5)
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType fonts embedded
        svg = paths["svg"].read_text()
        assert "<svg" in svg and "<text" not in svg  # glyphs as paths: no font needed to view it


# --------------------------------------------------------------------------------------------------------------
# t-SNE


def test_tsne_side_by_side_panels_share_one_embedding_and_legends():
    rng = np.random.default_rng(0)
    n = 20  # points per model and class
    coords = rng.normal(size=(4 * 3 * n, 2)) * 5
    ids = np.repeat(np.arange(4), 3 * n)
    labels = np.tile(np.repeat(np.arange(3), n), 4)
    names = ["resnet50", "vit_small_patch16_224"] * 2
    fig = tsne_figure(coords, labels, ids, ["cat", "dog", "emu"], names, "t-SNE of 3 imagenet100 classes",
                      panels=["r_indep · independent", "r_mokd · mokd"], panel_of_model=[0, 0, 1, 1],
                      marker_of_model=[0, 1, 0, 1], width="page")
    (left, right), (legend_ax,) = panels(fig)
    assert left.get_title() == "(a) r_indep · independent" and right.get_title() == "(b) r_mokd · mokd"
    assert left.get_xlim() == right.get_xlim() and left.get_ylim() == right.get_ylim()
    for ax, models in ((left, (0, 1)), (right, (2, 3))):
        pts = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(pts) == 2 * 3 * n  # its own two models only
        assert {tuple(p) for p in pts.tolist()} == {tuple(p) for p in coords[np.isin(ids, models)].tolist()}
        assert min(s for c in ax.collections for s in c.get_sizes()) >= 16  # circles and triangles tell apart
        assert len({c.get_paths()[0].vertices.shape for c in ax.collections}) == 2  # two marker shapes
    legends = [a for a in legend_ax.get_children() if a.__class__.__name__ == "Legend"]
    titles = sorted(leg.get_title().get_text() for leg in legends)
    assert titles == ["class", "model"]  # both legends together, under the panels
    model_texts = [t.get_text() for leg in legends if leg.get_title().get_text() == "model" for t in leg.get_texts()]
    assert model_texts == ["resnet50", "vit_small_patch16_224"]


@pytest.mark.slow
def test_side_by_side_and_mad_from_the_cli_name_runs_modes_and_shapes(tmp_path):
    for mode in ("mokd", "independent"):  # MOKD given first: the figure still puts independent left
        (tmp_path / f"pair_{mode}").mkdir()
        make_mokd_checkpoint(tmp_path / f"pair_{mode}" / "last.pth", net1={**RESNET, "small_stem": True},
                             net2=VIT32_P4, mode=mode)
    ckpts = [str(tmp_path / "pair_mokd" / "last.pth"), str(tmp_path / "pair_independent" / "last.pth")]
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(cli, ["analyze", "tsne", *ckpts, "--side-by-side", "--per-class", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "test_resnet [small stem]" in res.output and "tsne.svg" in res.output
    npz = np.load(out / "tsne.npz")
    assert list(npz["model_names"]) == [f"pair_{mode} · {mode}: {arch}" for mode in ("independent", "mokd")
                                        for arch in ("test_resnet [small stem]", "test_vit [patch 4, 32 px]")]
    assert npz["coords"].shape == (4 * 30, 2)
    with Image.open(out / "tsne.png") as im:
        assert im.size[0] == round(6.875 * 300)
    res = runner.invoke(cli, ["analyze", "mad", *ckpts, "--max-images", "8", "--figure-width", "column",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    with Image.open(out / "mad.png") as im:
        assert im.size[0] == round(3.25 * 300)
    mad = json.loads((out / "mad.json").read_text())
    assert {(m["run"], m["mode"], m["arch"]) for m in mad} == {
        (f"pair_{mode}", mode, arch) for mode in ("mokd", "independent")
        for arch in ("test_resnet [small stem]", "test_vit [patch 4, 32 px]")}
    rec = json.loads(next(out.glob("mad__*.json")).read_text())["checkpoint"]
    assert rec["run"].startswith("pair_") and rec["name"] in ("test_resnet [small stem]", "test_vit [patch 4, 32 px]")
    assert rec["pair"] == "test_resnet [small stem]+test_vit [patch 4, 32 px]"
    res = runner.invoke(cli, ["analyze", "tsne", ckpts[0], "--side-by-side"])
    assert res.exit_code != 0 and "compares two checkpoints" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_trainer_header_gives_true_names_and_backbone_and_head_sizes(tmp_path):
    from mokd_eval.loader import load_models

    args = [a for o in TINY_OVERRIDES for a in ("--set", o)] + ["--set", "optim.epochs=1", "--set", "data.subset=16",
                                                                "--set", "net2.name=ViT-p8", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(cli, ["train", *args])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("mokd train:"))
    assert re.search(r"test_resnet \[small stem\] \(backbone [\d.e-]+M \+ heads [\d.e-]+M\) \+ ViT-p8 \(backbone", header)
    net1, net2 = load_models(tmp_path / "r" / "last.pth")
    assert net1.checkpoint["name"] == "test_resnet [small stem]" and net1.checkpoint["run"] == "r"
    assert net2.checkpoint["name"] == "ViT-p8" and net2.checkpoint["shape"] == "test_vit [patch 8, 32 px]"
    assert net1.checkpoint["pair"] == "test_resnet [small stem]+test_vit [patch 8, 32 px]"


def test_help_states_the_image_size_default_really_used():
    res = CliRunner().invoke(cli, ["eval", "knn", "--help"])
    text = " ".join(res.output.split())
    assert ("the images' own size for digits, photos and CIFAR, else the checkpoint's training resolution, "
            "else 224") in text


# --------------------------------------------------------------------------------------------------------------
# report


def record(out, task, run, mode, model, value, pair="resnet18 [small stem]+vit_tiny [patch 8, 32 px]", **extra):
    arch = pair.split("+")[0 if model == "net1" else 1]
    ckpt = {"path": f"/runs/{run}/last.pth", "sha256": f"{run}{model}", "format": "mokd", "model": model,
            "branch": "teacher", "arch": arch.split(" ")[0], "name": arch, "run": run, "label": f"{model}-teacher",
            "mode": mode, "pair": pair}
    metrics = ({"top1": {10: value, 20: value - 1}, "top5": {10: 99.0, 20: 98.0}, "best_top1": value, "best_k": 10}
               if task == "knn" else {"top1": value, "top5": 95.0} if task == "linear" else extra.pop("metrics"))
    return write_record(out, task=task, checkpoint=ckpt, data={"spec": "folder:/data/imagenet100"},
                        settings=extra or {"seed": 0}, metrics=metrics, wall_time_s=1.0)


def test_report_of_two_runs_of_one_pair(tmp_path):
    values = {"indep_s0": ("independent", 60.0, 70.0), "indep_s1": ("independent", 62.0, 71.0),
              "mokd_s0": ("mokd", 65.0, 72.0), "mokd_s1": ("mokd", 66.0, 74.0)}
    for run, (mode, v1, v2) in values.items():
        record(tmp_path, "knn", run, mode, "net1", v1)
        record(tmp_path, "knn", run, mode, "net2", v2)
    record(tmp_path, "consistency", "mokd_s0", "mokd", "net1", 0,
           metrics={"headline": "consistency", "consistency": 0.8125})
    record(tmp_path, "mad", "mokd_s0", "mokd", "net2", 0, metrics={"headline": "mean", "mean": 57.3})
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in md.split("## k-NN")[0].splitlines()
            if line.startswith("| knn") or line.startswith("| consistency") or line.startswith("| mad")}
    # every row says run, model, architecture as built, mode, and the unit of its figure
    assert ("knn", "indep_s1", "net2 (teacher)", "vit_tiny [patch 8, 32 px]", "independent", "imagenet100",
            "top1 k=20", "70.00", "%") in rows  # DINO's k=20, not the best k tuned on the split reported
    assert ("consistency", "mokd_s0", "net1 (teacher)", "resnet18 [small stem]", "mokd", "imagenet100",
            "consistency", "0.812", "fraction") in rows
    assert any(r[0] == "mad" and r[-1] == "px" and r[-2] == "57.30" for r in rows)
    assert "last.pth" not in md.split("## k-NN")[0]
    grid = next(line for line in md.splitlines() if line.startswith("| resnet18 [small stem]"))
    cells = [c.strip() for c in grid.strip("|").split("|")]
    assert cells[:3] == ["resnet18 [small stem]", "vit_tiny [patch 8, 32 px]", "imagenet100"]
    assert cells[3:7] == ["60.00 ± 1.41 (n=2)", "69.50 ± 0.71 (n=2)", "64.50 ± 0.71 (n=2)", "72.00 ± 1.41 (n=2)"]
    assert "- k-NN Independent Net1 of resnet18 [small stem] + vit_tiny [patch 8, 32 px] on imagenet100: " \
           "indep_s0 59.00, indep_s1 61.00" in md
    assert "warning" not in md
    # the same checkpoint evaluated twice in one cell is not passed off as two runs
    record(tmp_path, "knn", "mokd_s1", "mokd", "net1", 67.0, seed=0, image_size=64)
    md = CliRunner().invoke(cli, ["report", str(tmp_path)]).output
    assert "warning: one checkpoint is counted more than once" in md and "mokd_s1 65.00, mokd_s1 66.00" in md


def test_report_names_unreadable_and_incomplete_records(tmp_path):
    good = record(tmp_path, "knn", "run_a", "mokd", "net1", 61.0)
    (tmp_path / "cut.json").write_text(good.read_text()[:200])  # a write cut short
    for name, change in (("no_metrics", lambda r: r.pop("metrics")), ("null_ckpt", lambda r: r.update(checkpoint=None)),
                         ("knn_no_top1", lambda r: r["metrics"].pop("top1")), ("no_data", lambda r: r.pop("data"))):
        r = json.loads(good.read_text())
        change(r)
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "mad.json").write_text("[]")  # not a record: left out without a word
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    skipped = res.output.split("## Skipped files")[1]
    assert re.search(r"cut\.json: not valid JSON \(.*line \d+\)", skipped)
    assert "no_metrics.json: missing field metrics" in skipped
    assert "null_ckpt.json: field checkpoint is NoneType, expected an object" in skipped
    assert "knn_no_top1.json: k-NN metrics lack top1" in skipped
    assert "no_data.json" not in skipped and "mad.json" not in skipped  # a record without data still reports
    assert "2 result record(s); 4 file(s) skipped" in res.output
    for p in tmp_path.glob("*.json"):
        if p.name not in ("cut.json", "no_metrics.json", "null_ckpt.json", "knn_no_top1.json"):
            p.unlink()
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "no result records" in res.output and "cut.json (not valid JSON" in res.output
    assert "Traceback" not in res.output


def test_feature_log_says_pooled_for_a_cnn(tmp_path):
    from mokd.data import build_dataset, parse_data_spec
    from mokd_eval.features import features_for
    from mokd_eval.loader import load_models

    make_mokd_checkpoint(tmp_path / "pair.pth", net1=RESNET, net2=VIT32_P4)
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(list(range(4)))
    lines: list[str] = []
    for m in load_models(tmp_path / "pair.pth"):
        features_for(m, spec, "val", dataset=ds, device="cpu", precision="fp32", use_cache=False, log=lines.append)
    assert "pooled" in lines[0] and "mode" not in lines[0]  # the CNN
    assert "mode cls" in lines[1]  # the ViT
