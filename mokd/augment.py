"""DINO multi-crop augmentation, made deterministic per sample.

Each image gets 2 global crops and N local crops. Global crop 1: random resized crop, flip, colour jitter
(p 0.8), grayscale (p 0.2), Gaussian blur (p 1.0); global crop 2: the same with blur p 0.1 and solarisation
p 0.2; local crops: the same with blur p 0.5. Blur radii are DINO's 0.1-2 px at 224, scaled by the global crop
size for every crop (augment.blur_scale=global, as DINO and the release: local crops too) or by each crop's own.

`SeededCrops` draws every random number of sample i in epoch e from a generator seeded by (seed, e, i), so
crops do not depend on worker count, rank or batch layout: a resumed run and a 2-process run see exactly
the crops of an uninterrupted 1-process run.
"""

from __future__ import annotations

import random

import torch
from PIL import ImageFilter
from torchvision import transforms as T

from mokd.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with probability p and a radius drawn uniformly from [lo, hi] (torch RNG)."""

    def __init__(self, p: float, lo: float, hi: float):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.lo + (self.hi - self.lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class MultiCrop:
    """PIL image -> list of 2 + local_crops tensors [3, S, S] (globals first)."""

    def __init__(self, cfg: AugmentConfig):
        flip_jitter = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        bicubic = T.InterpolationMode.BICUBIC

        g, l = cfg.global_size, cfg.local_size

        def blur(size: int, p: float) -> GaussianBlur:
            s = (g if cfg.blur_scale == "global" else size) / 224.0
            return GaussianBlur(p, 0.1 * s, 2.0 * s)

        self.global1 = T.Compose([T.RandomResizedCrop(g, scale=cfg.global_scale, interpolation=bicubic),
                                  *flip_jitter, blur(g, 1.0), *normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(g, scale=cfg.global_scale, interpolation=bicubic),
                                  *flip_jitter, blur(g, 0.1), T.RandomSolarize(threshold=128, p=0.2), *normalize])
        self.local = T.Compose([T.RandomResizedCrop(l, scale=cfg.local_scale, interpolation=bicubic),
                                *flip_jitter, blur(l, 0.5), *normalize])
        self.local_crops = cfg.local_crops

    def __call__(self, img) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of every random draw for sample `index` in `epoch` of a run seeded by `seed` (both pipelines)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SeededCrops(torch.utils.data.Dataset):
    """Wraps a data set of PIL images; item i of epoch e -> (list of crops, label), seeded by (seed, e, i)."""

    def __init__(self, dataset, multicrop: MultiCrop, seed: int):
        self.dataset, self.multicrop, self.seed, self.epoch = dataset, multicrop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i]
        seed = sample_seed(self.seed, self.epoch, i)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2**63))
            random.seed(seed)
            try:
                crops = self.multicrop(img)
            finally:
                random.setstate(py_state)
        return crops, label
