"""Configuration: dataclasses with every default, loaded from YAML and merged with --set overrides.

Defaults live here and nowhere else. A YAML file names only what differs from them; unknown keys are
errors that name the valid ones. The resolved config is written next to the outputs as config.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mokd.errors import UserError

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
PIPELINES = ("fast", "pil")  # augment.pipeline


@dataclass
class DataConfig:
    spec: str = "digits"  # see mokd.data: digits | photos | PATH | cifar10:PATH | cifar100:PATH
    class_list: str | None = None  # subset of classes (e.g. ImageNet-100)
    num_workers: int = 8
    subset: int = 0  # train on this many images only (a seeded pick; 0 = all): for smoke tests and dry runs
    skip_bad_images: bool = False  # leave out files that do not decode (counted in the log) instead of stopping
    gpu_augment: bool = False  # augment.pipeline=fast: workers ship uint8 crops, colour/blur/solarise run on the
    # training device for the whole batch (docs/loader.md)


@dataclass
class AugmentConfig:
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.25, 1.0)  # paper Supp. A.1
    local_scale: tuple[float, float] = (0.05, 0.25)
    local_crops: int = 8
    blur_kernel_frac: float = 0.1  # Gaussian blur kernel ~ 10% of the crop side, as DINO's radius 0.1-2 at 224
    pipeline: str = "fast"  # fast (mokd.fast_augment: one decode, torch + OpenCV ops) | pil (DINO's PIL chain per crop,
    # mokd.augment, which every result recorded before docs/loader.md was trained with); same distributions
    blur_scale: str = "global"  # Gaussian-blur radius 0.1-2 px x S/224 for every crop, S: global (the global crop
    # size: DINO and the release blur 96 px local crops by 0.1-2 px too) | crop (each crop's own size)


@dataclass
class NetConfig:
    arch: str = "resnet50"  # any timm model name
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, patch_size, drop_path_rate...)
    small_stem: bool = False  # CNNs: stride-1 first conv, no max-pool (for 32-64 px images)
    name: str | None = None  # shown in logs, records and figures; None -> the timm name with its shape arguments
    lam: float = 1.0  # lambda_i, weight of this model's cross-distillation terms
    optimizer: str = "auto"  # auto (SGD for CNNs, AdamW for ViTs) | sgd | adamw
    lr: float | None = None  # base lr at batch 256; None -> 0.1 for SGD, 0.0003 for AdamW (paper Supp. A.1)
    min_lr: float | None = None  # final lr of the cosine; None -> 0.016 x lr for SGD (DINO R50: 0.3 -> 0.0048), 1e-6 for AdamW
    weight_decay: float | None = None  # None -> 1e-4 for SGD, 0.04 for AdamW
    weight_decay_end: float | None = None  # None -> 1e-4 for SGD (constant), 0.4 for AdamW (DINO cosine)
    thead_lr: float | None = None  # T-Head base lr; None -> a CNN's (SGD) T-Head uses the AdamW lr and wd
    # schedules, as the official code does (a ViT's T-Head trains with the ViT)
    thead_min_lr: float | None = None  # final lr of the T-Head's cosine; None -> min_lr scaled as thead_lr is to lr
    # (an SGD net's T-Head: 1e-6 x thead_lr / 3e-4)
    thead_decay: str = "auto"  # which T-Head parameters get weight decay: all (the release's CNN T-Head, biases
    # and norms included) | weights (biases and norms without, as everywhere else) | auto (all for CNNs, weights for ViTs)
    clip_grad: float = 3.0  # per-parameter gradient-norm cap (DINO); 0 disables clipping
    momentum_teacher: float = 0.996  # EMA momentum at step 0, cosine to 1
    # Frozen weight-norm gain (DINO's norm_last_layer) of this net's MLP head / T-Head; None -> head.norm_last_layer
    # if set, else the release's: frozen for a CNN's MLP head, trainable for a ViT's and for every T-Head.
    norm_last_layer_mlp: bool | None = None
    norm_last_layer_thead: bool | None = None
    # Teacher-temperature warm-up (epochs) of this net's self terms (sm, st) and cross terms (cm, ct);
    # None -> loss.warmup_teacher_temp_epochs. The release: 50 for the CNN's self terms, 30 for the rest.
    warmup_teacher_temp_epochs: int | None = None
    warmup_teacher_temp_epochs_cross: int | None = None
    pos_resample: str = "dino"  # position embedding at other grids (ViT backbone, T-Head): dino (bicubic,
    # scale (n+0.1)/N, as DINO and the release) | timm (bicubic to size n, antialiased); mokd.models.pos_embed


@dataclass
class HeadConfig:
    out_dim: int = 65536  # K, shared by the MLP head and the T-Head
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool | None = None  # one setting for every head; None -> net*.norm_last_layer_mlp/_thead
    use_bn: bool = False


@dataclass
class THeadConfig:
    depth: int = 3  # Table S2
    dim: int = 384  # ViT-S width
    num_heads: int = 6
    mlp_ratio: float = 4.0
    l2_norm: bool = False  # L2-normalise the pooled feature before the last layer, as the MLP head does (the
    # release does not: its T-Head logits start 3-4x larger than the MLP head's, so a sharp teacher is one-hot)
    use_bn: bool = False  # BatchNorm on the pooled feature before the last layer (the release has none): the mean
    # over LayerNorm'd tokens barely varies with the input, so without it the T-Head's outputs do not either


@dataclass
class LossConfig:
    mode: str = "mokd"  # mokd | independent (two plain DINO runs: no T-Head, no cross terms)
    sm: bool = True  # self-distillation, MLP head (Eq. 2)
    st: bool = True  # self-distillation, T-Head (Eq. 3)
    cm: bool = True  # cross-distillation, MLP head (Eq. 5)
    ct: bool = True  # cross-attention feature search (Eq. 7)
    st_weight: float = 1.0  # weight of L_st in L_i = L_sm + w_st L_st + lambda_i (L_cm + w_ct L_ct); the paper: 1
    ct_weight: float = 1.0  # weight of L_ct inside the lambda_i bracket; the paper: 1
    ct_views: str = "local"  # student crops used by L_ct: local (official code) | global (paper Algorithm 1)
    # Centre L_ct's target (teacher j's T-Head output for student i's query) with an EMA of its batch means, as
    # every other term's target is. The release does not: its target is only sharpened, and at small scale it
    # becomes one dimension for every input (docs/fidelity.md).
    ct_center: bool = False
    thead_temp_scale: float = 1.0  # the T-Head's targets (L_st, L_ct) use the teacher temperature times this
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30  # every term's, unless net*.warmup_teacher_temp_epochs(_cross) say
    # otherwise; shortened to optim.epochs for shorter runs
    center_momentum: float = 0.9


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks and accumulation steps: one optimiser step sees this many images
    # micro-batches per optimiser step (gradient accumulation): each process runs batch_size / (processes x
    # accum_steps) images at a time; schedules, EMA, last-layer freeze and the centres count optimiser steps
    accum_steps: int = 1
    warmup_epochs: int = 10  # shortened to epochs - 1 for runs shorter than the warm-up
    freeze_last_layer: int = 1  # epochs during which the heads' last layers stay frozen
    sgd_momentum: float = 0.9
    precision: str = "auto"  # auto (bf16 where supported, else fp16 + grad scaler) | bf16 | fp16 | fp32


@dataclass
class TrainConfig:
    output_dir: str = "runs/mokd"
    seed: int = 0
    device: str = "auto"
    save_every: int = 10  # also write checkpoint_XXXX.pth every this many epochs (0: only last.pth)
    knn_every: int = 0  # online k-NN monitor on the held-out split every this many epochs (0: off)
    knn_k: int = 20
    knn_max_train: int = 50000  # cap on the memory-bank size for the online monitor
    monitor_rank: bool = False  # the monitor also logs RankMe and alpha-ReQ of the held-out features (no labels used)
    channels_last: bool = True  # for CNNs
    sync_bn: bool = True  # SyncBatchNorm for CNNs under DDP
    log_every: int = 10  # steps between JSONL records (the last step of an epoch is always logged)
    progress: bool = True  # tqdm bar per epoch on rank 0
    fast_step: bool = True  # foreach optimisers, fused EMA, low-precision teacher copies; false: the plain path
    compile: str = "auto"  # torch.compile the branches' forward: auto (on for CUDA, off on CPU) | true | false
    loggers: list = field(default_factory=lambda: ["jsonl"])  # jsonl (always) | tensorboard (OUT/tensorboard)


@dataclass
class Config:
    net1: NetConfig = field(default_factory=NetConfig)
    net2: NetConfig = field(default_factory=lambda: NetConfig(arch="vit_small_patch16_224",
                                                               kwargs={"drop_path_rate": 0.1}, lam=0.1))
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    thead: THeadConfig = field(default_factory=THeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists), fit for YAML and for weights_only checkpoints."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def from_dict(d: dict, cls: type = Config, where: str = "") -> Any:
    """Build a dataclass from a (partial) nested dict; unknown keys are errors naming the valid ones."""
    if not isinstance(d, dict):
        raise UserError(f"config section {where or '<root>'} must be a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        path = f"{where}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown config key {path!r}{hint}; valid keys here: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, path + ".")
        else:
            kwargs[key] = _coerce(value, hint, path)
    base = cls()
    for k, v in kwargs.items():
        setattr(base, k, v)
    return base


def _coerce(value: Any, hint: Any, path: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise UserError(f"config key {path!r} cannot be null")
    if text.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"config key {path!r} expects a pair like [0.25, 1.0], got {value!r}")
        return tuple(float(v) for v in value)
    try:
        if hint is bool or text == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int or text == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float or text.startswith("float"):
            return float(value)
        if hint is str or text.startswith("str"):
            return str(value)
        if hint is list:
            return [value] if isinstance(value, str) else list(value)
        if hint is dict or text.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as e:
        name = getattr(hint, "__name__", text.replace("typing.", ""))
        raise UserError(f"config key {path!r} expects {name}, got {value!r}") from e
    return value


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=v' -> ('a.b', YAML-parsed v), so numbers, booleans, lists and null come out typed."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE (e.g. optim.epochs=10), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        value = float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file() and (PACKAGE_CONFIGS / f"{path.name}.yaml").is_file() and path.suffix == "":
        path = PACKAGE_CONFIGS / f"{path.name}.yaml"  # `--config mokd_r50_vits16` names a shipped config
    if not path.is_file():
        close = sorted(p.name for p in PACKAGE_CONFIGS.glob("*.yaml"))
        raise UserError(f"config file {path} does not exist (shipped configs: {', '.join(close)})")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return d


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML (default: the embedded default.yaml) + --set overrides -> validated Config."""
    if path is None:
        path = PACKAGE_CONFIGS / "default.yaml"
    tree = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def apply_cli_flags(cfg: Config, *, data=None, class_list=None, out=None, epochs=None, batch_size=None,
                    device=None, seed=None) -> Config:
    """The common flags are shorthands for config keys; a flag given wins over the file and --set."""
    if data is not None:
        cfg.data.spec = data
    if class_list is not None:
        cfg.data.class_list = class_list
    if out is not None:
        cfg.train.output_dir = out
    if epochs is not None:
        cfg.optim.epochs = epochs
    if batch_size is not None:
        cfg.optim.batch_size = batch_size
    if device is not None:
        cfg.train.device = device
    if seed is not None:
        cfg.train.seed = seed
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise UserError(msg)

    _validate_numbers(cfg)
    need(cfg.loss.mode in ("mokd", "independent"), f"loss.mode must be 'mokd' or 'independent', got {cfg.loss.mode!r}")
    need(cfg.loss.ct_views in ("local", "global"), f"loss.ct_views must be 'local' or 'global', got {cfg.loss.ct_views!r}")
    need(cfg.augment.blur_scale in ("global", "crop"), f"augment.blur_scale must be global or crop, got "
         f"{cfg.augment.blur_scale!r}")
    need(cfg.augment.pipeline in PIPELINES, f"augment.pipeline must be one of {', '.join(PIPELINES)}, got "
         f"{cfg.augment.pipeline!r}")
    need(not cfg.data.gpu_augment or cfg.augment.pipeline == "fast",
         "data.gpu_augment needs augment.pipeline=fast (the pil pipeline augments in the workers only)")
    need(cfg.loss.sm, "loss.sm cannot be switched off: it is the self-distillation every model trains with")
    need(cfg.loss.mode != "mokd" or cfg.loss.ct_views == "global" or cfg.augment.local_crops > 0 or not cfg.loss.ct,
         "loss.ct_views=local needs augment.local_crops > 0 (or set loss.ct_views=global)")
    for name in ("net1", "net2"):
        n: NetConfig = getattr(cfg, name)
        need(n.optimizer in ("auto", "sgd", "adamw"), f"{name}.optimizer must be auto, sgd or adamw")
        need(0.0 <= n.lam, f"{name}.lam must be >= 0, got {n.lam}")
        need(0.0 <= n.momentum_teacher <= 1.0, f"{name}.momentum_teacher must be in [0, 1]")
        need(n.thead_decay in ("auto", "all", "weights"), f"{name}.thead_decay must be auto, all or weights, "
             f"got {n.thead_decay!r}")
        need(n.pos_resample in ("dino", "timm"), f"{name}.pos_resample must be dino or timm, got {n.pos_resample!r}")
        for key in ("warmup_teacher_temp_epochs", "warmup_teacher_temp_epochs_cross"):
            need(getattr(n, key) is None or getattr(n, key) >= 0, f"{name}.{key} must be >= 0 (or null)")
    need(cfg.optim.epochs >= 1, "optim.epochs must be >= 1")
    need(cfg.optim.batch_size >= 1, "optim.batch_size must be >= 1")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    need(cfg.optim.precision in ("auto", "bf16", "fp16", "fp32"), "optim.precision must be auto, bf16, fp16 or fp32")
    need(cfg.head.out_dim >= 2, "head.out_dim must be >= 2")
    need(cfg.thead.dim % cfg.thead.num_heads == 0, "thead.dim must be divisible by thead.num_heads")
    need(cfg.thead.depth >= 1, "thead.depth must be >= 1")
    need(not cfg.train.monitor_rank or cfg.train.knn_every > 0,
         "train.monitor_rank scores the features the online monitor extracts: set train.knn_every > 0 too")
    loggers = cfg.train.loggers if isinstance(cfg.train.loggers, list) else [cfg.train.loggers]
    need(all(x in ("jsonl", "tensorboard") for x in loggers) and "jsonl" in loggers,
         f"train.loggers must be [jsonl] or [jsonl, tensorboard] (log.jsonl is always written: resume and "
         f"mokd plot-log read it), got {cfg.train.loggers!r}")
    need(str(cfg.train.compile).lower() in ("auto", "true", "false"),
         f"train.compile must be auto, true or false, got {cfg.train.compile!r}")


def _validate_numbers(cfg: Config) -> None:
    """Numeric settings in their ranges (NaN fails every comparison, so it is refused too)."""
    def at_least(key: str, lo: float, strict: bool = False, optional: bool = False):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is None and optional:
            return
        ok = v == v and v != float("inf") and (v > lo if strict else v >= lo)
        if not ok:
            raise UserError(f"{key} must be {'>' if strict else '>='} {lo:g} (and finite), got {v!r}")

    def fraction(key: str, hi_open: bool = False):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if not (0.0 <= v < 1.0 if hi_open else 0.0 <= v <= 1.0):
            raise UserError(f"{key} must be in [0, 1{')' if hi_open else ']'}, got {v!r}")

    for name in ("net1", "net2"):
        for k in ("lr", "min_lr", "weight_decay", "weight_decay_end", "thead_lr"):
            at_least(f"{name}.{k}", 0.0, optional=True)
        at_least(f"{name}.clip_grad", 0.0)
        at_least(f"{name}.lam", 0.0)
    at_least("loss.st_weight", 0.0)
    at_least("loss.ct_weight", 0.0)
    at_least("loss.thead_temp_scale", 0.0, strict=True)
    for k in ("data.num_workers", "data.subset", "augment.local_crops", "augment.blur_kernel_frac",
              "loss.warmup_teacher_temp_epochs", "optim.freeze_last_layer", "train.save_every", "train.knn_every"):
        at_least(k, 0)
    for k in ("augment.global_size", "augment.local_size", "head.hidden_dim", "head.bottleneck_dim",
              "thead.dim", "thead.num_heads", "train.knn_k", "train.knn_max_train", "train.log_every",
              "optim.accum_steps"):
        at_least(k, 1)
    for k in ("loss.student_temp", "loss.teacher_temp", "loss.warmup_teacher_temp", "thead.mlp_ratio"):
        at_least(k, 0.0, strict=True)
    fraction("loss.center_momentum")
    fraction("optim.sgd_momentum", hi_open=True)
    for k in ("augment.global_scale", "augment.local_scale"):
        lo, hi = getattr(cfg.augment, k.split(".")[1])
        if not (0.0 < lo <= hi <= 1.0):
            raise UserError(f"{k} must be a pair 0 < low <= high <= 1, got [{lo}, {hi}]")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, readable back by load_config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Config, path: str | Path) -> None:
    from mokd.checkpoint import write_atomic  # torch is not needed to read configs

    text = config_yaml(cfg)
    write_atomic(path, lambda tmp: tmp.write_text(text))
