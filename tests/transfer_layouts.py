"""Synthetic copies of the transfer sets' on-disk layouts: tiny images, real split files and annotations.

`write_layout(name, root) -> path` writes one set under `root` and returns the path to give as ``name:PATH``.
`EXPECTED[name]` says what it holds: classes, images in the train pool, the official val part of the pool
(0 where a set has none), and the test split. Images are solid class colours with seeded noise, so a feature
extractor can tell the classes apart in an end-to-end test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SIDE = 16
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 220)]

# name -> classes, train pool size, official val part of the pool, test size
EXPECTED = {
    "stl10": dict(classes=["airplane", "bird", "car"], train=12, val=0, test=6),
    "food101": dict(classes=["apple_pie", "baby_back_ribs", "beignets"], train=12, val=0, test=6),
    "sun397": dict(classes=["abbey", "bakery/shop", "canyon"], train=12, val=0, test=6),
    "cars": dict(classes=["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"], train=12,
                 val=0, test=6),
    "aircraft": dict(classes=["707-320", "A300B4", "Cessna 172"], train=15, val=6, test=6),
    "dtd": dict(classes=["banded", "blotchy", "bubbly"], train=15, val=6, test=6),
    "pets": dict(classes=["Abyssinian", "American Bulldog", "Bengal"], train=12, val=0, test=6),
    "caltech101": dict(classes=["BACKGROUND_Google", "Faces", "accordion"], train=90, val=0, test=9),
    "flowers102": dict(classes=None, train=15, val=6, test=6),  # torchvision's 102 names
    "eurosat": dict(classes=["AnnualCrop", "Forest", "River"], train=24, val=0, test=6),
    "voc2007": dict(classes=None, train=10, val=3, test=3),  # the 20 VOC classes
}
PER_CLASS = {"train": 4, "val": 0, "test": 2}  # sets without an official val
PER_CLASS_VAL = {"train": 3, "val": 2, "test": 2}  # sets with one

# VOC: image id -> (part, [(class, difficult), ...])
VOC_OBJECTS = {
    "000001": ("train", [("dog", False), ("person", False)]),
    "000002": ("train", [("car", False)]),
    "000003": ("train", [("car", True), ("bus", False)]),  # a difficult car only: not positive for car
    "000004": ("train", [("cat", False)]),
    "000005": ("val", [("dog", False)]),
    "000006": ("val", [("person", False), ("person", True)]),
    "000007": ("val", [("aeroplane", False)]),
    "000008": ("train", [("sheep", False)]),
    "000009": ("train", [("cow", False)]),
    "000010": ("train", [("train", False), ("car", False)]),
    "000011": ("test", [("dog", False)]),
    "000012": ("test", [("car", False), ("cat", True)]),
    "000013": ("test", [("person", False)]),
}


def image(label: int, i: int, side: int = SIDE) -> Image.Image:
    """A solid class colour with seeded noise: [side, side, 3] uint8."""
    rng = np.random.default_rng(1000 * label + i)
    base = np.array(COLOURS[label % len(COLOURS)], dtype=np.int16)
    a = np.clip(base + rng.integers(-25, 26, size=(side, side, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _save(path: Path, label: int, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image(label, i).save(path, format="JPEG" if path.suffix == ".jpg" else None)


def _per_class(name: str) -> dict[str, int]:
    return PER_CLASS_VAL if EXPECTED[name]["val"] else PER_CLASS


def write_layout(name: str, root: str | Path) -> Path:
    """Write the synthetic `name` set under `root`; returns the path for ``name:PATH`` (root itself)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[name](root)
    return root


def _stl10(root: Path) -> None:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    classes = EXPECTED["stl10"]["classes"]
    (d / "class_names.txt").write_text("\n".join(classes) + "\n")
    for part in ("train", "test"):
        labels = [c for c in range(len(classes)) for _ in range(PER_CLASS[part])]
        imgs = np.stack([np.asarray(image(c, i, 96)) for i, c in enumerate(labels)])  # [N, H, W, 3]
        imgs.transpose(0, 3, 2, 1).tofile(d / f"{part}_X.bin")  # STL-10 stores [N, 3, W, H]
        (np.array(labels, dtype=np.uint8) + 1).tofile(d / f"{part}_y.bin")


def _food101(root: Path) -> None:
    d = root / "food-101"
    classes = EXPECTED["food101"]["classes"]
    (d / "meta").mkdir(parents=True)
    (d / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    n = 0
    for part in ("train", "test"):
        meta = {}
        for c, cls in enumerate(classes):
            ids = []
            for _ in range(PER_CLASS[part]):
                n += 1
                _save(d / "images" / cls / f"{n}.jpg", c, n)
                ids.append(f"{cls}/{n}")
            meta[cls] = ids
        (d / "meta" / f"{part}.json").write_text(json.dumps(meta))


def _sun397(root: Path) -> None:
    d = root / "SUN397"
    classes = EXPECTED["sun397"]["classes"]
    lines = [f"/{c[0]}/{c}" for c in classes]
    d.mkdir(parents=True)
    (d / "ClassName.txt").write_text("\n".join(lines) + "\n")
    (root / "Partitions").mkdir()
    (root / "Partitions" / "ClassName.txt").write_text("\n".join(lines) + "\n")
    n = 0
    for part, fname in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        rows = []
        for c, cls in enumerate(classes):
            for _ in range(PER_CLASS[part]):
                n += 1
                rel = f"/{cls[0]}/{cls}/sun_{n:04d}.jpg"
                _save(d / rel.lstrip("/"), c, n)
                rows.append(rel)
        (root / "Partitions" / fname).write_text("\n".join(rows) + "\n")


def _cars(root: Path) -> None:
    d = root / "stanford_cars"
    classes = EXPECTED["cars"]["classes"]
    (d / "devkit").mkdir(parents=True)
    scipy.io.savemat(d / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)[None]})
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for part, annos in (("train", d / "devkit" / "cars_train_annos.mat"), ("test", d / "cars_test_annos_withlabels.mat")):
        rows = []
        for c in range(len(classes)):
            for i in range(PER_CLASS[part]):
                fname = f"{c * 10 + i + 1:05d}.jpg"
                _save(d / f"cars_{part}" / fname, c, c * 10 + i)
                rows.append((1, 1, SIDE, SIDE, c + 1, fname))  # classes are 1-based
        scipy.io.savemat(annos, {"annotations": np.array(rows, dtype=dtype)[None]})


def _aircraft(root: Path) -> None:
    d = root / "fgvc-aircraft-2013b" / "data"
    classes = EXPECTED["aircraft"]["classes"]
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(classes) + "\n")
    n = 0
    rows = {p: [] for p in ("train", "val", "test")}
    for part in rows:
        for c, cls in enumerate(classes):
            for _ in range(PER_CLASS_VAL[part]):
                n += 1
                _save(d / "images" / f"{n:07d}.jpg", c, n)
                rows[part].append(f"{n:07d} {cls}")
    rows["trainval"] = rows["train"] + rows["val"]
    for part, lines in rows.items():
        (d / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")


def _dtd(root: Path) -> None:
    d = root / "dtd"
    classes = EXPECTED["dtd"]["classes"]
    n = 0
    rows = {p: [] for p in ("train", "val", "test")}
    for c, cls in enumerate(classes):
        for part in rows:
            for _ in range(PER_CLASS_VAL[part]):
                n += 1
                _save(d / "images" / cls / f"{cls}_{n:04d}.jpg", c, n)
                rows[part].append(f"{cls}/{cls}_{n:04d}.jpg")
    (d / "labels").mkdir(parents=True)
    for part, lines in rows.items():
        (d / "labels" / f"{part}1.txt").write_text("\n".join(lines) + "\n")
        (d / "labels" / f"{part}2.txt").write_text("\n".join(reversed(lines)) + "\n")  # another partition


def _pets(root: Path) -> None:
    d = root / "oxford-iiit-pet"
    raw = ["Abyssinian", "american_bulldog", "Bengal"]  # cats capitalised, dogs not, as in the real files
    (d / "annotations").mkdir(parents=True)
    n = 0
    for part, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        lines = []
        for c, cls in enumerate(raw):
            species = 1 if cls[0].isupper() else 2
            for _ in range(PER_CLASS[part]):
                n += 1
                _save(d / "images" / f"{cls}_{n}.jpg", c, n)
                lines.append(f"{cls}_{n} {c + 1} {species} {n}")
        (d / "annotations" / fname).write_text("\n".join(lines) + "\n")


def _caltech101(root: Path) -> None:
    d = root / "caltech101" / "101_ObjectCategories"
    for c, cls in enumerate(EXPECTED["caltech101"]["classes"]):
        for i in range(33):
            _save(d / cls / f"image_{i + 1:04d}.jpg", c, i)


def _flowers102(root: Path) -> None:
    d = root / "flowers-102"
    labels, ids, n = [], {"trnid": [], "valid": [], "tstid": []}, 0
    for c in range(3):
        for key, part in (("trnid", "train"), ("valid", "val"), ("tstid", "test")):
            for _ in range(PER_CLASS_VAL[part]):
                n += 1
                _save(d / "jpg" / f"image_{n:05d}.jpg", c, n)
                labels.append(c + 1)
                ids[key].append(n)
    scipy.io.savemat(d / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)[None]})
    scipy.io.savemat(d / "setid.mat", {k: np.array(v, dtype=np.uint16)[None] for k, v in ids.items()})


def _eurosat(root: Path) -> None:
    d = root / "eurosat" / "2750"
    for c, cls in enumerate(EXPECTED["eurosat"]["classes"]):
        for i in range(10):
            _save(d / cls / f"{cls}_{i + 1}.jpg", c, i)


def _voc2007(root: Path) -> None:
    d = root / "VOCdevkit" / "VOC2007"
    (d / "Annotations").mkdir(parents=True)
    (d / "ImageSets" / "Main").mkdir(parents=True)
    from mokd.transfer_data import VOC_CLASSES

    parts = {"train": [], "val": [], "test": []}
    for k, (img_id, (part, objects)) in enumerate(VOC_OBJECTS.items()):
        _save(d / "JPEGImages" / f"{img_id}.jpg", VOC_CLASSES.index(objects[0][0]), k)
        objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                       f"<difficult>{int(diff)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax>"
                       f"<ymax>8</ymax></bndbox></object>" for n, diff in objects)
        (d / "Annotations" / f"{img_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{img_id}.jpg</filename><size><width>{SIDE}</width>"
            f"<height>{SIDE}</height><depth>3</depth></size>{objs}</annotation>")
        parts[part].append(img_id)
    parts["trainval"] = parts["train"] + parts["val"]
    for part, ids in parts.items():
        (d / "ImageSets" / "Main" / f"{part}.txt").write_text("\n".join(ids) + "\n")


def voc_expected(part: str) -> dict[str, set[str]]:
    """VOC image id -> the classes it is positive for (non-difficult objects), for one part."""
    return {i: {n for n, diff in objs if not diff} for i, (p, objs) in VOC_OBJECTS.items() if p == part}


WRITERS = {"stl10": _stl10, "food101": _food101, "sun397": _sun397, "cars": _cars, "aircraft": _aircraft,
           "dtd": _dtd, "pets": _pets, "caltech101": _caltech101, "flowers102": _flowers102, "eurosat": _eurosat,
           "voc2007": _voc2007}


def write_cifar10(root: Path) -> Path:
    """CIFAR-10's python archive folder under `root` (4 images per batch file, labels 0-3); returns `root`."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root
