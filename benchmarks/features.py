"""Feature extraction in fp32 and bf16 autocast: throughput (images/s) of ViT-S/16 and ResNet-50 at 224 px,
and what bf16 does to k-NN (the reason the evaluation commands extract in fp32 by default).

    PYTHONPATH=. python benchmarks/features.py [--images 64] [--batch-size 32] [--device cpu]

Throughput: random-init timm models on random images (no download); the timed path is `extract_features`
(loader, autocast, copy to float32 on the host), i.e. what every protocol pays, without JPEG decoding.
k-NN: the same random-init (seeded) models on the embedded digits at 32 px (train split = bank, val split =
queries), features extracted in fp32 and in bf16: k-NN top-1 of each, the share of queries whose top-1
prediction changes, and the mean cosine between a feature's bf16 and fp32 versions.
Pipeline: generated JPEGs of ImageNet's typical size through the evaluation transform, the loader alone and
with R50 extraction, without workers and with the evaluation commands' default (up to 8 per process).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mokd.data import build_dataset, parse_data_spec
from mokd.models.backbones import create_backbone
from mokd_eval.features import eval_transform, extract_features
from mokd_eval.knn import knn_predict

ARCHS = (("ViT-S/16", "vit_small_patch16_224"), ("R50", "resnet50"))


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        self.x = torch.randn(n, 3, size, size)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-knn", action="store_true", help="skip the bf16-vs-fp32 k-NN comparison")
    p.add_argument("--no-pipeline", action="store_true", help="skip the JPEG decoding measurement")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"{args.images} images of {args.size} px, batch {args.batch_size}, device {device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    data = RandomImages(args.images, args.size)
    warm = RandomImages(args.batch_size, args.size)
    rows = []
    for label, name in ARCHS:
        torch.manual_seed(0)
        model = create_backbone(name).to(device).eval()
        for precision in ("fp32", "bf16"):
            extract_features(model, warm, device=device, batch_size=args.batch_size, precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats, _ = extract_features(model, data, device=device, batch_size=args.batch_size, precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = args.images / (time.perf_counter() - t0)
            rows.append((label, precision, rate, feats.shape[1]))
            print(f"{label:<9} {precision:<5} {rate:8.1f} images/s   (features {feats.shape[1]}-d)", flush=True)
    print()
    for label, _ in ARCHS:
        r = {prec: rate for lab, prec, rate, _ in rows if lab == label}
        print(f"{label:<9} bf16 / fp32 speed-up: x{r['bf16'] / r['fp32']:.2f}")
    if not args.no_pipeline:
        pipeline(device, args)
    if not args.no_knn:
        knn_difference(device, args.batch_size)


def pipeline(device: torch.device, args) -> None:
    """JPEG decoding and the evaluation transform (resize 256, centre crop 224) against the model: images/s of
    the loader alone and of extraction, with the evaluation commands' default workers and with none."""
    import tempfile

    import numpy as np
    from PIL import Image

    from mokd_eval.supervised import default_workers

    n = args.images
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in range(2):
                folder = os.path.join(root, split, f"class{c}")
                os.makedirs(folder)
                for i in range(n // 2 if split == "train" else 1):
                    # ImageNet's typical 500 x 375, smooth enough to compress like a photograph
                    img = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
                    Image.fromarray(img).resize((500, 375), Image.BICUBIC).save(
                        os.path.join(folder, f"{i}.jpg"), quality=90)
        spec = parse_data_spec(root)
        data = build_dataset(spec, "train", eval_transform(224, False))
        auto = default_workers(spec.kind)
        print(f"\ndata pipeline: {len(data)} JPEGs of 500 x 375 -> 224 px; the evaluation commands' default "
              f"--num-workers here is {auto}")
        torch.manual_seed(0)
        model = create_backbone("resnet50").to(device).eval()
        for workers in sorted({0, auto}):
            loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=workers)
            t0 = time.perf_counter()
            for _ in loader:
                pass
            decode = len(data) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            extract_features(model, data, device=device, batch_size=args.batch_size, num_workers=workers)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = len(data) / (time.perf_counter() - t0)
            print(f"workers {workers}: loader alone {decode:8.1f} images/s; R50 fp32 extraction {rate:8.1f} images/s")


def knn_difference(device: torch.device, batch_size: int) -> None:
    spec = parse_data_spec("digits")
    train = build_dataset(spec, "train", eval_transform(32, True))
    val = build_dataset(spec, "val", eval_transform(32, True))
    print(f"\nk-NN (k=20, T=0.07) on digits at 32 px ({len(train)} bank / {len(val)} queries), random-init "
          f"backbones, bf16 against fp32 features:")
    for label, name, kwargs in (("ViT-S/16", "vit_small_patch16_224", {"img_size": 32}),
                                ("ViT-S/8", "vit_small_patch16_224", {"img_size": 32, "patch_size": 8}),
                                ("R50", "resnet50", {})):
        torch.manual_seed(0)
        model = create_backbone(name, kwargs).to(device).eval()
        feats, preds = {}, {}
        for precision in ("fp32", "bf16"):
            tr, ytr = extract_features(model, train, device=device, batch_size=batch_size, precision=precision)
            te, yte = extract_features(model, val, device=device, batch_size=batch_size, precision=precision)
            feats[precision] = (tr, te)
            preds[precision] = knn_predict(tr, ytr, te, ks=(20,), num_classes=len(train.classes), backend="torch",
                                           log=None)[20][:, 0]
        top1 = {p: 100 * (preds[p] == yte).float().mean().item() for p in preds}
        changed = 100 * (preds["fp32"] != preds["bf16"]).float().mean().item()
        cos = torch.nn.functional.cosine_similarity(feats["fp32"][1], feats["bf16"][1], dim=1).mean().item()
        print(f"{label:<9} top-1 fp32 {top1['fp32']:6.2f}%  bf16 {top1['bf16']:6.2f}%  "
              f"difference {top1['bf16'] - top1['fp32']:+.2f} points; top-1 prediction changed for {changed:.2f}% "
              f"of queries; mean feature cosine {cos:.5f}")


if __name__ == "__main__":
    main()
