"""Frozen-backbone features: the evaluation transform, sharded extraction, and an on-disk cache.

Modes (what one image becomes):
  cls      CNN: the pooled pre-logits output; ViT: its own embedding (`backbone(x)`): the CLS token after the
           final norm (DINO's, MoCo v3's), or for an average-pooled ViT the mean patch token through its fc_norm
  lastn    ViT: that embedding taken at each of the last n blocks, concatenated (DINO linear eval: n CLS tokens)
  avgpool  ViT: the embedding and the mean of the patch tokens of the last block, concatenated (DINO, ViT-B)
  lastn_avgpool  ViT: the lastn features and the mean patch token of the last block (DINO's n > 1 with avgpool)
CNNs give their pooled output in every mode (as DINO's linear evaluation does for ResNets). A block's embedding
is the model's own head (`forward_head(pre_logits=True)`) applied to that block's normed tokens, so the last
block's is `backbone(x)` exactly, whatever the pooling; a CLS token the model does not pool is never read.

Labels are class indices [N] int64, or multi-hot vectors [N, C] uint8 for multi-label sets (VOC2007), alike in
memory, in the gather and in the cache.

Under torchrun each rank extracts one contiguous slice; in memory the slices are gathered in rank order, so the
result equals the single-process result row for row.

The cache holds one folder per entry: shards `shard_00000.pt`, ... of at most `shard_rows` rows (about 1 GiB of
fp32 each by default, `$MOKD_SHARD_ROWS` rows if set), written while the features are extracted (each rank its
own slice's shards, no gather), and `index.json`, written last. The folder is written under a private name and
renamed into place when complete (see "entries" below), so a reader sees a whole entry or none, whatever fails:
a full disk, a crash, a killed rank, or another run writing the same entry at the same time. A cached bank is
read lazily (`ShardedFeatures`), one memory-mapped shard at a time, so a bank larger than memory can be searched,
and any rows of it read without the rest (`take_rows`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from mokd import distributed as dist
from mokd.checkpoint import out_of_space, save_atomic, tensor_bytes, write_atomic
from mokd.data import DataSpec, ImageDataset, build_dataset, photos_fingerprint
from mokd.device import autocast
from mokd.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("cls", "lastn", "avgpool", "lastn_avgpool")
LASTN_MODES = ("lastn", "lastn_avgpool")  # the modes that take the embeddings of n_last_blocks blocks
DEFAULT_CACHE = Path("~/.cache/mokd/features")
CACHE_VERSION = 3  # 2: the key holds the labels, files' ctime and the resize ratio; 3: a ViT's lastn/avgpool
# features are its own embedding per block (an average-pooled ViT's were its unused CLS tokens)
SHARD_BYTES = 1 << 30  # fp32 features per cache shard by default
SHARD_ROWS_ENV = "MOKD_SHARD_ROWS"
INDEX = "index.json"
RESIZE_RATIO = 256 / 224  # ImageNet's resize-then-crop; the transfer sets use 1.0 (DataSpec.resize_ratio)


def is_vit(model: nn.Module) -> bool:
    # Imported on use: mokd.models.backbones pulls in timm, which worker processes need not pay for.
    from mokd.models.backbones import is_vit as _is_vit

    return _is_vit(model)


def eval_transform(image_size: int, native: bool, resize_ratio: float = RESIZE_RATIO) -> Callable:
    """PIL image -> normalised tensor [3, S, S].

    native=False (photographs): resize the short side to S * resize_ratio, centre crop S, bicubic. The ratio is
    256/224 for ImageNet-style data (DINO, timm) and 1.0 for the transfer sets (Kornblith et al. 2019 and
    ssl-transfer: the short side to S, then the centre S x S).
    native=True (small-image sets such as CIFAR): resize to S x S only if the images are not already S.
    """
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bicubic = T.InterpolationMode.BICUBIC
    if native:
        return T.Compose([T.Resize((image_size, image_size), interpolation=bicubic), *norm])
    return T.Compose([T.Resize(round(image_size * resize_ratio), interpolation=bicubic), T.CenterCrop(image_size),
                      *norm])


def spec_resize_ratio(spec: DataSpec) -> float:
    """The short side's resize over the crop for `spec` (DataSpec.resize_ratio; 256/224 for specs without one)."""
    return float(getattr(spec, "resize_ratio", RESIZE_RATIO))


def spec_transform(spec: DataSpec, image_size: int) -> Callable:
    """The evaluation transform of `spec`'s images at `image_size`: every command that feeds a frozen backbone
    uses this one, so a data set's images are prepared alike whichever command reads them."""
    return eval_transform(image_size, spec.native_size is not None, spec_resize_ratio(spec))


def spec_multilabel(spec: DataSpec) -> bool:
    """Whether `spec`'s labels are multi-hot vectors [C] uint8 (VOC2007) rather than class indices."""
    return bool(getattr(spec, "multilabel", False))


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
    n = n_last_blocks if mode in LASTN_MODES else 1
    # With return_prefix_tokens, each intermediate is (patch tokens [B, N, C], prefix tokens [B, P, C]), or bare
    # patch tokens for a model without prefix tokens.
    inter = backbone.forward_intermediates(x, indices=n, norm=True, return_prefix_tokens=True,
                                           intermediates_only=True, output_fmt="NLC", stop_early=True)
    inter = [o if isinstance(o, tuple) else (o, None) for o in inter]
    embeds = [backbone.forward_head(tokens if prefix is None else torch.cat([prefix, tokens], dim=1), pre_logits=True)
              for tokens, prefix in inter]
    if mode == "lastn":
        return torch.cat(embeds, dim=-1)
    return torch.cat([*embeds, inter[-1][0].mean(dim=1)], dim=-1)


def effective_mode(backbone: nn.Module, mode: str) -> str:
    """CNNs give their pooled output in every mode, so their cache entries are shared under 'cls'."""
    return mode if is_vit(backbone) else "cls"


def _rank_rows(n: int, world: int, rank: int) -> range:
    """The contiguous slice of `n` rows that `rank` of `world` extracts."""
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def _feature_batches(backbone: nn.Module, dataset: torch.utils.data.Dataset, rows: range, *, device: torch.device,
                     batch_size: int, precision: str, num_workers: int, mode: str, n_last_blocks: int,
                     progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features [B, D] float32, labels [B] long or [B, C] uint8) on `device`, batch by batch, for images `rows`
    of `dataset`."""
    backbone = backbone.to(device).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", drop_last=False)
    if progress and dist.is_main():
        from tqdm import tqdm

        loader = tqdm(loader, desc="features", leave=False)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, precision):
            f = forward_features(backbone, x, mode, n_last_blocks)
        yield f.float(), as_labels(y).to(device)


def as_labels(y) -> torch.Tensor:
    """A batch's labels as the cache keeps them: class indices [B] int64, or multi-hot vectors [B, C] uint8."""
    y = torch.as_tensor(y)
    return y.to(torch.uint8) if y.ndim == 2 else y.long()


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: torch.utils.data.Dataset, *, device: torch.device | str,
                     batch_size: int = 256, precision: str = "fp32", num_workers: int = 0, mode: str = "cls",
                     n_last_blocks: int = 4, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of `dataset` -> (features [N, D] float32 on CPU, labels), in memory.

    Labels are [N] int64 (class indices) or [N, C] uint8 (multi-hot, when the data set's labels are vectors).
    Sharded across ranks when a process group is up (each rank a contiguous slice, gathered in rank order);
    every rank returns the full result, equal row for row to one process's. `batch_size` is per rank. See
    `extract_to_shards` for banks too large to hold.
    """
    device = torch.device(device)
    rows = _rank_rows(len(dataset), dist.world_size(), dist.rank())
    feats, labels = [], []
    for f, y in _feature_batches(backbone, dataset, rows, device=device, batch_size=batch_size, precision=precision,
                                 num_workers=num_workers, mode=mode, n_last_blocks=n_last_blocks, progress=progress):
        feats.append(f)
        labels.append(y)
    if feats:
        f, y = torch.cat(feats), torch.cat(labels)
    else:  # an empty shard (more ranks than images): still take part in the gather, with the right shapes
        f, y = _empty_rows(backbone, dataset, device, precision, mode, n_last_blocks)
    return dist.all_gather_cat(f).cpu(), dist.all_gather_cat(y).cpu()


def _empty_rows(backbone, dataset, device, precision, mode, n_last_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [0, D] and labels [0] or [0, C] shaped like those of `dataset` (read from its first image)."""
    x, y = dataset[0]
    with autocast(device, precision):
        width = int(forward_features(backbone, x[None].to(device), mode, n_last_blocks).shape[-1])
    y = as_labels(torch.as_tensor(y)[None])
    return torch.zeros(0, width, device=device), y.new_zeros((0, *y.shape[1:])).to(device)


# --------------------------------------------------------------------------------------------------------------
# cache


def shard_rows_for(dim: int, shard_rows: int | None = None) -> int:
    """Rows per cache shard: `shard_rows` > $MOKD_SHARD_ROWS > about 1 GiB of fp32 rows (2^28 // D)."""
    value = shard_rows if shard_rows is not None else os.environ.get(SHARD_ROWS_ENV) or None
    if value is None:
        return max(1, SHARD_BYTES // (4 * max(dim, 1)))
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise UserError(f"${SHARD_ROWS_ENV} (rows per feature-cache shard) must be a positive integer, got {value!r}")
    return rows


def shard_plan(n: int, world: int, rows: int) -> list[tuple[int, int, int]]:
    """The shards of an entry of `n` rows, in row order: (rank that writes it, first row, end row).

    Each rank's slice is cut into pieces of at most `rows` rows, so shard i (`shard_name(i)`) follows shard
    i - 1 in the rows whichever rank wrote it, and every rank knows the whole plan without communicating.
    """
    plan = []
    for r in range(world):
        part = _rank_rows(n, world, r)
        plan += [(r, a, min(a + rows, part.stop)) for a in range(part.start, part.stop, rows)]
    return plan


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.pt"


def _load_shard(path: Path) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


@dataclass(frozen=True)
class ShardedFeatures:
    """A bank [N, D] float32 kept in the cache's shard files: iterating gives its row blocks [n_i, D] in order,
    each memory-mapped on demand, so no more than one shard need be in memory (see knn.search)."""
    folder: Path
    files: tuple[str, ...]
    rows: tuple[int, ...]
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.rows), self.dim

    def __len__(self) -> int:
        return sum(self.rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for name in self.files:
            yield _load_shard(self.folder / name)["features"]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` [R] of the bank (any order) -> [R, D], reading only the shards that hold them, one at a time."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        starts = torch.tensor([0, *itertools.accumulate(self.rows)])
        shard_of = torch.searchsorted(starts, rows, right=True) - 1
        out = torch.empty(len(rows), self.dim)
        for s in shard_of.unique().tolist():
            at = (shard_of == s).nonzero()[:, 0]
            out[at] = _load_shard(self.folder / self.files[s])["features"][rows[at] - starts[s]]
        return out

    def materialize(self) -> torch.Tensor:
        """The whole bank [N, D] in memory (filled shard by shard: no second copy)."""
        out, at = torch.empty(self.shape), 0
        for block in self:
            out[at:at + len(block)] = block
            at += len(block)
        return out


def take_rows(bank: torch.Tensor | ShardedFeatures, rows: torch.Tensor) -> torch.Tensor:
    """bank [N, D] in memory or in the cache's shards, rows [R] -> bank[rows] [R, D] (see ShardedFeatures.take)."""
    return bank[rows] if isinstance(bank, torch.Tensor) else bank.take(rows)


def load_sharded(folder: Path) -> tuple[ShardedFeatures, torch.Tensor, dict]:
    """A complete cache entry -> (its lazy bank, labels [N] int64 or [N, C] uint8, its index).

    Every shard the index lists is opened (memory-mapped: its tensors are not read) and checked against the
    index; a missing, damaged or mismatched shard raises, so that the entry is recomputed, never trusted.
    """
    index = json.loads((folder / INDEX).read_text())
    bank = ShardedFeatures(folder, tuple(index["files"]), tuple(int(r) for r in index["rows"]), int(index["dim"]))
    # entries written before multi-hot labels have class indices only
    label_dtype = LABEL_DTYPES[index.get("label_dtype", "int64")]
    label_shape = tuple(int(c) for c in index.get("label_shape", ()))
    if sum(bank.rows) != int(index.get("n", sum(bank.rows))):
        raise ValueError(f"{folder / INDEX}: rows {sum(bank.rows)} do not add up to n = {index['n']}")
    labels = []
    for name, rows in zip(bank.files, bank.rows, strict=True):
        blob = _load_shard(folder / name)
        f, y = blob["features"], blob["labels"]
        if (f.dtype != torch.float32 or tuple(f.shape) != (rows, bank.dim) or y.dtype != label_dtype
                or tuple(y.shape) != (rows, *label_shape)):
            raise ValueError(f"{folder / name}: features {tuple(f.shape)} {f.dtype}, labels {tuple(y.shape)} "
                             f"{y.dtype}; the index says {rows} x {bank.dim} float32, labels {label_shape} "
                             f"{label_dtype}")
        labels.append(y.clone())
    return bank, (torch.cat(labels) if labels else torch.zeros((0, *label_shape), dtype=label_dtype)), index


LABEL_DTYPES = {"int64": torch.int64, "uint8": torch.uint8}  # class indices; multi-hot vectors


def _save_shard(blob: dict, path: Path) -> None:
    """The shard writer (one atomic torch.save); a function of its own so the fault tests can fill the disk."""
    save_atomic(blob, path)


def _write_rank_shards(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], folder: Path,
                       pieces: list[tuple[str, int]], dim: int) -> None:
    """Copy feature batches into shards of the planned sizes, saving each one (atomically) once it is full.

    Memory: one shard's buffers and one batch, whatever the size of the slice.
    """
    batches = iter(batches)
    f = y = None
    at = 0
    for name, rows in pieces:
        feats, labels, fill = torch.empty(rows, dim), None, 0
        while fill < rows:
            if f is None or at == len(f):
                f, y = next(batches)
                f, y, at = f.cpu(), y.cpu(), 0
            if labels is None:  # labels [rows] int64 or [rows, C] uint8, as the data set gives them
                labels = y.new_empty((rows, *y.shape[1:]))
            take = min(rows - fill, len(f) - at)
            feats[fill:fill + take], labels[fill:fill + take] = f[at:at + take], y[at:at + take]
            fill, at = fill + take, at + take
        blob = {"features": feats, "labels": labels}
        try:
            _save_shard(blob, folder / name)
        except Exception as e:
            need = tensor_bytes(blob) + (1 << 20)
            if out_of_space(e, folder, need):
                raise UserError(_no_space(folder / name, need)) from e
            raise
    if next(batches, None) is not None or (f is not None and at < len(f)):
        raise RuntimeError(f"{folder}: more features than the shard plan holds")


def _no_space(path: Path, need: int) -> str:
    try:
        free = f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MB free"
    except OSError:
        free = ""
    return (f"no space left writing the feature cache ({path.name} needs about {need / 2**20:.0f} MB{free} in "
            f"{path.parent.parent}): free some space, move the cache (--cache-dir DIR or $MOKD_CACHE), or run with "
            f"--no-cache; the partial entry was not kept")


def _raise_together(error: BaseException | None) -> None:
    """Collective: when any rank failed, every rank raises (the failing rank its own error, the others one that
    names it), so no rank is left waiting at a later collective for one that gave up."""
    failed = [] if error is None else [(dist.rank(), error)]
    if dist.is_enabled():
        said = [None] * dist.world_size()
        torch.distributed.all_gather_object(
            said, None if error is None else (isinstance(error, UserError), str(error) or type(error).__name__))
        failed = [(r, s) for r, s in enumerate(said) if s is not None]
    if error is not None:
        raise error
    if failed:
        r, (user, message) = failed[0]
        raise (UserError if user else RuntimeError)(f"feature extraction failed on rank {r}: {message}")


def _write_entry(backbone: nn.Module, dataset: torch.utils.data.Dataset, folder: Path, *, device: torch.device,
                 batch_size: int, precision: str, num_workers: int, mode: str, n_last_blocks: int,
                 shard_rows: int | None, meta: dict | None, progress: bool) -> None:
    """The shards and index of `dataset`'s features in `folder` (see `extract_to_shards`). Collective."""
    n, world, rank = len(dataset), dist.world_size(), dist.rank()
    error, first, dim, label_shape, label_dtype = None, None, 0, [], "int64"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        batches = _feature_batches(backbone, dataset, _rank_rows(n, world, rank), device=device,
                                   batch_size=batch_size, precision=precision, num_workers=num_workers, mode=mode,
                                   n_last_blocks=n_last_blocks, progress=progress)
        first = next(batches, None)
        if first is not None:
            dim, label_shape = int(first[0].shape[1]), list(first[1].shape[1:])
            label_dtype = "uint8" if first[1].dtype == torch.uint8 else "int64"
    except Exception as e:
        error = e
    _raise_together(error)
    if dist.is_enabled():  # every rank plans with rank 0's shapes (rank 0 has rows whenever any rank has)
        shape = [dim, label_shape, label_dtype]
        torch.distributed.broadcast_object_list(shape, src=0)
        dim, label_shape, label_dtype = shape
    plan = shard_plan(n, world, shard_rows_for(dim, shard_rows))
    names = [shard_name(i) for i in range(len(plan))]
    try:
        if first is not None:
            mine = [(names[i], b - a) for i, (r, a, b) in enumerate(plan) if r == rank]
            _write_rank_shards(itertools.chain([first], batches), folder, mine, dim)
    except Exception as e:
        error = e
    _raise_together(error)
    if dist.is_main():
        try:
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise UserError(f"{folder}: shards written by other ranks are missing ({', '.join(missing[:3])}): "
                                "the feature cache must be on a file system all ranks share (--cache-dir DIR), or "
                                "use --no-cache")
            index = {"version": CACHE_VERSION, "n": n, "dim": dim, "files": names,
                     "rows": [b - a for _, a, b in plan], "label_shape": label_shape, "label_dtype": label_dtype,
                     **(meta or {})}
            write_atomic(folder / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1, default=str)))
            for stale in set(p.name for p in folder.glob("shard_*.pt")) - set(names):  # left by an earlier attempt
                (folder / stale).unlink(missing_ok=True)
        except Exception as e:
            error = e
    _raise_together(error)


@torch.no_grad()
def extract_to_shards(backbone: nn.Module, dataset: torch.utils.data.Dataset, folder: Path, *,
                      device: torch.device | str, batch_size: int = 256, precision: str = "fp32",
                      num_workers: int = 0, mode: str = "cls", n_last_blocks: int = 4, shard_rows: int | None = None,
                      meta: dict | None = None, progress: bool = False) -> tuple[ShardedFeatures, torch.Tensor]:
    """Features of every image of `dataset`, written into `folder` while extracted -> (lazy bank, labels).

    Shards hold {"features": [n_i, D] float32, "labels": [n_i] int64 or [n_i, C] uint8}, at most `shard_rows`
    rows each (see `shard_rows_for`); each is written atomically, so a crash leaves whole shards and no index.
    `index.json` (files, rows per shard, dim, the labels' shape and dtype, and `meta`) comes last, atomically,
    and marks the folder complete. Under torchrun each rank writes its own slice's shards and rank 0 the index:
    `folder` must be on a file system every rank sees. Collective: a failure on any rank (a full disk, an
    unreadable image) raises on every rank. Memory: one shard and one batch per rank. `features_for` writes
    through this into a private folder that it renames into place (see there).
    """
    _write_entry(backbone, dataset, folder, device=torch.device(device), batch_size=batch_size,
                 precision=precision, num_workers=num_workers, mode=mode, n_last_blocks=n_last_blocks,
                 shard_rows=shard_rows, meta=meta, progress=progress)
    bank, labels, _ = load_sharded(folder)
    return bank, labels


@dataclass
class FeatureSet:
    """One split's features: `bank` [N, D] float32 in memory, or a `ShardedFeatures` read lazily from the cache."""
    bank: torch.Tensor | ShardedFeatures
    labels: torch.Tensor  # [N] int64 class indices, or [N, C] uint8 multi-hot (multi-label sets)
    classes: list[str]
    image_size: int
    mode: str
    cache_path: Path | None  # the cache entry (a folder; a .pt file in the old layout); None with the cache off
    from_cache: bool

    @property
    def features(self) -> torch.Tensor:
        """[N, D] float32 in memory, for protocols that need the whole tensor (a sharded bank is read once)."""
        if isinstance(self.bank, ShardedFeatures):
            self.bank = self.bank.materialize()
        return self.bank

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def __len__(self) -> int:
        return int(self.bank.shape[0])


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

    Folder data: every file's path, size, mtime and ctime, plus its bytes for small sets (up to
    CONTENT_HASH_MAX_FILES files and CONTENT_HASH_MAX_BYTES). The ctime is what catches, in a set too large to
    read, a file replaced by another of the same size with its mtime put back (cp -p, rsync -t, tar): no user
    can set it, and any write or utime moves it. Its cost: a chmod, chown or copy of the set re-extracts it.
    CIFAR, STL-10: the binary files alike. The embedded digits: None (fixed). The embedded photos: a digest of
    the built set, which a new recipe or another scikit-image's photographs change.
    """
    if spec.kind == "photos":
        return photos_fingerprint()
    paths = getattr(dataset, "paths", None)
    if not paths and spec.kind in ("cifar10", "cifar100", "stl10") and spec.root is not None:
        paths = sorted(str(p) for p in Path(spec.root).rglob("*") if p.is_file())
    if not paths:
        return None
    h = hashlib.sha256()
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:  # gone since the listing: reading it will say so
            stats.append((p, -1, -1, -1))
            continue
        stats.append((p, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    for p, size, mtime, ctime in stats:
        h.update(f"{p}\0{size}\0{mtime}\0{ctime}\n".encode())
    if len(stats) <= CONTENT_HASH_MAX_FILES and sum(max(s[1], 0) for s in stats) <= CONTENT_HASH_MAX_BYTES:
        for p, size, *_ in stats:
            if size >= 0:
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def labels_digest(targets) -> str:
    """A digest of a data set's labels (class indices, or multi-hot vectors [C]): a split or annotation file
    that relabels the same images names another entry."""
    if len(targets) == 0:
        return "empty"
    first = torch.as_tensor(targets[0])
    y = as_labels(torch.stack([torch.as_tensor(t) for t in targets]) if first.ndim else torch.as_tensor(targets))
    return hashlib.sha256(f"{y.dtype}{tuple(y.shape)}".encode() + y.contiguous().numpy().tobytes()).hexdigest()


def cache_key(checkpoint: dict, spec: DataSpec, split: str, dataset: ImageDataset, image_size: int, native: bool,
              mode: str, n_last_blocks: int, precision: str, arch: dict | None = None,
              pos_resample: str | None = None, resize_ratio: float = RESIZE_RATIO) -> str:
    """Hex digest naming one cache entry: everything that changes the features or their labels.

    The checkpoint (hash, model/branch), the full architecture (name, kwargs, stem), the data (spec, split,
    file list, each file's size/mtime/ctime or bytes (see `data_fingerprint`), the labels), the transform
    (size, native, resize ratio), the mode, the precision and the position-embedding resampling. A split file
    that changes which images a split holds changes the file list; one that relabels them changes the labels.
    Files left out as unreadable (--skip-bad-images) are not in the file list, so such a set has an entry of
    its own.
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
        "files": data_fingerprint(spec, dataset), "labels": labels_digest(dataset.targets),
        "transform": {"size": image_size, "native": native, "resize_ratio": None if native else round(resize_ratio, 6)},
        "mode": mode, "n_last_blocks": n_last_blocks if mode in LASTN_MODES else None, "precision": precision,
        "pos_resample": pos_resample or DEFAULT_POS_RESAMPLE,
    }
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------------------
# entries: written privately, renamed into place whole
#
# An entry is written into a private folder `.{key}.tmp-{id}` beside it, whose `.owner.lock` its writer holds
# (flock) until it is done; once its index is written the folder is renamed to `{key}`, so a reader sees a
# complete entry or none. Two runs that extract the same entry at once both finish; the second to rename finds a
# complete entry in place and deletes its own copy. A run killed mid-write leaves its private folder unlocked,
# and the next run in that cache deletes it. An invalid entry in the way (a damaged shard, one written in place
# by an older mokd) is renamed to `.{key}.old-{id}` and deleted.

TEMP_MARK, OLD_MARK = ".tmp-", ".old-"
OWNER_LOCK = ".owner.lock"
INSTALL_LOCK = ".install.lock"  # held for the moment of checking and renaming an entry into place
UNLOCKED_STALE_S = 600  # a private folder without its lock file (made or renamed this instant) counts as left after
NOLOCK_STALE_S = 86400  # where the file system cannot lock (some network mounts): a day without a write


def _lock(fd: int, wait: bool) -> bool | None:
    """flock `fd` exclusively: True when held, False when another process holds it, None when the file system
    does not lock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _age_s(folder: Path) -> float:
    import time

    return time.time() - max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])


def _abandoned(folder: Path) -> bool:
    """Whether the private folder `folder` was left by a writer that is gone."""
    try:
        fd = os.open(folder / OWNER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return _age_s(folder) > UNLOCKED_STALE_S
    try:
        held = _lock(fd, wait=False)
    finally:
        os.close(fd)
    return _age_s(folder) > NOLOCK_STALE_S if held is None else held


def clean_stale(root: Path) -> list[Path]:
    """Delete what interrupted runs left in the cache folder `root`: private folders whose writer is gone, and
    invalid entries moved aside. Returns the folders deleted; a folder another process is writing is kept."""
    removed = []
    for p in root.glob(".*"):
        try:
            if p.is_dir() and (OLD_MARK in p.name or (TEMP_MARK in p.name and _abandoned(p))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        except OSError:  # gone meanwhile (another run cleaned it), or not ours to read
            continue
    return removed


def _read_entry(entry: Path, single: Path | None = None) -> tuple[torch.Tensor | ShardedFeatures, torch.Tensor,
                                                                    Path] | None:
    """(bank, labels, path) of a complete, intact entry (or a file of the older single-file layout), else None."""
    try:
        if (entry / INDEX).is_file():
            bank, labels, _ = load_sharded(entry)
            return bank, labels, entry
        if single is not None and single.is_file():
            blob = torch.load(single, map_location="cpu", weights_only=True)
            f, y = blob["features"], blob["labels"]
            if f.ndim != 2 or len(y) != len(f):
                raise ValueError(f"{single}: features {tuple(f.shape)}, labels {tuple(y.shape)}")
            return f, y, single
    except Exception:  # a damaged entry is recomputed, never trusted
        return None
    return None


def _stage(root: Path, key: str) -> tuple[Path, int]:
    """A new private folder for entry `key` and the descriptor holding its lock."""
    import uuid

    root.mkdir(parents=True, exist_ok=True)
    folder = root / f".{key}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    fd = os.open(folder / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    _lock(fd, wait=True)
    return folder, fd


def _discard(folder: Path, fd: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(fd)


def _install(staged: Path, entry: Path) -> bool:
    """Rename the complete private folder `staged` to `entry` -> True; False when a complete entry is there
    already (another run's, written at the same time), and `staged` is deleted."""
    import uuid

    aside = None
    fd = os.open(entry.parent / INSTALL_LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        _lock(fd, wait=True)  # where the file system cannot lock, the rename below still never exposes a partial entry
        if _read_entry(entry) is not None:
            shutil.rmtree(staged, ignore_errors=True)
            return False
        (staged / OWNER_LOCK).unlink(missing_ok=True)  # not part of the entry (its writer still holds the lock)
        if entry.exists():
            aside = entry.parent / f".{entry.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
            os.replace(entry, aside)
        try:
            os.rename(staged, entry)
        except OSError:  # another run's entry appeared without the lock (a file system that does not lock)
            if _read_entry(entry) is None:
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return False
        return True
    finally:
        os.close(fd)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """Collective: whether `flag` holds on every rank."""
    t = torch.tensor([float(flag)])
    if dist.is_enabled():
        t = t.to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item() == 1.0


def _broadcast(obj):
    """Collective: rank 0's `obj` on every rank."""
    if not dist.is_enabled():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def features_for(loaded, spec: DataSpec, split: str, *, device: torch.device | str, dataset: ImageDataset | None = None,
                 batch_size: int = 256, precision: str = "fp32", mode: str = "cls", n_last_blocks: int = 4,
                 image_size: int | None = None, num_workers: int = 0, cache: str | Path | None = None,
                 use_cache: bool = True, progress: bool = False, log: Callable[[str], None] | None = None,
                 pos_resample: str | None = None, shard_rows: int | None = None) -> FeatureSet:
    """Features of `split` of `spec` for a `LoadedModel`, read from the cache when there, written to it when not.

    Labels are [N] int64, or [N, C] uint8 multi-hot for multi-label sets (VOC2007). The evaluation transform
    takes `spec.resize_ratio` (256/224 when the spec has none). With the cache, the features are written in
    shards while they are extracted (see `extract_to_shards`; `shard_rows` or $MOKD_SHARD_ROWS sets their
    size) into a private folder renamed into place when complete, and the set returned reads them lazily;
    without it they are held in memory. Entries of the earlier single-file layout (`{key}.pt`) are still read.
    `dataset` may be given when it was already built (e.g. to check the class lists); its transform is
    replaced by the evaluation transform on a shallow copy.

    Under torchrun this is collective: every rank must call it, with the same arguments, in the same order.
    Each rank extracts one contiguous slice; every rank returns the full set, equal row for row to what one
    process returns (from the cache: a lazy bank over the shared entry, only the labels in memory; without:
    the gathered tensors). So the caller may run a protocol on rank 0 alone and let the other ranks move on
    to their next `features_for` call. A failure on any rank raises on every rank.
    """
    size = resolve_image_size(spec, image_size, loaded.image_size)
    native = spec.native_size is not None
    ratio = spec_resize_ratio(spec)
    mode = effective_mode(loaded.backbone, mode)
    ds = copy.copy(dataset) if dataset is not None else build_dataset(spec, split)
    ds.transform = spec_transform(spec, size)
    device = torch.device(device)
    root = entry = None
    if use_cache:
        # the loader's rule (recorded in the checkpoint field) unless one is given; CNNs have no position embedding
        resample = (pos_resample or loaded.checkpoint.get("pos_resample")) if is_vit(loaded.backbone) else None
        key = cache_key(loaded.checkpoint, spec, split, ds, size, native, mode, n_last_blocks, precision,
                        arch=loaded.arch, pos_resample=resample, resize_ratio=ratio)
        root = cache_dir(cache)
        entry = root / key
        if dist.is_main() and root.is_dir():
            clean_stale(root)
        found = _read_entry(entry, root / f"{key}.pt")
        if _all_ranks(found is not None, device):  # extraction is collective: every rank must agree on a hit
            bank, labels, path = found
            if log:
                log(f"features ({loaded.label}, {split}): from cache {path}")
            return FeatureSet(bank, labels, list(ds.classes), size, mode, path, True)
    fit_input_size(loaded.backbone, size)
    if log:
        shown = f"mode {mode}" if is_vit(loaded.backbone) else "pooled"  # a CNN gives its pooled map in any mode
        log(f"features ({loaded.label}, {split}): extracting {len(ds)} images at {size} px, {shown}, {precision}")
    kw = dict(device=device, batch_size=batch_size, precision=precision, num_workers=num_workers, mode=mode,
              n_last_blocks=n_last_blocks, progress=progress)
    if entry is None:
        feats, labels = extract_features(loaded.backbone, ds, **kw)
        return FeatureSet(feats, labels, list(ds.classes), size, mode, None, False)
    meta = {"classes": list(ds.classes), "image_size": size, "mode": mode, "checkpoint": dict(loaded.checkpoint),
            "split": split, "data": str(spec), "resize_ratio": ratio, "multilabel": spec_multilabel(spec)}
    staged, owner, error = None, None, None
    if dist.is_main():
        try:
            staged, owner = _stage(root, entry.name)
        except OSError as e:
            error = UserError(f"cannot write the feature cache in {root} ({e.strerror or e}): choose another "
                              f"(--cache-dir DIR or $MOKD_CACHE) or run with --no-cache")
    _raise_together(error)
    staged = Path(_broadcast(str(staged)))
    try:
        _write_entry(loaded.backbone, ds, staged, shard_rows=shard_rows, meta=meta, **kw)
    except BaseException:
        if owner is not None:
            _discard(staged, owner)
        raise
    won = True
    if owner is not None:
        try:
            won = _install(staged, entry)
        except Exception as e:
            error = e
        finally:
            os.close(owner)
    _raise_together(error)
    bank, labels, _ = load_sharded(entry)
    if log:
        how = "cached in" if won else "another run cached the same features at the same time; using"
        log(f"features ({loaded.label}, {split}): {how} {entry} ({len(bank.files)} shard(s) of up to "
            f"{max(bank.rows, default=0)} rows; --cache-dir DIR or $MOKD_CACHE moves the cache, --no-cache skips "
            f"it, ${SHARD_ROWS_ENV} sets the rows per shard)")
    return FeatureSet(bank, labels, list(ds.classes), size, mode, entry, False)
