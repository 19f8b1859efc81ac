"""Mean attention distance of a whole model over a set of images: per layer and head for ViTs, per residual
block for CNNs (the paper's Fig. 5 / S2), with JSON and CSV output."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mokd.errors import UserError
from mokd.models.backbones import is_vit
from mokd_analysis.attention import capture_block_maps, capture_vit_attention, residual_blocks
from mokd_analysis.distance import feature_map_distance, mean_attention_distance, patch_attention, \
    pixel_distance_matrix


@dataclass
class MADResult:
    """Mean attention distances of one model, in input pixels; `arch` is the model as built (mokd.naming).

    distances: ViT -> [layers][heads]; CNN -> [blocks][1]. prefix_mass (ViT only): [layers][heads], the mean
    attention mass patch queries give to the prefix (CLS) tokens, which the distances leave out.
    """
    label: str
    kind: str  # "vit" | "cnn"
    arch: str
    image_size: int
    num_images: int
    distances: list[list[float]]
    prefix_mass: list[list[float]] | None = None
    grid: list[list[int]] = field(default_factory=list)  # per layer/block: [h, w] of the token grid
    stride: list[list[float]] = field(default_factory=list)  # per layer/block: pixels per cell [y, x]
    run: str = ""  # the run (folder) the checkpoint comes from, for legends
    mode: str | None = None  # independent | mokd, from the checkpoint's config; None for third-party files

    def layer_means(self) -> list[float]:
        """Mean over heads of each layer (CNN: the block's value)."""
        return [sum(row) / len(row) for row in self.distances]

    def as_dict(self) -> dict:
        return {**asdict(self), "layer_mean": self.layer_means()}


@torch.no_grad()
def vit_mad(model: nn.Module, loader, device: torch.device, *, label: str = "", arch: str = "",
            progress: bool = True) -> MADResult:
    """Per layer and head mean attention distance of a timm ViT over the images of `loader` ([B, 3, H, W], y).

    The patch grid is read off each batch's input size (square grids of patch-size cells), so any input
    size the model accepts works.
    """
    patch = tuple(int(v) for v in model.patch_embed.patch_size)
    npre = int(model.num_prefix_tokens)
    depth = len(model.blocks)
    sums: list[torch.Tensor | None] = [None] * depth
    mass: list[torch.Tensor | None] = [None] * depth
    current: dict = {}

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        h, w = current["size"][0] // patch[0], current["size"][1] // patch[1]
        if attn.shape[-1] - npre != h * w:
            raise UserError(f"layer {layer}: {attn.shape[-1] - npre} patch tokens, but {current['size']} px inputs "
                            f"with patch {patch} make a {h}x{w} grid")
        if current.get("grid") != (h, w):
            current["grid"], current["dist"] = (h, w), pixel_distance_matrix((h, w), patch, device=attn.device)
        p, pm = patch_attention(attn, npre)
        d = mean_attention_distance(p, current["dist"]).sum(0)  # [H]
        sums[layer] = d if sums[layer] is None else sums[layer] + d
        mass[layer] = pm.sum(0) if mass[layer] is None else mass[layer] + pm.sum(0)

    n, size = _run(model, loader, device, capture_vit_attention(model, on_attention), progress, label, current)
    grid = list(current["grid"])
    return MADResult(label=label, kind="vit", arch=arch, image_size=size, num_images=n,
                     distances=[(s / n).tolist() for s in sums], prefix_mass=[(m / n).tolist() for m in mass],
                     grid=[grid] * depth, stride=[[float(patch[0]), float(patch[1])]] * depth)


@torch.no_grad()
def cnn_mad(model: nn.Module, loader, device: torch.device, *, label: str = "", arch: str = "",
            progress: bool = True) -> MADResult:
    """Per residual block mean attention distance of a timm CNN, with attention softmax(F Fᵀ/√C) over each
    block's output map F [C, H, W] and distances in input pixels (stride = input size / map size)."""
    nblocks = len(residual_blocks(model))
    sums: list[float] = [0.0] * nblocks
    grids: list[list[int]] = [[0, 0]] * nblocks
    current: dict = {}

    def on_map(block: int, fmap: torch.Tensor) -> None:
        sums[block] += float(feature_map_distance(fmap, current["size"]).sum())
        grids[block] = [int(fmap.shape[-2]), int(fmap.shape[-1])]

    n, size = _run(model, loader, device, capture_block_maps(model, on_map), progress, label, current)
    return MADResult(label=label, kind="cnn", arch=arch, image_size=size, num_images=n,
                     distances=[[s / n] for s in sums], grid=grids,
                     stride=[[size / g[0], size / g[1]] if g[0] else [0.0, 0.0] for g in grids])


def model_mad(model: nn.Module, loader, device: torch.device, **kw) -> MADResult:
    """ViT -> per layer and head; CNN -> per residual block."""
    return (vit_mad if is_vit(model) else cnn_mad)(model, loader, device, **kw)


def loaded_mad(loaded, spec, images, image_size: int | None, batch_size: int, device: torch.device,
               progress: bool = True) -> MADResult:
    """MAD of one loaded model (mokd_eval.loader.LoadedModel) on `images` (an ImageDataset, e.g. a seeded pick of a
    split) of data set `spec`, at the evaluation size (--image-size, else the data's own, else the model's) and
    with the data set's evaluation transform. `mokd analyze mad` and the bench's `mad` both call this."""
    from mokd_eval.features import fit_input_size, resolve_image_size, spec_transform

    size = resolve_image_size(spec, image_size, loaded.image_size)
    fit_input_size(loaded.backbone, size)
    ds = images.subset(range(len(images)))
    ds.transform = spec_transform(spec, size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    return model_mad(loaded.backbone, loader, device, label=loaded.label, arch=loaded.checkpoint["name"],
                     progress=progress)


def _run(model: nn.Module, loader, device: torch.device, capture, progress: bool, label: str,
         current: dict | None = None) -> tuple[int, int]:
    """Forward every batch in float32 with the hooks on -> (number of images, input side in pixels)."""
    model.eval().to(device)
    current = {} if current is None else current
    n = 0
    with capture:
        for x, _ in tqdm(loader, desc=f"mad {label}".strip(), disable=not progress, leave=False):
            current["size"] = tuple(int(s) for s in x.shape[-2:])
            model(x.to(device, non_blocking=True).float())
            n += x.shape[0]
    if n == 0:
        raise UserError("no images to compute the mean attention distance on")
    return n, current["size"][0]


def save_mad_tables(results: list[MADResult], out_dir: Path, stem: str = "mad") -> dict[str, Path]:
    """Write `stem`.json (everything) and `stem`.csv (one row per model, layer, head) -> their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, cs = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    js.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "kind", "arch", "layer", "head", "distance_px", "prefix_mass"])
        for r in results:
            for layer, row in enumerate(r.distances):
                for head, d in enumerate(row):
                    pm = r.prefix_mass[layer][head] if r.prefix_mass else ""
                    w.writerow([r.label, r.kind, r.arch, layer + 1, head if r.kind == "vit" else "",
                                f"{d:.4f}", pm if pm == "" else f"{pm:.4f}"])
    return {"json": js, "csv": cs}
