"""Result records: one JSON file per evaluated model, the input of `mokd report`.

Fields (DESIGN.md): task, checkpoint {path, sha256, format, model, branch, arch, label, name, shape, run,
[mode, pair]} (name and shape: mokd.naming.model_name; run: mokd.naming.run_name),
data {spec, sizes, classes}, settings (resolved), metrics, env (versions, device, git commit), wall_time_s,
and `provenance`: the same facts gathered flat for a report row (protocol and its parameters, seed, precision,
device type and world size, checkpoint sha256, format and load report, package version and git commit,
torch/timm/faiss versions, wall time) with `deviations`, the settings that differ from the published protocol
(`PUBLISHED`). `metrics` names its headline figure: k-NN has `best_top1`; other protocols put their headline
accuracy under `top1` (or name the key in `metrics["headline"]`).
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
    env = {"python": platform.python_version(), "packages": versions, "device": dev,
           "device_type": torch.device(dev).type, "platform": platform.platform(),
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


# The published protocols the records are compared with: DINO's k-NN (Caron et al. 2021, eval_knn.py) as the
# MOKD paper runs it (the best of k = 10, 20, 100, 200; Supp. A.2), and the paper's linear probe (Supp. A.2,
# after DINO's eval_linear.py). Both on 224 px centre crops of images resized to 256.
PUBLISHED = {
    "knn": {"ks": [10, 20, 100, 200], "temperature": 0.07, "image_size": 224, "resize": 256, "precision": "fp32"},
    "linear": {"mode": "full", "epochs": 100, "batch_size": 2048, "lr": {"cnn": 0.08, "vit": 0.008},
               "warmup_epochs": 10, "momentum": 0.9, "weight_decay": 0.0, "n_last_blocks": 4, "image_size": 224,
               "resize": 256},
}
# The transfer suite as ssl-transfer (Ericsson et al. 2021) runs it on 224 px inputs: many-shot L2 logistic
# regression with lambda from 45 log-spaced values in [1e-6, 1e5], and few-shot 5-way episodes.
PUBLISHED_TRANSFER = {
    "logreg": {"lambdas": (1e-6, 1e5, 45), "image_size": 224, "precision": "fp32"},
    "fewshot": {"ways": 5, "shots": [1, 5, 20], "queries": 15, "episodes": 600, "image_size": 224,
                "precision": "fp32"},
}
NATIVE_KINDS = ("digits", "photos", "cifar10", "cifar100")  # data evaluated at the images' own size (no crop)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _backbone_kind(settings: dict, checkpoint: dict) -> str:
    """vit | cnn, from the settings when the protocol said so, else from the architecture's name."""
    if settings.get("backbone_kind"):
        return settings["backbone_kind"]
    name = str(checkpoint.get("arch") or "").lower()
    return "vit" if any(t in name for t in ("vit", "deit", "xcit", "eva", "beit")) else "cnn"


def _size_deviations(settings: dict, data: dict, published: dict) -> list[str]:
    size = settings.get("image_size")
    if (data or {}).get("kind") in NATIVE_KINDS or str((data or {}).get("spec", "")).split(":")[0] in NATIVE_KINDS:
        return [f"images at their own {size} px (published: resize {published['resize']}, centre crop "
                f"{published['image_size']})"]
    if isinstance(size, int) and size != published["image_size"]:
        return [f"centre crop {size} px of {round(size * 256 / 224)} (published: {published['image_size']} of "
                f"{published['resize']})"]
    return []


def deviations(task: str, settings: dict, data: dict | None = None, checkpoint: dict | None = None) -> list[str]:
    """Where a record's settings differ from the published protocol (`PUBLISHED`), one sentence each; [] for a
    match, and for tasks without a published protocol (analyses)."""
    pub, s, out = PUBLISHED.get(task), settings or {}, []
    if task in PUBLISHED_TRANSFER:
        return _transfer_deviations(task, s)
    if pub is None:
        return out
    if task == "knn":
        ks = [int(k) for k in s.get("ks") or [] if str(k).isdigit()]
        if ks and sorted(ks) != pub["ks"]:
            out.append(f"k in {ks} (published: best of {pub['ks']}; DINO reports k=20)")
        if s.get("temperature") is not None and s["temperature"] != pub["temperature"]:
            out.append(f"T={_num(s['temperature'])} (published: {pub['temperature']})")
    else:
        kind = _backbone_kind(s, checkpoint or {})
        if s.get("mode") == "fast":
            out.append("fast probe: a grid of learning rates on cached features of the evaluation transform, the lr "
                       f"picked on {s.get('holdout', 0.1):.0%} of train held out (published: one lr, "
                       "RandomResizedCrop and flip)")
        elif s.get("lr") is not None and s["lr"] != pub["lr"][kind]:
            out.append(f"base lr {_num(s['lr'])} (published: {pub['lr'][kind]} for a {kind.upper()})")
        for key, what in (("epochs", "epochs"), ("batch_size", "batch"), ("warmup_epochs", "warm-up epochs"),
                          ("momentum", "momentum"), ("weight_decay", "weight decay")):
            if s.get(key) is not None and s[key] != pub[key]:
                out.append(f"{what} {_num(s[key])} (published: {_num(pub[key])})")
        if kind == "vit" and s.get("n_last_blocks") is not None and s["n_last_blocks"] != pub["n_last_blocks"]:
            out.append(f"CLS tokens of the last {s['n_last_blocks']} block(s) (published: {pub['n_last_blocks']})")
    out += _size_deviations(s, data or {}, pub)
    if s.get("precision") not in (None, "fp32"):
        out.append(f"features in {s['precision']} (published: fp32)")
    return out


def _transfer_deviations(task: str, s: dict) -> list[str]:
    pub, out = PUBLISHED_TRANSFER[task], []
    if task == "logreg" and s.get("lambdas") is not None:
        lo, hi, n = pub["lambdas"]
        lams = [float(x) for x in s["lambdas"]]
        if len(lams) != n or abs(min(lams) - lo) > 1e-12 or abs(max(lams) - hi) > 1e-6 * hi:
            out.append(f"lambda from {len(lams)} value(s) in [{_num(min(lams))}, {_num(max(lams))}] (published: {n} "
                       f"log-spaced in [{_num(lo)}, {_num(hi)}])")
    if task == "fewshot":
        for key in ("ways", "queries", "episodes"):
            if s.get(key) is not None and s[key] != pub[key]:
                out.append(f"{key} {_num(s[key])} (published: {pub[key]})")
        if s.get("shots") is not None and sorted(s["shots"]) != pub["shots"]:
            out.append(f"shots {s['shots']} (published: {pub['shots']})")
    if isinstance(s.get("image_size"), int) and s["image_size"] != pub["image_size"]:
        out.append(f"images at {s['image_size']} px (published: {pub['image_size']})")
    if s.get("precision") not in (None, "fp32"):
        out.append(f"features in {s['precision']} (published: fp32)")
    return out


def provenance(task: str, checkpoint: dict, data: dict, settings: dict, env: dict, wall_time_s: float) -> dict:
    """The facts a report row needs to be trusted and repeated, flat (see the module docstring)."""
    packages = env.get("packages") or {}
    stable = {k: v for k, v in (settings or {}).items() if k not in VOLATILE_SETTINGS}
    return {"protocol": task, "params": stable, "seed": stable.get("seed"), "precision": stable.get("precision"),
            "device_type": env.get("device_type"), "world_size": env.get("world_size"),
            "checkpoint_sha256": checkpoint.get("sha256"), "checkpoint_format": checkpoint.get("format"),
            "load_report": checkpoint.get("load_report"), "mokd_version": packages.get("mokd"),
            "git_commit": env.get("git_commit"), "torch": packages.get("torch"), "timm": packages.get("timm"),
            "faiss": packages.get("faiss-cpu") or packages.get("faiss-gpu-cu12"), "wall_time_s": float(wall_time_s),
            "deviations": deviations(task, settings, data, checkpoint)}


def write_record(out_dir: str | Path, *, task: str, checkpoint: dict, data: dict, settings: dict, metrics: dict,
                 wall_time_s: float, device: torch.device | str | None = None, extra: dict | None = None) -> Path:
    """Write one result record (adds `env`, `provenance`, `created`, `record_version`, and the fields of
    `extra`, such as the bench's job); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    record = {"record_version": RECORD_VERSION, "task": task, "checkpoint": checkpoint, "data": data,
              "settings": settings, "metrics": metrics, "env": env, "wall_time_s": float(wall_time_s),
              "provenance": provenance(task, checkpoint, data, settings, env, wall_time_s),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
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
