"""Data sets behind every command: ImageFolder roots, CIFAR archives on disk, and two embedded sets.

A data spec is a string:
  ``digits``            scikit-learn's 8x8 digits, upscaled to 32x32 RGB (ships with scikit-learn; the default)
  ``photos``            32x32 RGB patches of 12 photographs that ship with scikit-image, one class per photograph;
                        train and val patches come from disjoint parts of each photograph (see `build_photos`)
  ``PATH``              an ImageFolder root in ImageNet layout: PATH/train/<class>/<image>, PATH/val/<class>/<image>
  ``folder:PATH``       the same, spelled out (so a folder named digits or photos is read as a folder)
  ``cifar10:PATH``      CIFAR-10 python archive folder (``cifar-10-batches-py``, or a folder that contains it)
  ``cifar100:PATH``     CIFAR-100 python archive folder (``cifar-100-python``, or a folder that contains it)
  ``stl10:PATH``, ``food101:PATH``, ``sun397:PATH``, ``cars:PATH``, ``aircraft:PATH``, ``voc2007:PATH``,
  ``dtd:PATH``, ``pets:PATH``, ``caltech101:PATH``, ``flowers102:PATH``, ``eurosat:PATH``
                        the transfer suite's sets in their own layouts (`mokd.transfer_data`, docs/datasets.md)
Split names: "train" is the training pool (official train + val where a set has an official val split), "val"
the evaluation split (CIFAR's test batch, a transfer set's official test split); `holdout_split` picks the
validation rows of the pool (a transfer set's official val, else a seeded 20%).
An optional class-list file (one class folder name per line, e.g. ImageNet-100) selects a subset of classes.

Images are read as 8-bit RGB: 16-bit and 32-bit modes are scaled to 0-255 (not clipped). A file that does not
decode is a one-line error naming it, or, with `skip_unreadable`, left out and listed in `ImageDataset.skipped`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from mokd.errors import UserError
from mokd.transfer_data import TRANSFER_SETS, image_of, official_val_paths, read_split, seeded_holdout

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SIZE = 32
PHOTOS_SIZE = 32


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "digits" | "photos" | "folder" | "cifar10" | "cifar100" | a key of TRANSFER_SETS
    root: Path | None = None
    class_list: Path | None = None

    def __str__(self) -> str:
        s = self.kind if self.root is None else f"{self.kind}:{self.root}"
        return s if self.class_list is None else f"{s} (classes from {self.class_list})"

    @property
    def native_size(self) -> int | None:
        """Image side of small-image data sets (digits, photos, CIFAR); None for folders of arbitrary images."""
        return {"digits": DIGITS_SIZE, "photos": PHOTOS_SIZE, "cifar10": 32, "cifar100": 32}.get(self.kind)

    @property
    def transfer(self) -> bool:
        """One of the transfer suite's sets (`TRANSFER_SETS`), read from its own layout."""
        return self.kind in TRANSFER_SETS

    @property
    def metric(self) -> str:
        """The protocol's headline metric: "top1", "mean_per_class" (Aircraft, Pets, Caltech-101, Flowers) or
        "map11" (VOC 2007's 11-point mAP)."""
        return TRANSFER_SETS[self.kind].metric if self.transfer else "top1"

    @property
    def multilabel(self) -> bool:
        """Targets are multi-hot uint8 tensors [C] (VOC 2007), not class indices."""
        return self.transfer and TRANSFER_SETS[self.kind].multilabel

    @property
    def official_val(self) -> bool:
        """The training pool holds an official validation split (`holdout_split` returns it)."""
        return self.transfer and TRANSFER_SETS[self.kind].official_val

    @property
    def resize_ratio(self) -> float:
        """Short side before the centre crop, as a multiple of the crop: 1.0 for the transfer sets (the protocol's
        Resize(224, bicubic) + CenterCrop(224)), 256/224 otherwise (ImageNet's). Unused for native-size sets."""
        return 1.0 if self.transfer else 256 / 224

    @property
    def embedded(self) -> bool:
        """Built in memory from files that ship with an installed package (digits, photos): no path, no class list."""
        return self.kind in EMBEDDED


def parse_data_spec(spec: str | None, class_list: str | Path | None = None) -> DataSpec:
    """Parse a ``--data`` string (see the module docstring). None or '' means the embedded digits."""
    cl = Path(class_list).expanduser() if class_list else None
    if cl is not None and not cl.is_file():
        raise UserError(f"class-list file {cl} does not exist (expected a text file, one class folder name a line)")
    if spec in (None, "") or spec in EMBEDDED:
        if cl is not None:
            raise UserError(f"a class list only applies to ImageFolder data, not to the embedded {spec or 'digits'}")
        return DataSpec(spec or "digits")
    kind, sep, rest = str(spec).partition(":")
    if sep and (kind in ("cifar10", "cifar100", "folder", "imagefolder") or kind in TRANSFER_SETS):
        kind = "folder" if kind == "imagefolder" else kind
        path = Path(rest).expanduser()
    else:
        kind, path = "folder", Path(str(spec)).expanduser()
    if kind != "folder" and cl is not None:
        raise UserError(f"a class list only applies to ImageFolder data, not to {kind}")
    if not path.exists():
        raise UserError(f"data path {path} does not exist. {_layout_help(kind)}")
    if not path.is_dir():
        raise UserError(f"data path {path} is a file, not a folder. {_layout_help(kind)}")
    return DataSpec(kind, path, cl)


def _layout_help(kind: str) -> str:
    if kind in TRANSFER_SETS:
        return f"Expected {TRANSFER_SETS[kind].layout} (docs/datasets.md)."
    if kind == "cifar10":
        return "Expected the CIFAR-10 python archive folder 'cifar-10-batches-py' (data_batch_1..5, test_batch)."
    if kind == "cifar100":
        return "Expected the CIFAR-100 python archive folder 'cifar-100-python' (train, test, meta)."
    return ("Expected an ImageFolder root in ImageNet layout: ROOT/train/<class>/<image> and "
            "ROOT/val/<class>/<image> (a root holding class folders directly is also accepted for training).")


class ImageDataset(torch.utils.data.Dataset):
    """A list of (loader key, label) with class names; returns (transformed image, label)."""

    def __init__(self, classes: list[str], targets: list[int], load: Callable[[int], Image.Image],
                 transform: Callable | None = None, paths: list[str] | None = None):
        self.classes, self.targets, self._load, self.transform = classes, targets, load, transform
        self.paths = paths  # file paths for folder data (used by split files); None for in-memory sets
        self.skipped: list[str] = []  # unreadable files left out (build_dataset(..., skip_unreadable=True))
        self.multilabel = False  # targets are multi-hot uint8 tensors [C] (VOC 2007) instead of class indices

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self._load(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def subset(self, indices) -> "ImageDataset":
        indices = list(indices)
        sub = ImageDataset(self.classes, [self.targets[i] for i in indices], lambda j: self._load(indices[j]),
                           self.transform, None if self.paths is None else [self.paths[i] for i in indices])
        sub.multilabel = self.multilabel
        return sub


def build_dataset(spec: DataSpec, split: str = "train", transform: Callable | None = None,
                  skip_unreadable: bool = False) -> ImageDataset:
    """The `split` ('train' or 'val') of the data set named by `spec`, returning PIL RGB images.

    `skip_unreadable` (folders): decode every file once first and leave out those that fail.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.embedded:
        return EMBEDDED[spec.kind](split, transform)
    if spec.kind in ("cifar10", "cifar100"):
        return _cifar(spec.kind, spec.root, split, transform)
    if spec.transfer:
        return _transfer(spec, split, transform, skip_unreadable)
    return _folder(spec.root, split, spec.class_list, transform, skip_unreadable)


def _transfer(spec: DataSpec, split: str, transform, skip_unreadable: bool) -> ImageDataset:
    listing = read_split(spec.kind, spec.root, split)
    if listing.paths is None:  # in memory (STL-10)
        ds = ImageDataset(listing.classes, listing.targets, image_of(listing), transform)
        return ds
    paths, targets, skipped = listing.paths, listing.targets, []
    if skip_unreadable:
        paths, targets, skipped = _drop_unreadable(paths, targets, f"{spec}")
    ds = ImageDataset(listing.classes, targets, lambda i: read_image(paths[i]), transform, paths)
    ds.multilabel, ds.skipped = spec.multilabel, skipped
    return ds


def holdout_split(spec: DataSpec, train: ImageDataset, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit rows, validation rows), indices into the training pool `train` (`build_dataset(spec, "train")`).

    Aircraft, DTD, Flowers-102 and VOC 2007: the official validation split (its files, found in the pool by path;
    `seed` is unused). Every other set: ssl-transfer's draw, a seeded 20% of the pool, not class-stratified.
    """
    if spec.official_val:
        val = set(official_val_paths(spec.kind, spec.root))
        if train.paths is None:
            raise ValueError(f"{spec}: the training pool has no file paths to find the validation split in")
        fit = [i for i, p in enumerate(train.paths) if p not in val]
        held = [i for i, p in enumerate(train.paths) if p in val]
        if not fit or not held:
            raise UserError(f"{spec}: the official validation split leaves {len(fit)} images to fit and {len(held)} "
                            f"to validate; expected both non-empty")
        return fit, held
    return seeded_holdout(len(train), seed)


def _digits(split: str, transform) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # [1797, 8, 8]
    idx = np.arange(len(images))
    # Deterministic 80/20 split: every fifth image is held out.
    keep = idx[idx % 5 == 0] if split == "val" else idx[idx % 5 != 0]
    up = torch.nn.functional.interpolate(torch.from_numpy(images[keep]).float()[:, None],
                                         size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    arr = up[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    targets = [int(t) for t in d.target[keep]]
    return ImageDataset([str(c) for c in range(10)], targets,
                        lambda i: Image.fromarray(arr[i], mode="L").convert("RGB"), transform)


# The photos set. Bump PHOTOS_VERSION whenever the recipe below changes: it names cached features.
PHOTOS_VERSION = "photos-v1"
PHOTOS = {  # class name -> file in scikit-image's skimage/data folder (grey ones are stacked to RGB)
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "chelsea": "chelsea.png",
    "coffee": "coffee.png", "coins": "coins.png", "grass": "grass.png", "gravel": "gravel.png",
    "immunohistochemistry": "ihc.png", "moon": "moon.png", "motorcycle": "motorcycle_left.png",
    "rocket": "rocket.jpg",
}
PHOTOS_PER_CLASS = {"train": 300, "val": 100}
PHOTOS_GRID, PHOTOS_VAL_TILES = 4, 4  # 4 of each photograph's 4 x 4 tiles are val: a quarter of its area
PHOTOS_SIDE = (1 / 8, 1 / 4)  # window side, as a fraction of the photograph's shorter side (at most a tile's)
PHOTOS_JITTER = 0.2  # brightness and contrast factors drawn from [1 - j, 1 + j]
PHOTOS_SEED = 0


class PhotoPatches(NamedTuple):
    """One split of the photos set: images [N, 32, 32, 3] uint8, labels [N] (indices into sorted(PHOTOS)),
    windows [N, 3] (top, left, side): the square of its photograph, in pixels, that each patch was cut from."""

    images: np.ndarray
    labels: np.ndarray
    windows: np.ndarray


def _photo(name: str) -> Image.Image:
    """A photograph of PHOTOS as 8-bit RGB, read from the scikit-image package (no download)."""
    try:
        import skimage
    except ImportError:
        raise UserError("the photos data set is cut from photographs that ship with scikit-image, which is not "
                        "installed: pip install scikit-image") from None
    path = Path(skimage.__file__).parent / "data" / PHOTOS[name]
    if not path.is_file():
        raise UserError(f"scikit-image {skimage.__version__} does not ship {path.name}, which the photos data set "
                        f"is cut from: pip install -U scikit-image")
    return read_image(path)


def _tiles(h: int, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """An h x w photograph cut into a PHOTOS_GRID x PHOTOS_GRID grid, tiles dealt to the splits by a seeded draw:
    {split: [T, 4] (top, bottom, left, right)}; PHOTOS_VAL_TILES of them are val."""
    ys, xs = (np.arange(PHOTOS_GRID + 1) * n // PHOTOS_GRID for n in (h, w))
    tiles = np.array([(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(PHOTOS_GRID) for j in range(PHOTOS_GRID)])
    is_val = np.zeros(len(tiles), dtype=bool)
    is_val[rng.choice(len(tiles), PHOTOS_VAL_TILES, replace=False)] = True
    return {"train": tiles[~is_val], "val": tiles[is_val]}


def _windows(h: int, w: int, tiles: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n square windows [n, 3] (top, left, side), each wholly inside one of `tiles`: side uniform over
    PHOTOS_SIDE of the photograph's shorter side, tile uniform, place uniform inside the tile."""
    lo, hi = (int(f * min(h, w)) for f in PHOTOS_SIDE)  # a tile is at least hi on each side
    side = rng.integers(lo, hi + 1, size=n)
    top, bottom, left, right = tiles[rng.integers(0, len(tiles), size=n)].T
    top = top + (rng.random(n) * (bottom - top - side + 1)).astype(np.int64)
    left = left + (rng.random(n) * (right - left - side + 1)).astype(np.int64)
    return np.stack([top, left, side], 1)


def _jitter(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (about each patch's mean) then brightness, one draw per patch: [N, S, S, 3] uint8."""
    contrast, brightness = rng.uniform(1 - PHOTOS_JITTER, 1 + PHOTOS_JITTER, size=(2, len(patches), 1, 1, 1))
    x = patches.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean
    return np.round(x.clip(0, 255) * brightness).clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def build_photos() -> dict[str, PhotoPatches]:
    """The photos set, built once per process: {"train": PhotoPatches, "val": PhotoPatches}.

    Each photograph gives one class. It is cut into 4 x 4 tiles, 4 of them drawn for val and the rest train;
    every patch is a square window lying wholly inside one tile of its split, so no val pixel is seen in
    training. The window's side is drawn between 1/8 and 1/4 of the photograph's shorter side (so the zoom
    varies), its tile and place uniformly; it is cropped, resized to 32x32 with antialiasing, and its contrast
    and brightness are jittered so that a class is not just its mean colour. One seeded generator: every
    process builds the same set.
    """
    rng = np.random.default_rng(PHOTOS_SEED)
    parts = {split: [] for split in SPLITS}
    for label, name in enumerate(sorted(PHOTOS)):
        photo = _photo(name)
        tiles = _tiles(photo.height, photo.width, rng)
        for split in SPLITS:
            windows = _windows(photo.height, photo.width, tiles[split], PHOTOS_PER_CLASS[split], rng)
            # Crop before resizing: resize(box=...) would let the filter reach pixels beyond the window. PIL's
            # bicubic filter widens with the scale factor when shrinking: an antialiased resize.
            patches = np.stack([np.asarray(photo.crop((x, y, x + s, y + s)).resize((PHOTOS_SIZE, PHOTOS_SIZE),
                                                                                   Image.BICUBIC))
                                for y, x, s in windows])
            parts[split].append((_jitter(patches, rng), np.full(len(windows), label), windows))
    return {split: PhotoPatches(*(np.concatenate(a) for a in zip(*parts[split]))) for split in SPLITS}


@functools.lru_cache(maxsize=None)
def photos_fingerprint() -> str:
    """A digest of the built photos set (both splits, recipe version): changes whenever what it holds does."""
    h = hashlib.sha256(PHOTOS_VERSION.encode())
    for split, built in build_photos().items():
        h.update(split.encode())
        for a in built:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _photos(split: str, transform) -> ImageDataset:
    images, labels, _ = build_photos()[split]
    return ImageDataset(sorted(PHOTOS), [int(t) for t in labels], lambda i: Image.fromarray(images[i]), transform)


EMBEDDED = {"digits": _digits, "photos": _photos}  # spec -> builder(split, transform)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR archives are pickles; allow only what they contain (numpy arrays, lists, dicts, bytes)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR archive")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a readable CIFAR python batch ({e})") from e


def _cifar(kind: str, root: Path, split: str, transform) -> ImageDataset:
    folder_name = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    folder = root / folder_name if (root / folder_name).is_dir() else root
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    missing = [f for f in files + [meta_file] if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is missing {', '.join(missing)}. {_layout_help(kind)}")
    data, labels = [], []
    for f in files:
        batch = _read_batch(folder / f)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(x) for x in batch[label_key])
    arr = np.concatenate(data)
    classes = [str(c) for c in _read_batch(folder / meta_file)[names_key]]
    return ImageDataset(classes, labels, lambda i: Image.fromarray(arr[i]), transform)


def read_class_list(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise UserError(f"class-list file {path} is empty (expected one class folder name a line)")
    return names


def _folder(root: Path, split: str, class_list: Path | None, transform, skip_unreadable: bool = False
            ) -> ImageDataset:
    if (root / "train").is_dir() or (root / "val").is_dir():
        split_root = root / split
        if not split_root.is_dir():
            raise UserError(f"{root} has no '{split}' folder. {_layout_help('folder')}")
    elif split == "train":
        split_root = root
    else:
        raise UserError(f"{root} has no 'val' folder, which this command needs. {_layout_help('folder')}")
    classes = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    if class_list is not None:
        wanted = read_class_list(class_list)
        absent = [c for c in wanted if c not in classes]
        if absent:
            raise UserError(f"{len(absent)} classes of {class_list} are not folders of {split_root}: "
                            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        classes = sorted(wanted)
    if not classes:
        raise UserError(f"{split_root} holds no class folders. {_layout_help('folder')}")
    paths, targets = [], []
    for label, c in enumerate(classes):
        for p in sorted((split_root / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                paths.append(str(p))
                targets.append(label)
    if not paths:
        raise UserError(f"{split_root} holds class folders but no images ({', '.join(IMAGE_EXTENSIONS)}). "
                        f"{_layout_help('folder')}")

    skipped = []
    if skip_unreadable:
        paths, targets, skipped = _drop_unreadable(paths, targets, str(split_root))

    ds = ImageDataset(classes, targets, lambda i: read_image(paths[i]), transform, paths)
    ds.skipped = skipped
    return ds


def _drop_unreadable(paths: list[str], targets: list, where: str) -> tuple[list[str], list, list[str]]:
    """Decode every file once; (readable paths, their targets, the unreadable paths)."""
    with ThreadPoolExecutor(8) as pool:  # PIL decodes without the GIL
        ok = list(pool.map(_readable, paths))
    if not any(ok):
        raise UserError(f"none of the images in {where} could be read")
    return ([p for p, good in zip(paths, ok) if good], [t for t, good in zip(targets, ok) if good],
            [p for p, good in zip(paths, ok) if not good])


def read_image(path: str | Path) -> Image.Image:
    """One image file as 8-bit RGB; a file that does not decode is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] or type(e).__name__}. Replace or "
                        f"remove it, or leave unreadable files out with --skip-bad-images") from e
    return to_rgb8(img)


def _readable(path: str) -> bool:
    try:
        read_image(path)
        return True
    except UserError:
        return False


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert clips 16/32-bit values to 255 (nearly all white); scale them instead:
    16-bit integer modes (and "I", which 16-bit files widen to) by 255/65535, float images in [0, 1] by 255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    else:
        return img.convert("RGB")
    return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")


def check_same_classes(train: ImageDataset, val: ImageDataset) -> None:
    """Evaluation needs the same class list in both splits (labels are indices into it)."""
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:5]
        only_v = sorted(set(val.classes) - set(train.classes))[:5]
        raise UserError(f"train and val have different classes ({len(train.classes)} vs {len(val.classes)}); "
                        f"only in train: {only_t}, only in val: {only_v}")
