"""Images for the analyses that need no labels (CKA, rank, attention maps): a data spec's split, a folder of
images with no train/val or class layout, or image files named one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mokd.data import IMAGE_EXTENSIONS, DataSpec, ImageDataset, build_dataset, read_image
from mokd.errors import UserError

UNLABELLED = "unlabelled"


def seeded_subset(n: int, max_images: int | None, seed: int) -> list[int]:
    """Sorted indices of a seeded pick of `max_images` of n items (all of them when max_images is None or >= n),
    so that every analysis and the bench average over the same images for the same seed."""
    if not max_images or n <= max_images:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, max_images, replace=False).tolist())


def files_dataset(paths: list[str | Path]) -> ImageDataset:
    """Image files as a data set of one class ('unlabelled'); labels are all 0."""
    paths = [str(p) for p in paths]
    return ImageDataset([UNLABELLED], [0] * len(paths), lambda i: read_image(paths[i]), None, paths)


def image_files(args: list[str]) -> list[Path]:
    """Each argument an image file, or a folder whose images (recursively, sorted) are taken."""
    out = []
    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"{p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"{p} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            out.append(p)
        else:
            raise UserError(f"image {p} does not exist (expected an image file or a folder of images)")
    return out


def is_unlabelled_folder(spec: DataSpec) -> bool:
    """A folder with neither train/ nor val/ in it (and no class list): read as a plain set of images."""
    return (spec.kind == "folder" and spec.class_list is None and not (spec.root / "train").is_dir()
            and not (spec.root / "val").is_dir())


def analysis_dataset(spec: DataSpec, split: str = "val") -> ImageDataset:
    """`split` of the data set, or for an unlabelled folder every image in it (any split: there is only one)."""
    if is_unlabelled_folder(spec):
        return files_dataset(image_files([str(spec.root)]))
    return build_dataset(spec, split)
