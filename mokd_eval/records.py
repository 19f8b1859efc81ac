"""Result records: one JSON file per evaluated model, the input of `mokd report`.

Fields (DESIGN.md): task, checkpoint {path, sha256, format, model, branch, arch, label, name, shape, run,
[mode, pair]} (name and shape: mokd.naming.model_name; run: mokd.naming.run_name),
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


def record_problem(record: dict) -> str | None:
    """Why a record cannot be reported (a missing or mistyped field), or None when it can."""
    missing = [k for k in ("task", "checkpoint", "metrics") if k not in record]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    for key, kind in (("task", str), ("checkpoint", dict), ("metrics", dict), ("data", dict), ("settings", dict)):
        if key in record and not isinstance(record[key], kind):
            return f"field {key} is {type(record[key]).__name__}, expected {'text' if kind is str else 'an object'}"
    if record["task"] == "knn":
        bad = [k for k in ("top1", "top5") if not isinstance(record["metrics"].get(k), dict)]
        if bad:
            return f"k-NN metrics lack {' and '.join(bad)} (a table per k)"
    return None


def scan_records(directory: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every result record under `directory` (sorted by path), and (file, reason) for each JSON file skipped
    because it cannot be read or is an incomplete record. JSON files that are no records (mad.json, a list,
    an object without task/metrics/record_version) are left out silently."""
    records, skipped = [], []
    for p in sorted(Path(directory).rglob("*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            skipped.append((p, f"not valid JSON ({e.msg}, line {e.lineno})"))
            continue
        except UnicodeDecodeError:
            skipped.append((p, "not text (binary content)"))
            continue
        except OSError as e:
            skipped.append((p, f"unreadable ({e.strerror or e})"))
            continue
        if not isinstance(r, dict) or not {"task", "metrics", "record_version"} & set(r):
            continue
        problem = record_problem(r)
        if problem:
            skipped.append((p, problem))
            continue
        r["_file"] = str(p)
        records.append(r)
    return records, skipped


def read_records(directory: str | Path) -> list[dict]:
    """Every complete result record under `directory`, sorted by path (see scan_records for what is skipped)."""
    return scan_records(directory)[0]
