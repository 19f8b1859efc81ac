"""A tiny COCO-format data set drawn in the test: coloured rectangles and triangles with polygon masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]  # non-contiguous ids on purpose


def _shape(rng: np.random.Generator, kind: str, size: int) -> list[float]:
    s = int(rng.integers(size // 4, size // 2))
    x0 = int(rng.integers(0, size - s))
    y0 = int(rng.integers(0, size - s))
    if kind == "square":
        return [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]
    return [x0 + s / 2, y0, x0 + s, y0 + s, x0, y0 + s]


def write_split(root: Path, split: str, n_images: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        size = int(rng.integers(64, 97))
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(img)
        for j, cat in enumerate(CATEGORIES):
            poly = _shape(rng, cat["name"], size)
            colour = (230, 40, 40) if cat["name"] == "square" else (40, 220, 60)
            draw.polygon(poly, fill=colour)
            xs, ys = poly[0::2], poly[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat["id"],
                                "segmentation": [poly], "bbox": bbox, "area": bbox[2] * bbox[3] / 2, "iscrowd": 0})
        name = f"{i:06d}.png"
        img.save(root / split / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann


def make_tiny_coco(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """root/annotations/instances_{train,val}2017.json and root/{train,val}2017/*.png."""
    write_split(root, "train2017", n_train, seed=0)
    write_split(root, "val2017", n_val, seed=1)
    return root
