"""Low-precision copies of the frozen teachers, so that autocast does not re-cast their weights at every call.

Autocast caches casts only of weights that require a gradient; a teacher's do not, so each of its matrix
products casts its fp32 weight to bf16/fp16 again, every call of every step. A `LowPrecisionCopy` holds the
weights of the teacher's Linear and Conv layers already cast (weight-normalised layers: their effective
weight), and shares every other parameter and every buffer with the fp32 teacher, which stays the master:
the EMA updates it, the state dict is its, and BatchNorm running statistics move in its buffers.
The copy is refreshed after each EMA update, and on use whenever a master weight changed since
(e.g. a checkpoint was loaded), detected by the tensors' version counters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LowPrecisionCopy:
    """Callable like `master` (and `.thead`, `.backbone`, ... as attributes), with cast matmul weights."""

    def __init__(self, master: nn.Module, dtype: torch.dtype):
        self.master = master
        self.module = copy.deepcopy(master)
        self._sources: list[nn.Module] = []  # master layers whose (effective) weight is cast
        self._targets: list[torch.Tensor] = []
        for name, c in list(self.module.named_modules()):
            m = master.get_submodule(name)
            if isinstance(c, MATMUL_LAYERS) and parametrize.is_parametrized(c, "weight"):
                if not isinstance(c, nn.Linear):
                    continue  # (none in MOKD's models) left as is: its weight is recomputed and cast per call
                # A plain Linear in its place, holding the effective weight. (remove_parametrizations would
                # edit the parametrised class, which the deep copy shares with the master.)
                plain = nn.Linear(c.in_features, c.out_features, bias=c.bias is not None, device="meta")
                parent, _, child = name.rpartition(".")
                setattr(self.module.get_submodule(parent), child, plain)
                c = plain
            if isinstance(c, MATMUL_LAYERS):
                w = m.weight.detach().to(dtype)
                del c.weight
                c.register_buffer("weight", w, persistent=False)  # a buffer: no gradient, no optimiser
                self._sources.append(m)
                self._targets.append(w)
            for k in c._parameters:  # shared, not copied: biases, norms, embeddings, tokens
                c._parameters[k] = m._parameters[k]
            for k in c._buffers:
                if not (k == "weight" and isinstance(c, MATMUL_LAYERS)):
                    c._buffers[k] = m._buffers[k]
        self._versions: list[int] = []
        self.refresh()

    def _master_tensors(self) -> list[torch.Tensor]:
        """The fp32 tensors the cast weights derive from (a weight-normalised layer: its g and v)."""
        out = []
        for m in self._sources:
            if parametrize.is_parametrized(m, "weight"):
                out.extend(list(m.parametrizations.weight.parameters()))
            else:
                out.append(m.weight)
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the master's current weights into the copy (one multi-tensor copy)."""
        weights = [m.weight for m in self._sources]  # runs the weight-norm parametrisation where there is one
        torch._foreach_copy_(self._targets, weights)
        self._versions = [t._version for t in self._master_tensors()]

    def _sync(self) -> None:
        if [t._version for t in self._master_tensors()] != self._versions:
            self.refresh()
        if self.module.training != self.master.training:
            self.module.train(self.master.training)

    def __call__(self, *args, **kwargs):
        self._sync()
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):  # e.g. teacher.thead(keys, query=...)
        if name.startswith("__") or name in ("master", "module", "_sources", "_targets", "_versions"):
            raise AttributeError(name)
        self._sync()
        return getattr(self.module, name)
