"""Capturing attention maps from timm ViTs and residual-block maps from timm CNNs, by forward hooks.

timm's attention modules compute their weights inside `F.scaled_dot_product_attention` when `fused_attn` is on,
so they are never materialised. The hooks here recompute them from the module's input instead, exactly as the
module's non-fused path does, so they give the same weights whichever path the model runs. Each attention class
has its own recomputation (`RECOMPUTE`, keyed by the exact class: a subclass may change the forward), tested
against timm's own weights:
- `timm.layers.Attention` (ViT, DeiT, DINO(v2), registers): softmax(q_norm(q) k_norm(k)^T scale), q and k from the
  fused `qkv` projection.
- `timm.models.eva.EvaAttention` (EVA-02 and timm's ROPE ViTs built on Eva): q, k from the fused `qkv` with its
  separate q/k/v biases, or from separate q/k projections; q_norm/k_norm; the rotary embedding the block passes in
  (`rope`), applied to the patch tokens only; then the same softmax.
Any other attention class (BEiT's relative position bias, AttentionRope, ...) is refused by name rather than
drawn wrong.
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


def _softmax_weights(attn_module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scale = getattr(attn_module, "scale", q.shape[-1] ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _timm_attention(attn_module: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """timm.layers.Attention: q, k from the fused qkv projection (bias included), then q_norm / k_norm."""
    b, n, _ = x.shape
    heads = attn_module.num_heads
    head_dim = getattr(attn_module, "head_dim", None) or attn_module.qkv.out_features // (3 * heads)
    w, bias = attn_module.qkv.weight.float(), attn_module.qkv.bias
    qkv = F.linear(x, w, None if bias is None else bias.float())
    qkv = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn_module.q_norm(qkv[0]), attn_module.k_norm(qkv[1])
    return _softmax_weights(attn_module, q, k)


def _eva_attention(attn_module: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """timm EvaAttention: fused qkv with separate q/k/v biases (k's is zero) or separate projections; q_norm /
    k_norm; the rotary embedding on the tokens after the prefix."""
    from timm.layers import apply_rot_embed_cat

    b, n, _ = x.shape
    heads = attn_module.num_heads
    if attn_module.qkv is not None:
        bias = None
        if attn_module.q_bias is not None:
            bias = torch.cat((attn_module.q_bias, attn_module.k_bias, attn_module.v_bias)).float()
        qkv = F.linear(x, attn_module.qkv.weight.float(), bias)
        qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
    else:
        def project(lin: nn.Linear) -> torch.Tensor:
            out = F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())
            return out.reshape(b, n, heads, -1).transpose(1, 2)
        q, k = project(attn_module.q_proj), project(attn_module.k_proj)
    q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    if rope is not None:
        p, rope = attn_module.num_prefix_tokens, rope.float()
        # timm before the rotate-half layout has no `half` argument; pass it only when the module uses it
        half = {"half": True} if getattr(attn_module, "rotate_half", False) else {}
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, **half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, **half)], dim=2)
    return _softmax_weights(attn_module, q, k)


def _recompute_registry() -> dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]]:
    from timm.layers import Attention
    from timm.models.eva import EvaAttention

    return {Attention: _timm_attention, EvaAttention: _eva_attention}


RECOMPUTE = _recompute_registry()  # attention class -> (module, input [B, N, C] float32, rope) -> [B, H, N, N]


def vit_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each transformer block, in depth order (timm VisionTransformer layout); a class
    without a recomputation in RECOMPUTE is refused, naming it."""
    blocks = getattr(model, "blocks", None)
    if not is_vit(model) or blocks is None:
        raise UserError(f"{type(model).__name__} is not a timm ViT with .blocks; attention capture needs one")
    mods = [getattr(b, "attn", None) for b in blocks]
    if any(m is None for m in mods):
        raise UserError(f"{type(model).__name__}: block(s) {[i for i, m in enumerate(mods) if m is None]} have no "
                        ".attn module; attention maps need one per block")
    for m in mods:
        if type(m) not in RECOMPUTE:
            raise UserError(f"{type(model).__name__}: attention class {type(m).__module__}.{type(m).__name__} is not "
                            f"supported for attention maps (reproduced exactly: "
                            f"{', '.join(c.__name__ for c in RECOMPUTE)})")
    return mods


def recompute_attention(attn_module: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights of a supported timm attention module for its input x [B, N, C] (and the rotary embedding
    its block passed, if any) -> [B, heads, N, N] (float32).

    Computed in float32 outside autocast, as timm's non-fused path computes them in full precision.
    """
    fn = RECOMPUTE.get(type(attn_module))
    if fn is None:
        raise UserError(f"attention class {type(attn_module).__name__} is not supported for attention maps")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return fn(attn_module, x.float(), rope)


@contextmanager
def capture_vit_attention(model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """While active, every forward pass calls callback(layer, attention [B, heads, N, N]) once per block."""
    handles = []
    for layer, mod in enumerate(vit_attention_modules(model)):
        def hook(module, args, kwargs, _output, layer=layer):
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise UserError("attention capture does not support masked attention")
            x = args[0] if args else kwargs["x"]
            rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
            callback(layer, recompute_attention(module, x, rope))
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
