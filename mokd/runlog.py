"""JSONL training log: one record per logged step, one per epoch, one per k-NN evaluation."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from mokd.checkpoint import write_atomic


class RunLog:
    """Appends JSON lines to `path` on the main rank; on resume, drops records past the resumed step."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Keep records whose 'step' < step (records of an epoch that was cut off are written again)."""
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
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
