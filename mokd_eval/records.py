"""Result records: one JSON file per evaluated model, the input of `mokd report`.

Fields (DESIGN.md): task, checkpoint {path, sha256, format, model, branch, arch, label, [mode, pair]},
data {spec, sizes, classes}, settings (resolved), metrics, env (versions, device, git commit), wall_time_s.
`metrics` names its headline figure: k-NN has `best_top1`; other protocols put their headline accuracy
under `top1` (or name the key in `metrics["headline"]`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mokd import distributed as dist

RECORD_VERSION = 1
VOLATILE_SETTINGS = ("features_cached", "num_workers")  # do not change the result, so do not name the record
_PACKAGES = ("mokd", "torch", "torchvision", "timm", "numpy", "faiss-cpu", "faiss-gpu-cu12", "scikit-learn",
             "detectron2", "pycocotools")


def to_jsonable(x: Any) -> Any:
    """Tensors, Paths, tuples and int-keyed dicts -> JSON types (dict keys become strings)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device | str | None = None) -> dict:
    """Package versions, Python, device (with the GPU name), world size and git commit."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    versions.setdefault("torch", torch.__version__)
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    env = {"python": platform.python_version(), "packages": versions, "device": dev, "platform": platform.platform(),
           "world_size": dist.world_size(), "git_commit": _git_commit()}
    if dev.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(dev))
    return env


def record_name(task: str, checkpoint: dict, data: dict, settings: dict) -> str:
    """Stable file name: the same evaluation overwrites its record, a different one gets its own file."""
    stable = {k: v for k, v in settings.items() if k not in VOLATILE_SETTINGS}
    ident = json.dumps(to_jsonable([checkpoint.get("sha256"), checkpoint.get("label"), data.get("spec"), stable]),
                       sort_keys=True)
    stem = Path(str(checkpoint.get("path", "ckpt"))).stem
    label = str(checkpoint.get("label") or "")
    base = f"{task}__{stem}" + (f"__{label}" if label and label != stem else "")
    base = re.sub(r"[^A-Za-z0-9._+-]+", "_", base)
    return f"{base}__{hashlib.sha256(ident.encode()).hexdigest()[:8]}.json"


def write_record(out_dir: str | Path, *, task: str, checkpoint: dict, data: dict, settings: dict, metrics: dict,
                 wall_time_s: float, device: torch.device | str | None = None) -> Path:
    """Write one result record (adds `env`, `created`, `record_version`); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"record_version": RECORD_VERSION, "task": task, "checkpoint": checkpoint, "data": data,
              "settings": settings, "metrics": metrics, "env": environment(device), "wall_time_s": float(wall_time_s),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = out / record_name(task, checkpoint, data, settings)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(record), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_records(directory: str | Path) -> list[dict]:
    """Every result record (a JSON object with `task` and `metrics`) under `directory`, sorted by path."""
    out = []
    for p in sorted(Path(directory).rglob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(r, dict) and "task" in r and isinstance(r.get("metrics"), dict):
            r["_file"] = str(p)
            out.append(r)
    return out
