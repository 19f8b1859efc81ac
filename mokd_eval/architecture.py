"""Which architecture a checkpoint holds: the file's own word, the user's flags and the shapes, reconciled.

An architecture is the loader's dict {"name", "kwargs", "small_stem", "stem_conv"}: a timm name and
create_model arguments; `small_stem` (stride-1 first convolution, no stem max-pool: the trainer's small-image
stem); `stem_conv` ({"kernel", "padding"} or None): a first convolution of another kernel than the timm
model's, as CIFAR ResNets have (3x3, stride 1, no max-pool).

Two architectures are the same when they compute the same function from the same tensors: equal state-dict
shapes and equal hyper-parameters that the shapes cannot show (attention heads, convolution strides and
paddings, layer types). `differences` lists how two differ, in words.
"""

from __future__ import annotations

import torch
from torch import nn

from mokd.errors import UserError
from mokd.models.backbones import create_backbone, is_vit

_IGNORED_TYPES = ("Identity", "Dropout", "DropPath", "Dropout2d")  # no effect at evaluation time


def normalise(arch: dict) -> dict:
    return {"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {}),
            "small_stem": bool(arch.get("small_stem")), "stem_conv": arch.get("stem_conv") or None}


def build(arch: dict) -> nn.Module:
    """The timm backbone for `arch`, with its stem as the dict says."""
    a = normalise(arch)
    try:
        model = create_backbone(a["name"], a["kwargs"], a["small_stem"] or a["stem_conv"] is not None)
    except (AssertionError, ValueError) as e:  # timm checks its arguments with asserts (e.g. width % heads)
        raise UserError(f"timm cannot build {describe(a)}: {e or type(e).__name__}") from e
    if a["stem_conv"] is not None:
        replace_stem_conv(model, a["stem_conv"]["kernel"], a["stem_conv"]["padding"])
    return model


def replace_stem_conv(model: nn.Module, kernel: int, padding: int) -> None:
    """A CIFAR-style first convolution: kernel x kernel, stride 1, the given padding (the max-pool is gone)."""
    old = getattr(model, "conv1", None)
    if not isinstance(old, nn.Conv2d):
        raise UserError(f"{type(model).__name__} has no plain conv1 to give a {kernel}x{kernel} CIFAR-style stem")
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel, stride=1, padding=padding,
                            bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def signature(arch: dict) -> dict:
    """What decides the computation: state-dict shapes, heads, convolution geometry, layer types (meta device)."""
    with torch.device("meta"):
        model = build(arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads = [int(m.num_heads) for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    convs = [(n, m.stride, m.padding, m.dilation, m.groups) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    pools = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    layers = [(n, type(m).__name__) for n, m in model.named_modules()
              if not list(m.children()) and type(m).__name__ not in _IGNORED_TYPES]
    eps = [(n, float(m.eps)) for n, m in model.named_modules() if hasattr(m, "eps") and isinstance(m.eps, float)]
    return {"shapes": shapes, "heads": heads, "convs": convs, "pools": pools, "layers": layers, "eps": eps,
            "vit": is_vit(model)}


def differences(a: dict, b: dict) -> list[str]:
    """How architecture `a` differs from `b`, in words (empty: they compute the same function)."""
    sa, sb = signature(a), signature(b)
    out = []
    if sa["shapes"] != sb["shapes"]:
        only = sorted(set(sa["shapes"]) ^ set(sb["shapes"]))
        diff = [k for k in sa["shapes"] if k in sb["shapes"] and sa["shapes"][k] != sb["shapes"][k]]
        if diff:
            k = diff[0]
            out.append(f"{len(diff)} tensor shapes differ (e.g. {k}: {sa['shapes'][k]} vs {sb['shapes'][k]})")
        if only:
            out.append(f"{len(only)} tensors exist in one only (e.g. {only[0]})")
    if sa["heads"] != sb["heads"]:
        out.append(f"attention heads {_heads(sa['heads'])} vs {_heads(sb['heads'])}")
    if sa["convs"] != sb["convs"] and not out:
        k = next(i for i, (x, y) in enumerate(zip(sa["convs"], sb["convs"])) if x != y) \
            if len(sa["convs"]) == len(sb["convs"]) else 0
        out.append(f"convolution geometry differs (e.g. {sa['convs'][k][0]}: stride/padding "
                   f"{sa['convs'][k][1]}/{sa['convs'][k][2]} vs {sb['convs'][k][1]}/{sb['convs'][k][2]})")
    if sa["pools"] != sb["pools"]:
        out.append(f"stem pooling {sa['pools'] or 'none'} vs {sb['pools'] or 'none'}")
    if sa["layers"] != sb["layers"] and not out:
        x, y = next(((x, y) for x, y in zip(sa["layers"], sb["layers"]) if x != y), (None, None))
        out.append(f"layer types differ (e.g. {x} vs {y})" if x else "layer structure differs")
    if sa["eps"] != sb["eps"] and not out:
        out.append("normalisation epsilons differ")
    return out


def _heads(h: list[int]) -> str:
    return str(h[0]) if h and len(set(h)) == 1 else str(h)


def describe(arch: dict) -> str:
    """'vit_small_patch16_224 {num_heads: 12}' and the stem, for messages."""
    a = normalise(arch)
    s = a["name"]
    if a["kwargs"]:
        s += " " + ", ".join(f"{k}={v}" for k, v in a["kwargs"].items()).join("{}")
    if a["stem_conv"]:
        s += f" with a {a['stem_conv']['kernel']}x{a['stem_conv']['kernel']} stride-1 stem"
    elif a["small_stem"]:
        s += " with the small (stride-1, no max-pool) stem"
    return s


def heads_of(arch: dict) -> int | None:
    h = signature(arch)["heads"]
    return h[0] if h else None


def detect_stem_conv(arch: dict, state: dict[str, torch.Tensor], padding: int | None = None) -> dict | None:
    """{"kernel", "padding"} when the file's conv1 has another kernel than the model's (a CIFAR-style stem)."""
    w = state.get("conv1.weight")
    if w is None or w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        return None
    with torch.device("meta"):
        model = create_backbone(arch["name"], arch.get("kwargs"), False)
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or tuple(conv.weight.shape[:2]) != tuple(w.shape[:2]):
        return None
    k = int(w.shape[-1])
    if k == conv.kernel_size[0]:
        return None
    return {"kernel": k, "padding": k // 2 if padding is None else padding}
