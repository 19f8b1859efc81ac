"""The training loop: plain functions, one screen per step (DINO's main_dino.py is the model).

train(cfg) sets up data, the MOKDModel, one optimiser per model and the schedules, resumes if asked, and
runs train_one_epoch; checkpoints are written atomically after every epoch.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mokd import distributed
from mokd.augment import MultiCrop, SeededCrops
from mokd.checkpoint import FORMAT, VERSION, load_file, rng_state, save_atomic, seed_everything, set_rng_state
from mokd.config import Config, save_yaml, to_dict
from mokd.data import build_dataset, parse_data_spec
from mokd.device import autocast, grad_scaler, resolve_device, resolve_precision
from mokd.errors import UserError
from mokd.health import collapse_warning
from mokd.models.backbones import configure_attention, is_vit
from mokd.models.mokd import NETS, MOKDModel
from mokd.optim import Schedules, apply_schedules, build_optimizer, build_schedules, resolve_optimizer
from mokd.runlog import RunLog, peak_memory_mb
from mokd.schedules import teacher_temp_schedules


@dataclass
class TrainState:
    model: MOKDModel
    optimizers: dict[str, torch.optim.Optimizer]
    schedules: dict[str, Schedules]
    teacher_temp: dict[str, np.ndarray]  # "net1_self", "net1_cross", ... (mokd.schedules.teacher_temp_schedules)
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    steps_per_epoch: int


def build_loader(cfg: Config, dist_info: distributed.DistInfo) -> tuple[torch.utils.data.DataLoader, SeededCrops]:
    spec = parse_data_spec(cfg.data.spec, cfg.data.class_list)
    images = build_dataset(spec, "train")
    if 0 < cfg.data.subset < len(images):
        pick = np.random.default_rng(cfg.train.seed).choice(len(images), cfg.data.subset, replace=False)
        images = images.subset(sorted(pick.tolist()))
    dataset = SeededCrops(images, MultiCrop(cfg.augment), cfg.train.seed)
    if cfg.optim.batch_size % dist_info.world_size:
        raise UserError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {dist_info.world_size} "
                        f"processes (the batch size is global)")
    per_rank = cfg.optim.batch_size // dist_info.world_size
    if len(dataset) < cfg.optim.batch_size:
        raise UserError(f"the data set has {len(dataset)} images, fewer than one batch of {cfg.optim.batch_size}")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                                  shuffle=True, seed=cfg.train.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                                         num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    return loader, dataset


def build_state(cfg: Config, device: torch.device, steps_per_epoch: int, dist_info: distributed.DistInfo) -> TrainState:
    model = MOKDModel(cfg).to(device)
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
            model.student_forward[n] = nn.parallel.DistributedDataParallel(
                model.student[n], device_ids=[device.index] if device.type == "cuda" else None)
        else:
            model.student_forward[n] = model.student[n]
    optimizers, schedules = {}, {}
    for n in NETS:
        net_cfg = getattr(cfg, n)
        settings = resolve_optimizer(net_cfg, is_vit(model.student[n].backbone))
        optimizers[n] = build_optimizer(model.student[n], settings, cfg.optim)
        schedules[n] = build_schedules(settings, net_cfg, cfg.optim, steps_per_epoch)
    temp = teacher_temp_schedules(cfg, steps_per_epoch)
    return TrainState(model, optimizers, schedules, temp, grad_scaler(device, precision), device, precision,
                      steps_per_epoch)


def clip_gradients(module: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at `clip` on its own (0 disables)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if clip <= 0 or not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(clip / (nrm + 1e-6), max=1.0) for nrm in norms]
    torch._foreach_mul_(grads, scales)


def last_layer_params(branch: nn.Module) -> list[nn.Parameter]:
    params = list(branch.mlp_head.last_layer.parameters())
    if branch.thead is not None:
        params += list(branch.thead.fc.parameters())
    return params


def train_step(state: TrainState, crops: list[torch.Tensor], step: int, freeze_last_layer: bool,
               cfg: Config) -> dict[str, torch.Tensor]:
    """One optimisation step of both models on one batch of crops; returns the named losses (8 terms + totals)."""
    model = state.model
    for n in NETS:
        apply_schedules(state.optimizers[n], state.schedules[n], step)
    with autocast(state.device, state.precision):
        losses = model(crops, {k: float(v[step]) for k, v in state.teacher_temp.items()})
    losses.update(model.total_losses(losses))
    _check_finite(losses, step, step // state.steps_per_epoch)

    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    state.scaler.scale(losses["loss1"] + losses["loss2"]).backward()
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


def train_one_epoch(state: TrainState, loader, epoch: int, cfg: Config, log: RunLog) -> dict[str, float]:
    """One pass over the loader; returns the epoch's mean of every logged quantity."""
    model, device = state.model, state.device
    model.train()
    sums: dict[str, float] = {}
    window_start, window_images = time.perf_counter(), 0
    show = cfg.train.progress and distributed.is_main()
    progress = _progress(loader, epoch, cfg.optim.epochs, show)
    # Batch jobs (stderr not a terminal) get no bar: a plain line every log_every steps instead, as DINO's.
    lines = distributed.is_main() and not sys.stderr.isatty()
    epoch_start, total_steps = time.perf_counter(), cfg.optim.epochs * state.steps_per_epoch
    for it, (crops, _) in enumerate(progress):
        step = epoch * state.steps_per_epoch + it
        crops = [c.to(device, non_blocking=True) for c in crops]
        losses = train_step(state, crops, step, freeze_last_layer=epoch < cfg.optim.freeze_last_layer, cfg=cfg)
        values = {k: v.detach().float() for k, v in {**losses, **model.health}.items()}
        stacked = distributed.all_reduce_mean(torch.stack(list(values.values())))
        record = dict(zip(values, stacked.tolist()))
        record["loss"] = record["loss1"] + record["loss2"]
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        window_images += crops[0].shape[0] * distributed.world_size()
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
                per_step = (time.perf_counter() - epoch_start) / (it + 1)
                eta = per_step * (total_steps - step - 1)
                print(f"epoch {epoch + 1}/{cfg.optim.epochs} step {step + 1}/{total_steps} "
                      f"loss1={record['loss1']:.4f} loss2={record['loss2']:.4f} "
                      f"{window_images / max(elapsed, 1e-9):.1f} img/s eta {_hms(eta)}", flush=True)
            window_start, window_images = time.perf_counter(), 0
        if show:
            progress.set_postfix(loss1=f"{record['loss1']:.3f}", loss2=f"{record['loss2']:.3f}")
    return {k: v / state.steps_per_epoch for k, v in sums.items()}


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def health_warnings(means: dict[str, float], cfg: Config) -> list[str]:
    """Collapse warnings (mokd.health) from an epoch's mean health figures, one per collapsed model."""
    out = []
    for n in NETS:
        if f"entropy_{n}" in means:
            w = collapse_warning(f"{n} ({getattr(cfg, n).arch})", means[f"entropy_{n}"], means[f"mean_entropy_{n}"],
                                 cfg.head.out_dim)
            if w:
                out.append(w)
    return out


def knn_summary(log_path: Path, cfg: Config) -> str | None:
    """The run's one-line result: each model's online k-NN at initialisation and at the end (from the log)."""
    import json

    try:
        knn = [r for r in map(json.loads, log_path.read_text().splitlines()) if r.get("type") == "knn"]
    except (OSError, json.JSONDecodeError):
        return None
    first = next((r for r in knn if r["epoch"] == 0), None)
    if first is None or len(knn) < 2:
        return None
    last = knn[-1]
    parts = [f"{n} ({getattr(cfg, n).arch}) {first[f'knn_top1_{n}']:.2f}% -> {last[f'knn_top1_{n}']:.2f}% "
             f"({last[f'knn_top1_{n}'] - first[f'knn_top1_{n}']:+.2f})" for n in NETS]
    head = f"summary: online k-NN top-1 (k={last['k']}) from initialisation to epoch {last['epoch']}: "
    return head + ", ".join(parts)


def _progress(loader, epoch: int, epochs: int, show: bool):
    if not show:
        return loader
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (cluster logs), the per-epoch line stays
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)


def _check_finite(losses: dict[str, torch.Tensor], step: int, epoch: int) -> None:
    """Stop every rank together (a rank raising alone would leave the others in the gradient all-reduce)."""
    not_finite = torch.stack([(~torch.isfinite(v.detach())).any() for v in losses.values()]).float()
    distributed.all_reduce_sum(not_finite)
    if bool(not_finite.any()):
        bad = [k for k, flag in zip(losses, not_finite.tolist()) if flag]
        bad = [k for k in bad if not k.startswith("loss")] or bad  # name the term, not only the sums
        raise UserError(f"non-finite loss {', '.join(bad)} at step {step} (epoch {epoch + 1}); stopping. The last "
                        f"good checkpoint is untouched: lower the learning rate or use fp32 and --resume.")


def make_checkpoint(state: TrainState, cfg: Config, epoch: int, metrics: dict) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "epoch": epoch, "step": epoch * state.steps_per_epoch,
        "config": to_dict(cfg), "arch": state.model.arch(), "model": state.model.state_dict(),
        "optimizer": {n: state.optimizers[n].state_dict() for n in NETS},
        "scaler": state.scaler.state_dict(), "rng": rng_state(), "metrics": metrics,
    }


def resume(state: TrainState, path: Path, cfg: Config) -> int:
    """Load `path` into the state; returns the number of completed epochs."""
    ckpt = load_file(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        raise UserError(f"{path} is not a mokd training checkpoint; cannot resume from it")
    if ckpt["arch"] != state.model.arch():
        raise UserError(f"{path} was trained with {ckpt['arch']}, but the config asks for {state.model.arch()}")
    own = state.model.state_dict()
    differ = sorted(set(own) ^ set(ckpt["model"]))
    differ += [k for k in own if k in ckpt["model"] and own[k].shape != ckpt["model"][k].shape]
    if differ:
        raise UserError(f"{path} does not fit the model this config builds ({len(differ)} tensors differ, e.g. "
                        f"{', '.join(differ[:4])}): loss.mode, loss.st/ct, head.* and thead.* must stay as they "
                        f"were. Resume without --config to use the run's own config.yaml.")
    state.model.load_state_dict(ckpt["model"])
    for n in NETS:
        state.optimizers[n].load_state_dict(ckpt["optimizer"][n])
    if ckpt["scaler"]:  # an fp32/bf16 run has no scaler state to carry into fp16
        state.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if ckpt["config"].get("optim", {}).get("epochs") != cfg.optim.epochs:
        print(f"note: resuming a run planned for {ckpt['config']['optim']['epochs']} epochs with "
              f"{cfg.optim.epochs}; the schedules follow the new length")
    return int(ckpt["epoch"])


def knn_monitor(state: TrainState, cfg: Config, epoch: int, log: RunLog) -> dict[str, float]:
    """k-NN top-1 of both teachers' backbones: train split as the bank, the held-out split as queries."""
    from mokd_eval.features import eval_transform, extract_features
    from mokd_eval.knn import knn_evaluate

    spec = parse_data_spec(cfg.data.spec, cfg.data.class_list)
    native = spec.native_size is not None
    transform = eval_transform(cfg.augment.global_size, native)
    train_set, val_set = build_dataset(spec, "train", transform), build_dataset(spec, "val", transform)
    if len(train_set) > cfg.train.knn_max_train:
        idx = np.random.default_rng(0).choice(len(train_set), cfg.train.knn_max_train, replace=False)
        train_set = train_set.subset(sorted(idx.tolist()))
    out = {}
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
    if distributed.is_main():
        when = "initialisation" if epoch == 0 else f"epoch {epoch}"
        print(f"online k-NN top-1 (k={cfg.train.knn_k}) at {when}: "
              + ", ".join(f"{n} ({getattr(cfg, n).arch}) {out[n]:.2f}%" for n in NETS), flush=True)
        log.write({"type": "knn", "epoch": epoch, "step": epoch * state.steps_per_epoch - 1, "k": cfg.train.knn_k,
                   **{f"knn_top1_{n}": out[n] for n in NETS}})
    return out


def train(cfg: Config, resume_run: bool = False) -> Path:
    """Train the pair described by `cfg`; returns the path of the final checkpoint."""
    dist_info = distributed.init_distributed(resolve_device(cfg.train.device).type)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    seed_everything(cfg.train.seed)  # the same on every rank: students and teachers start identical everywhere
    out_dir = Path(cfg.train.output_dir)
    main = dist_info.is_main
    loader, dataset = build_loader(cfg, dist_info)
    state = build_state(cfg, device, len(loader), dist_info)
    log = RunLog(out_dir / "log.jsonl", enabled=main)
    last = out_dir / "last.pth"
    start_epoch = 0
    if resume_run and last.exists():
        start_epoch = resume(state, last, cfg)
        if main:
            print(f"resumed from {last} after epoch {start_epoch}")
    elif resume_run and main:
        print(f"--resume: no checkpoint at {last}; starting from scratch")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
    if start_epoch == 0 and log.enabled:
        log.path.unlink(missing_ok=True)
    log.truncate_after(start_epoch * state.steps_per_epoch)
    if main:
        n_params = {n: sum(p.numel() for p in state.model.student[n].parameters()) / 1e6 for n in NETS}
        print(f"mokd train: {cfg.net1.arch} ({n_params['net1']:.1f}M) + {cfg.net2.arch} ({n_params['net2']:.1f}M), "
              f"mode {cfg.loss.mode}, {len(dataset)} images, {state.steps_per_epoch} steps/epoch, "
              f"{cfg.optim.epochs} epochs, {device} {state.precision}, {dist_info.world_size} process(es) -> {out_dir}")

    knn_on = cfg.train.knn_every > 0
    metrics: dict = {}
    if knn_on and start_epoch == 0:
        metrics["knn_init"] = knn_monitor(state, cfg, 0, log)
    ckpt_path = last
    for epoch in range(start_epoch, cfg.optim.epochs):
        # Stochastic depth draws from a generator seeded by (seed, rank, epoch): ranks draw independently,
        # and a resumed run draws what an uninterrupted one would.
        seed_everything((cfg.train.seed * 1_000_003 + dist_info.rank) * 10_007 + epoch)
        dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        epoch_means = train_one_epoch(state, loader, epoch, cfg, log)
        done = epoch + 1
        metrics.update({"epoch": done, "epoch_time_s": time.perf_counter() - t0, **epoch_means})
        if knn_on and (done % cfg.train.knn_every == 0 or done == cfg.optim.epochs):
            metrics["knn"] = knn_monitor(state, cfg, done, log)
        log.write({"type": "epoch", "epoch": done, "step": done * state.steps_per_epoch - 1,
                   **{k: v for k, v in epoch_means.items()}})
        if main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in epoch_means.items() if k not in state.model.health)
            health = " ".join(f"{n}: H {epoch_means[f'entropy_{n}']:.2f} H(mean) {epoch_means[f'mean_entropy_{n}']:.2f}"
                              f" agree {epoch_means[f'agreement_{n}']:.2f}" for n in NETS)
            print(f"epoch {done}/{cfg.optim.epochs}: {terms} ({metrics['epoch_time_s']:.1f}s)", flush=True)
            print(f"  teacher health (nats, log K = {np.log(cfg.head.out_dim):.2f}): {health}", flush=True)
            for w in health_warnings(epoch_means, cfg):
                print(w, flush=True)
            ckpt = make_checkpoint(state, cfg, done, metrics)
            save_atomic(ckpt, last)
            if cfg.train.save_every and done % cfg.train.save_every == 0:
                save_atomic(ckpt, out_dir / f"checkpoint_{done:04d}.pth")
        distributed.barrier()
    if main:
        summary = knn_summary(log.path, cfg) if knn_on else None
        if summary:
            print(summary, flush=True)
        print(f"done: {ckpt_path}")
    distributed.cleanup()
    return ckpt_path
