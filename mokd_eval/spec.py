"""One checkpoint as a user names it: a path and how to read it, with the label it carries into figures,
tables and records. The bench manifest's entries, `mokd analyze`'s `PATH::ARCH` arguments and `--label` options
all become CheckpointSpecs, so that one figure can hold a DINO release file that needs an architecture, a MoCo v3
file that names its own and a MOKD pair, each under its own name.

    specs = parse_checkpoint_args(["dino_vits16.pth::vit_small_patch16_224", "runs/a/last.pth"],
                                  labels=["DINO ViT-S/16", "MOKD"])
    models = [m for s in specs for m in load_spec(s)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from mokd.errors import UserError

ARCH_SEPARATOR = "::"
POS_RESAMPLE_RULES = ("dino", "timm")


@dataclass
class CheckpointSpec:
    """How to read one checkpoint file (the loader's options, per file) and what to call it."""

    path: str
    label: str | None = None  # None: the loader's label (net1-teacher, file stem, ...)
    arch: str | None = None
    arch_kwargs: dict | None = None
    model: str | None = None  # MOKD files: net1 | net2 (None: both); official MOKD files: cnn | vit
    branch: str | None = None  # teacher | student (None: the format's default)
    key: str | None = None
    allow_partial: bool = False
    cifar_stem: bool = False
    pos_resample: str | None = None  # dino | timm (None: the rule the checkpoint's source trained with)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}

    @classmethod
    def from_dict(cls, entry: dict[str, Any], where: str = "entry") -> "CheckpointSpec":
        """From a manifest entry; unknown keys are errors that name the valid ones."""
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with at least `path`, got {entry!r}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        if not entry.get("path"):
            raise UserError(f"{where}: `path` (the checkpoint file) is required")
        spec = cls(**{k: entry[k] for k in valid if k in entry})
        spec.path = str(spec.path)
        spec.validate(where)
        return spec

    def validate(self, where: str = "checkpoint") -> None:
        if self.pos_resample is not None and self.pos_resample not in POS_RESAMPLE_RULES:
            raise UserError(f"{where}: pos_resample must be one of {', '.join(POS_RESAMPLE_RULES)}, "
                            f"got {self.pos_resample!r}")
        if self.branch is not None and self.branch not in ("teacher", "student"):
            raise UserError(f"{where}: branch must be teacher or student, got {self.branch!r}")
        if self.arch_kwargs is not None and not isinstance(self.arch_kwargs, dict):
            raise UserError(f"{where}: arch_kwargs must be a mapping (e.g. {{img_size: 32}}), "
                            f"got {self.arch_kwargs!r}")


def split_path_arch(text: str) -> tuple[str, str | None]:
    """`PATH::ARCH` -> (PATH, ARCH); a plain path -> (path, None)."""
    path, sep, arch = text.partition(ARCH_SEPARATOR)
    if sep and not arch:
        raise UserError(f"{text!r}: expected PATH::TIMM_ARCH (e.g. dino_vits16.pth::vit_small_patch16_224), "
                        f"the architecture after '::' is empty")
    return path, (arch or None)


def parse_checkpoint_args(args: Sequence[str], labels: Sequence[str] = (), **common: Any) -> list[CheckpointSpec]:
    """CLI checkpoint arguments (each `PATH` or `PATH::ARCH`) and `--label`s (one per argument, in order) ->
    specs. `common` holds the loader options given once for all files (--branch, --arch, ...); an architecture
    given with `::` wins over --arch for its own file."""
    if labels and len(labels) != len(args):
        raise UserError(f"--label was given {len(labels)} time(s) for {len(args)} checkpoint(s): give one label per "
                        f"checkpoint, in the same order, or none")
    specs = []
    for i, text in enumerate(args):
        path, arch = split_path_arch(text)
        values = {k: v for k, v in common.items() if v is not None}
        if arch:
            values["arch"] = arch
        spec = CheckpointSpec(path=path, label=labels[i] if labels else None, **values)
        spec.validate(text)
        specs.append(spec)
    return specs


def load_spec(spec: CheckpointSpec) -> list:
    """The spec's model(s) (mokd_eval.loader.LoadedModel). A label set on a file that yields two models (a MOKD
    pair) is extended by each model's own (`MOKD net1-teacher`); the record's checkpoint field keeps it."""
    from mokd_eval.loader import load_models

    models = load_models(spec.path, model=spec.model, branch=spec.branch, arch=spec.arch,
                         arch_kwargs=spec.arch_kwargs, key=spec.key, allow_partial=spec.allow_partial,
                         cifar_stem=spec.cifar_stem, pos_resample=spec.pos_resample)
    if spec.label:
        for m in models:
            m.label = spec.label if len(models) == 1 else f"{spec.label} {m.label}"
            m.checkpoint["label"] = m.label
    return models
