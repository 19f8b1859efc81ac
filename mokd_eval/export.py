"""`mokd export`: a checkpoint's backbone in detectron2's, timm's or torchvision's layout.

detectron2 reads third-party weights from a pickle `{"model": {name: ndarray}, "__author__": ...,
"matching_heuristics": True}`; with matching heuristics its checkpointer aligns names by suffix, so the
backbone's `res5.*` lands in the C4 ROI head's `roi_heads.res5.*`. timm's ResNet keys are torchvision's, so
the torchvision export is the timm state dict checked against `torchvision.models.resnetNN()`.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from mokd.checkpoint import write_atomic
from mokd.cli_common import debug_option
from mokd.errors import UserError
from mokd_eval.common import checkpoint_options

TARGETS = ("detectron2", "timm", "torchvision")
RESNET_DEPTHS = {(2, 2, 2, 2, "basic"): 18, (3, 4, 6, 3, "basic"): 34, (3, 4, 6, 3, "bottleneck"): 50,
                 (3, 4, 23, 3, "bottleneck"): 101, (3, 8, 36, 3, "bottleneck"): 152}

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_STEM = re.compile(r"^(conv1\.weight|bn1\.(weight|bias|running_mean|running_var|num_batches_tracked))$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+)$")


# ----------------------------------------------------------------------------------------------- structure

def resnet_structure(state_dict: dict[str, torch.Tensor]) -> dict:
    """Blocks per stage and block type of a torchvision-layout ResNet state dict.

    Returns {"depths": (n1, n2, n3, n4), "block": "basic" | "bottleneck", "depth": 18 | 34 | ... | None}.
    Raises UserError for anything that is not a plain ResNet (deep stems, SE blocks, avg-pool shortcuts, ViTs).
    """
    keys = [k for k in state_dict if not k.startswith("fc.")]
    foreign = [k for k in keys if not (_STEM.match(k) or _BLOCK.match(k))]
    if foreign or "conv1.weight" not in state_dict or "layer4.0.conv1.weight" not in state_dict:
        shown = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        raise UserError("this backbone is not a plain ResNet (torchvision / timm resnet18/34/50/101 layout: "
                        "conv1, bn1, layer1-4 with conv/bn/downsample); detectron2 and torchvision exports "
                        f"support those only. Keys that do not fit: {shown or 'no layer1-4 found'}")
    depths = tuple(len({int(m.group(2)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == str(i)})
                   for i in range(1, 5))
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    return {"depths": depths, "block": block, "depth": RESNET_DEPTHS.get((*depths, block)),
            "standard_widths": _standard_widths(state_dict, block)}


def _standard_widths(state_dict: dict[str, torch.Tensor], block: str) -> bool:
    """conv1 64 wide, stage widths 64/128/256/512 (x4 out for bottlenecks), no groups: what detectron2 builds."""
    if state_dict["conv1.weight"].shape[0] != 64:
        return False
    for i in range(4):
        width = 64 * 2 ** i
        conv2 = state_dict[f"layer{i + 1}.0.conv2.weight"]
        if state_dict[f"layer{i + 1}.0.conv1.weight"].shape[0] != width or tuple(conv2.shape[:2]) != (width, width):
            return False
        if block == "bottleneck" and state_dict[f"layer{i + 1}.0.conv3.weight"].shape[0] != 4 * width:
            return False
    return True


# ------------------------------------------------------------------------------------------------ renaming

def detectron2_name(key: str) -> str | None:
    """torchvision/timm ResNet key -> detectron2 ResNet key (None: not exported, e.g. num_batches_tracked)."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = _BLOCK.match(key)
    if m is None:
        raise UserError(f"cannot map {key!r} to a detectron2 ResNet parameter")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}."
    if rest.startswith("conv"):
        return prefix + rest
    if rest.startswith("bn"):
        field = rest.split(".", 1)[1]
        return prefix + f"conv{rest[2]}.norm.{field}"
    index, field = rest[len("downsample."):].split(".", 1)
    return prefix + ("shortcut." if index == "0" else "shortcut.norm.") + field


def to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Plain ResNet state dict -> {detectron2 name: float32 ndarray} (fc and BN counters dropped)."""
    resnet_structure(state_dict)
    out = {}
    for key, value in state_dict.items():
        name = detectron2_name(key)
        if name is not None:
            out[name] = value.detach().cpu().float().numpy()
    return out


def check_torchvision(state_dict: dict[str, torch.Tensor]) -> None:
    """Load into torchvision's ResNet of the same depth; anything but a missing fc is a UserError."""
    import torchvision

    info = resnet_structure(state_dict)
    if info["depth"] is None:
        raise UserError(f"ResNet with {info['block']} blocks {info['depths']} has no torchvision counterpart "
                        f"(torchvision has depths {sorted(set(RESNET_DEPTHS.values()))})")
    tv_model = getattr(torchvision.models, f"resnet{info['depth']}")(weights=None)
    tv_shapes = {k: v.shape for k, v in tv_model.state_dict().items()}
    bad = [k for k, v in state_dict.items() if k in tv_shapes and tuple(v.shape) != tuple(tv_shapes[k])]
    if bad:
        raise UserError(f"shapes differ from torchvision resnet{info['depth']} for {', '.join(bad[:5])} "
                        "(a width- or group-modified ResNet has no plain torchvision counterpart)")
    result = tv_model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise UserError(f"torchvision resnet{info['depth']} does not take this state dict: missing {missing[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")


# ------------------------------------------------------------------------------------------------- writing

def export_detectron2(state_dict: dict[str, torch.Tensor], out: Path) -> Path:
    weights = to_detectron2(state_dict)
    obj = {"model": weights, "__author__": "mokd", "matching_heuristics": True}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)

    write_atomic(out, write)
    return out


def export_timm(state_dict: dict[str, torch.Tensor], arch: dict, out: Path) -> tuple[Path, Path]:
    """safetensors weights + `<out>.json` {name, kwargs, small_stem}: timm.create_model(name, **kwargs) loads it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    kwargs = {"num_classes": 0, **dict(arch.get("kwargs") or {})}
    sidecar = {"name": arch["name"], "kwargs": kwargs, "small_stem": bool(arch.get("small_stem", False)),
               "stem_conv": arch.get("stem_conv"),
               "note": "timm.create_model(name, **kwargs).load_state_dict(safetensors.torch.load_file(weights)); "
                       "small_stem=true: the model was trained with conv1 stride 1 and no stem max-pool "
                       "(mokd.models.backbones.apply_small_stem), which changes no parameter. stem_conv "
                       "{kernel, padding}: conv1 is replaced by a kernel x kernel stride-1 convolution first "
                       "(a CIFAR-style stem; mokd_eval.architecture.build does both)."}
    write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "timm_name": arch["name"]}))
    json_path = out.with_suffix(".json")
    write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    return out, json_path


def export_torchvision(state_dict: dict[str, torch.Tensor], out: Path) -> Path:
    check_torchvision(state_dict)
    tensors = {k: v.detach().cpu().clone() for k, v in state_dict.items()}

    def write(tmp: Path) -> None:
        torch.save(tensors, tmp)

    write_atomic(out, write)
    return out


def export_backbone(backbone: nn.Module, arch: dict, target: str, out: str | Path) -> list[Path]:
    """Write `backbone` (a timm model) to `out` in the `target` layout; returns the files written."""
    out = Path(out)
    state_dict = backbone.state_dict()
    stem = arch.get("stem_conv")
    if stem and target in ("detectron2", "torchvision"):
        raise UserError(f"this backbone has a {stem['kernel']}x{stem['kernel']} CIFAR-style first convolution; "
                        f"{target}'s ResNet has the 7x7 one, so the weights have no {target} counterpart. "
                        "Export --to timm (its sidecar records the stem)")
    if target == "detectron2":
        if not resnet_structure(state_dict)["standard_widths"]:
            warnings.warn("the ResNet's widths differ from the standard ones (64/128/256/512 per stage); detectron2's "
                          "ResNet configs build the standard widths and would skip these tensors", stacklevel=2)
        if arch.get("small_stem"):
            warnings.warn("the backbone was trained with a small-image stem (stride-1 conv1, no max-pool); "
                          "detectron2 uses the standard stride-4 stem, so the stem sees other scales", stacklevel=2)
        return [export_detectron2(state_dict, out)]
    if target == "timm":
        if out.suffix == ".json":
            raise UserError(f"{out}: the timm export writes safetensors weights plus a .json sidecar beside them; "
                            "name the weights file e.g. model.safetensors")
        return list(export_timm(state_dict, arch, out))
    if target == "torchvision":
        return [export_torchvision(state_dict, out)]
    raise UserError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")


def pick_model(models: list, target: str):
    """One LoadedModel from the loader's list: the only one, or the only ResNet for detectron2/torchvision."""
    if len(models) == 1:
        return models[0]
    if target in ("detectron2", "torchvision"):
        resnets = [m for m in models if _is_plain_resnet(m.backbone)]
        if len(resnets) == 1:
            return resnets[0]
    labels = ", ".join(f"{m.label} ({m.arch['name']})" for m in models)
    raise UserError(f"the checkpoint holds several backbones: {labels}; choose one with --model net1|net2")


def _is_plain_resnet(backbone: nn.Module) -> bool:
    try:
        resnet_structure(backbone.state_dict())
        return True
    except UserError:
        return False


@contextlib.contextmanager
def echo_warnings():
    """Show the warnings raised inside as one-line `warning: ...` messages (stderr) instead of Python warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


def load_one(checkpoint: str, *, target: str, model: str | None, branch: str | None, arch: str | None,
             arch_kwargs: dict | None, key: str | None, allow_partial: bool):
    """The loader's models for CHECKPOINT (report printed), narrowed to the one `target` takes."""
    from mokd_eval.common import load_models_cli

    models = load_models_cli(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial)
    return pick_model(models, target)


@click.command("export")
@checkpoint_options
@click.option("--to", "target", type=click.Choice(TARGETS), required=True,
              help="detectron2: ResNet weights pickled for detectron2 (.pkl); timm: safetensors + JSON sidecar; "
                   "torchvision: torchvision ResNet state dict (.pth).")
@click.argument("out", type=click.Path(dir_okay=False))
@debug_option
def export_cmd(checkpoint, model, branch, arch, arch_kwargs, key, allow_partial, target, out):
    """Export the backbone in CHECKPOINT (ours or any format the loader reads) to OUT.

    \b
    mokd export run/last.pth --to detectron2 r34.pkl --model net1
    mokd export dino_resnet50.pth --to torchvision r50.pth --arch resnet50
    """
    loaded = load_one(checkpoint, target=target, model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs,
                      key=key, allow_partial=allow_partial)
    with echo_warnings():
        files = export_backbone(loaded.backbone, loaded.arch, target, out)
    click.echo(f"{loaded.label} ({loaded.arch['name']}) -> {target}: " + ", ".join(str(p) for p in files))


# The loader options are shared with `mokd eval`; these two say what they mean for an export of one backbone.
_EXPORT_HELP = {
    "model": "Which backbone of a MOKD checkpoint: net1 or net2 (official MOKD files: cnn or vit). Needed when the "
             "file holds several, unless only one of them is a ResNet (detectron2, torchvision).",
    "allow_partial": "Export even if not every backbone tensor matched (the rest keep their random init).",
}
for _param in export_cmd.params:
    if _param.name in _EXPORT_HELP:
        _param.help = _EXPORT_HELP[_param.name]
    if _param.name == "model":
        _param.show_default = "the only backbone"
