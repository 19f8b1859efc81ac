"""MOKDModel: two student branches, their EMA teachers, the centres, and every MOKD loss term.

A branch = timm backbone + DINO MLP head + T-Head. Code about "model i and the other model j" is written
once (`_terms_for`) and called for (net1, net2) and (net2, net1).
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from mokd.config import Config, NetConfig
from mokd.health import health_metrics
from mokd.losses import Center, dino_cross_entropy, paired_cross_entropy, sharpen
from mokd.models.backbones import create_backbone, encode, feature_grid, global_dim, is_vit, local_dim
from mokd.models.heads import DINOHead, THead, norm_last_layer_for
from mokd.models.lowp import LowPrecisionCopy
from mokd.schedules import TEMP_GROUPS

NETS = ("net1", "net2")
N_GLOBAL = 2


def _temp(teacher_temp: float | dict[str, float], net: str, term: str) -> float:
    """The teacher temperature of `net`'s term ("sm", "st", "cm", "ct")."""
    if isinstance(teacher_temp, dict):
        return float(teacher_temp[f"{net}_{TEMP_GROUPS[term]}"])
    return float(teacher_temp)


@dataclass
class BranchOutput:
    mlp: torch.Tensor  # [V*B, K]
    thead: torch.Tensor | None  # [V*B, K]
    glob: list[torch.Tensor]  # V x [B, Cg]
    local: list[torch.Tensor]  # V x [B, N_v, C]
    is_vit: bool

    def query_feature(self, v: int) -> torch.Tensor:
        """The pooled feature a T-Head query is made from: ViT CLS token, CNN mean of the final map. [B, C]"""
        return self.glob[v] if self.is_vit else self.local[v].mean(dim=1)


@contextlib.contextmanager
def seeded_init(seed: int, net: str, module: str):
    """Draw a module's initial weights from a generator seeded by (seed, net, module), not the global stream.

    So with one seed a backbone (or head) starts from the same weights whatever else is built around it:
    the loss mode, the Table 7 switches or the other model. The global RNG state is restored afterwards.
    """
    derived = zlib.crc32(f"{seed}/{net}/{module}".encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived)
        yield


class Branch(nn.Module):
    """backbone + mlp_head (+ thead). forward(crops) runs every crop, grouping equal resolutions.

    The heads' weights are drawn by seeded_init(seed, net, "mlp_head" / "thead").
    """

    def __init__(self, backbone: nn.Module, cfg: Config, grid: tuple[int, int] | None, channels_last: bool = False,
                 net: str = "net"):
        super().__init__()
        self.backbone = backbone
        self.is_vit = is_vit(backbone)
        net_cfg = getattr(cfg, net) if net in NETS else NetConfig()
        h, seed = cfg.head, cfg.train.seed
        frozen = {k: norm_last_layer_for(k, self.is_vit, getattr(net_cfg, f"norm_last_layer_{k}"), h.norm_last_layer)
                  for k in ("mlp", "thead")}
        with seeded_init(seed, net, "mlp_head"):
            self.mlp_head = DINOHead(global_dim(backbone), h.out_dim, h.hidden_dim, h.bottleneck_dim, h.use_bn,
                                     frozen["mlp"])
        t = cfg.thead
        self.thead = None
        if grid is not None:
            with seeded_init(seed, net, "thead"):
                self.thead = THead(local_dim(backbone), h.out_dim, grid, t.dim, t.depth, t.num_heads, t.mlp_ratio,
                                   frozen["thead"], net_cfg.pos_resample, t.l2_norm, t.use_bn)
        self.channels_last = channels_last and not self.is_vit

    def forward(self, crops: list[torch.Tensor]) -> BranchOutput:
        glob, local = [], []
        for group in _resolution_groups(crops):
            x = torch.cat(group)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            g, l = encode(self.backbone, x)
            glob.extend(g.chunk(len(group)))
            local.extend(l.chunk(len(group)))
        # Logits go to fp32 once here (every loss takes them in fp32), not once per loss that uses them.
        mlp = self.mlp_head(torch.cat(glob)).float()
        thead = None
        if self.thead is not None:
            thead = torch.cat([self.thead(torch.cat(local[a:b])) for a, b in _group_bounds(local)]).float()
        return BranchOutput(mlp, thead, glob, local, self.is_vit)


def _group_bounds(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Index ranges of consecutive tensors with equal shape[1:]."""
    bounds, start = [], 0
    for i in range(1, len(tensors) + 1):
        if i == len(tensors) or tensors[i].shape[1:] != tensors[start].shape[1:]:
            bounds.append((start, i))
            start = i
    return bounds


def _resolution_groups(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [crops[a:b] for a, b in _group_bounds(crops)]


STOCHASTIC_KWARGS = ("drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_block_rate",
                     "pos_drop_rate", "patch_drop_rate")


def teacher_kwargs(kwargs: dict) -> dict:
    """Teachers are built without stochastic depth or dropout (their weights come from the EMA)."""
    return {k: v for k, v in kwargs.items() if k not in STOCHASTIC_KWARGS}


class MOKDModel(nn.Module):
    """student/teacher x net1/net2; forward(crops, teacher_temp) -> dict of named loss terms."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.mokd = cfg.loss.mode == "mokd"
        self.use_thead = self.mokd and (cfg.loss.st or cfg.loss.ct)
        self.lam = {n: getattr(cfg, n).lam for n in NETS}
        students, teachers = {}, {}
        for n in NETS:
            nc = getattr(cfg, n)
            with seeded_init(cfg.train.seed, n, "backbone"):
                backbone = create_backbone(nc.arch, nc.kwargs, nc.small_stem, nc.pos_resample)
            label = f"{n} ({nc.arch})"
            grid = feature_grid(backbone, cfg.augment.global_size, label)
            if cfg.augment.local_crops > 0:
                feature_grid(backbone, cfg.augment.local_size, label)
            grid = grid if self.use_thead else None
            students[n] = Branch(backbone, cfg, grid, cfg.train.channels_last, net=n)
            # The teacher's own draws do not matter: it is overwritten with the student's weights.
            teacher_backbone = create_backbone(nc.arch, teacher_kwargs(nc.kwargs), nc.small_stem, nc.pos_resample)
            teachers[n] = Branch(teacher_backbone, cfg, grid, cfg.train.channels_last, net=n)
            teachers[n].load_state_dict(students[n].state_dict())
            for p in teachers[n].parameters():
                p.requires_grad = False
        self.student = nn.ModuleDict(students)
        self.teacher = nn.ModuleDict(teachers)
        k, m = cfg.head.out_dim, cfg.loss.center_momentum
        heads = ("mlp", "thead") if self.use_thead else ("mlp",)
        if self.mokd and cfg.loss.ct and cfg.loss.ct_center:
            heads += ("search",)  # "net1_search": the centre of net1's L_ct target (teacher net2's T-Head)
        self.centers = nn.ModuleDict({f"{n}_{h}": Center(k, m) for n in NETS for h in heads})
        # DDP wrappers of the students, when distributed (a plain dict: not part of the state dict).
        self.student_forward = {n: self.student[n] for n in NETS}
        # What runs the teachers' forward: the teachers, or their low-precision copies (see use_fast_step).
        self.teacher_forward = {n: self.teacher[n] for n in NETS}
        self.fused_ema = False
        # The last forward's training-health figures (mokd.health), per model and teacher output:
        # entropy_net1 (MLP head), mean_entropy_thead_net2 (T-Head), agreement_search_net1 (L_ct's target), ...
        self.health: dict[str, torch.Tensor] = {}
        # This forward's L_ct targets and raw search logits per model i (for the health figures and the centre).
        self._search: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def arch(self) -> dict:
        return {n: {"name": getattr(self.cfg, n).arch, "kwargs": dict(getattr(self.cfg, n).kwargs),
                    "small_stem": getattr(self.cfg, n).small_stem} for n in NETS}

    def forward(self, crops: list[torch.Tensor], teacher_temp: float | dict[str, float]) -> dict[str, torch.Tensor]:
        """crops: 2 global views then local views, each [B, 3, S, S]. Returns sm1, st1, cm1, ct1, sm2, ...

        teacher_temp: one temperature for every term, or {"net1_self", "net1_cross", "net2_self", "net2_cross"}
        (mokd.schedules.teacher_temp_schedules): model i's sm/st use i_self, its cm/ct use i_cross.
        Teacher outputs are detached; centres move after the terms are computed (DINO's order).
        """
        students = {n: self.student_forward[n](crops) for n in NETS}
        with torch.no_grad():
            teachers = {n: self.teacher_forward[n](crops[:N_GLOBAL]) for n in NETS}
        cache: dict[tuple[str, str, float], torch.Tensor] = {}

        def probs(n: str, head: str, temp: float) -> torch.Tensor:
            """Teacher n's centred, sharpened output of `head` at `temp` (shared by the terms that use it)."""
            if (n, head, temp) not in cache:
                with torch.no_grad():
                    cache[(n, head, temp)] = sharpen(getattr(teachers[n], head), temp,
                                                     self.centers[f"{n}_{head}"].center)
            return cache[(n, head, temp)]

        losses = {}
        self._search = {}
        temps = {n: self._term_temps(teacher_temp, n) for n in NETS}
        for i, j in (("net1", "net2"), ("net2", "net1")):
            losses.update(self._terms_for(i, j, students, teachers, probs, temps[i], len(crops)))
        self.health = {}
        for n in NETS:
            t_probs = probs(n, "mlp", temps[n]["sm"])
            figures = health_metrics(t_probs, students[n].mlp[:len(t_probs)])
            if self.mokd and self.cfg.loss.st:
                t_probs = probs(n, "thead", temps[n]["st"])
                figures.update({f"{k}_thead": v for k, v in
                                health_metrics(t_probs, students[n].thead[:len(t_probs)]).items()})
            if n in self._search:
                target, _, student_logits = self._search[n]
                figures.update({f"{k}_search": v for k, v in health_metrics(target, student_logits).items()})
            self.health.update({f"{k}_{n}": v for k, v in figures.items()})
        for n in NETS:
            self.centers[f"{n}_mlp"].update(teachers[n].mlp)
            if self.use_thead:
                self.centers[f"{n}_thead"].update(teachers[n].thead)
            if f"{n}_search" in self.centers:
                self.centers[f"{n}_search"].update(self._search[n][1])
        return losses

    def _term_temps(self, teacher_temp: float | dict[str, float], net: str) -> dict[str, float]:
        """The teacher temperature of each of `net`'s terms; the T-Head's targets (st, ct) are scaled by
        loss.thead_temp_scale."""
        scale = {"st": self.cfg.loss.thead_temp_scale, "ct": self.cfg.loss.thead_temp_scale}
        return {t: _temp(teacher_temp, net, t) * scale.get(t, 1.0) for t in TEMP_GROUPS}

    def _terms_for(self, i: str, j: str, students: dict, teachers: dict, probs, temps: dict[str, float],
                   n_views: int) -> dict[str, torch.Tensor]:
        """The terms of model i: L_sm, L_st (own teacher), L_cm, L_ct (the other model j's teacher).

        probs(net, head, temp) gives a teacher's centred, sharpened output; temps maps sm/st/cm/ct to model
        i's temperature for that term.
        """
        lc, idx = self.cfg.loss, i[-1]
        s = students[i]

        def ce(student_logits, teacher_probs):
            return dino_cross_entropy(student_logits, teacher_probs, lc.student_temp, n_views, N_GLOBAL)

        out = {f"sm{idx}": ce(s.mlp, probs(i, "mlp", temps["sm"]))}
        if not self.mokd:
            return out
        if lc.st:
            out[f"st{idx}"] = ce(s.thead, probs(i, "thead", temps["st"]))
        if lc.cm:
            out[f"cm{idx}"] = ce(s.mlp, probs(j, "mlp", temps["cm"]))
        if lc.ct:
            out[f"ct{idx}"] = self._feature_search_loss(i, j, s, teachers[j], temps["ct"], n_views)
        return out

    def _feature_search_loss(self, i: str, j: str, s: BranchOutput, t: BranchOutput, teacher_temp: float,
                             n_views: int) -> torch.Tensor:
        """L_ct: student i's T-Head output on view v against teacher j's T-Head run on teacher j's local
        features of a global view with student i's (detached) query for view v prepended.

        ct_views=local (official code): v = each local crop, keys from global view 1.
        ct_views=global (paper's Algorithm 1): v = each global view, keys from the other global view.
        """
        views = list(range(N_GLOBAL, n_views)) if self.cfg.loss.ct_views == "local" else list(range(N_GLOBAL))
        key_views = [0] * len(views) if self.cfg.loss.ct_views == "local" else [1 - v for v in views]
        with torch.no_grad():
            query = self.student[i].thead.query(torch.cat([s.query_feature(v) for v in views]).detach())
            keys = torch.cat([t.local[kv] for kv in key_views])
            logits = self.teacher_forward[j].thead(keys, query=query)
            center = self.centers[f"{i}_search"].center if f"{i}_search" in self.centers else None
            target = sharpen(logits, teacher_temp, center)
        student_logits = torch.cat(s.thead.chunk(n_views)[views[0]:views[-1] + 1])
        self._search[i] = (target, logits, student_logits.detach())
        return paired_cross_entropy(student_logits, target, self.cfg.loss.student_temp)

    def total_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L_i = (L_sm_i + w_st L_st_i) + lambda_i (L_cm_i + w_ct L_ct_i), for i = 1, 2 (w = 1 in the paper)."""
        lc, out = self.cfg.loss, {}
        weight = {"sm": 1.0, "st": lc.st_weight, "cm": 1.0, "ct": lc.ct_weight}
        for n in NETS:
            k = n[-1]
            self_terms = sum(weight[t] * losses[f"{t}{k}"] for t in ("sm", "st") if f"{t}{k}" in losses)
            cross_terms = [weight[t] * losses[f"{t}{k}"] for t in ("cm", "ct") if f"{t}{k}" in losses]
            out[f"loss{k}"] = self_terms + (self.lam[n] * sum(cross_terms) if cross_terms else 0.0)
        return out

    def use_fast_step(self, teacher_dtype: torch.dtype | None) -> None:
        """The fast path: a one-kernel EMA (lerp), and with `teacher_dtype` (bf16/fp16 autocast) teacher
        forwards through low-precision copies of the teachers' weights. Call after the modules are final
        (device, memory format, SyncBatchNorm)."""
        self.fused_ema = True
        self.teacher_forward = {n: self.teacher[n] if teacher_dtype is None
                                else LowPrecisionCopy(self.teacher[n], teacher_dtype) for n in NETS}

    @torch.no_grad()
    def update_teachers(self, momentum: dict[str, float]) -> None:
        """teacher <- m * teacher + (1 - m) * student, per model (whole branch: backbone and heads)."""
        for n in NETS:
            t_params = list(self.teacher[n].parameters())
            s_params = [p.detach() for p in self.student[n].parameters()]
            if self.fused_ema:  # t + (1 - m) (s - t): the same update in one multi-tensor kernel
                torch._foreach_lerp_(t_params, s_params, 1.0 - momentum[n])
            else:
                torch._foreach_mul_(t_params, momentum[n])
                torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum[n])
            if isinstance(self.teacher_forward[n], LowPrecisionCopy):  # not a compiled teacher: nothing to refresh
                self.teacher_forward[n].refresh()
