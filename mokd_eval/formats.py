"""Checkpoint layouts: how to recognise a file and where its backbone weights live.

`FORMATS` maps a format name to a `Format` (a detector and an extractor). Detectors are tried in order;
the first that recognises the loaded object extracts one or more `Candidate`s: a backbone state dict with
its prefix stripped, plus what the file says about the architecture. Matching the weights to a timm model
is the loader's job (`mokd_eval.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mokd.errors import UserError
from mokd.naming import model_name

StateDict = dict[str, torch.Tensor]


@dataclass
class Request:
    """What the user asked for (CLI flags), handed to every extractor."""

    model: str | None = None  # ours: net1|net2; official MOKD: cnn|vit; None = the format's default
    branch: str | None = None  # teacher|student; None = the format's default
    arch: str | None = None  # timm name; official MOKD files accept "CNN_ARCH,VIT_ARCH"
    arch_kwargs: dict | None = None


@dataclass
class Candidate:
    """One backbone found in a checkpoint file."""

    label: str
    state: StateDict  # backbone keys, prefixes stripped (head keys may remain; the loader ignores them)
    ignored: list[str] = field(default_factory=list)  # keys of the same (sub-)dict left out on purpose
    arch: dict | None = None  # {"name", "kwargs", "small_stem"} when the file names or implies it
    model: str | None = None
    branch: str | None = None
    image_size: int | None = None
    extra: dict = field(default_factory=dict)  # e.g. {"mode": "mokd", "pair": "resnet50+vit_small_patch16_224"}
    arch_source: str = ""  # where `arch` comes from, for messages: "its arch 'vit_small' (MoCo v3)"
    # Hyper-parameters the format fixes but the shapes cannot show: {kwarg: (value, why)}; applied to any
    # architecture built for these weights unless --arch-kwargs names the kwarg.
    implied: dict = field(default_factory=dict)
    stem_padding: int | None = None  # padding of a CIFAR-style stem by the format's convention (None: k // 2)
    user_arch: str | None = None  # this candidate's share of --arch (official MOKD files: "CNN,VIT")


@dataclass(frozen=True)
class Format:
    detect: Callable[[Any], bool]
    extract: Callable[[Any, Request], list[Candidate]]
    description: str


# --------------------------------------------------------------------------------------------------------------
# helpers


def is_state_dict(obj: Any) -> bool:
    """A non-empty flat dict of tensors (a timm/torchvision/`module.` state dict)."""
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values()) \
        and all(isinstance(k, str) for k in obj)


def split_prefix(sd: StateDict, prefix: str) -> tuple[StateDict, list[str]]:
    """(keys under `prefix` with it stripped, the other keys)."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, [k for k in sd if not k.startswith(prefix)]


def first_prefix(sd: StateDict, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if any(k.startswith(p) for k in sd)), None)


def _unwrap_state(obj: Any) -> StateDict | None:
    """The flat state dict inside `obj`: itself, or under a usual wrapper key."""
    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state", "model_state_dict", "net", "network"):
            if is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _branch(req: Request, default: str) -> str:
    b = req.branch or default
    if b not in ("teacher", "student"):
        raise UserError(f"--branch must be 'teacher' or 'student', got {b!r}")
    return b


def arch_from_name(name: str | None, patch_size: int | None = None, num_heads: int | None = None,
                   state: StateDict | None = None) -> dict | None:
    """Map the architecture names written by DINO / MoCo / MOKD scripts ('vit_small', 'resnet50') to timm.

    Short ViT names get the patch size from `patch_size`, else from the weights' patch embedding, else 16
    (the scripts' default). None when the name is no timm model.
    """
    if not name:
        return None
    import timm

    name = str(name)
    kwargs: dict = {}
    if name.startswith("vit_") and name.count("_") == 1:  # DINO/MoCo short names: vit_tiny, vit_small, vit_base
        w = (state or {}).get("patch_embed.proj.weight")
        patch = patch_size or (int(w.shape[-1]) if w is not None and w.ndim == 4 else 16)
        name = f"{name}_patch{patch}_224"
        if num_heads:
            kwargs["num_heads"] = num_heads
    if name not in timm.list_models():
        return None
    return {"name": name, "kwargs": kwargs, "small_stem": False}


def _named(label: str, name: Any) -> str:
    return f"its {label} {name!r}" if name else ""


def _arg(args: Any, name: str) -> Any:
    if isinstance(args, dict):
        return args.get(name)
    return getattr(args, name, None)


# --------------------------------------------------------------------------------------------------------------
# ours


def _detect_mokd(obj: Any) -> bool:
    from mokd.checkpoint import is_mokd_checkpoint

    return is_mokd_checkpoint(obj)


def _extract_mokd(obj: dict, req: Request) -> list[Candidate]:
    branch = _branch(req, "teacher")
    nets = sorted(obj["arch"])
    if req.model is not None and req.model not in nets:
        raise UserError(f"--model {req.model!r}: this MOKD checkpoint holds {', '.join(nets)}")
    sd = obj["model"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    cfg = obj.get("config") or {}
    image_size = (cfg.get("augment") or {}).get("global_size")
    mode = (cfg.get("loss") or {}).get("mode", "mokd")
    shapes = [model_name(a["name"], a.get("kwargs"), bool(a.get("small_stem"))) for a in (obj["arch"][n] for n in nets)]
    pair = "+".join(shapes)  # as built, so that runs of one timm name with other arguments never share a row
    out = []
    for net in [req.model] if req.model else nets:
        state, _ = split_prefix(sd, f"{branch}.{net}.backbone.")
        own, _ = split_prefix(sd, f"{branch}.{net}.")
        ignored = [k for k in own if not k.startswith("backbone.")]
        a = obj["arch"][net]
        arch = {"name": a["name"], "kwargs": dict(a.get("kwargs") or {}), "small_stem": bool(a.get("small_stem")),
                "given_name": (cfg.get(net) or {}).get("name")}  # the config's netX.name, if set
        out.append(Candidate(f"{net}-{branch}", state, ignored, arch, net, branch, image_size,
                             {"mode": mode, "pair": pair, "epoch": obj.get("epoch")},
                             arch_source=f"its arch.{net} {a['name']!r}"))
    return out


# --------------------------------------------------------------------------------------------------------------
# the authors' released MOKD files: {"teacher_cnn": sd, "teacher_vit": sd, ...}

_OFFICIAL_MODELS = {"cnn": "cnn", "vit": "vit", "net1": "cnn", "net2": "vit"}


def _detect_official(obj: Any) -> bool:
    return isinstance(obj, dict) and any(f"{b}_{m}" in obj for b in ("teacher", "student") for m in ("cnn", "vit"))


def _extract_official(obj: dict, req: Request) -> list[Candidate]:
    branch = _branch(req, "teacher")
    present = [m for m in ("cnn", "vit") if f"{branch}_{m}" in obj]
    if not present:
        raise UserError(f"this official MOKD file has no {branch} weights; top-level keys: {', '.join(map(str, obj))}")
    archs = [a.strip() for a in req.arch.split(",")] if req.arch else []
    named = {m: obj.get(f"arch_{m}") for m in ("cnn", "vit") if isinstance(obj.get(f"arch_{m}"), str)}
    if req.model is not None:
        if req.model not in _OFFICIAL_MODELS:
            raise UserError(f"--model for an official MOKD file is 'cnn' or 'vit', got {req.model!r}")
        wanted = [_OFFICIAL_MODELS[req.model]]
    elif len(archs) == 2:
        wanted = ["cnn", "vit"]
    elif len(archs) == 1:  # pick the sub-dict that fits the named architecture
        wanted = ["vit" if _is_vit_arch(archs[0]) else "cnn"]
    elif named:  # main_mokd.py stores arch_cnn / arch_vit: both models, as for our own files
        wanted = [m for m in ("cnn", "vit") if f"{branch}_{m}" in obj]
    else:
        raise UserError("this official MOKD file names no architecture (no arch_cnn / arch_vit): pass --arch "
                        "CNN_ARCH,VIT_ARCH (e.g. --arch resnet50,vit_small_patch16_224), or --model cnn|vit with "
                        "one --arch")
    out = []
    for m in wanted:
        key = f"{branch}_{m}"
        if key not in obj:
            raise UserError(f"this official MOKD file has no '{key}'; top-level keys: {', '.join(map(str, obj))}")
        sd = _unwrap_state(obj[key])
        if sd is None:
            raise UserError(f"'{key}' in this file is not a state dict")
        prefix = first_prefix(sd, ("module.backbone.", "backbone."))
        if prefix is None:
            raise UserError(f"'{key}' has no 'module.backbone.' or 'backbone.' keys (first keys: {list(sd)[:5]})")
        state, ignored = split_prefix(sd, prefix)
        user = archs[("cnn", "vit").index(m)] if len(archs) == 2 else (archs[0] if archs else None)
        # The authors' ViTs are DINO's (vit_small: 6 heads, as timm's); patch size from the weights.
        arch = arch_from_name(named.get(m), state=state)
        out.append(Candidate(f"{m}-{branch}", state, ignored, arch, m, branch,
                             arch_source=_named(f"arch_{m}", named.get(m)), user_arch=user))
    return out


def _is_vit_arch(name: str) -> bool:
    from mokd.models.backbones import create_backbone, is_vit

    with torch.device("meta"):  # no memory, no init cost: only the module structure is needed
        return is_vit(create_backbone(name))


# --------------------------------------------------------------------------------------------------------------
# DINO training checkpoints: {"teacher": sd, "student": sd, "args": Namespace, ...}


def _detect_dino(obj: Any) -> bool:
    return isinstance(obj, dict) and any(_unwrap_state(obj.get(b)) is not None for b in ("teacher", "student"))


def _extract_dino(obj: dict, req: Request) -> list[Candidate]:
    branch = _branch(req, "teacher")
    sd = _unwrap_state(obj.get(branch))
    if sd is None:
        raise UserError(f"this DINO checkpoint has no '{branch}' state dict; top-level keys: {', '.join(map(str, obj))}")
    prefix = first_prefix(sd, ("module.backbone.", "backbone.", "module."))
    state, ignored = split_prefix(sd, prefix) if prefix else (sd, [])
    args = obj.get("args")
    name = _arg(args, "arch") if args is not None else None
    arch = arch_from_name(name, _arg(args, "patch_size"), state=state)
    return [Candidate(branch, state, ignored, arch, None, branch, arch_source=_named("args.arch", name))]


# --------------------------------------------------------------------------------------------------------------
# MoCo v3: state_dict with module.base_encoder. / module.momentum_encoder. ; MoCo v2: module.encoder_q. / encoder_k.


def _state_with(obj: Any, prefixes: tuple[str, ...]) -> StateDict | None:
    """The state dict of `obj` (wrapped in "state_dict" or not) if it has keys under one of `prefixes`."""
    sd = _unwrap_state(obj)
    return sd if sd is not None and first_prefix(sd, prefixes) else None


_MOCO3 = ("module.base_encoder.", "base_encoder.", "module.momentum_encoder.", "momentum_encoder.")
_MOCO2 = ("module.encoder_q.", "encoder_q.")


def _extract_moco(obj: dict, req: Request, v3: bool) -> list[Candidate]:
    # MoCo's own linear evaluation uses the query (base) encoder, so that is the default here.
    branch = _branch(req, "student")
    sd = _unwrap_state(obj)
    names = ("base_encoder", "momentum_encoder") if v3 else ("encoder_q", "encoder_k")
    enc = names[0] if branch == "student" else names[1]
    prefix = first_prefix(sd, (f"module.{enc}.", f"{enc}."))
    if prefix is None:
        raise UserError(f"this MoCo checkpoint has no '{enc}' weights (asked for by --branch {branch})")
    state, ignored = split_prefix(sd, prefix)
    name = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    implied = {}
    width = state["pos_embed"].shape[-1] if "pos_embed" in state else None
    if v3 and width in (384, 768):
        # MoCo v3's vits.py builds its ViTs (small: 384 wide, base: 768) with 12 heads; timm's vit_small has 6:
        # the weight shapes are the same, the computation is not.
        implied["num_heads"] = (12, "MoCo v3 builds its ViTs with 12 heads (vit_small too, where timm has 6)")
    arch = arch_from_name(name, None, implied.get("num_heads", (None,))[0], state=state)
    return [Candidate(enc, state, ignored, arch, None, branch, arch_source=_named("arch", name), implied=implied)]


# --------------------------------------------------------------------------------------------------------------
# solo-learn (PyTorch Lightning): state_dict with backbone. / momentum_backbone.


def _detect_solo(obj: Any) -> bool:
    return isinstance(obj, dict) and is_state_dict(obj.get("state_dict")) and \
        first_prefix(obj["state_dict"], ("backbone.",)) is not None


def _extract_solo(obj: dict, req: Request) -> list[Candidate]:
    branch = _branch(req, "student")
    sd = obj["state_dict"]
    prefix = "backbone." if branch == "student" else "momentum_backbone."
    if not any(k.startswith(prefix) for k in sd):
        raise UserError(f"this solo-learn checkpoint has no '{prefix}' weights (asked for by --branch {branch})")
    state, ignored = split_prefix(sd, prefix)
    hp = obj.get("hyper_parameters")
    name = _arg(_arg(hp, "backbone"), "name") if hp is not None else None
    # solo-learn's CIFAR ResNets: conv1 3x3, stride 1, padding 2, no max-pool.
    return [Candidate("backbone" if branch == "student" else "momentum_backbone", state, ignored,
                      arch_from_name(name, state=state), None, branch, arch_source=_named("backbone.name", name),
                      stem_padding=2)]


# --------------------------------------------------------------------------------------------------------------
# plain state dicts: `module.` (SwAV, BYOL, any DDP-wrapped model), torchvision, timm


def _detect_module(obj: Any) -> bool:
    sd = _unwrap_state(obj)
    return sd is not None and all(k.startswith("module.") for k in sd)


def _extract_module(obj: Any, req: Request) -> list[Candidate]:
    sd = _unwrap_state(obj)
    prefix = first_prefix(sd, ("module.backbone.", "module.encoder.", "module."))
    state, ignored = split_prefix(sd, prefix)
    return [Candidate("backbone", state, ignored, _arch_of(obj, state), arch_source=_arch_source(obj))]


def _detect_torchvision(obj: Any) -> bool:
    sd = _unwrap_state(obj)
    return sd is not None and "conv1.weight" in sd and "layer1.0.conv1.weight" in sd


def _detect_timm(obj: Any) -> bool:
    return _unwrap_state(obj) is not None


def _extract_plain(obj: Any, req: Request) -> list[Candidate]:
    state = dict(_unwrap_state(obj))
    return [Candidate("backbone", state, [], _arch_of(obj, state), arch_source=_arch_source(obj))]


def _arch_of(obj: Any, state: StateDict) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("arch"), str):
        return arch_from_name(obj["arch"], state=state)
    return None


def _arch_source(obj: Any) -> str:
    return _named("arch", obj["arch"]) if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else ""


FORMATS: dict[str, Format] = {
    "mokd": Format(_detect_mokd, _extract_mokd, "this toolkit's training checkpoint (format='mokd')"),
    "mokd-official": Format(_detect_official, _extract_official,
                            "the MOKD authors' release (teacher_cnn / teacher_vit, backbone. keys)"),
    "dino": Format(_detect_dino, _extract_dino, "DINO training checkpoint (teacher / student, backbone. keys)"),
    "mocov3": Format(lambda o: _state_with(o, _MOCO3) is not None, lambda o, r: _extract_moco(o, r, True),
                     "MoCo v3 (state_dict, module.base_encoder. / module.momentum_encoder.)"),
    "mocov2": Format(lambda o: _state_with(o, _MOCO2) is not None, lambda o, r: _extract_moco(o, r, False),
                     "MoCo v2 (state_dict, module.encoder_q.)"),
    "solo-learn": Format(_detect_solo, _extract_solo, "solo-learn / Lightning (state_dict, backbone.)"),
    "module": Format(_detect_module, _extract_module, "SwAV / BYOL / DDP-wrapped state dict (module. keys)"),
    "torchvision": Format(_detect_torchvision, _extract_plain, "torchvision ResNet state dict (timm-compatible)"),
    "timm": Format(_detect_timm, _extract_plain, "plain timm state dict (also DINO backbone-only releases)"),
}


def detect(obj: Any) -> str | None:
    """Name of the first format in FORMATS that recognises `obj`, or None."""
    return next((name for name, f in FORMATS.items() if f.detect(obj)), None)


def select_key(obj: Any, key: str) -> tuple[StateDict, list[str]]:
    """`--key`: a sub-dict by (dotted) name, or a key prefix of a flat state dict; common prefixes stripped."""
    cur = obj
    for part in key.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            cur = None
            break
    sd = _unwrap_state(cur) if cur is not None else None
    if sd is None:
        flat = _unwrap_state(obj)
        prefix = key if key.endswith(".") else key + "."
        if flat is not None and any(k.startswith(prefix) for k in flat):
            return split_prefix(flat, prefix)
        top = list(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"--key {key!r} is neither a sub-dict of tensors nor a key prefix in this file; "
                        f"top-level keys: {top}")
    prefix = first_prefix(sd, ("module.backbone.", "backbone.", "module."))
    return split_prefix(sd, prefix) if prefix else (dict(sd), [])
