"""Is a teacher collapsed? Its MLP head's outputs on two seeded global views of every training image.

    python benchmarks/head_health.py runs/default/last.pth
    python benchmarks/head_health.py runs/mokd/checkpoint_000*.pth runs/mokd/last.pth --init --json out.json

For each checkpoint (a `mokd train` checkpoint; --init adds the run's initial weights, rebuilt from its
config and seed) and each model, the teacher's MLP head runs on the two global crops of every training
image (the training augmentation, seeded, batches of optim.batch_size in train mode as in training), its
output centred with the checkpoint's centre and sharpened at the run's final teacher temperature. Printed:

- H: the mean per-sample entropy (nats); log K for uniform outputs;
- H(mean) batch / set: the entropy of the mean output over each training-sized batch (what the trainer
  logs) and over the whole set; near 0 when one dimension dominates;
- MI: H(mean, batch) - H, the information the output carries about which image of the batch it is;
- p_max: the mean over samples of the largest probability (1/K for uniform outputs);
- views agree: the fraction of images whose argmax is the same on both global views; view match (the
  function below: whether one view's output picks out the other view, 0 at chance), per batch / over the set;
- protos: the number of distinct argmax prototypes over the set, and exp(entropy of their histogram);
- NMI: normalised mutual information between the argmax prototype and the class label (never used in
  training; a label-free run can still check the other figures).
The online k-NN of the checkpoint's run is read from its log.jsonl when there.

DINO's two collapses (Caron et al. 2021, Sec. 5.3) are outputs that are uniform for every input and outputs
that one dimension dominates for every input; both leave one prototype (or none beyond chance) and an
entropy gap near 0. A teacher near log K that still uses many prototypes, with a gap that is a good part of
log K - H, is flat, not collapsed (mokd.health's rule). On the digits the two views' argmax agrees for only a
few percent of images even for healthy teachers (docs/experiments/2026-12-07-vit-teacher-health.md), so read
the prototypes, the gap and the NMI first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mokd.augment import MultiCrop, SeededCrops  # noqa: E402
from mokd.checkpoint import load_file  # noqa: E402
from mokd.config import Config, from_dict  # noqa: E402
from mokd.data import build_dataset, parse_data_spec  # noqa: E402
from mokd.losses import sharpen  # noqa: E402
from mokd.models.mokd import NETS, MOKDModel  # noqa: E402
from mokd.schedules import teacher_temp_schedules  # noqa: E402

VIEW_SEED = 12345  # the crops' seed: the same two views of each image for every checkpoint compared


@torch.no_grad()
def view_match(probs: torch.Tensor) -> torch.Tensor:
    """probs [2N, K], rows i and N + i the same image under two views -> scalar: how often the image's second
    view is the one whose output is closest to its first view's among the N (cosine of the centred
    log-probabilities, which the temperature only scales), rescaled so that chance (1/N) is 0 and every image
    found is 1. 0 for outputs that are the same for every input (uniform or one dimension: ties, and the
    first index wins) and for outputs unrelated across views."""
    n = probs.shape[0] // 2
    if n < 2:
        return torch.zeros((), device=probs.device)
    x = torch.log(probs[:2 * n].float().clamp_min(1e-30))
    x = torch.nn.functional.normalize(x - x.mean(dim=-1, keepdim=True), dim=-1)
    sim = x[:n] @ x[n:].T
    found = (sim.argmax(dim=-1) == torch.arange(n, device=probs.device)).float().mean()
    return (found - 1.0 / n) / (1.0 - 1.0 / n)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """p [..., K] -> entropy in nats [...]."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


@torch.no_grad()
def head_figures(probs: torch.Tensor, labels: np.ndarray, batch: int) -> dict[str, float]:
    """probs [2, N, K]: the teacher's distributions on both global views of N images, in training order.

    Returns the figures of the module docstring (NMI needs labels [N])."""
    from sklearn.metrics import normalized_mutual_info_score

    v, n, k = probs.shape
    flat = probs.reshape(v * n, k)
    ent = _entropy(flat).mean()
    batch_means = [_entropy(probs[:, a:a + batch].reshape(-1, k).mean(dim=0)) for a in range(0, n - batch + 1, batch)]
    ent_mean_batch = torch.stack(batch_means).mean()
    ent_mean_set = _entropy(flat.mean(dim=0))
    matches = [view_match(probs[:, a:a + batch].reshape(-1, k)) for a in range(0, n - batch + 1, batch)]
    arg = probs.argmax(dim=-1)  # [2, N]
    counts = torch.bincount(arg.reshape(-1), minlength=k).float()
    hist = counts / counts.sum()
    return {"H": float(ent), "H_mean_batch": float(ent_mean_batch), "H_mean_set": float(ent_mean_set),
            "MI": float(ent_mean_batch - ent), "log_K": math.log(k),
            "p_max": float(flat.max(dim=-1).values.mean()),
            "views_agree": float((arg[0] == arg[1]).float().mean()),
            "match_batch": float(torch.stack(matches).mean()), "match_set": float(view_match(flat)),
            "protos": int((counts > 0).sum()), "protos_eff": float(torch.exp(_entropy(hist))),
            "nmi_label": float(normalized_mutual_info_score(labels, arg[0].numpy()))}


def final_teacher_temp(cfg: Config, net: str) -> float:
    """`net`'s MLP self term's teacher temperature at the run's last step (mokd.schedules)."""
    return float(teacher_temp_schedules(cfg, 1)[f"{net}_self"][-1])


@torch.no_grad()
def teacher_probs(model: MOKDModel, cfg: Config, max_images: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """{net: [2, N, K]} centred, sharpened teacher MLP outputs on two seeded global views; labels [N]."""
    images = build_dataset(parse_data_spec(cfg.data.spec, cfg.data.class_list), "train")
    crops = SeededCrops(images, MultiCrop(cfg.augment), VIEW_SEED)
    n = min(len(crops), max_images) if max_images else len(crops)
    n -= n % cfg.optim.batch_size
    model.train()  # as in training: BatchNorm on the batch's statistics
    out: dict[str, list[torch.Tensor]] = {net: [] for net in NETS}
    labels = []
    for a in range(0, n, cfg.optim.batch_size):
        items = [crops[i] for i in range(a, a + cfg.optim.batch_size)]
        views = [torch.stack([c[v] for c, _ in items]) for v in range(2)]
        labels += [y for _, y in items]
        for net in NETS:
            logits = model.teacher[net](views).mlp
            p = sharpen(logits, final_teacher_temp(cfg, net), model.centers[f"{net}_mlp"].center)
            out[net].append(p.reshape(2, len(items), -1))
    return {net: torch.cat(ps, dim=1) for net, ps in out.items()}, np.asarray(labels)


def online_knn(run_dir: Path, epoch: int) -> dict[str, float]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("type") == "knn" and r.get("epoch") == epoch:
            return {n: r[f"knn_top1_{n}"] for n in NETS}
    return {}


def load(path: Path, init: bool) -> tuple[MOKDModel, Config, int]:
    ckpt = load_file(path)
    cfg = from_dict(ckpt["config"])
    torch.manual_seed(cfg.train.seed)
    model = MOKDModel(cfg)
    if init:
        return model, cfg, 0
    model.load_state_dict(ckpt["model"])
    return model, cfg, int(ckpt["epoch"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--init", action="store_true", help="also the initial weights of the first checkpoint's run")
    ap.add_argument("--images", type=int, default=0, help="at most this many training images (0: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = ([(args.checkpoints[0], True)] if args.init else []) + [(p, False) for p in args.checkpoints]
    rows = []
    print("| run | epoch | model | mode | H | H(mean) batch / set | MI | p_max | views agree | match batch / set | "
          "protos (eff.) | NMI label | online k-NN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path, init in jobs:
        model, cfg, epoch = load(path, init)
        probs, labels = teacher_probs(model, cfg, args.images)
        knn = online_knn(path.parent, epoch)
        for net in NETS:
            f = head_figures(probs[net], labels, cfg.optim.batch_size)
            row = {"run": str(path.parent), "epoch": epoch, "net": net, "arch": getattr(cfg, net).arch,
                   "mode": cfg.loss.mode, "knn": knn.get(net), **f}
            rows.append(row)
            k = "—" if row["knn"] is None else f"{row['knn']:.2f}"
            print(f"| {path.parent.name} | {epoch} | {net} | {cfg.loss.mode} | {f['H']:.2f} of {f['log_K']:.2f} | "
                  f"{f['H_mean_batch']:.2f} / {f['H_mean_set']:.2f} | {f['MI']:.2f} | {f['p_max']:.3f} | "
                  f"{f['views_agree']:.2f} | {f['match_batch']:.2f} / {f['match_set']:.2f} | {f['protos']} ({f['protos_eff']:.0f}) | {f['nmi_label']:.2f} | {k} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
