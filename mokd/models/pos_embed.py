"""Resampling a learned position embedding to another token grid, by DINO's rule or by timm's.

dino: bicubic interpolation with scale_factor = (n + 0.1) / N per side, align_corners=False, no antialias.
      The source coordinates follow the scale factor itself, not the ratio n / N (DINO issue #8); the DINO,
      MoCo v3 and MOKD releases resample this way, in their ViTs and in MOKD's T-Heads.
timm: bicubic interpolation to size=n with antialias (timm's `dynamic_img_size`).
At the paper's local crops (14 -> 6 tokens a side) the two differ by 25-90% on random embeddings.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mokd.errors import UserError

RULES = ("dino", "timm")


def resample_grid(pos_embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int], rule: str) -> torch.Tensor:
    """pos_embed [1, old_h*old_w, C] (grid tokens only, row-major) -> [1, new_h*new_w, C]."""
    if tuple(old) == tuple(new):
        return pos_embed
    if rule == "timm":
        return resample_abs_pos_embed(pos_embed, list(new), list(old), num_prefix_tokens=0)
    if rule != "dino":
        raise ValueError(f"unknown position-embedding rule {rule!r}; expected one of {', '.join(RULES)}")
    dim = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    scale = ((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
    out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert tuple(out.shape[-2:]) == tuple(new), (out.shape, new)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)


def _dino_pos_embed(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """VisionTransformer._pos_embed with the grid part of pos_embed resampled by DINO's rule.

    x [B, H, W, C] (dynamic_img_size) or [B, N, C] -> tokens with prefix tokens and position embedding.
    """
    to_cat = []
    if self.cls_token is not None:
        to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
    if self.reg_token is not None:
        to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
    if self.pos_embed is None:
        return torch.cat(to_cat + [x.view(x.shape[0], -1, x.shape[-1])], dim=1)
    pos_embed = self.pos_embed
    if self.dynamic_img_size:
        b, h, w, c = x.shape
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        grid = resample_grid(pos_embed[:, prefix:], tuple(self.patch_embed.grid_size), (h, w), "dino")
        pos_embed = torch.cat([pos_embed[:, :prefix], grid], dim=1) if prefix else grid
        x = x.view(b, -1, c)
    if self.no_embed_class:
        x = x + pos_embed
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + pos_embed
    return self.pos_drop(x)


def set_pos_resample(model: nn.Module, rule: str, label: str = "backbone") -> None:
    """Make a timm ViT resample its position embedding by `rule` for inputs away from its native size.

    timm's own `_pos_embed` implements the timm rule; the dino rule replaces it on this instance (the class,
    the state dict and every other model are untouched). ViT-like models with a `_pos_embed` of their own
    (DeiT distilled, EVA, ...) take only the timm rule.
    """
    if rule not in RULES:
        raise UserError(f"{label}: pos_resample must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "timm":
        model.__dict__.pop("_pos_embed", None)
        return
    if not dino_rule_applies(model):
        raise UserError(f"{label}: {type(model).__name__} has a position embedding of its own, which only timm's "
                        f"rule resamples; set pos_resample: timm for it")
    model._pos_embed = types.MethodType(_dino_pos_embed, model)


def dino_rule_applies(model: nn.Module) -> bool:
    """Whether set_pos_resample(model, "dino") can take effect: a timm VisionTransformer with timm's _pos_embed."""
    return isinstance(model, VisionTransformer) and type(model)._pos_embed is VisionTransformer._pos_embed


def pos_resample_of(model: nn.Module) -> str:
    """The rule a ViT built here resamples by ('dino' or 'timm')."""
    method = model.__dict__.get("_pos_embed")
    return "dino" if getattr(method, "__func__", None) is _dino_pos_embed else "timm"
