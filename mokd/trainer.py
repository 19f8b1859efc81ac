"""The training loop: plain functions, one screen per step (DINO's main_dino.py is the model).

train(cfg) guards the run folder (mokd.rundir), sets up data, the MOKDModel, one optimiser per model and the
schedules, resumes if asked, and runs train_one_epoch; checkpoints are written atomically after every epoch
and, on SIGTERM/SIGINT/SIGUSR1, mid-epoch (mokd.preemption). No checkpoint with NaN/inf in it is written.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mokd import distributed, rundir
from mokd.augment import MultiCrop, SeededCrops
from mokd.fast_augment import FastMultiCrop, FastSeededCrops, to_device
from mokd.checkpoint import FORMAT, VERSION, load_file, no_space_message, non_finite, out_of_space, rng_state, \
    save_atomic, seed_everything, set_rng_state, write_atomic
from mokd.config import Config, save_yaml, to_dict
from mokd.data import build_dataset, check_same_classes, parse_data_spec
from mokd.device import autocast, grad_scaler, resolve_compile, resolve_device, resolve_precision
from mokd.errors import UserError
from mokd.health import CONSTANT_CURES, collapse_warning, teacher_outputs
from mokd.models.backbones import configure_attention, is_vit
from mokd.models.lowp import LowPrecisionCopy
from mokd.models.mokd import NETS, MOKDModel
from mokd.naming import model_name
from mokd.optim import Schedules, apply_schedules, build_optimizer, build_schedules, resolve_optimizer
from mokd.preemption import StopRequest, StoppedBySignal, ignore_stop_signals
from mokd.runlog import RunLog, peak_memory_mb
from mokd.schedules import teacher_temp_schedules

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    model: MOKDModel
    optimizers: dict[str, torch.optim.Optimizer]
    schedules: dict[str, Schedules]
    teacher_temp: dict[str, np.ndarray]  # "net1_self", "net1_cross", ... (mokd.schedules.teacher_temp_schedules)
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    steps_per_epoch: int  # optimiser steps (each of optim.accum_steps micro-batches)
    ddp: dict[str, nn.parallel.DistributedDataParallel] = field(default_factory=dict)  # the students' wrappers


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start its epoch's order at a given position (a mid-epoch resume) and end it
    after a whole number of optimiser steps (`take`: micro-batches of an unfinished accumulation cycle go)."""

    skip = 0  # samples of this rank's order to leave out, from the start
    take: int | None = None  # samples of this rank's order an epoch uses (None: all)

    def __iter__(self):
        return iter(list(super().__iter__())[:self.take][self.skip:])

    def __len__(self) -> int:
        return (self.num_samples if self.take is None else self.take) - self.skip


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Images per process and forward: optim.batch_size (global) / (processes x optim.accum_steps)."""
    accum, batch = cfg.optim.accum_steps, cfg.optim.batch_size
    if batch % (world_size * accum):
        raise UserError(f"optim.batch_size {batch} is not divisible by {world_size} process(es) x optim.accum_steps "
                        f"{accum} = {world_size * accum} (the batch size is global: each process runs batch_size / "
                        f"(processes x accum_steps) images at a time)")
    return batch // (world_size * accum)


def build_loader(cfg: Config, dist_info: distributed.DistInfo
                 ) -> tuple[torch.utils.data.DataLoader, SeededCrops | FastSeededCrops]:
    spec = parse_data_spec(cfg.data.spec, cfg.data.class_list)
    images = build_dataset(spec, "train", skip_unreadable=cfg.data.skip_bad_images)
    skipped = images.skipped
    if 0 < cfg.data.subset < len(images):
        pick = np.random.default_rng(cfg.train.seed).choice(len(images), cfg.data.subset, replace=False)
        images = images.subset(sorted(pick.tolist()))
    if cfg.augment.pipeline == "pil":
        dataset = SeededCrops(images, MultiCrop(cfg.augment), cfg.train.seed)
    else:
        dataset = FastSeededCrops(images, FastMultiCrop(cfg.augment, ship_uint8=cfg.data.gpu_augment), cfg.train.seed)
    dataset.skipped = skipped  # unreadable files left out (data.skip_bad_images), reported by train()
    micro = micro_batch_size(cfg, dist_info.world_size)
    if len(dataset) < cfg.optim.batch_size:
        raise UserError(f"the data set has {len(dataset)} images, fewer than one batch of {cfg.optim.batch_size}")
    sampler = ResumableSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                               shuffle=True, seed=cfg.train.seed, drop_last=True)
    per_step = micro * cfg.optim.accum_steps  # this rank's images in one optimiser step
    sampler.take = sampler.num_samples // per_step * per_step
    # len(loader) = optimiser steps per epoch x optim.accum_steps
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True,
                                         num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(cfg.train.seed),
                                         worker_init_fn=ignore_stop_signals)
    return loader, dataset


def build_state(cfg: Config, device: torch.device, steps_per_epoch: int, dist_info: distributed.DistInfo) -> TrainState:
    model = MOKDModel(cfg).to(device)
    ddp = {}
    precision = resolve_precision(cfg.optim.precision, device)
    configure_attention(model, device, precision)
    for n in NETS:
        branch = model.student[n]
        if branch.channels_last:
            model.student[n].to(memory_format=torch.channels_last)
            model.teacher[n].to(memory_format=torch.channels_last)
        if dist_info.enabled:
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in branch.modules())
            if cfg.train.sync_bn and device.type == "cuda" and has_bn:
                model.student[n] = nn.SyncBatchNorm.convert_sync_batchnorm(branch)
                model.teacher[n] = nn.SyncBatchNorm.convert_sync_batchnorm(model.teacher[n])
            ddp[n] = model.student_forward[n] = nn.parallel.DistributedDataParallel(
                model.student[n], device_ids=[device.index] if device.type == "cuda" else None)
        else:
            model.student_forward[n] = model.student[n]
    fast = cfg.train.fast_step
    if fast:
        model.use_fast_step(None if precision == "fp32" else LOW_PRECISION[precision])
    if resolve_compile(cfg.train.compile, device):
        for n in NETS:
            model.student_forward[n] = torch.compile(model.student_forward[n])
            t = model.teacher_forward[n]
            if isinstance(t, LowPrecisionCopy):
                t.module = torch.compile(t.module)
            else:
                model.teacher_forward[n] = torch.compile(t)
    optimizers, schedules = {}, {}
    for n in NETS:
        net_cfg = getattr(cfg, n)
        settings = resolve_optimizer(net_cfg, is_vit(model.student[n].backbone))
        optimizers[n] = build_optimizer(model.student[n], settings, cfg.optim, foreach=fast)
        schedules[n] = build_schedules(settings, net_cfg, cfg.optim, steps_per_epoch)
    temp = teacher_temp_schedules(cfg, steps_per_epoch)
    return TrainState(model, optimizers, schedules, temp, grad_scaler(device, precision), device, precision,
                      steps_per_epoch, ddp)


def clip_gradients(module: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at `clip` on its own (0 disables)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if clip <= 0 or not grads:
        return
    # clip / (norm + 1e-6), capped at 1, as multi-tensor kernels (no Python loop over the parameters)
    scales = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, clip)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


def last_layer_params(branch: nn.Module) -> list[nn.Parameter]:
    params = list(branch.mlp_head.last_layer.parameters())
    if branch.thead is not None:
        params += list(branch.thead.fc.parameters())
    return params


def train_step(state: TrainState, crops: list, step: int, freeze_last_layer: bool,
               cfg: Config) -> dict[str, torch.Tensor]:
    """One optimisation step of both models; returns the named losses (8 terms + totals).

    crops: one batch (2 global views then local views, each [B, 3, S, S]), or a list of micro-batches (loader
    batches, moved to the device one at a time: optim.accum_steps > 1). Over micro-batches the gradients add
    up (each loss weighted 1/count), every micro-batch is centred with the step's starting centres, and the
    centres, the optimisers and the teachers move once: one step on the whole batch, up to float rounding
    (batch norm aside: its statistics are per micro-batch). The losses returned are then micro-batch means.
    """
    model = state.model
    micro = [crops] if isinstance(crops[0], torch.Tensor) else list(crops)
    for n in NETS:
        apply_schedules(state.optimizers[n], state.schedules[n], step)
    temps = {k: float(v[step]) for k, v in state.teacher_temp.items()}
    accumulating = len(micro) > 1
    if accumulating:
        start_centres = {k: c.center.clone() for k, c in model.centers.items()}
        moved = {k: torch.zeros_like(v) for k, v in start_centres.items()}
        means: dict[str, torch.Tensor] = {}
    for k, batch in enumerate(micro):
        # Gradients are all-reduced once, in the last micro-batch's backward.
        sync = contextlib.ExitStack()
        if k < len(micro) - 1:
            for wrapper in state.ddp.values():
                sync.enter_context(wrapper.no_sync())
        with sync:
            if accumulating:
                for name, c in model.centers.items():
                    c.center.copy_(start_centres[name])
            with autocast(state.device, state.precision):
                losses = model(to_device(batch, state.device), temps)
            losses.update(model.total_losses(losses))
            _check_finite(losses, step, step // state.steps_per_epoch)
            if k == 0:
                for opt in state.optimizers.values():
                    opt.zero_grad(set_to_none=True)
            total = losses["loss1"] + losses["loss2"]
            state.scaler.scale(total / len(micro) if accumulating else total).backward()
        if accumulating:
            # m c0 + (1 - m) mean_b, averaged over equal micro-batches b, is the update by the whole batch's mean
            for name, c in model.centers.items():
                moved[name] += c.center / len(micro)
            for name, v in {**losses, **model.health}.items():
                means[name] = means.get(name, 0.0) + v.detach().float() / len(micro)
    if accumulating:
        for name, c in model.centers.items():
            c.center.copy_(moved[name])
        losses = {name: means[name] for name in losses}
        model.health = {name: means[name] for name in model.health}
    for n in NETS:
        state.scaler.unscale_(state.optimizers[n])
        clip_gradients(model.student[n], getattr(cfg, n).clip_grad)
        if freeze_last_layer:
            for p in last_layer_params(model.student[n]):
                p.grad = None
        state.scaler.step(state.optimizers[n])
    state.scaler.update()
    model.update_teachers({n: float(state.schedules[n].momentum[step]) for n in NETS})
    return losses


def _steps(loader, accum: int):
    """The loader's batches in groups of `accum` (one optimiser step each); a group of one is that batch."""
    group = []
    for crops, _ in loader:
        group.append(crops)
        if len(group) == accum:
            yield group if accum > 1 else group[0]
            group = []


class EpochInterrupted(Exception):
    """A stop signal arrived: `batches` steps of the epoch are done, `sums` their running sums."""

    def __init__(self, batches: int, sums: dict[str, float]):
        super().__init__(f"stopped after batch {batches}")
        self.batches, self.sums = batches, sums


def train_one_epoch(state: TrainState, loader, epoch: int, cfg: Config, log: RunLog, start: int = 0,
                    sums: dict[str, float] | None = None, stop: StopRequest | None = None) -> dict[str, float]:
    """One pass over the loader (from batch `start`, with the sums so far, on a mid-epoch resume); returns the
    epoch's mean of every logged quantity. Raises EpochInterrupted after a step when `stop` was requested."""
    model, device = state.model, state.device
    model.train()
    sums = dict(sums or {})
    window_start, window_images = time.perf_counter(), 0
    show = cfg.train.progress and distributed.is_main()
    progress = _progress(loader, epoch, cfg.optim.epochs, show)
    # Batch jobs (stderr not a terminal) get no bar: a plain line every log_every steps instead, as DINO's.
    lines = distributed.is_main() and not sys.stderr.isatty()
    epoch_start, total_steps = time.perf_counter(), cfg.optim.epochs * state.steps_per_epoch
    accum = cfg.optim.accum_steps
    for it, crops in enumerate(_steps(progress, accum), start=start):
        step = epoch * state.steps_per_epoch + it
        if accum == 1:  # (micro-batches go to the device one at a time, in train_step)
            crops = to_device(crops, device)  # data.gpu_augment: colour, blur and solarise happen here
        losses = train_step(state, crops, step, freeze_last_layer=epoch < cfg.optim.freeze_last_layer, cfg=cfg)
        values = {k: v.detach().float() for k, v in {**losses, **model.health}.items()}
        stacked = distributed.all_reduce_mean(torch.stack(list(values.values())))
        record = dict(zip(values, stacked.tolist()))
        record["loss"] = record["loss1"] + record["loss2"]
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        window_images += cfg.optim.batch_size
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == state.steps_per_epoch:
            elapsed = time.perf_counter() - window_start
            log.write({"type": "step", "epoch": epoch, "step": step, **record,
                       **{f"lr_{n}": state.optimizers[n].param_groups[0]["lr"] for n in NETS},
                       **{f"wd_{n}": state.optimizers[n].param_groups[0]["weight_decay"] for n in NETS},
                       **{f"lr_thead_{n}": float(state.schedules[n].thead_lr[step]) for n in NETS},
                       **{f"momentum_{n}": float(state.schedules[n].momentum[step]) for n in NETS},
                       **{f"teacher_temp_{k}": float(v[step]) for k, v in state.teacher_temp.items()},
                       "img_per_s": window_images / max(elapsed, 1e-9),
                       "peak_mem_mb": peak_memory_mb(device)})
            if lines:
                per_step = (time.perf_counter() - epoch_start) / (it + 1 - start)
                eta = per_step * (total_steps - step - 1)
                print(f"epoch {epoch + 1}/{cfg.optim.epochs} step {step + 1}/{total_steps} "
                      f"loss1={record['loss1']:.4f} loss2={record['loss2']:.4f} "
                      f"{window_images / max(elapsed, 1e-9):.1f} img/s eta {_hms(eta)}", flush=True)
            window_start, window_images = time.perf_counter(), 0
        if show:
            progress.set_postfix(loss1=f"{record['loss1']:.3f}", loss2=f"{record['loss2']:.3f}")
        if stop is not None and it + 1 < state.steps_per_epoch and stop.requested(device):
            raise EpochInterrupted(it + 1, sums)
    return {k: v / state.steps_per_epoch for k, v in sums.items()}


def _accum_text(cfg: Config, dist_info: distributed.DistInfo) -> str:
    if cfg.optim.accum_steps == 1:
        return ""
    micro = micro_batch_size(cfg, dist_info.world_size)
    return (f" (batch {cfg.optim.batch_size} = {dist_info.world_size} process(es) x {cfg.optim.accum_steps} "
            f"accumulated micro-batches x {micro})")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def health_warnings(means: dict[str, float], cfg: Config) -> list[str]:
    """Collapse warnings (mokd.health) from an epoch's mean health figures, one per collapsed model."""
    out = []
    for n in NETS:
        for head, ent, ent_mean in teacher_outputs(means, n):
            w = collapse_warning(f"{n} ({getattr(cfg, n).arch}) {head}", ent, ent_mean, cfg.head.out_dim,
                                 CONSTANT_CURES.get(head))
            if w:
                out.append(w)
    return out


def knn_summary(metrics: dict, cfg: Config) -> str | None:
    """The run's one-line result: each model's online k-NN at initialisation and at the end.

    From the run's metrics (carried in every checkpoint, so a resumed run still knows its start)."""
    first, last = metrics.get("knn_init"), metrics.get("knn")
    if not first or not last:
        return None
    parts = [f"{n} ({getattr(cfg, n).arch}) {first[n]:.2f}% -> {last[n]:.2f}% ({last[n] - first[n]:+.2f})"
             for n in NETS]
    head = f"summary: online k-NN top-1 (k={cfg.train.knn_k}) from initialisation to epoch {metrics['epoch']}: "
    return head + ", ".join(parts)


def _progress(loader, epoch: int, epochs: int, show: bool):
    if not show:
        return loader
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (cluster logs), the per-epoch line stays
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)


class NonFiniteLoss(UserError):
    """A loss term went NaN/inf; train() adds which checkpoint is the last good one."""


def _check_finite(losses: dict[str, torch.Tensor], step: int, epoch: int) -> None:
    """Stop every rank together (a rank raising alone would leave the others in the gradient all-reduce)."""
    not_finite = torch.stack([(~torch.isfinite(v.detach())).any() for v in losses.values()]).float()
    distributed.all_reduce_sum(not_finite)
    if bool(not_finite.any()):
        bad = [k for k, flag in zip(losses, not_finite.tolist()) if flag]
        bad = [k for k in bad if not k.startswith("loss")] or bad  # name the term, not only the sums
        raise NonFiniteLoss(f"non-finite loss {', '.join(bad)} at step {step} (epoch {epoch + 1}); stopping")


def make_checkpoint(state: TrainState, cfg: Config, epoch: int, metrics: dict, batches: int = 0,
                    sums: dict[str, float] | None = None) -> dict:
    """The checkpoint after `epoch` completed epochs and, mid-epoch, `batches` steps of the next one."""
    ckpt = {
        "format": FORMAT, "version": VERSION, "epoch": epoch, "step": epoch * state.steps_per_epoch + batches,
        "config": to_dict(cfg), "arch": state.model.arch(), "model": state.model.state_dict(),
        "optimizer": {n: state.optimizers[n].state_dict() for n in NETS},
        "scaler": state.scaler.state_dict(), "rng": rng_state(), "metrics": metrics,
    }
    if batches:  # what a resume needs to finish the epoch as an uninterrupted run would
        ckpt["partial_epoch"] = {"batches": batches, "of": state.steps_per_epoch, "sums": dict(sums or {})}
    return ckpt


def non_finite_state(state: TrainState) -> tuple[list[str], int]:
    """Weights, buffers and optimiser state holding NaN/inf: (first names, count)."""
    named = dict(state.model.state_dict())
    for n in NETS:
        names = {id(p): k for k, p in state.model.student[n].named_parameters()}
        for p, slots in state.optimizers[n].state.items():
            for slot, v in slots.items():
                named[f"optimizer {n} {slot} of student.{n}.{names.get(id(p), '?')}"] = v
    return non_finite(named)


BUILD_KEYS = ("loss.mode", "loss.st", "loss.ct", "loss.ct_center", "head", "thead", "net1.arch", "net1.kwargs",
              "net1.small_stem",
              "net2.arch", "net2.kwargs", "net2.small_stem")


def _setting(tree: dict, dotted: str):
    for k in dotted.split("."):
        tree = tree.get(k, {}) if isinstance(tree, dict) else {}
    return tree


def read_resumable(path: Path, state: TrainState, cfg: Config) -> dict:
    """Load `path` and check that it fits the model; UnusableCheckpoint when it is unreadable or damaged."""
    try:
        ckpt = load_file(path)
    except UserError as e:
        raise rundir.UnusableCheckpoint(str(e)) from e
    needed = ("epoch", "step", "config", "arch", "model", "optimizer", "scaler", "rng")
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        raise rundir.UnusableCheckpoint(f"{path} is not a mokd training checkpoint")
    if any(k not in ckpt for k in needed):
        missing = [k for k in needed if k not in ckpt]
        raise rundir.UnusableCheckpoint(f"{path} is damaged: it lacks {', '.join(missing)}")
    if ckpt["arch"] != state.model.arch():
        raise UserError(f"{path} was trained with {ckpt['arch']}, but the config asks for {state.model.arch()}")
    own = state.model.state_dict()
    differ = sorted(set(own) ^ set(ckpt["model"]))
    differ += [k for k in own if k in ckpt["model"] and own[k].shape != ckpt["model"][k].shape]
    if differ:
        same_build = all(_setting(ckpt["config"], k) == _setting(to_dict(cfg), k) for k in BUILD_KEYS)
        if same_build:  # its own config builds this very model, so tensors were lost, not renamed
            raise rundir.UnusableCheckpoint(
                f"{path} is damaged: {len(differ)} tensors are missing or misshapen although its own config builds "
                f"this model (e.g. {', '.join(differ[:3])})")
        raise UserError(f"{path} does not fit the model this config builds ({len(differ)} tensors differ, e.g. "
                        f"{', '.join(differ[:4])}): loss.mode, loss.st/ct/ct_center, head.* and thead.* must stay as they "
                        f"were. Resume without --config to use the run's own config.yaml.")
    bad, count = non_finite(_resumable_tensors(ckpt))
    if bad:
        more = f" and {count - len(bad)} more" if count > len(bad) else ""
        raise rundir.NonFiniteCheckpoint(f"{path} ({rundir.describe(ckpt)}) holds non-finite values (NaN or inf) "
                                         f"in {', '.join(bad)}{more}", int(ckpt["step"]))
    part = ckpt.get("partial_epoch")
    if part and part["of"] != state.steps_per_epoch:
        raise UserError(f"{path} was saved in the middle of an epoch of {part['of']} steps, but this config gives "
                        f"{state.steps_per_epoch} steps per epoch (batch size or data changed); resume with the "
                        f"run's batch size and data, or from a checkpoint_NNNN.pth")
    return ckpt


def _resumable_tensors(ckpt: dict) -> dict:
    """A checkpoint's weights and optimiser state by name: what a resume would train on."""
    named = dict(ckpt["model"])
    for n, opt in (ckpt.get("optimizer") or {}).items():
        for i, slots in (opt.get("state") or {}).items() if isinstance(opt, dict) else ():
            named.update({f"optimizer {n} {slot} of parameter {i}": v for slot, v in slots.items()})
    return named


def resume(state: TrainState, ckpt: dict, cfg: Config) -> tuple[int, int, dict[str, float] | None]:
    """Load a checkpoint (from read_resumable) into the state; returns (completed epochs, batches done in the
    next epoch, their sums)."""
    state.model.load_state_dict(ckpt["model"])
    for n in NETS:
        foreach = state.optimizers[n].defaults.get("foreach")
        state.optimizers[n].load_state_dict(ckpt["optimizer"][n])
        for g in state.optimizers[n].param_groups:  # this run's train.fast_step, not the saved groups' flag
            g["foreach"] = foreach
    if ckpt["scaler"]:  # an fp32/bf16 run has no scaler state to carry into fp16
        state.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if ckpt["config"].get("optim", {}).get("epochs") != cfg.optim.epochs:
        print(f"note: resuming a run planned for {ckpt['config']['optim']['epochs']} epochs with "
              f"{cfg.optim.epochs}; the schedules follow the new length")
    part = ckpt.get("partial_epoch")
    if part:
        return int(ckpt["epoch"]), int(part["batches"]), dict(part["sums"])
    return int(ckpt["epoch"]), 0, None


def knn_monitor(state: TrainState, cfg: Config, epoch: int, log: RunLog) -> dict[str, float]:
    """k-NN top-1 of both teachers' backbones: train split as the bank, the held-out split as queries."""
    from mokd_eval.features import eval_transform, extract_features
    from mokd_eval.knn import knn_evaluate

    spec = parse_data_spec(cfg.data.spec, cfg.data.class_list)
    native = spec.native_size is not None
    transform = eval_transform(cfg.augment.global_size, native)
    train_set, val_set = build_dataset(spec, "train", transform), build_dataset(spec, "val", transform)
    check_same_classes(train_set, val_set)
    if len(train_set) > cfg.train.knn_max_train:
        idx = np.random.default_rng(0).choice(len(train_set), cfg.train.knn_max_train, replace=False)
        train_set = train_set.subset(sorted(idx.tolist()))
    out, ranks = {}, {}
    for n in NETS:
        backbone = state.model.teacher[n].backbone
        was_training = backbone.training
        kw = dict(device=state.device, batch_size=256, precision=state.precision, num_workers=0)
        train_f, train_l = extract_features(backbone, train_set, **kw)
        test_f, test_l = extract_features(backbone, val_set, **kw)
        backbone.train(was_training)
        if distributed.is_main():
            res = knn_evaluate(train_f, train_l, test_f, test_l, ks=(cfg.train.knn_k,),
                               num_classes=len(train_set.classes), log=None)
            out[n] = res["top1"][cfg.train.knn_k]
            if cfg.train.monitor_rank:  # label-free: collapse shows as RankMe falling towards 1
                from mokd_analysis.rank import rank_scores

                scores = rank_scores(test_f)
                ranks.update({f"rankme_{n}": scores["rankme"], f"rankme_centered_{n}": scores["rankme_centered"],
                              f"alpha_req_{n}": scores["alpha_req"]})
    if distributed.is_main():
        when = "initialisation" if epoch == 0 else f"epoch {epoch}"
        print(f"online k-NN top-1 (k={cfg.train.knn_k}) at {when}: "
              + ", ".join(f"{n} ({getattr(cfg, n).arch}) {out[n]:.2f}%" for n in NETS), flush=True)
        if ranks:
            print(f"online rank at {when}: " + ", ".join(
                f"{n} RankMe {ranks[f'rankme_{n}']:.1f} alpha-ReQ {_fmt(ranks[f'alpha_req_{n}'])}" for n in NETS),
                flush=True)
        log.write({"type": "knn", "epoch": epoch, "step": epoch * state.steps_per_epoch - 1, "k": cfg.train.knn_k,
                   **{f"knn_top1_{n}": out[n] for n in NETS}, **ranks})
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def train(cfg: Config, resume_run: bool = False, overwrite: bool = False, resume_from: Path | None = None) -> Path:
    """Train the pair described by `cfg`; returns the path of the final checkpoint.

    A folder that holds a run needs `resume_run` (continue from its newest readable checkpoint) or `overwrite`
    (start over). `resume_from` (implies resume_run) rolls the run back to that checkpoint first
    (rundir.roll_back: the newer files are moved aside, so a later resume keeps to the rolled-back line). On SIGTERM, SIGINT or SIGUSR1 the current step finishes, a resumable checkpoint is saved and
    StoppedBySignal is raised.
    """
    dist_info = distributed.init_distributed(resolve_device(cfg.train.device).type)
    out_dir = Path(cfg.train.output_dir)
    lock, stop = None, StopRequest()
    try:
        if dist_info.is_main:  # before the model is built: a bad --out costs nothing
            lock = _own_run_dir(out_dir, resume_run, overwrite)
        distributed.barrier()
        stop.install()
        return _train(cfg, dist_info, resume_run or resume_from is not None, stop, resume_from)
    except OSError as e:
        if out_of_space(e, out_dir):
            raise UserError(no_space_message(Path(e.filename) if e.filename else out_dir / "log.jsonl")) from e
        raise
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        distributed.cleanup()


def _own_run_dir(out_dir: Path, resume_run: bool, overwrite: bool) -> rundir.RunLock:
    """Create and lock --out, refuse to start over a run by accident, clean up after killed writes."""
    if resume_run and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; expected a folder for the run's checkpoints and log")
    existed = out_dir.exists()
    rundir.make_writable(out_dir)
    lock = rundir.RunLock(out_dir)
    try:
        note = lock.acquire()
    except BaseException:
        if not existed:
            out_dir.rmdir()
        raise
    try:
        rundir.check_out_dir(out_dir, resume_run, overwrite)
        if not overwrite and (removed := rundir.clear_failed_start(out_dir)):
            print(f"note: deleted {', '.join(removed)} in {out_dir}, left by a start that trained no step")
        if note:
            print(f"note: {note}")
        if n := rundir.clean_temp_files(out_dir):
            print(f"note: removed {n} temporary file(s) left in {out_dir} by an interrupted write")
        if overwrite and (removed := rundir.clear_run(out_dir)):
            print(f"--overwrite: deleted {', '.join(removed)} in {out_dir}")
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_non_finite(state: TrainState, step: int, last_good: str) -> None:
    """Every rank, before a save: a model or optimiser holding NaN/inf never replaces a good file."""
    bad, count = non_finite_state(state)
    if bad:
        more = f" and {count - len(bad)} more" if count > len(bad) else ""
        raise UserError(f"non-finite values after step {step} (epoch {step // state.steps_per_epoch + 1}) in "
                        f"{', '.join(bad)}{more}; not saved: {last_good}. Lower the learning rate or use "
                        f"optim.precision=fp32, then --resume.")


def _stopped(signum: int, path: Path, out_dir: Path, where: str) -> StoppedBySignal:
    import signal

    return StoppedBySignal(signum, f"stopped by {signal.Signals(signum).name}: saved {path} ({where}). Continue "
                                   f"with: mokd train --out {out_dir} --resume (under torchrun: the same torchrun "
                                   f"command plus --resume)")


def _train(cfg: Config, dist_info: distributed.DistInfo, resume_run: bool, stop: StopRequest,
           resume_from: Path | None = None) -> Path:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    seed_everything(cfg.train.seed)  # the same on every rank: students and teachers start identical everywhere
    out_dir = Path(cfg.train.output_dir)
    main = dist_info.is_main
    loader, dataset = build_loader(cfg, dist_info)
    knn_on = cfg.train.knn_every > 0
    if knn_on:  # the monitor's labels index one class list: check now, not after the first epoch
        check_same_classes(dataset.dataset, build_dataset(parse_data_spec(cfg.data.spec, cfg.data.class_list), "val"))
    state = build_state(cfg, device, len(loader) // cfg.optim.accum_steps, dist_info)
    spe = state.steps_per_epoch
    log = RunLog(out_dir / "log.jsonl", enabled=main, loggers=cfg.train.loggers)
    last = out_dir / rundir.LAST
    start_epoch, start_batch, start_sums, metrics = 0, 0, None, {}
    last_good = "no checkpoint was written yet"
    resumed_from: Path | None = None
    if resume_from is not None:
        ckpt = read_resumable(resume_from, state, cfg)  # every rank checks it before rank 0 moves a file
        distributed.barrier()
        if main:
            aside, moved = rundir.roll_back(out_dir, resume_from, int(ckpt["epoch"]))
            print(f"--resume-from: rolled {out_dir} back to {resume_from} ({rundir.describe(ckpt)})"
                  + (f"; moved {', '.join(moved)} to {aside}" if moved else ""))
        distributed.barrier()
        found = (resume_from, ckpt, [])
    elif resume_run:
        found = rundir.find_resume_checkpoint(out_dir, lambda p: read_resumable(p, state, cfg))
    if resume_run:
        if found is None:
            if main:
                print(f"--resume: no checkpoint in {out_dir} yet; starting from scratch")
        else:
            path, ckpt, notes = found
            resumed_from = path
            start_epoch, start_batch, start_sums = resume(state, ckpt, cfg)
            metrics = dict(ckpt.get("metrics") or {})
            last_good = f"{path} ({rundir.describe(ckpt)}) is untouched"
            if main:
                for note in notes:
                    print(f"note: {note}")
                print(f"resumed from {path} ({rundir.describe(ckpt)})")
    if main:
        save_yaml(cfg, out_dir / "config.yaml")
    log.truncate_after(start_epoch * spe + start_batch)
    if main:
        def size(m: nn.Module) -> float:
            return sum(p.numel() for p in m.parameters()) / 1e6

        branches = ((getattr(cfg, n), state.model.student[n]) for n in NETS)
        nets = [f"{model_name(c.arch, c.kwargs, c.small_stem, c.name)} (backbone {size(s.backbone):.3g}M + heads "
                f"{size(s) - size(s.backbone):.3g}M)" for c, s in branches]
        print(f"mokd train: {' + '.join(nets)}, "
              f"mode {cfg.loss.mode}, {len(dataset)} images, {spe} steps/epoch{_accum_text(cfg, dist_info)}, "
              f"{cfg.optim.epochs} epochs, {device} {state.precision}, {dist_info.world_size} process(es) -> {out_dir}")
        if dataset.skipped:
            print(f"left out {len(dataset.skipped)} unreadable image file(s) (data.skip_bad_images), e.g. "
                  f"{dataset.skipped[0]}; all are listed in {log.path}")
            metrics["skipped_images"] = len(dataset.skipped)
            log.write({"type": "data", "step": -1, "skipped_images": len(dataset.skipped),
                       "skipped_files": dataset.skipped[:100]})

    if knn_on and start_epoch == 0 and start_batch == 0:
        metrics["knn_init"] = knn_monitor(state, cfg, 0, log)
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            mid = epoch == start_epoch and start_batch > 0
            if not mid:  # a mid-epoch resume carries on with the generators' state saved at the cut instead
                # Stochastic depth draws from a generator seeded by (seed, rank, epoch): ranks draw independently,
                # and a resumed run draws what an uninterrupted one would.
                seed_everything((cfg.train.seed * 1_000_003 + dist_info.rank) * 10_007 + epoch)
            dataset.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            # partial_epoch counts optimiser steps: a cycle cut short is redone from its first micro-batch
            loader.sampler.skip = start_batch * loader.batch_size * cfg.optim.accum_steps if mid else 0
            t0 = time.perf_counter()
            try:
                epoch_means = train_one_epoch(state, loader, epoch, cfg, log, start=start_batch if mid else 0,
                                              sums=start_sums if mid else None, stop=stop)
            except EpochInterrupted as cut:
                step = epoch * spe + cut.batches
                _refuse_non_finite(state, step - 1, last_good)
                if main:
                    save_atomic(make_checkpoint(state, cfg, epoch, metrics, cut.batches, cut.sums), last)
                distributed.barrier()
                raise _stopped(stop.signum, last, out_dir,
                               f"step {step}, batch {cut.batches} of {spe} in epoch {epoch + 1}") from None
            done = epoch + 1
            metrics.update({"epoch": done, "epoch_time_s": time.perf_counter() - t0, **epoch_means})
            if knn_on and (done % cfg.train.knn_every == 0 or done == cfg.optim.epochs):
                metrics["knn"] = knn_monitor(state, cfg, done, log)
            log.write({"type": "epoch", "epoch": done, "step": done * spe - 1,
                       **{k: v for k, v in epoch_means.items()}})
            _refuse_non_finite(state, done * spe - 1, last_good)
            if main:
                terms = " ".join(f"{k}={v:.4f}" for k, v in epoch_means.items() if k not in state.model.health)
                health = "; ".join(f"{n}: H {epoch_means[f'entropy_{n}']:.2f} H(mean) "
                                   f"{epoch_means[f'mean_entropy_{n}']:.2f} agree {epoch_means[f'agreement_{n}']:.2f}"
                                   + "".join(f", {head} {h:.2f} / {hm:.2f}"
                                             for head, h, hm in list(teacher_outputs(epoch_means, n))[1:])
                                   for n in NETS)
                print(f"epoch {done}/{cfg.optim.epochs}: {terms} ({metrics['epoch_time_s']:.1f}s)", flush=True)
                print(f"  teacher health (nats, log K = {np.log(cfg.head.out_dim):.2f}): {health}", flush=True)
                for w in health_warnings(epoch_means, cfg):
                    print(w, flush=True)
                ckpt = make_checkpoint(state, cfg, done, metrics)
                # The numbered copy first: a kill between the two leaves it, and the resume picks the newer one.
                if cfg.train.save_every and done % cfg.train.save_every == 0:
                    save_atomic(ckpt, out_dir / f"checkpoint_{done:04d}.pth")
                save_atomic(ckpt, last)
            last_good = f"{last} (after epoch {done}) is untouched"
            distributed.barrier()
            if done < cfg.optim.epochs and stop.requested(device):
                raise _stopped(stop.signum, last, out_dir, f"after epoch {done}")
    except NonFiniteLoss as e:
        raise UserError(f"{e}; not saved: {last_good}. Lower the learning rate or use optim.precision=fp32, "
                        f"then --resume.") from e
    log.close()
    if main and resumed_from is not None and resumed_from != last and start_epoch >= cfg.optim.epochs:
        # Resumed from a numbered checkpoint (last.pth older or damaged) with no epoch left to train: no save
        # above rewrote last.pth, which eval and export read, so it gets the newest state now, byte for byte.
        write_atomic(last, lambda tmp: shutil.copyfile(resumed_from, tmp), size_hint=resumed_from.stat().st_size)
        print(f"wrote {last} from {resumed_from} (the newest state)")
    if main:
        summary = knn_summary(metrics, cfg) if knn_on else None
        if summary:
            print(summary, flush=True)
        print(f"done: {last}")
    return last
