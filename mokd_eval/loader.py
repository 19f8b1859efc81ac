"""Any SSL checkpoint -> timm backbone(s) with a report of what matched.

    models = load_models("dino_deitsmall16_pretrain_full_checkpoint.pth", arch="vit_small_patch16_224")
    print(models[0].report.summary())

The file is read with `torch.load(weights_only=True)` (argparse.Namespace, which DINO and the official MOKD
code store as `args`, is allowed as well: it holds plain values only). Its layout is recognised by the
detectors in `mokd_eval.formats.FORMATS`; the backbone weights are matched by name and shape against the
timm model, heads (fc, head, projector, prototypes, ...) are ignored and reported, and anything short of
every backbone tensor matched is an error unless `allow_partial`.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mokd.checkpoint import load_file
from mokd.errors import UserError
from mokd.models.backbones import is_vit
from mokd.models.pos_embed import dino_rule_applies, set_pos_resample
from mokd.naming import model_name, run_name
from mokd_eval import architecture
from mokd_eval.formats import FORMATS, Candidate, Request, detect, select_key

# Keys that belong to a classifier or an SSL head rather than to the backbone.
HEAD_PREFIXES = ("fc.", "head.", "heads.", "head_dist.", "classifier.", "projector.", "projection_head.",
                 "projection.", "predictor.", "prototypes.", "prototype.", "mlp_head.", "thead.", "last_layer.")
# Buffers that carry no information for inference; old checkpoints lack them.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# Formats whose ViTs resample their position embedding by DINO's rule (mokd.models.pos_embed) in their own code,
# so that evaluating them away from their native size should do the same; other files get timm's.
DINO_RULE_FORMATS = ("dino", "mocov3", "mokd-official")


@dataclass
class LoadReport:
    """Outcome of matching a checkpoint's backbone tensors to a model's state dict."""

    matched: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key: file shape vs model shape"
    total: int  # tensors in the model's state dict
    ignored: list[str] = field(default_factory=list)  # heads and other parts of the file left out on purpose
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched

    def as_dict(self) -> dict:
        return asdict(self)

    def as_dict_brief(self, n: int = 10) -> dict:
        """Counts, and the first `n` keys of each list (for result records)."""
        out: dict = {"matched": self.matched, "total": self.total}
        for name in ("missing", "mismatched", "unexpected", "ignored"):
            keys = getattr(self, name)
            out[name] = len(keys)
            if keys and name != "ignored":
                out[f"{name}_keys"] = keys[:n]
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def summary(self) -> str:
        parts = [f"matched {self.matched}/{self.total} backbone tensors",
                 f"missing {len(self.missing)}", f"shape-mismatched {len(self.mismatched)}",
                 f"unexpected {len(self.unexpected)}", f"ignored {len(self.ignored)}{_ignored_groups(self.ignored)}"]
        return "; ".join(parts)


@dataclass
class LoadedModel:
    backbone: nn.Module  # timm model, eval mode, num_classes=0, weights loaded
    label: str  # "net1-teacher" for ours, "<file stem>" (or "<stem>:<part>") for third-party files
    arch: dict  # {"name", "kwargs", "small_stem", "stem_conv"} (mokd_eval.architecture)
    report: LoadReport
    checkpoint: dict  # result-record field: {"path", "sha256", "format", "model", "branch", "arch", "label", ...}
    image_size: int | None  # training resolution when known (ours: config.augment.global_size)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """load_file with argparse.Namespace allowed (DINO/MOKD `args`); still weights_only."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_file(path)


def load_models(path: str | Path, *, model: str | None = None, branch: str | None = None, arch: str | None = None,
                arch_kwargs: dict | None = None, key: str | None = None, allow_partial: bool = False,
                cifar_stem: bool = False, pos_resample: str | None = None) -> list[LoadedModel]:
    """Load the backbone(s) of a checkpoint file.

    Ours: both models' teachers by default (`model=None`), or the one named; `branch` picks teacher/student.
    Third-party: one model (official MOKD files: both); `arch` names the timm architecture when the file does
    not, and is checked against the file's own when it does; `key` selects a sub-dict (or key prefix) by
    hand; `cifar_stem` forces a stride-1 first convolution without max-pool (a 3x3 first convolution is
    recognised from the shapes without it). Raises UserError for unreadable files, unknown layouts, files
    without backbone weights, architectures that contradict the file or do not fit it, non-finite weights,
    and (unless `allow_partial`) any backbone tensor left unmatched.
    A ViT resamples its position embedding by `pos_resample` (dino | timm; None: the rule its format trained
    with, see eval_pos_resample); the record's checkpoint field says which.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    req = Request(model=model, branch=branch, arch=arch, arch_kwargs=arch_kwargs)
    if key is not None:
        state, ignored = select_key(obj, key)
        fmt, candidates = f"key:{key}", [Candidate(key, state, ignored, None, None, branch)]
    else:
        fmt = detect(obj)
        if fmt is None:
            raise UserError(f"{path}: unknown checkpoint layout. Top-level keys: {_describe_keys(obj)}. Formats "
                            f"tried: {', '.join(FORMATS)}. Use --key NAME to pick the sub-dict (or key prefix) "
                            f"that holds the backbone weights.")
        candidates = FORMATS[fmt].extract(obj, req)
        if path.suffix == ".safetensors":
            fmt = "safetensors"
    if model is not None and fmt not in ("mokd", "mokd-official"):
        raise UserError(f"--model applies to MOKD checkpoints (two models in one file); {path.name} is {fmt}")
    sha = file_sha256(path)
    out = []
    for cand in candidates:
        label = cand.label if fmt == "mokd" else f"{path.stem}" + (f":{cand.label}" if len(candidates) > 1 else "")
        _check_has_backbone(cand, path, fmt)
        a, notes = resolve_arch(cand, req, fmt, path, cifar_stem)
        backbone = architecture.build(a)
        rule = None
        if is_vit(backbone):
            rule, why = choose_pos_resample(fmt, obj, cand, pos_resample, backbone)
            set_pos_resample(backbone, rule, a["name"])
            notes.append(_pos_resample_note(backbone, rule, why))
        report = match_and_load(backbone, cand.state, cand.ignored)
        report.notes.extend(notes)
        _check(report, a["name"], path, label, allow_partial, _arch_hint(cand.state))
        check_finite(backbone, f"{path.name} ({label})", several=len(candidates) > 1)
        backbone.eval()
        ckpt = {"path": str(path.resolve()), "sha256": sha, "format": fmt, "model": cand.model,
                "branch": cand.branch, "arch": a["name"], "arch_kwargs": a["kwargs"], "small_stem": a["small_stem"],
                "stem_conv": a["stem_conv"], "label": label,
                "shape": model_name(a["name"], a["kwargs"], a["small_stem"]),
                "name": model_name(a["name"], a["kwargs"], a["small_stem"], (cand.arch or {}).get("given_name")),
                "run": run_name(path),
                "load_report": report.as_dict_brief(),  # so that every result record carries it (provenance)
                **{k: v for k, v in cand.extra.items() if v is not None},
                **({"pos_resample": rule} if rule else {})}
        out.append(LoadedModel(backbone, label, a, report, ckpt, cand.image_size))
    return out


def resolve_arch(cand: Candidate, req: Request, fmt: str, path: Path, cifar_stem: bool = False
                 ) -> tuple[dict, list[str]]:
    """The architecture to build for `cand`, and notes on what was assumed.

    The file's own architecture (its arch/args, the format's conventions) is the reference: --arch and
    --arch-kwargs may name it differently or add what it leaves open, never change what it computes.
    """
    user_name = cand.user_arch if fmt == "mokd-official" else req.arch
    user_kwargs = dict(req.arch_kwargs or {})
    file = architecture.normalise(cand.arch) if cand.arch and cand.arch.get("name") else None
    if file is None and user_name is None:
        named = f" ({cand.arch_source}, which is not a timm model name)" if cand.arch_source else ""
        raise UserError(f"{path.name} ({fmt}) does not name its architecture{named}: pass --arch with the timm model "
                        f"name (e.g. resnet50, vit_small_patch16_224){_arch_hint(cand.state)}")
    implied = {k: v for k, (v, _) in cand.implied.items()}
    name = user_name or file["name"]
    own = dict(file["kwargs"]) if file is not None and name == file["name"] else {}
    arch = {"name": name, "kwargs": {**own, **{k: v for k, v in implied.items() if k not in user_kwargs}, **user_kwargs},
            "small_stem": bool(file and file["small_stem"]), "stem_conv": None}
    notes = []
    stem = architecture.detect_stem_conv(arch, cand.state, cand.stem_padding)
    if stem is not None:
        arch["stem_conv"], arch["small_stem"] = stem, True
        k = stem["kernel"]
        why = "solo-learn's convention" if cand.stem_padding is not None else f"{k} // 2"
        notes.append(f"CIFAR-style stem from the file's {k}x{k} conv1: stride 1, padding {stem['padding']} ({why}), "
                     "no max-pool (stride, padding and pooling cannot be seen in the weights)")
    if cifar_stem:
        if fmt == "mokd" and file is not None and not file["small_stem"]:
            raise UserError(f"{path.name} ({cand.label}): --cifar-stem contradicts the file, whose {file['name']} was "
                            "trained with the standard stem (arch small_stem: false); drop --cifar-stem")
        if not arch["small_stem"] and stem is None:
            notes.append("--cifar-stem: first convolution at stride 1, no max-pool")
        arch["small_stem"] = True
    if file is not None:
        reference = {**file, "kwargs": {**file["kwargs"], **implied}, "stem_conv": arch["stem_conv"],
                     "small_stem": file["small_stem"] if fmt == "mokd" else arch["small_stem"]}
        diffs = architecture.differences(arch, reference)
        if diffs:
            reasons = "".join(f"; {why}" for _, why in cand.implied.values())
            flags = " ".join(f for f in (f"--arch {user_name}" if user_name else "",
                                         f"--arch-kwargs {_kv(user_kwargs)}" if user_kwargs else "") if f)
            raise UserError(f"{path.name} ({cand.label}): {flags} contradicts the file: {cand.arch_source or 'it'} "
                            f"means {architecture.describe(reference)}{reasons}, while {flags} builds "
                            f"{architecture.describe(arch)} ({'; '.join(diffs)}). Drop {flags} to use the file's "
                            "architecture, or correct them.")
    heads = architecture.heads_of(arch)
    if heads is not None:
        if "num_heads" in user_kwargs:
            why = "from --arch-kwargs"
        elif "num_heads" in cand.implied:
            why = cand.implied["num_heads"][1]
        elif "num_heads" in arch["kwargs"]:
            why = f"from the file ({cand.arch_source})" if cand.arch_source else "from the file"
        elif file is not None and name == file["name"]:
            why = f"{name}'s own, as the file's {fmt} architecture has" if fmt != "mokd" else "as trained"
        else:
            why = f"timm's default for {name}"
        notes.append(f"num_heads={heads} ({why}); the head count cannot be seen in the weights, pass --arch-kwargs "
                     "num_heads=N if the model was built otherwise")
    return arch, notes


def _kv(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _check_has_backbone(cand: Candidate, path: Path, fmt: str) -> None:
    """A projector-only or head-only file (or an empty backbone part) says so instead of asking for --arch."""
    if not cand.state:
        raise UserError(f"{path.name} ({fmt}, {cand.label}) holds no backbone weights: no tensors where this layout "
                        f"keeps them{_ignored_groups(cand.ignored)}")
    if all(k.startswith(HEAD_PREFIXES) for k in cand.state):
        groups = sorted({k.split(".")[0] + ".*" for k in cand.state})
        raise UserError(f"{path.name} ({fmt}) holds no backbone weights: every tensor is under "
                        f"{'/'.join(groups)} (a projector or classifier head only); use the file that holds the "
                        "backbone, or --key NAME if it sits elsewhere in this one")


def check_finite(backbone: nn.Module, what: str, several: bool = False) -> None:
    """Refuse NaN/inf weights (a diverged run) instead of evaluating them to chance accuracy."""
    bad = [k for k, v in backbone.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        pick = " (--model picks one backbone of the file)" if several else ""
        raise UserError(f"{what}: the backbone holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                        f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. The run that wrote it diverged; "
                        f"use an earlier checkpoint{pick}.")


def eval_pos_resample(fmt: str, obj: Any, cand: Candidate) -> str:
    """The position-embedding rule a checkpoint's ViT trained with: DINO's for DINO, MoCo v3 and official MOKD
    files; ours: the run's net*.pos_resample (runs from before that setting used timm's); timm's otherwise."""
    if fmt in DINO_RULE_FORMATS:
        return "dino"
    if fmt == "mokd" and isinstance(obj, dict):
        net_cfg = (obj.get("config") or {}).get(cand.model) or {}
        return net_cfg.get("pos_resample", "timm")
    return "timm"


SOURCES = {"dino": "DINO", "mocov3": "MoCo v3", "mokd-official": "the official MOKD code"}


def choose_pos_resample(fmt: str, obj: Any, cand: Candidate, asked: str | None, backbone: nn.Module
                        ) -> tuple[str, str]:
    """(rule, why) for a ViT: the user's --pos-resample, else the rule the checkpoint's source trained with."""
    if asked is not None:
        return asked, f"--pos-resample {asked}"
    rule = eval_pos_resample(fmt, obj, cand)
    if rule == "dino" and not dino_rule_applies(backbone):
        return "timm", f"{type(backbone).__name__} has a position embedding of its own, which only timm's rule resamples"
    if fmt in SOURCES:
        return rule, f"the rule {SOURCES[fmt]} trained with"
    if fmt == "mokd":
        net_cfg = ((obj.get("config") or {}).get(cand.model) or {}) if isinstance(obj, dict) else {}
        if "pos_resample" in net_cfg:
            return rule, f"the run's {cand.model}.pos_resample, as it trained"
        return rule, f"the run predates {cand.model}.pos_resample and trained with timm's rule"
    return rule, (f"a {fmt} file does not say how its source resampled; DINO's backbone-only release files "
                  f"(e.g. dino_deitsmall16_pretrain.pth) trained with DINO's rule: --pos-resample dino for them")


def _pos_resample_note(backbone: nn.Module, rule: str, why: str) -> str:
    """The load report's line on position-embedding resampling, for any input away from the native grid."""
    pe = backbone.patch_embed
    size, grid = getattr(pe, "img_size", None), getattr(pe, "grid_size", None)
    native = f" away from {size[0]} px ({grid[0]}x{grid[1]} grid)" if size and grid else ""
    name = {"dino": "DINO's rule (bicubic, scale (n + 0.1) / N)", "timm": "timm's rule (bicubic to n, antialiased)"}
    return f"position embedding resampled{native} by {name[rule]}: {why}"


def _arch_hint(state: dict) -> str:
    """A guess from the tensors, to help choose --arch."""
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        w = state["patch_embed.proj.weight"]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"; the weights look like a ViT with width {w.shape[0]}, patch {w.shape[-1]}, depth {depth}"
    if "layer1.0.conv1.weight" in state:
        blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in state
        return f"; the weights look like a ResNet with blocks {blocks} ({'bottleneck' if bottleneck else 'basic'})"
    return ""


def match_and_load(backbone: nn.Module, state: dict[str, torch.Tensor], ignored: list[str] | None = None
                   ) -> LoadReport:
    """Copy every tensor of `state` whose name and shape fit `backbone`; report the rest."""
    target = backbone.state_dict()
    matched, mismatched, unexpected, ignored = {}, [], [], list(ignored or [])
    for k, v in state.items():
        if k in target:
            if tuple(v.shape) == tuple(target[k].shape):
                matched[k] = v
            else:
                mismatched.append(f"{k}: {tuple(v.shape)} in file vs {tuple(target[k].shape)} in model")
        elif k.startswith(HEAD_PREFIXES):
            ignored.append(k)
        else:
            unexpected.append(k)
    mismatched_keys = {m.split(":")[0] for m in mismatched}
    missing = [k for k in target if k not in matched and k not in mismatched_keys and not k.endswith(OPTIONAL_SUFFIXES)]
    backbone.load_state_dict(matched, strict=False)
    return LoadReport(len(matched), missing, unexpected, mismatched, len(target), ignored)


def _check(report: LoadReport, arch: str, path: Path, label: str, allow_partial: bool, hint: str = "") -> None:
    if report.matched == 0 or (report.mismatched and report.matched < report.total // 2):
        if report.mismatched:
            detail = f" For example: {'; '.join(report.mismatched[:3])}."
        elif report.unexpected:
            detail = f" File keys such as {', '.join(report.unexpected[:3])} are not in the model."
        else:
            detail = f" The model expects keys such as {', '.join(report.missing[:3])}, which the file lacks."
        raise UserError(f"{path.name} ({label}) does not fit architecture {arch!r}: {report.summary()}.{detail} "
                        f"Check --arch (and --arch-kwargs such as img_size/patch_size){hint}.")
    if report.complete or allow_partial:
        if not report.complete:
            report.notes.append("partial load allowed (--allow-partial): unmatched tensors keep their random init")
        return
    bad = report.missing[:5] + report.mismatched[:3]
    raise UserError(f"{path.name} ({label}) fits {arch!r} only partly: {report.summary()}. Not matched: "
                    f"{', '.join(bad)}{' ...' if len(report.missing) + len(report.mismatched) > len(bad) else ''}. "
                    f"Use --allow-partial to evaluate anyway.")


def _describe_keys(obj: Any, n: int = 15) -> str:
    if not isinstance(obj, dict):
        return f"(not a dict: {type(obj).__name__})"
    keys = [str(k) for k in obj]
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _ignored_groups(keys: list[str]) -> str:
    if not keys:
        return ""
    groups: dict[str, int] = {}
    for k in keys:
        g = k.split(".")[0] + ".*"
        groups[g] = groups.get(g, 0) + 1
    shown = ", ".join(f"{g}: {n}" for g, n in list(groups.items())[:6])
    return f" ({shown}{', ...' if len(groups) > 6 else ''})"
