"""Does RankMe track k-NN accuracy over a run? Spearman's rank correlation between the two over a run's saved
checkpoints, per model (docs/analysis.md gives the numbers of the default run).

    mokd train --out runs/mokd --set train.save_every=1
    python benchmarks/rankme_knn.py runs/mokd [--out results/rankme_knn]

For each checkpoint_XXXX.pth (and last.pth when it is newer than all of them) it runs `mokd eval knn` and
`mokd analyze rank` through the CLI (both on the data the run trained on, sharing the feature cache: the
validation features are extracted once), then reads the records back and prints a table and Spearman's rho
with its p-value for each model. It prints figures; it times nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from click.testing import CliRunner
from scipy.stats import spearmanr

from mokd.cli import cli
from mokd_eval.records import read_records


def _run(args: list[str]) -> None:
    res = CliRunner().invoke(cli, args)
    if res.exit_code != 0:
        sys.exit(f"mokd {' '.join(args)} failed:\n{res.output}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with checkpoint_XXXX.pth files (train.save_every=1)")
    ap.add_argument("--out", type=Path, default=Path("results/rankme_knn"))
    ap.add_argument("--data", default=None, help="--data for both (default: the run's own data.spec)")
    a = ap.parse_args()
    ckpts = sorted(a.run.glob("checkpoint_*.pth"))
    if len(ckpts) < 3:
        sys.exit(f"{a.run} holds {len(ckpts)} checkpoint_XXXX.pth files; train with --set train.save_every=1")
    data = a.data
    if data is None:
        import yaml

        data = (yaml.safe_load((a.run / "config.yaml").read_text()).get("data") or {}).get("spec") or "digits"
    rows = []
    for ckpt in ckpts:
        epoch = int(re.search(r"(\d+)", ckpt.stem).group(1))
        knn_out, rank_out = a.out / "knn" / ckpt.stem, a.out / "rank" / ckpt.stem
        _run(["eval", "knn", str(ckpt), "--data", data, "--out", str(knn_out)])
        _run(["analyze", "rank", str(ckpt), "--data", data, "--out", str(rank_out)])
        knn = {r["checkpoint"]["label"]: r["metrics"] for r in read_records(knn_out) if r["task"] == "knn"}
        rank = {r["checkpoint"]["label"]: r["metrics"] for r in read_records(rank_out) if r["task"] == "rank"}
        for label in sorted(knn):
            k = knn[label]
            top1 = k["top1"].get("20", k["best_top1"])
            rows.append({"epoch": epoch, "model": label, "knn_top1": float(top1), "rankme": rank[label]["rankme"],
                         "rankme_centered": rank[label]["rankme_centered"], "alpha_req": rank[label]["alpha_req"]})
    print("| epoch | model | k-NN top-1 (k=20, %) | RankMe | RankMe centred | alpha-ReQ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        alpha = "n/a" if r["alpha_req"] is None else f"{r['alpha_req']:.2f}"
        print(f"| {r['epoch']} | {r['model']} | {r['knn_top1']:.2f} | {r['rankme']:.2f} | {r['rankme_centered']:.2f} "
              f"| {alpha} |")
    print()
    result = {"rows": rows, "spearman": {}}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        for score in ("rankme", "rankme_centered", "alpha_req"):
            xs = [r[score] for r in mine]
            if any(x is None for x in xs):
                continue
            rho, p = spearmanr(xs, [r["knn_top1"] for r in mine])
            result["spearman"].setdefault(model, {})[score] = {"rho": float(rho), "p": float(p), "n": len(mine)}
            print(f"{model}: Spearman rho({score}, k-NN top-1) = {rho:+.3f} (p = {p:.3f}, {len(mine)} checkpoints)")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rankme_knn.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
