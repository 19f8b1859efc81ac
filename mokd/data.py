"""Data sets behind every command: ImageFolder roots, CIFAR archives on disk, and the embedded digits.

A data spec is a string:
  ``digits``            scikit-learn's 8x8 digits, upscaled to 32x32 RGB (ships with scikit-learn; the default)
  ``PATH``              an ImageFolder root in ImageNet layout: PATH/train/<class>/<image>, PATH/val/<class>/<image>
  ``folder:PATH``       the same, spelled out
  ``cifar10:PATH``      CIFAR-10 python archive folder (``cifar-10-batches-py``, or a folder that contains it)
  ``cifar100:PATH``     CIFAR-100 python archive folder (``cifar-100-python``, or a folder that contains it)
An optional class-list file (one class folder name per line, e.g. ImageNet-100) selects a subset of classes.

Images are read as 8-bit RGB: 16-bit and 32-bit modes are scaled to 0-255 (not clipped). A file that does not
decode is a one-line error naming it, or, with `skip_unreadable`, left out and listed in `ImageDataset.skipped`.
"""

from __future__ import annotations

import io
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mokd.errors import UserError

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SIZE = 32


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "digits" | "folder" | "cifar10" | "cifar100"
    root: Path | None = None
    class_list: Path | None = None

    def __str__(self) -> str:
        s = self.kind if self.root is None else f"{self.kind}:{self.root}"
        return s if self.class_list is None else f"{s} (classes from {self.class_list})"

    @property
    def native_size(self) -> int | None:
        """Image side of small-image data sets (digits, CIFAR); None for folders of arbitrary images."""
        return {"digits": DIGITS_SIZE, "cifar10": 32, "cifar100": 32}.get(self.kind)


def parse_data_spec(spec: str | None, class_list: str | Path | None = None) -> DataSpec:
    """Parse a ``--data`` string (see the module docstring). None or '' means the embedded digits."""
    cl = Path(class_list).expanduser() if class_list else None
    if cl is not None and not cl.is_file():
        raise UserError(f"class-list file {cl} does not exist (expected a text file, one class folder name a line)")
    if spec in (None, "", "digits"):
        if cl is not None:
            raise UserError("a class list only applies to ImageFolder data, not to the embedded digits")
        return DataSpec("digits")
    kind, sep, rest = str(spec).partition(":")
    if sep and kind in ("cifar10", "cifar100", "folder", "imagefolder"):
        kind = "folder" if kind == "imagefolder" else kind
        path = Path(rest).expanduser()
    else:
        kind, path = "folder", Path(str(spec)).expanduser()
    if kind != "folder" and cl is not None:
        raise UserError("a class list only applies to ImageFolder data, not to CIFAR")
    if not path.exists():
        raise UserError(f"data path {path} does not exist. {_layout_help(kind)}")
    if not path.is_dir():
        raise UserError(f"data path {path} is a file, not a folder. {_layout_help(kind)}")
    return DataSpec(kind, path, cl)


def _layout_help(kind: str) -> str:
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

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self._load(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def subset(self, indices) -> "ImageDataset":
        indices = list(indices)
        sub = ImageDataset(self.classes, [self.targets[i] for i in indices], lambda j: self._load(indices[j]),
                           self.transform, None if self.paths is None else [self.paths[i] for i in indices])
        return sub


def build_dataset(spec: DataSpec, split: str = "train", transform: Callable | None = None,
                  skip_unreadable: bool = False) -> ImageDataset:
    """The `split` ('train' or 'val') of the data set named by `spec`, returning PIL RGB images.

    `skip_unreadable` (folders): decode every file once first and leave out those that fail.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.kind == "digits":
        return _digits(split, transform)
    if spec.kind in ("cifar10", "cifar100"):
        return _cifar(spec.kind, spec.root, split, transform)
    return _folder(spec.root, split, spec.class_list, transform, skip_unreadable)


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
        with ThreadPoolExecutor(8) as pool:  # PIL decodes without the GIL
            ok = list(pool.map(_readable, paths))
        skipped = [p for p, good in zip(paths, ok) if not good]
        paths = [p for p, good in zip(paths, ok) if good]
        targets = [t for t, good in zip(targets, ok) if good]
        if not paths:
            raise UserError(f"none of the images in {split_root} could be read")

    ds = ImageDataset(classes, targets, lambda i: read_image(paths[i]), transform, paths)
    ds.skipped = skipped
    return ds


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
