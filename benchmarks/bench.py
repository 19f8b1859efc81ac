"""`mokd bench` against the separate commands, run one after another, on the embedded digits: four checkpoints
(a DINO training checkpoint and a MoCo v3 file of timm's test_vit, a solo-learn test_resnet, net1 of a MOKD
pair), k-NN, linear probe (fast, 10 epochs), rank, mean attention distance and CKA.

    PYTHONPATH=. python benchmarks/bench.py [--device cpu] [--keep DIR]

Both paths start from empty feature caches and the same settings, and run as fresh `mokd` processes, as a user
would type them. The separate path is, per checkpoint, `mokd eval knn`, `mokd eval linear --fast`,
`mokd analyze mad --image-size 32` (the bench's crop on digits) and, where this version has it, `mokd analyze
rank`. The bench's CKA (between final embeddings, from the features it holds) has no separate command
(`mokd analyze cka` compares every layer of two models, a larger computation) and is left out of the separate
path. The separate commands share one feature cache (their default), so features of the same kind are reused
between them, as they are for a user. Prints both wall times and their ratio, measured in this
one run, and the number of commands.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ckpt_factory import RESNET, backbone_state, make_mokd_checkpoint  # noqa: E402

VIT = {"name": "test_vit", "kwargs": {}, "small_stem": False}
LINEAR = {"epochs": 10, "warmup_epochs": 1}


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def make_checkpoints(folder: Path) -> list[dict]:
    """Four checkpoint files as their code saves them -> manifest entries (label, path, loader options)."""
    import argparse as ap

    torch.save({"teacher": _prefixed(backbone_state(VIT, 1), "backbone."),
                "args": ap.Namespace(arch="test_vit", patch_size=16), "epoch": 100}, folder / "dino.pth")
    torch.save({"arch": "test_vit", "epoch": 300,
                "state_dict": {**_prefixed(backbone_state(VIT, 2), "module.base_encoder."),
                               **_prefixed(backbone_state(VIT, 3), "module.momentum_encoder.")}},
               folder / "mocov3.pth.tar")
    torch.save({"state_dict": _prefixed(backbone_state(RESNET, 4), "backbone."), "epoch": 400}, folder / "solo.ckpt")
    make_mokd_checkpoint(folder / "pair.pth", net1=RESNET)
    return [{"path": str(folder / "dino.pth"), "label": "DINO"},
            {"path": str(folder / "mocov3.pth.tar"), "label": "MoCo v3"},
            {"path": str(folder / "solo.ckpt"), "label": "solo-learn", "arch": "test_resnet"},
            {"path": str(folder / "pair.pth"), "label": "MOKD net1", "model": "net1"}]


def has_command(*words: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "mokd", *words, "--help"], capture_output=True, text=True, env=ENV)
    return r.returncode == 0


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ mokd {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "mokd", *cmd], stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if r.returncode != 0:
        raise SystemExit(f"`mokd {' '.join(cmd)}` failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def loader_flags(e: dict) -> list[str]:
    flags = []
    for key in ("arch", "model"):
        if key in e:
            flags += [f"--{key}", e[key]]
    return flags


ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", default=None, help="keep the outputs (and logs) in this folder")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="mokd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    entries = make_checkpoints(work)
    common = ["--data", "digits", "--device", args.device, "--seed", "0"]

    # the bench: one process, one manifest
    manifest = work / "bench.yaml"
    protocols = ["knn", "linear", "rank", "mad", "cka"]  # those with a separate command to compare with
    manifest.write_text(yaml.safe_dump({"data": "digits", "device": args.device, "checkpoints": entries,
                                        "protocols": protocols, "features": {"cache_dir": str(work / "cache-bench")},
                                        "settings": {"linear": LINEAR}}))
    t_bench = run(["bench", str(manifest), "--out", str(work / "bench")], work / "bench.log")

    # the separate commands, one after another, sharing one cache of their own
    cache = ["--cache-dir", str(work / "cache-separate")]
    out = ["--out", str(work / "separate")]
    commands = []
    for e in entries:
        path, flags = e["path"], loader_flags(e)
        commands.append(["eval", "knn", path, *flags, *common, *cache, *out])
        commands.append(["eval", "linear", path, *flags, "--fast", "--epochs", str(LINEAR["epochs"]),
                         "--warmup-epochs", str(LINEAR["warmup_epochs"]), *common, *cache, *out])
        commands.append(["analyze", "mad", path, *flags, "--image-size", "32", *common, *out])
    missing = []
    if has_command("analyze", "rank"):
        commands += [["analyze", "rank", e["path"], *loader_flags(e), *common, *out] for e in entries]
    else:
        missing.append("rank")
    by_kind: dict[str, float] = {}
    for c in commands:
        by_kind[" ".join(c[:2])] = by_kind.get(" ".join(c[:2]), 0.0) + run(c, work / "separate.log")
    t_separate = sum(by_kind.values())

    print(f"data: embedded digits (1437 train / 360 val, 32 px), {len(entries)} checkpoints, protocols "
          f"{', '.join(protocols)}; linear: fast, {LINEAR['epochs']} epochs; device {args.device}")
    print(f"mokd bench (1 command):               {t_bench:8.1f} s")
    print(f"separate commands ({len(commands):2d} commands):      {t_separate:8.1f} s"
          + (f"  (no `mokd analyze {'/'.join(missing)}` in this version: the separate path leaves "
             f"{'it' if len(missing) == 1 else 'them'} out)" if missing else "") + "; no CKA (see the docstring)")
    print("  of which " + ", ".join(f"`mokd {k}` {v:.1f} s" for k, v in by_kind.items()))
    print(f"ratio bench / separate:               {t_bench / t_separate:8.2f}")
    print(f"outputs and logs: {work}")


if __name__ == "__main__":
    main()
