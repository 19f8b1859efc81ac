"""Names a reader can trust: the architecture as built, and the run a checkpoint file belongs to.

A timm name alone can mislead: `resnet18` built with `layers=[1, 1, 1, 1]` and a small stem is not a
ResNet-18, and `vit_tiny_patch16_224` built with `patch_size=8, img_size=32` has neither patch 16 nor 224 px.
`model_name` gives the name with what the arguments change, e.g. `resnet18 [layers 1-1-1-1, small stem]` or
`vit_tiny [patch 8, 32 px]`; a name the config sets (`netX.name`) replaces it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Arguments that regularise training or set runtime behaviour but build the same shape of network.
_SAME_SHAPE = {"drop_rate", "drop_path_rate", "drop_block_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
               "patch_drop_rate", "dynamic_img_size", "dynamic_img_pad", "pretrained", "pretrained_cfg",
               "num_classes", "zero_init_last", "weight_init", "fix_init", "device", "dtype"}
_WIDTH = ("width_multiplier", "channel_multiplier", "width_mult", "multiplier", "width")
_ORDER = ("layers", "depths", *_WIDTH, "channels", "base_width", "stem_width", "embed_dim", "dims", "depth",
          "num_heads", "mlp_ratio", "patch_size", "img_size")
_VIT_SUFFIX = re.compile(r"^(?P<base>.+)_patch(?P<patch>\d+)_(?P<size>\d+)$")
_NUMBERED = re.compile(r"^checkpoint_(\d+)$")


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "-".join(_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _square(v: Any) -> int | None:
    """An int, or a pair of equal ints, as one int; None otherwise."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def model_name(arch: str, kwargs: dict | None = None, small_stem: bool = False, name: str | None = None) -> str:
    """The architecture as built: `name` when given (the config's netX.name), else the timm name with the
    arguments that change its shape, in brackets.

    model_name("resnet18", {"layers": [1, 1, 1, 1]}, True) -> "resnet18 [layers 1-1-1-1, small stem]"
    model_name("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 32}) -> "vit_tiny [patch 8, 32 px]"
    model_name("vit_small_patch16_224", {"drop_path_rate": 0.1}) -> "vit_small_patch16_224"
    """
    if name:
        return str(name)
    kw = {k: v for k, v in (kwargs or {}).items() if k not in _SAME_SHAPE}
    base, dot, tag = str(arch).partition(".")  # "vit_small_patch16_224.dino": the tag names weights, not shape
    m = _VIT_SUFFIX.match(base)
    if m:  # a ViT name states its patch and size: keep them only while they are true
        patch, size = int(m["patch"]), int(m["size"])
        new_patch, new_size = _square(kw.get("patch_size", patch)), _square(kw.get("img_size", size))
        if new_patch == patch:
            kw.pop("patch_size", None)
        if new_size == size:
            kw.pop("img_size", None)
        if "patch_size" in kw or "img_size" in kw:
            base = m["base"]
            kw.setdefault("patch_size", patch)
            kw.setdefault("img_size", size)
    parts = []
    for k in sorted(kw, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k)):
        v = kw[k]
        if k == "patch_size":
            parts.append(f"patch {_value(_square(v) or v)}")
        elif k == "img_size":
            parts.append(f"{_value(_square(v) or v)} px")
        elif k in _WIDTH:
            parts.append(f"width {_value(v)}")
        elif k == "embed_dim":
            parts.append(f"dim {_value(v)}")
        elif k == "num_heads":
            parts.append(f"heads {_value(v)}")
        elif k == "mlp_ratio":
            parts.append(f"mlp {_value(v)}")
        else:
            parts.append(f"{k.replace('_', ' ')} {_value(v)}")
    if small_stem:
        parts.append("small stem")
    shown = base + (dot + tag if tag else "")
    return f"{shown} [{', '.join(parts)}]" if parts else shown


def run_name(path: str | Path) -> str:
    """What a reader calls the run a checkpoint file comes from.

    Files the trainer writes (`last.pth`, `checkpoint_0010.pth`) are named by their run folder ("r18_vit",
    "r18_vit@10"); any other file by its own stem.
    """
    p = Path(str(path))
    folder = p.parent.name
    if folder and p.stem == "last":
        return folder
    m = _NUMBERED.match(p.stem)
    if folder and m:
        return f"{folder}@{int(m[1])}"
    return p.stem or str(path)


_DATA_KINDS = {"digits": "digits", "photos": "photos", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def data_name(spec: Any) -> str:
    """A data set as a reader names it: an image folder by its folder name ("imagenet100", not "folder"),
    the small built-in sets by their own name; a class list says how many classes it keeps.

    Takes a mokd.data.DataSpec or its string form ("folder:/data/in100", "cifar10:/data/c10").
    """
    if isinstance(spec, str) or spec is None:
        text = str(spec or "digits")
        text, _, cl = text.partition(" (classes from ")
        kind, sep, root = text.partition(":")
        if not sep:
            kind, root = (kind, "") if kind in ("digits", "photos") else ("folder", kind)
        class_list = Path(cl.rstrip(")")) if cl else None
    else:
        kind, root, class_list = spec.kind, str(spec.root or ""), spec.class_list
    name = _DATA_KINDS.get(kind) or Path(root.rstrip("/")).name or kind
    if class_list is not None:
        try:
            n = sum(1 for line in Path(class_list).read_text().splitlines() if line.strip())
            name += f" ({n} classes of {Path(class_list).name})"
        except OSError:
            name += f" (classes of {Path(class_list).name})"
    return name
