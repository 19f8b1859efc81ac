"""The transfer suite's data sets (Kornblith et al. 2019; Ericsson et al. 2021), read from their own on-disk layouts.

Each set is a `TransferSet` in `TRANSFER_SETS`, keyed by its `--data` prefix (``dtd:PATH``, ``voc2007:PATH``, ...).
Its reader lists one *part* of the set: "train", "test", and "val" where the set has an official validation
split. The protocol's meaning of our split names (docs/datasets.md):

  train pool  (`build_dataset(spec, "train")`): official train + val where there is an official val, else train
  evaluation  (`build_dataset(spec, "val")`): the official test split
  holdout     (`holdout_split`): the official val rows of the pool, else a seeded 20% of it (as ssl-transfer)

Nothing downloads. torchvision's readers are used where they read the real layout with download=False and check
no checksum (Food-101, Stanford Cars, FGVC Aircraft, Oxford-IIIT Pets, EuroSAT's folders, VOC 2007); STL-10 and
Flowers-102 (torchvision verifies their MD5 on load), SUN397 (no partition support), DTD (torchvision expects a
doubled dtd/dtd folder) and Caltech-101 (torchvision drops the background class and writes into the root) are
read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from mokd.errors import UserError

HOLDOUT_FRACTION = 0.2  # ssl-transfer's valid_size: the share of the train split held out to pick hyper-parameters
CALTECH_TRAIN_PER_CLASS = 30
CALTECH_SEED = 0
EUROSAT_TEST_FRACTION = 0.2
EUROSAT_SEED = 0
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class Listing(NamedTuple):
    """One part of a set: class names, and per image a file path and a label (an int, or for multi-label sets a
    multi-hot uint8 tensor [C]). In-memory sets (STL-10) give `images` [N, H, W, 3] uint8 and `files` (the files
    read) instead of paths."""

    classes: list[str]
    paths: list[str] | None
    targets: list
    images: np.ndarray | None = None
    files: list[str] | None = None


@dataclass(frozen=True)
class TransferSet:
    title: str
    metric: str  # "top1" | "mean_per_class" | "map11"
    layout: str  # the layout expected, for error messages
    read: Callable[[Path, str], Listing]  # (user path, part) -> Listing
    official_val: bool = False
    multilabel: bool = False

    @property
    def parts(self) -> dict[str, tuple[str, ...]]:
        """Our split name -> the parts of the set it is made of."""
        return {"train": ("train", "val") if self.official_val else ("train",), "val": ("test",)}


def _need(spec: str, files: list[Path], layout: str) -> None:
    """One line naming the first missing file or folder and the layout expected."""
    for f in files:
        if not f.exists():
            raise UserError(f"{spec}: missing {f}; expected {layout}")


def _base(path: Path, rel: str) -> Path:
    """The folder `rel` (e.g. 'food-101') given the user's path: PATH/rel, or PATH itself when it is that folder."""
    if (path / rel).is_dir():
        return path / rel
    parts = Path(rel).parts
    if path.parts[-len(parts):] == parts:
        return path
    return path / rel


def _lines(f: Path) -> list[str]:
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------- STL-10

STL10_LAYOUT = ("the STL-10 binary layout stl10_binary/{train,test}_X.bin, stl10_binary/{train,test}_y.bin and "
                "stl10_binary/class_names.txt")


def _stl10(path: Path, part: str) -> Listing:
    base = _base(path, "stl10_binary")
    x, y, names = base / f"{part}_X.bin", base / f"{part}_y.bin", base / "class_names.txt"
    _need(f"stl10:{path}", [base, names, x, y], STL10_LAYOUT)
    labels = np.fromfile(y, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    side = 96
    n = x.stat().st_size // (3 * side * side)
    if n != len(labels) or x.stat().st_size != n * 3 * side * side:
        raise UserError(f"stl10:{path}: {x.name} holds {x.stat().st_size} bytes, not {len(labels)} images of "
                        f"3x96x96 bytes as {y.name} says; expected {STL10_LAYOUT}")
    # Stored channel-major, each channel column-major: [N, 3, W, H]; memory-mapped, decoded one image at a time.
    images = np.memmap(x, dtype=np.uint8, mode="r", shape=(n, 3, side, side)).transpose(0, 3, 2, 1)
    classes = _lines(names)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise UserError(f"stl10:{path}: {y.name} has labels outside 1..{len(classes)} ({names.name} names "
                        f"{len(classes)} classes)")
    return Listing(classes, None, [int(t) for t in labels], images, [str(x), str(y), str(names)])


# ---------------------------------------------------------------------------------------------- Food-101

FOOD_LAYOUT = "the Food-101 layout food-101/images/<class>/<id>.jpg and food-101/meta/{train,test}.json"


def _food101(path: Path, part: str) -> Listing:
    from torchvision.datasets import Food101

    base = _base(path, "food-101")
    _need(f"food101:{path}", [base / "images", base / "meta" / f"{part}.json"], FOOD_LAYOUT)
    try:
        ds = Food101(str(base.parent), split=part, download=False)
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"food101:{path}: {base / 'meta' / f'{part}.json'} is not a JSON object of class -> image "
                        f"ids ({e}); expected {FOOD_LAYOUT}") from e
    return Listing(list(ds.classes), [str(p) for p in ds._image_files], list(ds._labels))


# ---------------------------------------------------------------------------------------------- SUN397

SUN_LAYOUT = ("the SUN397 layout SUN397/ClassName.txt, SUN397/<letter>/<class>/sun_*.jpg and the partition files "
              "Training_01.txt, Testing_01.txt (in Partitions/ beside or inside SUN397/, or in SUN397/ itself)")


def _sun397(path: Path, part: str) -> Listing:
    base = _base(path, "SUN397")
    _need(f"sun397:{path}", [base, base / "ClassName.txt"], SUN_LAYOUT)
    name = {"train": "Training_01.txt", "test": "Testing_01.txt"}[part]
    candidates = [base.parent / "Partitions", base / "Partitions", base, base.parent]
    found = [d / name for d in candidates if (d / name).is_file()]
    if not found:
        raise UserError(f"sun397:{path}: missing {name} (looked in {', '.join(str(d) for d in candidates[:3])}); "
                        f"expected {SUN_LAYOUT}")
    # ClassName.txt lines are '/a/abbey', '/b/bakery/shop': the class is what follows the letter folder.
    classes = sorted(ln.strip("/").split("/", 1)[1] for ln in _lines(base / "ClassName.txt"))
    index = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for ln in _lines(found[0]):
        rel = ln.strip("/")
        cls = "/".join(rel.split("/")[1:-1])
        if cls not in index:
            raise UserError(f"sun397:{path}: {found[0].name} lists {ln}, whose class {cls!r} is not in "
                            f"ClassName.txt; expected {SUN_LAYOUT}")
        paths.append(str(base / rel))
        targets.append(index[cls])
    return Listing(classes, paths, targets)


# ---------------------------------------------------------------------------------------------- Stanford Cars

CARS_LAYOUT = ("the Stanford Cars layout stanford_cars/{cars_train,cars_test}/*.jpg, "
               "stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat} and "
               "stanford_cars/cars_test_annos_withlabels.mat")


def _cars(path: Path, part: str) -> Listing:
    from torchvision.datasets import StanfordCars

    base = _base(path, "stanford_cars")
    annos = base / "devkit" / "cars_train_annos.mat" if part == "train" else base / "cars_test_annos_withlabels.mat"
    _need(f"cars:{path}", [base / "devkit" / "cars_meta.mat", annos, base / f"cars_{part}"], CARS_LAYOUT)
    try:
        ds = StanfordCars(str(base.parent), split=part, download=False)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cars:{path}: cannot read the annotations in {annos.name} or devkit/cars_meta.mat ({e}); "
                        f"expected {CARS_LAYOUT}") from e
    return Listing([str(c) for c in ds.classes], [p for p, _ in ds._samples], [int(t) for _, t in ds._samples])


# ---------------------------------------------------------------------------------------------- FGVC Aircraft

AIRCRAFT_LAYOUT = ("the FGVC-Aircraft layout fgvc-aircraft-2013b/data/images/*.jpg, "
                   "fgvc-aircraft-2013b/data/variants.txt and "
                   "fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt")


def _aircraft(path: Path, part: str) -> Listing:
    from torchvision.datasets import FGVCAircraft

    base = _base(path, "fgvc-aircraft-2013b")
    data = base / "data"
    _need(f"aircraft:{path}", [data / "images", data / "variants.txt", data / f"images_variant_{part}.txt"],
          AIRCRAFT_LAYOUT)
    try:
        ds = FGVCAircraft(str(base.parent), split=part, annotation_level="variant", download=False)
    except (KeyError, ValueError) as e:
        raise UserError(f"aircraft:{path}: images_variant_{part}.txt names a variant not in variants.txt ({e}); "
                        f"expected {AIRCRAFT_LAYOUT}") from e
    return Listing(list(ds.classes), [str(p) for p in ds._image_files], list(ds._labels))


# ---------------------------------------------------------------------------------------------- DTD

DTD_LAYOUT = "the DTD layout dtd/images/<class>/*.jpg and dtd/labels/{train,val,test}1.txt"


def _dtd(path: Path, part: str) -> Listing:
    base = _base(path, "dtd")
    if (base / "dtd" / "labels").is_dir():  # torchvision's download folder: dtd/dtd/
        base = base / "dtd"
    split_file = base / "labels" / f"{part}1.txt"
    _need(f"dtd:{path}", [base / "images", split_file], DTD_LAYOUT)
    classes = sorted(p.name for p in (base / "images").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for ln in _lines(split_file):  # 'banded/banded_0002.jpg'
        cls = ln.split("/")[0]
        if cls not in index:
            raise UserError(f"dtd:{path}: {split_file.name} lists {ln}, but there is no folder images/{cls}; "
                            f"expected {DTD_LAYOUT}")
        paths.append(str(base / "images" / ln))
        targets.append(index[cls])
    return Listing(classes, paths, targets)


# ---------------------------------------------------------------------------------------------- Oxford-IIIT Pets

PETS_LAYOUT = "the Oxford-IIIT Pet layout oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt"


def _pets(path: Path, part: str) -> Listing:
    from torchvision.datasets import OxfordIIITPet

    base = _base(path, "oxford-iiit-pet")
    split = "trainval" if part == "train" else "test"
    _need(f"pets:{path}", [base / "images", base / "annotations" / f"{split}.txt"], PETS_LAYOUT)
    try:
        ds = OxfordIIITPet(str(base.parent), split=split, download=False)
    except ValueError as e:
        raise UserError(f"pets:{path}: annotations/{split}.txt is not lines of 'id class species breed' ({e}); "
                        f"expected {PETS_LAYOUT}") from e
    return Listing(list(ds.classes), [str(p) for p in ds._images], list(ds._labels))


# ---------------------------------------------------------------------------------------------- Caltech-101

CALTECH_LAYOUT = "the Caltech-101 layout caltech101/101_ObjectCategories/<class>/image_NNNN.jpg"


def _caltech101(path: Path, part: str) -> Listing:
    """All 102 folders (BACKGROUND_Google included, as Kornblith et al. and ssl-transfer). Per class, in sorted
    class order, one generator seeded CALTECH_SEED draws CALTECH_TRAIN_PER_CLASS images without replacement for
    train; every other image of the class is test (no cap)."""
    folder = _base(path, "caltech101/101_ObjectCategories")
    if not folder.is_dir():
        folder = _base(path, "101_ObjectCategories")
    _need(f"caltech101:{path}", [folder], CALTECH_LAYOUT)
    from mokd.data import IMAGE_EXTENSIONS

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"caltech101:{path}: {folder} holds no class folders; expected {CALTECH_LAYOUT}")
    rng = np.random.default_rng(CALTECH_SEED)
    paths, targets = [], []
    for label, c in enumerate(classes):
        files = sorted(str(p) for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) <= CALTECH_TRAIN_PER_CLASS:
            raise UserError(f"caltech101:{path}: class {c} has {len(files)} images; the split takes "
                            f"{CALTECH_TRAIN_PER_CLASS} per class for training and needs more for testing")
        train = set(rng.choice(len(files), CALTECH_TRAIN_PER_CLASS, replace=False).tolist())
        keep = [f for i, f in enumerate(files) if (i in train) == (part == "train")]
        paths += keep
        targets += [label] * len(keep)
    return Listing(classes, paths, targets)


# ---------------------------------------------------------------------------------------------- Flowers-102

FLOWERS_LAYOUT = "the Flowers-102 layout flowers-102/jpg/image_NNNNN.jpg, flowers-102/imagelabels.mat and flowers-102/setid.mat"


def _flowers102(path: Path, part: str) -> Listing:
    import scipy.io
    from torchvision.datasets import Flowers102

    base = _base(path, "flowers-102")
    _need(f"flowers102:{path}", [base / "jpg", base / "imagelabels.mat", base / "setid.mat"], FLOWERS_LAYOUT)
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[part]
    try:
        ids = scipy.io.loadmat(base / "setid.mat", squeeze_me=True)[key]
        labels = scipy.io.loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"flowers102:{path}: setid.mat needs trnid, valid, tstid and imagelabels.mat needs labels "
                        f"(missing {e}); expected {FLOWERS_LAYOUT}") from e
    ids, labels = np.atleast_1d(ids).astype(np.int64), np.atleast_1d(labels).astype(np.int64)
    if ids.size and ids.max() > len(labels):
        raise UserError(f"flowers102:{path}: setid.mat names image {ids.max()}, imagelabels.mat labels only "
                        f"{len(labels)}; expected {FLOWERS_LAYOUT}")
    # The files hold label numbers only; torchvision keeps the 102 names (in label order).
    n_classes = int(labels.max())
    classes = list(Flowers102.classes[:n_classes]) if n_classes <= len(Flowers102.classes) else \
        [str(i) for i in range(1, n_classes + 1)]
    return Listing(classes, [str(base / "jpg" / f"image_{i:05d}.jpg") for i in ids],
                   [int(labels[i - 1]) - 1 for i in ids])


# ---------------------------------------------------------------------------------------------- EuroSAT

EUROSAT_LAYOUT = "the EuroSAT RGB layout eurosat/2750/<class>/*.jpg (the folder 2750 holds the 10 class folders)"


def _eurosat(path: Path, part: str) -> Listing:
    """No official split: per class (sorted files), a generator seeded EUROSAT_SEED takes round(20%) for test."""
    from torchvision.datasets import ImageFolder

    folder = _base(path, "eurosat/2750")
    if not folder.is_dir():
        folder = _base(path, "2750")
    _need(f"eurosat:{path}", [folder], EUROSAT_LAYOUT)
    try:
        ds = ImageFolder(str(folder), allow_empty=False)
    except FileNotFoundError as e:
        raise UserError(f"eurosat:{path}: {e}; expected {EUROSAT_LAYOUT}") from e
    rng = np.random.default_rng(EUROSAT_SEED)
    by_class: dict[int, list[str]] = {}
    for p, t in sorted(ds.samples):
        by_class.setdefault(t, []).append(p)
    paths, targets = [], []
    for t in sorted(by_class):
        files = by_class[t]
        test = set(rng.permutation(len(files))[:round(EUROSAT_TEST_FRACTION * len(files))].tolist())
        keep = [f for i, f in enumerate(files) if (i in test) == (part == "test")]
        paths += keep
        targets += [t] * len(keep)
    return Listing(list(ds.classes), paths, targets)


# ---------------------------------------------------------------------------------------------- VOC 2007

VOC_LAYOUT = ("the VOC 2007 layout VOCdevkit/VOC2007/{JPEGImages,Annotations}/ and "
              "VOCdevkit/VOC2007/ImageSets/Main/{train,val,test}.txt (the trainval and test archives extracted "
              "into one folder)")


def _voc2007(path: Path, part: str) -> Listing:
    """Multi-label: an image is positive for a class when it holds an object of that class not marked difficult
    (the VOC classification rule; an image whose only objects of a class are difficult counts as negative)."""
    from torchvision.datasets import VOCDetection

    base = _base(path, "VOCdevkit/VOC2007")
    if not base.is_dir():
        base = _base(path, "VOC2007")
    main = base / "ImageSets" / "Main" / f"{part}.txt"
    _need(f"voc2007:{path}", [base / "JPEGImages", base / "Annotations", main], VOC_LAYOUT)
    # torchvision reads ROOT/VOCdevkit/VOC2007; a VOC2007 folder elsewhere is listed here, the same way.
    ds = VOCDetection(str(base.parent.parent), year="2007", image_set=part, download=False) \
        if base.parent.name == "VOCdevkit" else None
    images = ds.images if ds is not None else [str(base / "JPEGImages" / f"{i}.jpg") for i in _lines(main)]
    annos = ds.annotations if ds is not None else [str(base / "Annotations" / f"{i}.xml") for i in _lines(main)]
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    targets = []
    for a in annos:
        try:
            objects = _voc_objects(a)
        except (OSError, ValueError) as e:
            raise UserError(f"voc2007:{path}: cannot read annotation {a} ({e}); expected {VOC_LAYOUT}") from e
        y = torch.zeros(len(VOC_CLASSES), dtype=torch.uint8)
        for name, difficult in objects:
            if name not in index:
                raise UserError(f"voc2007:{path}: {a} has an object of class {name!r}, not one of the 20 VOC classes")
            if not difficult:
                y[index[name]] = 1
        targets.append(y)
    return Listing(list(VOC_CLASSES), list(images), targets)


def _voc_objects(xml_file: str) -> list[tuple[str, bool]]:
    """(class name, difficult) of every object in one VOC annotation file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as e:
        raise ValueError(str(e)) from e
    return [(o.findtext("name", "").strip(), o.findtext("difficult", "0").strip() == "1")
            for o in root.iter("object")]


TRANSFER_SETS: dict[str, TransferSet] = {
    "stl10": TransferSet("STL-10", "top1", STL10_LAYOUT, _stl10),
    "food101": TransferSet("Food-101", "top1", FOOD_LAYOUT, _food101),
    "sun397": TransferSet("SUN397", "top1", SUN_LAYOUT, _sun397),
    "cars": TransferSet("Stanford Cars", "top1", CARS_LAYOUT, _cars),
    "aircraft": TransferSet("FGVC Aircraft", "mean_per_class", AIRCRAFT_LAYOUT, _aircraft, official_val=True),
    "voc2007": TransferSet("Pascal VOC 2007", "map11", VOC_LAYOUT, _voc2007, official_val=True, multilabel=True),
    "dtd": TransferSet("DTD", "top1", DTD_LAYOUT, _dtd, official_val=True),
    "pets": TransferSet("Oxford-IIIT Pets", "mean_per_class", PETS_LAYOUT, _pets),
    "caltech101": TransferSet("Caltech-101", "mean_per_class", CALTECH_LAYOUT, _caltech101),
    "flowers102": TransferSet("Flowers-102", "mean_per_class", FLOWERS_LAYOUT, _flowers102, official_val=True),
    "eurosat": TransferSet("EuroSAT", "top1", EUROSAT_LAYOUT, _eurosat),
}


def read_split(kind: str, path: Path, split: str) -> Listing:
    """Our split ('train' = the pool, 'val' = the official test) of a transfer set, as one Listing; checks that
    the pool and the test split hold the same classes (single-label sets)."""
    ts = TRANSFER_SETS[kind]
    listings = {s: [ts.read(path, p) for p in ts.parts[s]] for s in ("train", "val")}
    if not ts.multilabel:
        seen = {s: set().union(*(set(ls.targets) for ls in parts)) for s, parts in listings.items()}
        if seen["train"] != seen["val"]:
            classes = listings["train"][0].classes
            only_t = [classes[i] for i in sorted(seen["train"] - seen["val"])][:5]
            only_v = [classes[i] for i in sorted(seen["val"] - seen["train"])][:5]
            raise UserError(f"{kind}:{path}: the train split has images of {len(seen['train'])} classes, the test "
                            f"split of {len(seen['val'])} (only in train: {only_t}, only in test: {only_v}); "
                            f"expected every class in both")
    parts, classes = listings[split], listings["train"][0].classes  # one class list for both splits
    if len(parts) == 1:
        return parts[0]._replace(classes=classes)
    return Listing(classes, [p for ls in parts for p in ls.paths], [t for ls in parts for t in ls.targets])


def official_val_paths(kind: str, path: Path) -> list[str]:
    """The image paths of a set's official validation split (a part of its train pool)."""
    ts = TRANSFER_SETS[kind]
    if not ts.official_val:
        raise ValueError(f"{kind} has no official validation split")
    return ts.read(path, "val").paths


def seeded_holdout(n: int, seed: int = 0, fraction: float = HOLDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """(fit rows, held-out rows) of n: ssl-transfer's draw (not class-stratified): shuffle range(n) with numpy's
    legacy generator seeded `seed`, the first floor(fraction * n) are held out. Both lists sorted."""
    k = int(np.floor(fraction * n))
    if k == 0 or k == n:
        raise UserError(f"cannot hold out {fraction:.0%} of {n} training images for validation: need at least "
                        f"{int(np.ceil(1 / fraction))} images")
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    return sorted(idx[k:].tolist()), sorted(idx[:k].tolist())


def image_of(listing: Listing) -> Callable[[int], Image.Image]:
    """The loader of an in-memory listing's i-th image (an RGB PIL image)."""
    images = listing.images
    return lambda i: Image.fromarray(np.ascontiguousarray(images[i]))
