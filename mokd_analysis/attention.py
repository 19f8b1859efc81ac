"""Capturing attention maps from timm ViTs and residual-block maps from timm CNNs, by forward hooks.

timm's `Attention` computes its weights inside `F.scaled_dot_product_attention` when `fused_attn` is on, so
they are never materialised. The hook here recomputes them from the module's input instead:
softmax(q_norm(q) · k_norm(k)ᵀ · scale) with q, k from the module's own `qkv` projection, exactly as timm's
non-fused path does, so it gives the same weights whichever path the model runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mokd.errors import UserError
from mokd.models.backbones import is_vit

AttentionCallback = Callable[[int, torch.Tensor], None]  # (layer index, attention [B, H, N, N])
MapCallback = Callable[[int, torch.Tensor], None]  # (block index, feature map [B, C, H, W])


def vit_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each transformer block, in depth order (timm VisionTransformer layout)."""
    blocks = getattr(model, "blocks", None)
    if not is_vit(model) or blocks is None:
        raise UserError(f"{type(model).__name__} is not a timm ViT with .blocks; attention capture needs one")
    mods = [getattr(b, "attn", None) for b in blocks]
    bad = [i for i, m in enumerate(mods) if m is None or not isinstance(getattr(m, "qkv", None), nn.Linear)]
    if bad:
        raise UserError(f"{type(model).__name__}: block(s) {bad} have no attention module with a fused qkv "
                        "projection (timm Attention); this attention type is not supported")
    return mods


def recompute_attention(attn_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention weights of a timm `Attention` for its input x [B, N, C] -> [B, heads, N, N] (float32).

    Computed in float32 outside autocast, as timm's non-fused path computes them in full precision.
    """
    b, n, _ = x.shape
    heads = attn_module.num_heads
    head_dim = getattr(attn_module, "head_dim", None) or attn_module.qkv.out_features // (3 * heads)
    with torch.autocast(device_type=x.device.type, enabled=False):
        w, bias = attn_module.qkv.weight.float(), attn_module.qkv.bias
        qkv = F.linear(x.float(), w, None if bias is None else bias.float())
        qkv = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        q, k = attn_module.q_norm(q), attn_module.k_norm(k)
        scale = getattr(attn_module, "scale", head_dim ** -0.5)
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@contextmanager
def capture_vit_attention(model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """While active, every forward pass calls callback(layer, attention [B, heads, N, N]) once per block."""
    handles = []
    for layer, mod in enumerate(vit_attention_modules(model)):
        def hook(module, args, kwargs, _output, layer=layer):
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise UserError("attention capture does not support masked attention")
            x = args[0] if args else kwargs["x"]
            callback(layer, recompute_attention(module, x))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm CNN, in depth order.

    ResNet family: the children of layer1..layer4; RegNet: of s1..s4; ConvNeXt/RegNet-like models: `stages[i].blocks` (or the
    stage's children); EfficientNet/MobileNet: the children of each `blocks` stage.
    """
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [blk for i in range(1, 5) for blk in getattr(model, f"layer{i}").children()]
    if all(hasattr(model, f"s{i}") for i in range(1, 5)):  # RegNet
        return [blk for i in range(1, 5) for blk in getattr(model, f"s{i}").children()]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Module) and not is_vit(model):
        return [blk for st in stages.children()
                for blk in (st.blocks.children() if hasattr(st, "blocks") else st.children())]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and not is_vit(model):
        return [blk for st in blocks.children()
                for blk in (st.children() if isinstance(st, nn.Sequential) else [st])]
    raise UserError(f"{type(model).__name__}: cannot find residual blocks (expected a timm ResNet with layer1..4, "
                    "or a model with .stages or .blocks)")


@contextmanager
def capture_block_maps(model: nn.Module, callback: MapCallback) -> Iterator[None]:
    """While active, every forward pass calls callback(block, output map [B, C, H, W]) once per residual block."""
    handles = []
    for idx, blk in enumerate(residual_blocks(model)):
        def hook(_module, _args, output, idx=idx):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                callback(idx, output)
        handles.append(blk.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# Where a model looks: CLS-to-patch attention, attention rollout, and a CNN's feature norm (`mokd analyze attention`)


def patch_grid(backbone: nn.Module, num_patches: int) -> tuple[int, int]:
    """The (rows, cols) of a ViT's patch tokens: the patch embedding's grid when it matches, else a square."""
    grid = tuple(getattr(getattr(backbone, "patch_embed", None), "grid_size", None) or ())
    if len(grid) == 2 and grid[0] * grid[1] == num_patches:
        return int(grid[0]), int(grid[1])
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise UserError(f"{type(backbone).__name__}: {num_patches} patch tokens do not form a known grid")
    return side, side


def cls_patch_attention(attn: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The CLS token's attention to each patch, per head: attn [B, H, N, N] -> [B, H, rows, cols].

    Tokens 0 .. num_prefix-1 are CLS and register tokens (timm's layout); the CLS query's weights on them are
    left out, so a head that parks its attention on a register shows as a faint map rather than a wrong one."""
    b, h = attn.shape[:2]
    return attn[:, :, 0, num_prefix:].reshape(b, h, *grid)


def attention_rollout(attns: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) over blocks in depth order: each block's attention [B, H, N, N]
    is averaged over heads, mixed with the identity for the residual connection (residual * I + (1 - residual)
    * A, rows renormalised) and the blocks multiplied: [B, N, N], row i the flow from every token into token i
    at the last block."""
    if not attns:
        raise UserError("attention rollout needs at least one block's attention")
    rollout = None
    for a in attns:
        a = a.float().mean(1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def rollout_cls_map(attns: list[torch.Tensor], num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The CLS token's row of the rollout over the patch tokens: [B, rows, cols]."""
    r = attention_rollout(attns)
    return r[:, 0, num_prefix:].reshape(r.shape[0], *grid)


def feature_norm_map(fmap: torch.Tensor) -> torch.Tensor:
    """A CNN's analogue of an attention map: the L2 norm over channels of its feature map [B, C, h, w] -> [B, h, w]."""
    return fmap.float().norm(dim=1)


@torch.no_grad()
def vit_attention_maps(backbone: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of images x [B, 3, S, S] through a timm ViT (fused attention or not, register tokens or
    not) -> {'heads': last block's CLS-to-patch attention [B, H, rows, cols], 'rollout': [B, rows, cols]},
    from each block's qkv by hooks (capture_vit_attention)."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    if getattr(backbone, "cls_token", None) is None:
        raise UserError(f"{type(backbone).__name__} has no CLS token: CLS attention maps need one")
    attns: dict[int, torch.Tensor] = {}
    with capture_vit_attention(backbone, lambda layer, a: attns.__setitem__(layer, a.cpu())):
        backbone(x)
    ordered = [attns[i] for i in sorted(attns)]
    grid = patch_grid(backbone, ordered[-1].shape[-1] - prefix)
    return {"heads": cls_patch_attention(ordered[-1], prefix, grid), "rollout": rollout_cls_map(ordered, prefix, grid)}


@torch.no_grad()
def cnn_norm_map(backbone: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'norm': the channel norm of a timm CNN's last feature map [B, h, w]} for images x [B, 3, S, S]."""
    fmap = backbone.forward_features(x)
    if fmap.dim() != 4:
        raise UserError(f"{type(backbone).__name__}.forward_features gave shape {tuple(fmap.shape)}, not a map "
                        "[B, C, h, w]")
    return {"norm": feature_norm_map(fmap).cpu()}
