"""How many images a second can one loader worker turn into DINO multi-crops? DINO's PIL chain against ours.

    PYTHONPATH=. python benchmarks/loader.py                    # 2,000 images, 1 and 2 workers, both crop settings
    PYTHONPATH=. python benchmarks/loader.py --quick            # 192 images a measurement: about a minute
    PYTHONPATH=. python benchmarks/loader.py --images 400 --workers 1,2,8 --rounds 2

The images: an ImageFolder of ImageNet-like JPEGs (--count, 2,000 by default; 500x375 or 375x500, quality 90) cut
from the photographs that ship with scikit-image (nothing is downloaded), built once into --root and reused.

The pipelines, each a torch DataLoader over the folder (--images images a measurement, batches of 16):
  dino   DINO's DataAugmentationDINO written out with torchvision's PIL transforms: ImageFolder's PIL decode, then
         per crop RandomResizedCrop (bicubic), flip, ColorJitter (p 0.8), RandomGrayscale, PIL GaussianBlur,
         solarise (global 2), ToTensor, Normalize. This is what augment.pipeline=pil computes.
  fast   mokd.fast_augment (augment.pipeline=fast, the default): one decode per image (reduced-scale JPEG decode
         where every crop allows), crops cut on uint8 tensors, colour, blur and solarise per crop with OpenCV.
  fast-uint8 (--gpu-augment) the workers' part of data.gpu_augment: decode and crop/resize only, the crops shipped
         as uint8 with their parameters; with CUDA, the photometric part of a batch is timed on the device too.
Both crop settings (2x224 + 6x96 and 2x224 + 10x96, the paper's scales) and every --workers count; the
pipelines run back to back within each round (alternating which goes first) so that they share the machine's
load, and the ratio shown is the median over rounds of each round's ratio (rates: the median over rounds).
Images/s per worker = images/s of the loader / workers. A profile pass in this process (one thread) splits each
pipeline's time into decode, crop/resize, colour (jitter, grayscale, solarise), blur and the rest (parameter
draws, to-tensor, normalise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mokd.config import AugmentConfig  # noqa: E402
from mokd import fast_augment as fa  # noqa: E402

SOURCES = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
           "gravel.png", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
           "retina.jpg", "hubble_deep_field.jpg", "horse.png", "page.png", "text.png", "color.png", "cell.png"]
SETTINGS = {"2x224+6x96": 6, "2x224+10x96": 10}
FOLDER_VERSION = "v1"


# ------------------------------------------------------------------------------------------------------------
# The images


def build_folder(root: Path, count: int, seed: int = 0) -> Path:
    """An ImageFolder (root/train/<photograph>/<i>.JPEG) of `count` JPEGs, reused when a complete one is there."""
    import skimage

    folder = root / f"{FOLDER_VERSION}-{count}"
    done = folder / "complete.json"
    if done.is_file():
        return folder
    data = Path(skimage.__file__).parent / "data"
    photos = {}
    for name in SOURCES:
        if (data / name).is_file():
            img = Image.open(data / name)
            img.load()
            photos[Path(name).stem] = img.convert("RGB")
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)  # ImageNet: mostly landscape
        # A window of the photograph at the image's aspect ratio, 50-100% of the largest that fits, flipped half
        # the time: every file differs
        fit = min(photo.width / w, photo.height / h) * rng.uniform(0.5, 1.0)
        cw, ch = max(1, round(w * fit)), max(1, round(h * fit))
        x, y = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        path = folder / "train" / name / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    done.write_text(json.dumps({"count": count, "seed": seed, "sources": names}) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------------------
# DINO's DataAugmentationDINO, composed as its main_dino.py composes it (the facts; the code is written here)


class RandomPILBlur:
    """DINO's GaussianBlur: with probability p, PIL's Gaussian blur of a radius uniform in [0.1, 2] (python random)."""

    def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class RandomSolarize:
    """DINO's Solarization: with probability p, PIL's solarise at 128."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    def __init__(self, global_scale, local_scale, local_crops: int, global_size: int = 224, local_size: int = 96):
        flip_and_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(fa.IMAGENET_MEAN, fa.IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_and_jitter, RandomPILBlur(1.0), normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_and_jitter, RandomPILBlur(0.1), RandomSolarize(0.2), normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
                                flip_and_jitter, RandomPILBlur(0.5), normalize])
        self.local_crops = local_crops

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]


def pil_loader(path: str) -> Image.Image:
    """torchvision ImageFolder's loader, as DINO reads ImageNet."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


# ------------------------------------------------------------------------------------------------------------
# The loaders


class Files(torch.utils.data.Dataset):
    """The first n files of the folder through one pipeline: 'dino', 'fast' or 'fast-uint8'."""

    def __init__(self, paths: list[str], pipeline: str, cfg: AugmentConfig):
        self.paths, self.pipeline = paths, pipeline
        if pipeline == "dino":
            self.transform = DataAugmentationDINO(cfg.global_scale, cfg.local_scale, cfg.local_crops)
        else:
            self.transform = fa.FastMultiCrop(cfg, ship_uint8=pipeline == "fast-uint8")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.pipeline == "dino":
            return self.transform(pil_loader(self.paths[i])), 0
        return self.transform(self.paths[i], torch.Generator().manual_seed(i)), 0


def worker_init(_: int) -> None:
    """Both pipelines' workers get the allocator setting the fast one makes for itself, so that it is not what
    the ratio measures (it helps the PIL chain's ToTensor and Normalize too)."""
    fa.keep_freed_memory()


def loader_rate(paths: list[str], pipeline: str, cfg: AugmentConfig, workers: int, batch: int = 16) -> float:
    """Images per second of a DataLoader with `workers` processes, start-up included."""
    loader = torch.utils.data.DataLoader(Files(paths, pipeline, cfg), batch_size=batch, num_workers=workers,
                                         shuffle=False, worker_init_fn=worker_init)
    t0 = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - t0)


def device_finish_rate(paths: list[str], cfg: AugmentConfig, batch: int, device: torch.device) -> float:
    """data.gpu_augment's device part: images per second of finish_batch on a batch of shipped uint8 crops."""
    ds = Files(paths[:batch], "fast-uint8", cfg)
    collated = torch.utils.data.default_collate([ds[i][0] for i in range(len(ds))])
    fa.finish_batch(collated, device)
    torch.cuda.synchronize(device)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        fa.finish_batch(collated, device)
    torch.cuda.synchronize(device)
    return reps * len(ds) / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------------
# The profile: where each pipeline's time goes (one thread, this process)

STAGES = ("decode", "crop/resize", "colour", "blur", "other")


class Timed:
    """Wraps a transform and adds its time to totals[stage]."""

    def __init__(self, fn, stage: str, totals: dict):
        self.fn, self.stage, self.totals = fn, stage, totals

    def __call__(self, x):
        t0 = time.perf_counter()
        out = self.fn(x)
        self.totals[self.stage] += time.perf_counter() - t0
        return out


def dino_stage(t) -> str:
    if isinstance(t, (T.RandomResizedCrop, T.RandomHorizontalFlip)):
        return "crop/resize"
    if isinstance(t, (T.RandomApply, T.RandomGrayscale, RandomSolarize)):
        return "colour"
    return "blur" if isinstance(t, RandomPILBlur) else "other"


def profile_dino(paths: list[str], cfg: AugmentConfig) -> dict:
    totals = dict.fromkeys(STAGES, 0.0)
    aug = DataAugmentationDINO(cfg.global_scale, cfg.local_scale, cfg.local_crops)

    def wrap(compose):
        flat = []
        for t in compose.transforms:
            flat.extend(t.transforms if isinstance(t, T.Compose) else [t])
        return T.Compose([Timed(t, dino_stage(t), totals) for t in flat])

    aug.global1, aug.global2, aug.local = wrap(aug.global1), wrap(aug.global2), wrap(aug.local)
    for p in paths:
        t0 = time.perf_counter()
        img = pil_loader(p)
        totals["decode"] += time.perf_counter() - t0
        aug(img)
    return totals


def profile_fast(paths: list[str], cfg: AugmentConfig) -> dict:
    """The steps of FastMultiCrop.__call__ and .finish (photometric_cv2 per crop), each timed."""
    totals = dict.fromkeys(STAGES, 0.0)
    kinds = fa.crop_kinds(cfg)
    last = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        totals[stage] += now - last[0]
        last[0] = now

    for i, path in enumerate(paths):
        lap("other")
        img = Image.open(path)
        params = fa.sample_params(torch.Generator().manual_seed(i), kinds, *img.size)
        lap("other")
        image, factor = fa.decode(path, params, kinds, img.width, img.height, img)
        lap("decode")
        crops = [fa.cut(image, p, k.size, factor) for p, k in zip(params, kinds)]
        lap("crop/resize")
        for crop, p in zip(crops, params):  # fa.photometric_cv2, step by step
            x = fa.to_float_hwc(crop)
            lap("other")
            x = fa.colour_cv2(x, p)
            lap("colour")
            x = fa.blur_cv2(x, p["sigma"])
            lap("blur")
            if p["solarize"]:
                x = np.where(x >= fa.SOLARIZE_THRESHOLD, 1 - x, x)
            lap("colour")
            fa.cv2.transform(x, fa.NORMALISE, dst=x)
            torch.from_numpy(x).permute(2, 0, 1).contiguous()
            lap("other")
    return totals


# ------------------------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default=str(ROOT / "runs" / "loader_bench"), help="where the image folder is built "
                    "once and reused (default: runs/loader_bench)")
    ap.add_argument("--count", type=int, default=2000, help="images in the folder (default: 2000)")
    ap.add_argument("--images", type=int, default=None, help="images per measurement (default: all of --count)")
    ap.add_argument("--quick", action="store_true", help="192 images a measurement, 48 in the profile, one round")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of alternating measurements; the median is shown")
    ap.add_argument("--profile-images", type=int, default=100, help="images in the one-thread profile pass")
    ap.add_argument("--gpu-augment", action="store_true",
                    help="also the workers' part of data.gpu_augment (and, with CUDA, the device part)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.profile_images, args.rounds = args.images or 192, min(args.profile_images, 48), 1
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.count < 1 or args.rounds < 1 or not workers or min(workers) < 1:
        raise SystemExit("loader.py: --count, --rounds and every --workers count must be >= 1")
    torch.set_num_threads(1)  # as in a DataLoader worker
    fa.keep_freed_memory()  # the profile pass runs here, both pipelines with it (see worker_init)
    fa.cv2_one_thread()
    folder = build_folder(Path(args.root), args.count)
    paths = sorted(str(p) for p in (folder / "train").rglob("*.JPEG"))
    n = min(args.images or len(paths), len(paths))
    paths = paths[:: max(1, len(paths) // n)][:n]  # spread over every photograph
    pipelines = ["dino", "fast"] + (["fast-uint8"] if args.gpu_augment else [])
    print(f"loader benchmark on {machine()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"torch {torch.__version__}; {n} images a measurement from {folder}", flush=True)

    rates: dict = {}
    for name, local in SETTINGS.items():
        cfg = AugmentConfig(local_crops=local)
        for w in workers:
            for r in range(args.rounds):
                for pipeline in (pipelines if r % 2 == 0 else pipelines[::-1]):
                    rate = loader_rate(paths, pipeline, cfg, w)
                    rates.setdefault((name, w, pipeline), []).append(rate)
                    print(f"  {name} workers={w} {pipeline}: {rate:.1f} img/s (round {r + 1})", flush=True)

    # The ratio is the median of each round's ratio: a round's pipelines ran back to back, under the same load
    head = ["crops", "workers", "DINO img/s per worker", "ours img/s per worker", "ours / DINO (each round)"]
    if args.gpu_augment:
        head += ["uint8 shipping img/s per worker (/ DINO)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = []
    for name in SETTINGS:
        for w in workers:
            runs = {p: rates[(name, w, p)] for p in pipelines}
            med = {p: statistics.median(runs[p]) / w for p in pipelines}
            ratio = {p: [a / b for a, b in zip(runs[p], runs["dino"])] for p in pipelines}
            row = {"crops": name, "workers": w, **med, "ratio": statistics.median(ratio["fast"]),
                   "round_ratios": ratio["fast"]}
            cells = [name, str(w), f"{med['dino']:.1f}", f"{med['fast']:.1f}",
                     f"{row['ratio']:.2f}x ({', '.join(f'{r:.2f}' for r in ratio['fast'])})"]
            if args.gpu_augment:
                row["uint8_ratio"] = statistics.median(ratio["fast-uint8"])
                cells.append(f"{med['fast-uint8']:.1f} ({row['uint8_ratio']:.2f}x)")
            table.append(row)
            lines.append("| " + " | ".join(cells) + " |")
    print()
    print("\n".join(lines))

    profile = {}
    print(f"\nwhere the time goes (one thread, {min(args.profile_images, n)} images, 2x224+10x96):")
    cfg = AugmentConfig(local_crops=10)
    sub = paths[:min(args.profile_images, n)]
    for pipeline, fn in (("dino", profile_dino), ("fast", profile_fast)):
        totals = fn(sub, cfg)
        total = sum(totals.values())
        profile[pipeline] = {"ms_per_image": 1000 * total / len(sub), **{k: v / total for k, v in totals.items()}}
        print(f"  {pipeline:<5} {1000 * total / len(sub):6.1f} ms/image: "
              + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in totals.items()))

    finish = {}
    if args.gpu_augment and torch.cuda.is_available():
        for name, local in SETTINGS.items():
            finish[name] = device_finish_rate(paths, AugmentConfig(local_crops=local), 256, torch.device("cuda"))
            print(f"  device part of data.gpu_augment, {name}, batch 256: {finish[name]:.0f} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "images": n, "table": table,
                                               "profile": profile, "device_finish": finish}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
