"""Frozen-backbone features: the evaluation transform, sharded extraction, and an on-disk cache.

Modes (what one image becomes):
  cls      CNN: the pooled pre-logits output; ViT: the CLS token after the final norm (`backbone(x)`)
  lastn    ViT: CLS tokens of the last n blocks, each through the final norm, concatenated (DINO linear eval)
  avgpool  ViT: CLS token and the mean of the patch tokens of the last block, concatenated (DINO, ViT-B)
CNNs give their pooled output in every mode (as DINO's linear evaluation does for ResNets).

Under torchrun each rank extracts one contiguous shard; the shards are gathered in rank order, so the
result equals the single-process result row for row.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mokd import distributed as dist
from mokd.checkpoint import save_atomic
from mokd.data import DataSpec, ImageDataset, build_dataset
from mokd.device import autocast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("cls", "lastn", "avgpool")
DEFAULT_CACHE = Path("~/.cache/mokd/features")
CACHE_VERSION = 1


def is_vit(model: nn.Module) -> bool:
    # Imported on use: mokd.models.backbones pulls in timm, which worker processes need not pay for.
    from mokd.models.backbones import is_vit as _is_vit

    return _is_vit(model)


def eval_transform(image_size: int, native: bool) -> Callable:
    """PIL image -> normalised tensor [3, S, S].

    native=False (ImageNet-sized data): resize the short side to S*256/224, centre crop S, bicubic.
    native=True (small-image sets such as CIFAR): resize to S x S only if the images are not already S.
    """
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bicubic = T.InterpolationMode.BICUBIC
    if native:
        return T.Compose([T.Resize((image_size, image_size), interpolation=bicubic), *norm])
    return T.Compose([T.Resize(round(image_size * 256 / 224), interpolation=bicubic), T.CenterCrop(image_size), *norm])


def resolve_image_size(spec: DataSpec, image_size: int | None = None, trained_size: int | None = None) -> int:
    """Explicit size > the data set's own size (small images) > the training resolution > 224."""
    return int(image_size or spec.native_size or trained_size or 224)


def fit_input_size(backbone: nn.Module, image_size: int) -> None:
    """Make a fixed-size timm ViT accept `image_size` (interpolating its position embedding); CNNs need nothing."""
    if not is_vit(backbone):
        return
    pe = backbone.patch_embed
    if getattr(pe, "img_size", None) is None or tuple(pe.img_size) == (image_size, image_size):
        return
    if getattr(pe, "dynamic_img_size", False) or getattr(backbone, "dynamic_img_size", False):
        return
    if not hasattr(backbone, "set_input_size"):
        raise ValueError(f"{type(backbone).__name__} is fixed to {pe.img_size} px and cannot be resized to {image_size}")
    backbone.set_input_size(img_size=image_size)


@torch.no_grad()
def forward_features(backbone: nn.Module, x: torch.Tensor, mode: str = "cls", n_last_blocks: int = 4) -> torch.Tensor:
    """x [B, 3, H, W] -> features [B, D] (D = C, n*C or 2C for a ViT of width C; see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "cls" or not is_vit(backbone):
        return backbone(x)
    n = n_last_blocks if mode == "lastn" else 1
    # With return_prefix_tokens, each intermediate is (patch tokens [B, N, C], prefix tokens [B, P, C]).
    inter = backbone.forward_intermediates(x, indices=n, norm=True, return_prefix_tokens=True,
                                           intermediates_only=True, output_fmt="NLC")
    cls = [prefix[:, 0] for _, prefix in inter]
    if mode == "lastn":
        return torch.cat(cls, dim=-1)
    return torch.cat([cls[-1], inter[-1][0].mean(dim=1)], dim=-1)


def effective_mode(backbone: nn.Module, mode: str) -> str:
    """CNNs give their pooled output in every mode, so their cache entries are shared under 'cls'."""
    return mode if is_vit(backbone) else "cls"


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: torch.utils.data.Dataset, *, device: torch.device | str,
                     batch_size: int = 256, precision: str = "fp32", num_workers: int = 0, mode: str = "cls",
                     n_last_blocks: int = 4, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of `dataset` -> (features [N, D] float32 on CPU, labels [N] long).

    Sharded across ranks when a process group is up (each rank a contiguous slice, gathered in rank order);
    every rank returns the full result. `batch_size` is per rank.
    """
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    n, ws, rk = len(dataset), dist.world_size(), dist.rank()
    per = -(-n // ws)
    shard = torch.utils.data.Subset(dataset, range(min(rk * per, n), min((rk + 1) * per, n)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", drop_last=False)
    if progress and dist.is_main():
        from tqdm import tqdm

        loader = tqdm(loader, desc="features", leave=False)
    feats, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, precision):
            f = forward_features(backbone, x, mode, n_last_blocks)
        feats.append(f.float())
        labels.append(torch.as_tensor(y, device=device).long())
    if feats:
        f, y = torch.cat(feats), torch.cat(labels)
    else:  # an empty shard (more ranks than images): still take part in the gather, with the right width
        width = _feature_width(backbone, dataset, device, precision, mode, n_last_blocks)
        f, y = torch.zeros(0, width, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return dist.all_gather_cat(f).cpu(), dist.all_gather_cat(y).cpu()


def _feature_width(backbone, dataset, device, precision, mode, n_last_blocks) -> int:
    x = dataset[0][0][None].to(device)
    with autocast(device, precision):
        return int(forward_features(backbone, x, mode, n_last_blocks).shape[-1])


# --------------------------------------------------------------------------------------------------------------
# cache


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N] long
    classes: list[str]
    image_size: int
    mode: str
    cache_path: Path | None  # where it is (or would be) cached; None with the cache off
    from_cache: bool


def cache_dir(path: str | Path | None = None) -> Path:
    """--cache-dir > $MOKD_CACHE > ~/.cache/mokd/features."""
    return Path(path or os.environ.get("MOKD_CACHE") or DEFAULT_CACHE).expanduser()


# How a ViT's position embedding is resampled to another input size; "timm" is what the loader's models do
# (timm's own resampling, through set_input_size or dynamic_img_size). A `pos_resample` choice made elsewhere
# (e.g. "dino") is passed to features_for and so names its own cache entries.
DEFAULT_POS_RESAMPLE = "timm"
# Image sets up to these sizes are identified by their bytes, larger ones by each file's size and mtime.
CONTENT_HASH_MAX_FILES = 5000
CONTENT_HASH_MAX_BYTES = 64 << 20


def data_fingerprint(spec: DataSpec, dataset: ImageDataset) -> str | None:
    """A digest of the image files behind `dataset`, so that files replaced in place are re-extracted.

    Folder data: every file's path, size and mtime, plus its bytes for small sets (a copy that keeps the
    mtime is still seen). CIFAR: the batch files' size and mtime. The embedded digits: None (fixed).
    """
    paths = getattr(dataset, "paths", None)
    if not paths and spec.kind in ("cifar10", "cifar100") and spec.root is not None:
        paths = sorted(str(p) for p in Path(spec.root).rglob("*") if p.is_file())
    if not paths:
        return None
    h = hashlib.sha256()
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:  # gone since the listing: reading it will say so
            stats.append((p, -1, -1))
            continue
        stats.append((p, st.st_size, st.st_mtime_ns))
    for p, size, mtime in stats:
        h.update(f"{p}\0{size}\0{mtime}\n".encode())
    if len(stats) <= CONTENT_HASH_MAX_FILES and sum(max(s, 0) for _, s, _ in stats) <= CONTENT_HASH_MAX_BYTES:
        for p, size, _ in stats:
            if size >= 0:
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def cache_key(checkpoint: dict, spec: DataSpec, split: str, dataset: ImageDataset, image_size: int, native: bool,
              mode: str, n_last_blocks: int, precision: str, arch: dict | None = None,
              pos_resample: str | None = None) -> str:
    """Hex digest naming one feature file: everything that changes the features.

    The checkpoint (hash, model/branch), the full architecture (name, kwargs, stem), the data (spec, split,
    file list and each file's size/mtime or bytes), the transform (size, native), the mode, the precision
    and the position-embedding resampling.
    """
    paths = getattr(dataset, "paths", None)
    arch = arch or {"name": checkpoint.get("arch"), "kwargs": checkpoint.get("arch_kwargs") or {}}
    items = {
        "v": CACHE_VERSION, "sha256": checkpoint.get("sha256"), "label": checkpoint.get("label"),
        "model": checkpoint.get("model"), "branch": checkpoint.get("branch"),
        "arch": {"name": arch.get("name"), "kwargs": arch.get("kwargs") or {}, "small_stem": bool(arch.get("small_stem")),
                 "stem_conv": arch.get("stem_conv")},
        "data": str(spec), "split": split, "n": len(dataset), "classes": list(dataset.classes),
        "paths": hashlib.sha256("\n".join(paths).encode()).hexdigest() if paths else None,
        "files": data_fingerprint(spec, dataset),
        "transform": {"size": image_size, "native": native}, "mode": mode,
        "n_last_blocks": n_last_blocks if mode == "lastn" else None, "precision": precision,
        "pos_resample": pos_resample or DEFAULT_POS_RESAMPLE,
    }
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:32]


def features_for(loaded, spec: DataSpec, split: str, *, device: torch.device | str, dataset: ImageDataset | None = None,
                 batch_size: int = 256, precision: str = "fp32", mode: str = "cls", n_last_blocks: int = 4,
                 image_size: int | None = None, num_workers: int = 0, cache: str | Path | None = None,
                 use_cache: bool = True, progress: bool = False, log: Callable[[str], None] | None = None,
                 pos_resample: str | None = None) -> FeatureSet:
    """Features of `split` of `spec` for a `LoadedModel`, read from the cache when there, written to it when not.

    `dataset` may be given when it was already built (e.g. to check the class lists); its transform is
    replaced by the evaluation transform on a shallow copy. Collective under torchrun: call it on every rank.
    """
    size = resolve_image_size(spec, image_size, loaded.image_size)
    native = spec.native_size is not None
    mode = effective_mode(loaded.backbone, mode)
    ds = copy.copy(dataset) if dataset is not None else build_dataset(spec, split)
    ds.transform = eval_transform(size, native)
    path = None
    if use_cache:
        # the loader's rule (recorded in the checkpoint field) unless one is given; CNNs have no position embedding
        resample = (pos_resample or loaded.checkpoint.get("pos_resample")) if is_vit(loaded.backbone) else None
        key = cache_key(loaded.checkpoint, spec, split, ds, size, native, mode, n_last_blocks, precision,
                        arch=loaded.arch, pos_resample=resample)
        path = cache_dir(cache) / f"{key}.pt"
        hit = torch.tensor([float(path.is_file())])
        if dist.is_enabled():  # extraction is collective: every rank must agree on hit or miss
            hit = hit.to(torch.device(device))
            torch.distributed.all_reduce(hit, op=torch.distributed.ReduceOp.MIN)
        if hit.item() == 1.0:
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if log:
                    log(f"features ({loaded.label}, {split}): from cache {path}")
                return FeatureSet(blob["features"], blob["labels"], list(ds.classes), size, mode, path, True)
            except Exception:  # a damaged cache entry is recomputed, never trusted
                if dist.is_enabled():
                    raise
    fit_input_size(loaded.backbone, size)
    if log:
        shown = f"mode {mode}" if is_vit(loaded.backbone) else "pooled"  # a CNN gives its pooled map in any mode
        log(f"features ({loaded.label}, {split}): extracting {len(ds)} images at {size} px, {shown}, {precision}")
    feats, labels = extract_features(loaded.backbone, ds, device=device, batch_size=batch_size, precision=precision,
                                     num_workers=num_workers, mode=mode, n_last_blocks=n_last_blocks,
                                     progress=progress)
    if path is not None and dist.is_main():
        save_atomic({"features": feats, "labels": labels, "classes": list(ds.classes), "image_size": size,
                     "mode": mode, "checkpoint": dict(loaded.checkpoint), "split": split, "data": str(spec)}, path)
        if log:
            log(f"features ({loaded.label}, {split}): cached in {path} (--cache-dir DIR or $MOKD_CACHE moves the "
                "cache, --no-cache skips it)")
    return FeatureSet(feats, labels, list(ds.classes), size, mode, path, False)
