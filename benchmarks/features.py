"""Feature-extraction throughput (images/s) in fp32 and bf16 autocast, ViT-S/16 and ResNet-50 at 224 px.

    PYTHONPATH=. python benchmarks/features.py [--images 64] [--batch-size 32] [--device cpu]

Random-init timm models on random images (no download); the timed path is `extract_features` (loader,
autocast, copy to float32 on the host), i.e. what every protocol pays, without JPEG decoding.
"""

from __future__ import annotations

import argparse
import time

import torch

from mokd.models.backbones import create_backbone
from mokd_eval.features import extract_features

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


if __name__ == "__main__":
    main()
