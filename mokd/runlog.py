"""The training log: one record per logged step, one per epoch, one per k-NN evaluation.

log.jsonl always holds every record (resume, `mokd plot-log` and benchmarks/reproduce.py read it); with
`train.loggers: [jsonl, tensorboard]` every number of every record also goes to TensorBoard, in OUT/tensorboard.
docs/monitoring.md gives the fields.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path

import torch

from mokd.checkpoint import write_atomic
from mokd.errors import UserError


LOGGERS = ("jsonl", "tensorboard")


def scalar_tag(kind: str, key: str) -> str:
    """TensorBoard tag of a log field: grouped by what it is; epoch means get their own section."""
    if key.startswith(("entropy_", "mean_entropy_", "agreement_")):
        group = "health"
    elif key.startswith(("lr_", "wd_", "momentum_", "teacher_temp_")):
        group = "schedule"
    elif key in ("img_per_s", "peak_mem_mb", "skipped_images"):
        group = "speed" if key != "skipped_images" else "data"
    elif key.startswith("knn_"):
        group = "knn"
    else:
        group = "loss"
    return f"epoch/{group}/{key}" if kind == "epoch" else f"{group}/{key}"


class RunLog:
    """Appends JSON lines to `path` on the main rank (and scalars to TensorBoard when `loggers` names it); on
    resume, drops records past the resumed step."""

    def __init__(self, path: Path, enabled: bool = True, loggers: tuple[str, ...] | list[str] = ("jsonl",)):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard = enabled and "tensorboard" in loggers
        self._writer, self._purge_step = None, None
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise UserError("train.loggers names tensorboard, but the tensorboard package is not installed: "
                            "pip install -e \".[tensorboard]\" (or pip install tensorboard)")

    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events past the resumed step, as truncate_after does here
            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._purge_step)
        return self._writer

    def truncate_after(self, step: int) -> None:
        """Keep records whose 'step' < step (records of an epoch that was cut off are written again)."""
        self._purge_step = step if step > 0 else None
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for ln in self.path.read_text().splitlines():
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:  # a line cut off by the kill that interrupted the run
                continue
            if record.get("step", 0) < step:
                kept.append(ln)
        text = "".join(ln + "\n" for ln in kept)
        write_atomic(self.path, lambda tmp: tmp.write_text(text))  # a kill now must not lose the whole log

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            writer, kind = self._tb(), record.get("type", "")
            step = max(int(record.get("step", 0)), 0)
            for key, value in record.items():
                if key not in ("type", "epoch", "step") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    writer.add_scalar(scalar_tag(kind, key), value, step)
            writer.flush()  # a run killed between records loses nothing already logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
