"""Training checkpoints: the contract between the trainer and everything that reads its files.

A checkpoint is one `.pth` holding plain containers and tensors only, so that it reads back with
`torch.load(weights_only=True)` like any third-party file:
  format "mokd", version 1, epoch (completed), step, config (resolved, plain dict),
  arch {net1: {name, kwargs, small_stem}, net2: {...}}, model (MOKDModel state dict), optimizer, scaler,
  rng, metrics.
Writes are atomic: a temporary file in the same folder, fsync, then rename over the target.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mokd.errors import UserError

FORMAT = "mokd"
VERSION = 1


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read any checkpoint with weights_only=True; a missing or damaged file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if path.stat().st_size == 0:
            raise UserError(f"checkpoint {path} is empty (0 bytes): a copy or save was interrupted") from e
        raise UserError(f"cannot read checkpoint {path}: it is truncated, corrupt, or holds objects other than "
                        f"tensors and plain containers (read with weights_only=True). Details: "
                        f"{str(e).splitlines()[0][:300]}") from e


def is_mokd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "model" in obj and "arch" in obj


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the training loop touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]
