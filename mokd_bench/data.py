"""The bench's data sets: each labelled (both splits share a class list) or an unlabelled folder of images.

A bench reads one or more data sets (`--data` repeated, or the manifest's `datasets:`); each is loaded on its own,
and one that fails to load is reported with its one-line reason while the others run (`load_datasets`).

For the transfer data sets (`mokd.data`'s named sets: dtd:, food101:, voc2007:, ...), "train" is the training pool
(official train+val) and "val" the official test split; the spec names the headline metric (`DataSpec.metric`:
top1, mean_per_class or map11) and whether labels are multi-hot (`DataSpec.multilabel`, VOC2007).

An unlabelled folder (image files, in any sub-folders, under a root with no train/ or val/ folder and no class
folders holding every image) serves the protocols that need no labels (rank, mad, cka); the labelled protocols
are planned out with the reason. Labelled data with no val split likewise serves only those protocols.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mokd.cli_common import resolve_data
from mokd.data import IMAGE_EXTENSIONS, DataSpec, ImageDataset, build_dataset, check_same_classes, read_image
from mokd.errors import UserError
from mokd.naming import data_name

UNLABELLED_CLASS = "(unlabelled)"


@dataclass
class BenchData:
    spec: DataSpec
    splits: dict[str, ImageDataset]
    labelled: bool
    note: str | None = None  # why only some protocols can run on it
    skipped: list[str] = field(default_factory=list)
    name: str = ""  # the data set's column in the report's tables (unique within a bench)

    def __post_init__(self):
        # a transfer set by its own name (dtd, voc2007), whatever its folder is called
        self.name = self.name or (self.spec.kind if getattr(self.spec, "transfer", False) else data_name(self.spec))

    @property
    def metric(self) -> str:
        """The headline metric the data set is published with: top1, mean_per_class or map11."""
        return str(getattr(self.spec, "metric", None) or "top1")

    @property
    def multilabel(self) -> bool:
        """Multi-hot labels [N, C] (VOC2007), not one class per image."""
        return bool(getattr(self.spec, "multilabel", False))

    def holdout(self, seed: int = 0) -> tuple[list[int], list[int]]:
        """(fit rows, val rows) of the training pool: the official val split where there is one, else a seeded
        20% (mokd.data.holdout_split), for choosing a probe's regularisation without the test split."""
        from mokd.data import holdout_split

        fit, val = holdout_split(self.spec, self.splits["train"], seed=seed)
        return [int(i) for i in fit], [int(i) for i in val]

    @property
    def free_split(self) -> str:
        """The split the label-free protocols read: val when there is one (as `mokd analyze`), else train."""
        return "val" if "val" in self.splits else "train"

    @property
    def classes(self) -> list[str]:
        return list(self.splits["train"].classes)

    def record(self, split: str | None = None) -> dict:
        """The result record's `data` field."""
        out = {"spec": str(self.spec), "name": self.name, "kind": self.spec.kind if self.labelled else "unlabelled",
               "labelled": self.labelled, **{f"{s}_size": len(d) for s, d in self.splits.items()}}
        if self.labelled:
            out.update(num_classes=len(self.classes), classes=self.classes, metric=self.metric,
                       multilabel=self.multilabel)
        if split:
            out["split"] = split
        if self.skipped:
            out.update(skipped_images=len(self.skipped), skipped_files=list(self.skipped))
        return out


def is_unlabelled_folder(root: Path) -> bool:
    """No train/ or val/ folder, and image files directly in the root (an ImageFolder keeps them in class folders)."""
    if (root / "train").is_dir() or (root / "val").is_dir():
        return False
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())


def unlabelled_folder(root: Path) -> ImageDataset:
    """Every image file under `root` (sorted), one pseudo-class, label 0."""
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise UserError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageDataset([UNLABELLED_CLASS], [0] * len(paths), lambda i: read_image(paths[i]), None, paths)


def load_bench_data(data: str | None, class_list: str | None = None, skip_bad_images: bool = False) -> BenchData:
    """Resolve --data for the bench: both splits when it has them, else what it has, and whether it is labelled."""
    spec = resolve_data(data, class_list)
    if spec.kind == "folder" and is_unlabelled_folder(spec.root):
        if class_list:
            raise UserError(f"--class-list: {spec.root} is an unlabelled folder (images without class folders)")
        return BenchData(spec, {"train": unlabelled_folder(spec.root)}, labelled=False,
                         note=f"{spec.root} holds images without class folders (unlabelled)")
    train = build_dataset(spec, "train", skip_unreadable=skip_bad_images)
    try:
        val = build_dataset(spec, "val", skip_unreadable=skip_bad_images)
    except UserError as e:
        return BenchData(spec, {"train": train}, labelled=False, note=f"no val split ({e})",
                         skipped=list(train.skipped))
    check_same_classes(train, val)
    for name, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise UserError(f"{spec}: the {name} split holds no images")
    return BenchData(spec, {"train": train, "val": val}, labelled=True, skipped=train.skipped + val.skipped)


def load_datasets(specs: list[str | None], class_list: str | None = None, skip_bad_images: bool = False
                  ) -> tuple[list[BenchData | None], list[dict]]:
    """Each of `specs` loaded on its own -> (per spec its BenchData, or None when it failed; the failures as
    {"checkpoint": "all", "dataset", "protocol": None, "reason"}). Names are made unique (`dtd`, `dtd #2`) in the
    order given, so that a table's columns tell the data sets apart."""
    out: list[BenchData | None] = []
    failures = []
    names: set[str] = set()
    for i, text in enumerate(specs or [None]):
        try:
            # a class list selects the classes of the ImageFolder data sets; the named sets keep their own
            own = class_list if class_list and resolve_data(text, None).kind == "folder" else None
            d = load_bench_data(text, own, skip_bad_images)
        except Exception as e:  # noqa: BLE001 - a data set that does not load fails alone, with its reason
            from mokd_bench.run import one_line

            out.append(None)
            failures.append({"checkpoint": "all", "dataset": str(text or "digits"), "protocol": None,
                             "reason": one_line(e)})
            continue
        base = d.name
        if base in names:
            d.name = f"{base} #{i + 1}"
        names.add(d.name)
        out.append(d)
    return out, failures
