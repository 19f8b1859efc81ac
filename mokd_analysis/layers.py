"""Every layer's representation of a timm backbone from one forward pass, by forward hooks, pooled to [B, D]:
what layer-by-layer CKA compares.

- ViT (timm VisionTransformer and relatives with `.blocks`): each block's output gives two entries,
  `block{i}.mean` (its patch tokens averaged; CLS and register tokens left out) and `block{i}.cls` (its CLS
  token; absent for models without one).
- CNN: each stage's output (timm's `feature_info` modules, the stem left out), spatially averaged: `layer1`
  ... `layer4` for a ResNet, `stages.0` ... for a ConvNeXt, `blocks.0` ... for an EfficientNet.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from mokd.device import autocast
from mokd.errors import UserError
from mokd.models.backbones import is_vit

STEM_PREFIXES = ("act", "bn", "conv", "stem")  # feature_info entries of the stem, not of a stage


@dataclass(frozen=True)
class Layer:
    name: str  # block3.mean, layer2, ...
    module: nn.Module
    pool: Callable[[torch.Tensor], torch.Tensor]  # the module's output -> [B, D]


def _patch_mean(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x[:, prefix:].mean(1)


def _cls(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0]


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3)) if x.dim() == 4 else x.reshape(x.shape[0], -1)


def representation_layers(backbone: nn.Module) -> list[Layer]:
    """The layers compared by CKA, in depth order (see the module docstring)."""
    if is_vit(backbone):
        blocks = getattr(backbone, "blocks", None)
        if blocks is None:
            raise UserError(f"{type(backbone).__name__}: a ViT without .blocks; cannot find its transformer blocks")
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        has_cls = getattr(backbone, "cls_token", None) is not None
        layers = []
        for i, blk in enumerate(blocks):
            layers.append(Layer(f"block{i + 1}.mean", blk, _patch_mean(prefix)))
            if has_cls:
                layers.append(Layer(f"block{i + 1}.cls", blk, _cls))
        return layers
    info = getattr(backbone, "feature_info", None)
    names = [f["module"] for f in info] if info else []
    stages = [n for n in names if not n.split(".")[0].startswith(STEM_PREFIXES)] or names
    if not stages:
        raise UserError(f"{type(backbone).__name__}: no stages found (expected a timm CNN with feature_info)")
    return [Layer(n, backbone.get_submodule(n), _spatial_mean) for n in stages]


@contextmanager
def capture_layers(layers: list[Layer]) -> Iterator[list[torch.Tensor | None]]:
    """While active, each forward pass fills the yielded list with every layer's pooled output [B, D] (float32).

    A module used twice in one pass keeps its last output (timm's blocks and stages run once)."""
    outputs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def hook(_m, _args, out, i=i, pool=layer.pool):
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs[i] = pool(out).float()
        handles.append(layer.module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def model_cka(backbone_a: nn.Module, backbone_b: nn.Module | None, batches: Iterable, device: torch.device,
              precision: str = "fp32"):
    """Layer-by-layer linear CKA of two backbones over image batches, one forward pass of each per batch.

    `batches` yields (x_a, x_b) pairs (the same images, each model's own transform) or, with backbone_b None
    (self-similarity), x_a alone. -> (MinibatchCKA after every batch, layer names of A, layer names of B)."""
    from mokd_analysis.cka import MinibatchCKA

    layers_a = representation_layers(backbone_a)
    layers_b = representation_layers(backbone_b) if backbone_b is not None else None
    cka = MinibatchCKA(len(layers_a), None if layers_b is None else len(layers_b))
    a = backbone_a.to(device).eval()
    b = backbone_b.to(device).eval() if backbone_b is not None else None
    with capture_layers(layers_a) as out_a, capture_layers(layers_b or []) as out_b:
        for batch in batches:
            xa, xb = batch if b is not None else (batch, None)
            feats_a = _run(a, layers_a, out_a, xa, device, precision)
            feats_b = _run(b, layers_b, out_b, xb, device, precision) if b is not None else None
            cka.update(feats_a, feats_b)
    names_a = [layer.name for layer in layers_a]
    return cka, names_a, names_a if layers_b is None else [layer.name for layer in layers_b]


def _run(backbone, layers, outputs, x, device, precision) -> list[torch.Tensor]:
    for i in range(len(outputs)):
        outputs[i] = None
    with autocast(device, precision):
        backbone(x.to(device))
    missing = [layers[i].name for i, o in enumerate(outputs) if o is None]
    if missing:
        raise UserError(f"{type(backbone).__name__}: layer(s) {', '.join(missing)} did not run in the forward pass")
    return list(outputs)
