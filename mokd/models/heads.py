"""Projection heads: the DINO MLP head and the T-Head with cross-attention feature search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mokd.models.pos_embed import resample_grid


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def normalized_last_layer(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """Weight-normalised linear layer without bias; its scale is frozen at 1 when norm_last_layer."""
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    layer.parametrizations.weight.original0.data.fill_(1.0)
    if norm_last_layer:
        layer.parametrizations.weight.original0.requires_grad = False
    return layer


class DINOHead(nn.Module):
    """x [B, in_dim] -> logits [B, out_dim]: 3-layer MLP (GELU), L2-normalised bottleneck, weight-normed last layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, hidden_dim, hidden_dim]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if use_bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = normalized_last_layer(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class THead(nn.Module):
    """Transformer head over local features, with an optional prepended query token.

    local [B, N, in_dim] -> input projection to width D (identity when in_dim == D) + positional embedding
    (learned on the training grid, resampled to other grids by `pos_resample`: mokd.models.pos_embed) ->
    [query ; tokens] -> `depth` ViT blocks -> norm -> drop the query position -> mean over tokens ->
    (with `use_bn`, BatchNorm over the batch) -> (with `l2_norm`, L2-normalised as the MLP head's bottleneck
    is; the release does neither) -> weight-normed FC -> [B, K].
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], dim: int = 384, depth: int = 3,
                 num_heads: int = 6, mlp_ratio: float = 4.0, norm_last_layer: bool = False,
                 pos_resample: str = "dino", l2_norm: bool = False, use_bn: bool = False):
        super().__init__()
        self.grid = tuple(grid)
        self.l2_norm = l2_norm
        self.pos_resample = pos_resample
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.bn = nn.BatchNorm1d(dim) if use_bn else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)
        self.fc = normalized_last_layer(dim, out_dim, norm_last_layer)

    def pos_embed_for(self, n: int) -> torch.Tensor:
        """Positional embedding [1, n, D] for a square grid of n tokens (or the training grid)."""
        if n == self.pos_embed.shape[1]:
            return self.pos_embed
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"T-Head got {n} local tokens, which is not a square grid")
        return resample_grid(self.pos_embed, self.grid, (side, side), self.pos_resample)

    def query(self, feature: torch.Tensor) -> torch.Tensor:
        """A pooled feature [B, in_dim] projected to a query token [B, D]."""
        return self.proj(feature)

    def forward(self, local: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(local) + self.pos_embed_for(local.shape[1])
        if query is not None:
            x = torch.cat([query[:, None, :].to(x.dtype), x], dim=1)
        x = self.norm(self.blocks(x))
        if query is not None:
            x = x[:, 1:]
        x = self.bn(x.mean(dim=1))
        return self.fc(F.normalize(x, dim=-1) if self.l2_norm else x)


# The authors' release: the CNN's MLP head keeps its weight-norm gain frozen at 1 (DINO's norm_last_layer);
# the ViT's MLP head and both T-Heads train theirs (its script's --norm_last_layer flag is never read).
RELEASE_NORM_LAST_LAYER = {("cnn", "mlp"): True, ("vit", "mlp"): False, ("cnn", "thead"): False,
                           ("vit", "thead"): False}


def norm_last_layer_for(head: str, vit: bool, per_net: bool | None, all_heads: bool | None = None) -> bool:
    """Whether the last layer's gain of `head` ("mlp" | "thead") stays frozen: the net's own setting, else
    the single head.norm_last_layer (all heads), else the release's default for the backbone kind."""
    if per_net is not None:
        return per_net
    if all_heads is not None:
        return all_heads
    return RELEASE_NORM_LAST_LAYER[("vit" if vit else "cnn", head)]
