"""Mean attention distance (Dosovitskiy et al., ViT, Sec. D.7), for ViT heads and for CNN feature maps.

For one query position, the attention-weighted average of the distance in input pixels to every key
position; averaged over queries (and, by the callers, over images). A token's position is its cell on the
spatial grid, and the distance between two cells is the Euclidean distance of their grid coordinates scaled
by the stride of the grid in pixels (the patch size for a ViT, input size / map size for a CNN stage).

Prefix tokens (CLS, registers, distillation token) have no place on the grid: they are dropped as queries
and as keys, and each query's attention over the remaining patch keys is renormalised to sum to 1, so the
result is "where on the image a head looks when it looks at the image". The attention mass the prefix
tokens take is reported separately (`prefix_attention_mass`).
"""

from __future__ import annotations

import math

import torch


def pixel_distance_matrix(grid: tuple[int, int], stride: tuple[float, float] | float,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Pairwise pixel distances between the cells of an (h, w) grid, row-major -> [h*w, h*w] float32.

    stride: pixels per grid cell along (y, x), or one number for both (the ViT patch size).
    """
    h, w = grid
    sy, sx = (float(stride), float(stride)) if isinstance(stride, (int, float)) else map(float, stride)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.flatten() * sy, xs.flatten() * sx], dim=1)  # [N, 2] in pixels
    return torch.cdist(pos, pos)


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """attn [..., Nq, Nk] (rows sum to 1 over the grid's keys), distances [Nq, Nk] -> [...] mean over queries.

    Each query's expected distance under its attention distribution, then the mean over the queries.
    """
    if attn.shape[-2:] != distances.shape:
        raise ValueError(f"attention over {tuple(attn.shape[-2:])} tokens does not match a {tuple(distances.shape)}"
                         " distance matrix")
    per_query = (attn.float() * distances).sum(dim=-1)  # [..., Nq]
    return per_query.mean(dim=-1)


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full token attention [B, H, N, N] -> (patch-to-patch attention renormalised over patch keys
    [B, H, P, P], mass the patch queries put on the prefix tokens [B, H]), P = N - num_prefix_tokens."""
    p = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()
    mass = p.sum(dim=-1, keepdim=True)  # [B, H, P, 1]
    prefix_mass = (1.0 - mass[..., 0]).mean(dim=-1)
    return p / mass.clamp_min(1e-12), prefix_mass


def feature_map_attention(fmap: torch.Tensor) -> torch.Tensor:
    """CNN analogue of self-attention: fmap [B, C, H, W] -> softmax(F Fᵀ / √C) over positions [B, H*W, H*W]."""
    f = fmap.float().flatten(2).transpose(1, 2)  # [B, N, C]
    logits = f @ f.transpose(1, 2) / math.sqrt(f.shape[-1])
    return logits.softmax(dim=-1)


def feature_map_distance(fmap: torch.Tensor, image_size: tuple[int, int], max_elements: int = 1 << 25
                         ) -> torch.Tensor:
    """Mean attention distance in input pixels of one CNN map: fmap [B, C, H, W] -> [B].

    The stride is input size / map size per axis. Images are processed in chunks so that one chunk's
    attention holds at most `max_elements` entries (the map of an early ResNet stage at 224 px has 3136
    positions, i.e. ~10 M attention entries per image).
    """
    b, _, h, w = fmap.shape
    dist = pixel_distance_matrix((h, w), (image_size[0] / h, image_size[1] / w), device=fmap.device)
    chunk = max(1, max_elements // (h * w) ** 2)
    return torch.cat([mean_attention_distance(feature_map_attention(fmap[i:i + chunk]), dist)
                      for i in range(0, b, chunk)])


def uniform_distance(grid: tuple[int, int], stride: tuple[float, float] | float) -> float:
    """Mean attention distance of uniform attention over an (h, w) grid: the level a head that looks
    everywhere alike sits at, the reference line of the figures (116.49 px for 14x14 patches of 16 px)."""
    return float(pixel_distance_matrix(grid, stride).mean())
