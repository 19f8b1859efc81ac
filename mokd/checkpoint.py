"""Training checkpoints: the contract between the trainer and everything that reads its files.

A checkpoint is one `.pth` holding plain containers and tensors only, so that it reads back with
`torch.load(weights_only=True)` like any third-party file:
  format "mokd", version 1, epoch (completed), step, config (resolved, plain dict),
  arch {net1: {name, kwargs, small_stem}, net2: {...}}, model (MOKDModel state dict), optimizer, scaler,
  rng, metrics.
Writes are atomic: a temporary file in the same folder, fsync, then rename over the target. A write that
runs out of space is one line naming the file system and the size needed.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mokd.errors import UserError

FORMAT = "mokd"
VERSION = 1


TEMP_GLOB = ".*.tmp"  # what write_atomic leaves behind when its process is killed mid-write


def write_atomic(path: str | Path, write: Callable[[Path], None], size_hint: int | None = None) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file. `size_hint`
    (bytes) is what the message says is needed when the file system fills up.
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and out_of_space(e, path.parent, size_hint):
            raise UserError(no_space_message(path, size_hint)) from e
        raise


def out_of_space(e: BaseException, folder: Path, size_hint: int | None = None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the exception's chain, or, whatever
    the exception says, less free space in `folder` than the write needed (`size_hint` bytes, at least 1 MiB).

    torch.save reports a full disk without an errno, in words that vary with where it stopped ("file write
    failed", "unexpected pos ..."), so the free space is the test that does not depend on its wording.
    """
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return free < max(size_hint or 0, 1 << 20)


def no_space_message(path: Path, size_hint: int | None = None) -> str:
    folder = Path(path).parent
    mount = _mount_point(folder)
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MB free"
    except OSError:
        free = ""
    need = f", needed about {size_hint / 2**20:.0f} MB" if size_hint else ""
    return (f"no space left on {mount} (the file system of {folder}) writing {Path(path).name}{need}{free}. "
            f"Free some space (or choose another --out) and run the same command with --resume; the files "
            f"written before are intact.")


def _mount_point(folder: Path) -> str:
    p = Path(os.path.abspath(folder))
    while not p.exists() or not os.path.ismount(p):
        if p == p.parent:
            break
        p = p.parent
    return str(p)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp), size_hint=tensor_bytes(obj) + (1 << 20))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read any checkpoint with weights_only=True; a missing, damaged or unsafe file is a UserError."""
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
        raise UserError(_load_failure(path, e)) from e


def _load_failure(path: Path, e: Exception) -> str:
    text = str(e)
    if path.stat().st_size == 0:
        return f"checkpoint {path} is empty (0 bytes): a copy or save was interrupted"
    blocked = re.search(r"GLOBAL (\S+) (?:was not an allowed|whose module)", text)
    if blocked:  # only a global the unpickler met and refused means code: anything else is not a checkpoint
        return (f"refused to load {path}: it holds a pickled {blocked.group(1)} object. Unpickling it would run "
                f"code from the file, so mokd reads checkpoints with weights_only=True (tensors and plain "
                f"containers only) and will not load it. If you made this file yourself, save the state dict "
                f"alone (torch.save(model.state_dict(), path)) and load that.")
    if "zip archive" in text or "central directory" in text or isinstance(e, EOFError):
        return (f"checkpoint {path} is damaged: it is truncated or corrupt (not a complete torch archive), "
                f"e.g. a copy or save was cut off")
    detail = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in text else text
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", detail).splitlines() if ln.strip()]
    detail = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    return f"{path} is not a checkpoint (unreadable: {detail}); expected a file written by torch.save or safetensors"


def non_finite(named: dict[str, torch.Tensor], limit: int = 4) -> tuple[list[str], int]:
    """Names of the first `limit` floating tensors holding NaN or inf, and how many do."""
    items = [(k, v) for k, v in named.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not items:
        return [], 0
    flags = torch.stack([torch.isfinite(v.detach()).all() for _, v in items]).cpu().tolist()
    bad = [k for (k, _), ok in zip(items, flags) if not ok]
    return bad[:limit], len(bad)


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
