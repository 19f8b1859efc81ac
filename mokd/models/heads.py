"""Projection heads: the DINO MLP head and the T-Head with cross-attention feature search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


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
    (learned on the training grid, bicubically interpolated to other grids) -> [query ; tokens] ->
    `depth` ViT blocks -> norm -> drop the query position -> mean over tokens -> weight-normed FC -> [B, K].
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], dim: int = 384, depth: int = 3,
                 num_heads: int = 6, mlp_ratio: float = 4.0, norm_last_layer: bool = True):
        super().__init__()
        self.grid = tuple(grid)
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
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
        h, w = self.grid
        pe = self.pos_embed.reshape(1, h, w, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe.float(), size=(side, side), mode="bicubic", align_corners=False)
        return pe.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, n, -1)

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
        return self.fc(x.mean(dim=1))
