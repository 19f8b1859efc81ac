"""timm's own attention weights of every block, the reference the recomputed (qkv-hook) attention is tested on."""

import torch

from mokd.models.backbones import set_fused_attention


def timm_attention_weights(vit: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Block index -> softmax attention [B, heads, N, N]. timm's non-fused path hands its weights to attn_drop, so
    they are read there; the model is left non-fused (set the path under test afterwards)."""
    reference = {}
    set_fused_attention(vit, False)
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: reference.__setitem__(i, o.clone()))
             for i, blk in enumerate(vit.blocks)]
    with torch.no_grad():
        vit(x)
    for h in hooks:
        h.remove()
    return reference
