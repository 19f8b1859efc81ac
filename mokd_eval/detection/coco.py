"""COCO-format data for detection transfer: folder validation, a torch data set, and pycocotools scoring.

Expected layout (the official COCO 2017 download), or any COCO-format data set given file by file:
  DIR/annotations/instances_train2017.json   DIR/train2017/*.jpg
  DIR/annotations/instances_val2017.json     DIR/val2017/*.jpg
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mokd.errors import UserError

LAYOUT = ("expected the COCO 2017 layout: DIR/annotations/instances_train2017.json, "
          "DIR/annotations/instances_val2017.json, DIR/train2017/ and DIR/val2017/ (image folders), "
          "or give --train-json/--val-json/--train-images/--val-images for another COCO-format data set")

# Box AP ("b") and mask AP ("s", segmentation, as the paper writes them): AP, AP50, AP75 and COCO's
# small / medium / large objects (COCO's APs, APm, APl, renamed to keep "s" for masks).
_SIZES = {"AP": "", "AP50": "50", "AP75": "75", "APs": "_small", "APm": "_medium", "APl": "_large"}
METRIC_NAMES = tuple(p + suffix for p in ("APb", "APs") for suffix in _SIZES.values())


def metric_name(prefix: str, coco_name: str) -> str:
    """("APb", "APm") -> "APb_medium"; coco_name is COCOeval's / detectron2's name."""
    return prefix + _SIZES[coco_name]


def split_counts(splits: "CocoSplits") -> dict:
    """The record's counts, the same for both backends: training images with a usable annotation (what both
    train on), validation images, and the categories (names in id order)."""
    train, val = (check_annotations(p) for p in (splits.train_json, splits.val_json))
    usable = {a["image_id"] for a in train["annotations"]
              if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1}
    cats = sorted(train["categories"], key=lambda c: c["id"])
    return {"train_size": sum(1 for im in train["images"] if im["id"] in usable), "val_size": len(val["images"]),
            "num_classes": len(cats), "classes": [c["name"] for c in cats]}


@dataclass
class CocoSplits:
    train_json: Path
    val_json: Path
    train_images: Path
    val_images: Path
    num_classes: int = 0  # categories in the train annotations (filled by resolve_coco)

    def as_dict(self) -> dict:
        return {k: str(getattr(self, k)) for k in ("train_json", "val_json", "train_images", "val_images")}


def resolve_coco(root: str | Path | None, *, train_json=None, val_json=None, train_images=None,
                 val_images=None) -> CocoSplits:
    """Paths of the two splits from DIR and/or explicit overrides; anything missing or unreadable is a UserError."""
    root = Path(root) if root else None
    if root is None and None in (train_json, val_json, train_images, val_images):
        raise UserError(f"no COCO data given: pass --coco DIR; {LAYOUT}")
    if root is not None and not root.is_dir():
        raise UserError(f"COCO folder {root} does not exist; {LAYOUT}")
    splits = CocoSplits(
        train_json=Path(train_json) if train_json else root / "annotations" / "instances_train2017.json",
        val_json=Path(val_json) if val_json else root / "annotations" / "instances_val2017.json",
        train_images=Path(train_images) if train_images else root / "train2017",
        val_images=Path(val_images) if val_images else root / "val2017")
    missing = [str(p) for p in (splits.train_json, splits.val_json) if not p.is_file()]
    missing += [str(p) + "/" for p in (splits.train_images, splits.val_images) if not p.is_dir()]
    if missing:
        raise UserError(f"COCO data incomplete, missing: {', '.join(missing)}; {LAYOUT}")
    train_cats, val_cats = ({c["id"] for c in check_annotations(p)["categories"]}
                            for p in (splits.train_json, splits.val_json))
    if train_cats != val_cats:
        raise UserError(f"{splits.train_json} and {splits.val_json} list different categories "
                        f"({len(train_cats)} vs {len(val_cats)} ids); both splits need the same ones")
    splits.num_classes = len(train_cats)
    return splits


def check_annotations(path: Path) -> dict:
    """Read a COCO instances file and check the keys detection needs; returns the parsed JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file ({e}); {LAYOUT}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO instances file: it needs the lists 'images', 'annotations' and "
                        f"'categories'; {LAYOUT}")
    if not data["categories"]:
        raise UserError(f"{path} has no categories")
    for name, items, fields in (("images", data["images"], ("id", "file_name", "height", "width")),
                                ("annotations", data["annotations"], ("id", "image_id", "category_id", "bbox")),
                                ("categories", data["categories"], ("id", "name"))):
        bad = next((it for it in items if not isinstance(it, dict) or any(f not in it for f in fields)), None)
        if bad is not None:
            raise UserError(f"{path}: an entry of '{name}' lacks one of the fields {', '.join(fields)}: "
                            f"{str(bad)[:200]}")
    return data


def quiet_coco(path: Path):
    """pycocotools.COCO without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances as (image [3, H, W] float in [0, 1], target dict of torchvision detection).

    target: boxes [N, 4] xyxy, labels [N] in 1..K (contiguous, 0 = background), masks [N, H, W] uint8,
    image_id. Crowd annotations and degenerate boxes are dropped; `train=True` drops images left without
    annotations (detectron2's FILTER_EMPTY_ANNOTATIONS) and flips images horizontally at random.
    """

    def __init__(self, ann_file: Path, image_root: Path, *, train: bool):
        self.coco = quiet_coco(ann_file)
        self.image_root = Path(image_root)
        self.train = train
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if self._annotations(i)]
            if not ids:
                raise UserError(f"{ann_file}: no training image has a usable (non-crowd, non-empty) annotation")
        self.ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a["bbox"][2] > 1 and a["bbox"][3] > 1 and a.get("iscrowd", 0) == 0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from PIL import Image

        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = self.image_root / info["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise UserError(f"cannot read image {path} listed in the annotations ({e})") from e
        w, h = image.size
        anns = self._annotations(image_id)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([self._mask(a, h, w) for a in anns])) if anns else \
            torch.zeros((0, h, w), dtype=torch.uint8)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
            masks = masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return x, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}

    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        if "segmentation" not in ann or not ann["segmentation"]:
            m = np.zeros((h, w), dtype=np.uint8)  # box-only annotation: the box as mask
            x0, y0, bw, bh = (int(round(v)) for v in ann["bbox"])
            m[y0:y0 + bh, x0:x0 + bw] = 1
            return m
        return self.coco.annToMask(ann).astype(np.uint8)


def collate(batch):
    return tuple(zip(*batch))


def coco_results(outputs: dict[int, dict], dataset: CocoDetection, mask_threshold: float = 0.5
                 ) -> tuple[list[dict], list[dict]]:
    """torchvision detection outputs {image_id: {boxes, scores, labels, masks}} -> COCO result lists."""
    from pycocotools import mask as mask_util

    cat_of = {v: k for k, v in dataset.label_of.items()}
    boxes_out, segm_out = [], []
    for image_id, out in outputs.items():
        boxes = out["boxes"].tolist()
        scores = out["scores"].tolist()
        labels = out["labels"].tolist()
        masks = (out["masks"][:, 0] > mask_threshold).numpy().astype(np.uint8) if "masks" in out else None
        for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
            x0, y0, x1, y1 = box
            item = {"image_id": image_id, "category_id": cat_of[label], "score": float(score)}
            boxes_out.append({**item, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[i]))
                rle["counts"] = rle["counts"].decode("ascii")
                segm_out.append({**item, "segmentation": rle})
    return boxes_out, segm_out


def coco_ap(dataset: CocoDetection, boxes: list[dict], segms: list[dict]) -> dict[str, float | None]:
    """COCOeval AP, AP50, AP75, AP small/medium/large (in %) for boxes and masks: METRIC_NAMES.

    pycocotools reports -1 where no ground truth qualifies: None here (null in the record), as detectron2's
    NaN. With no detections at all, AP is 0.
    """
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for prefix, iou_type, results in (("APb", "bbox", boxes), ("APs", "segm", segms)):
        if not results:
            stats = [0.0] * 6
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                dt = dataset.coco.loadRes(results)
                ev = COCOeval(dataset.coco, dt, iou_type)
                ev.params.imgIds = list(dataset.ids)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = [float(s) for s in ev.stats[:6]]
        for coco_name, s in zip(_SIZES, stats):
            metrics[metric_name(prefix, coco_name)] = s * 100.0 if s >= 0 else None
    return metrics
