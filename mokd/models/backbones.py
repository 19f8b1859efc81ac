"""timm backbones and the adapter that gives MOKD a global and a local view of their features.

global feature: CNN -> the model's own pooled (pre-logits) output; ViT -> CLS token after the final norm.
local features: CNN -> the final feature map as H*W tokens; ViT -> the patch tokens.
The backbone module *is* the timm model, so its state dict is a plain timm state dict.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from mokd.errors import UserError
from mokd.models.pos_embed import set_pos_resample


def create_backbone(name: str, kwargs: dict | None = None, small_stem: bool = False,
                    pos_resample: str = "timm") -> nn.Module:
    """timm.create_model(name, num_classes=0, **kwargs), with an optional small-image stem for CNNs.

    A ViT resamples its position embedding for other input sizes by `pos_resample` (dino | timm; see
    mokd.models.pos_embed); CNNs ignore it.

    The small stem keeps every parameter (so the state dict stays a timm state dict) but removes the
    stem's downsampling: the first convolution gets stride 1 and a stem max-pool is dropped. At 32 px a
    ResNet then ends on a 4x4 map instead of 1x1, which the T-Head needs as local features.
    """
    kwargs = dict(kwargs or {})
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise UserError(f"unknown architecture {name!r}: not a timm model name.{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model {name!r} does not accept the arguments {kwargs}: {e}") from e
    if is_vit(model) and getattr(model, "dynamic_img_size", True) is False and "dynamic_img_size" not in kwargs:
        # Multi-crop feeds ViTs several resolutions: let timm interpolate the position embedding per input.
        model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    if is_vit(model):
        set_pos_resample(model, pos_resample, name)
    if small_stem:
        if is_vit(model):
            raise UserError(f"small_stem applies to CNNs; for the ViT {name!r} set img_size and patch_size instead")
        apply_small_stem(model)
    return model


def apply_small_stem(model: nn.Module) -> None:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise UserError(f"{type(model).__name__} has no convolution to turn into a small-image stem")
    first_conv.stride = (1, 1)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def is_vit(model: nn.Module) -> bool:
    """Token models (timm VisionTransformer and relatives) have patch_embed and a token prefix."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def global_dim(model: nn.Module) -> int:
    """Width of the global feature (pre-logits; e.g. 1280 for MobileNetV3-Large, not its 960-channel map)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def local_dim(model: nn.Module) -> int:
    return int(model.num_features)


def encode(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, 3, H, W] -> (global [B, Cg], local [B, N, C]) for any timm CNN or ViT."""
    feats = model.forward_features(x)
    if is_vit(model):
        local = feats[:, model.num_prefix_tokens:]
    elif feats.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
        local = feats.flatten(1, 2)
    elif feats.ndim == 4:
        local = feats.flatten(2).transpose(1, 2)
    else:
        raise UserError(f"{type(model).__name__} returns features of shape {tuple(feats.shape)}; expected a CNN "
                        f"map [B, C, H, W] or ViT tokens [B, N, C]")
    glob = model.forward_head(feats, pre_logits=True)
    return glob, local


def feature_grid(model: nn.Module, image_size: int, label: str = "backbone") -> tuple[int, int]:
    """Spatial grid (h, w) of the local features at a given input size, found by a dry run.

    A size the model cannot take (a ViT crop that is no multiple of the patch, a crop too small for a CNN)
    is a UserError naming the model, the size and the constraint.
    """
    if is_vit(model):
        p = model.patch_embed.patch_size
        if image_size % p[0] or image_size % p[1]:
            raise UserError(f"{label} cannot take {image_size} px crops: a ViT needs crop sizes that are "
                            f"multiples of its patch size {p[0]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
            glob, local = encode(model, x)
    except Exception as e:  # timm raises assertion and shape errors of many kinds
        raise UserError(f"{label} cannot take {image_size} px crops ({type(e).__name__}: {e}); choose "
                        f"larger crops or, for a CNN, small_stem: true") from e
    finally:
        model.train(was_training)
    if is_vit(model):
        p = model.patch_embed.patch_size
        return image_size // p[0], image_size // p[1]
    n = local.shape[1]
    side = int(round(n ** 0.5))
    return (side, n // side) if side * side == n else (1, n)


def configure_attention(module: nn.Module, device: torch.device, precision: str) -> None:
    """Training on the CPU in bf16: use the explicit attention path (see set_fused_attention)."""
    if device.type == "cpu" and precision == "bf16":
        set_fused_attention(module, False)


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch timm's fused scaled-dot-product attention on or off in every attention layer; returns the count.

    On the CPU, the fused kernel's bf16 backward is slower than the explicit q.k softmax path (whose matrix
    products use AMX), so CPU training in bf16 turns it off.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
            n += 1
    return n
