"""Step 1, plan: a manifest (or the command line) -> the jobs, each (checkpoint(s), data set, protocol, settings),
with a stable id that names its records, so that a bench run again skips what is written.

Manifest (YAML; relative paths are read from the manifest's folder):

    data: digits                     # one data spec, as --data (ImageFolder root, cifar10:PATH, digits, photos,
                                     # or a folder of unlabelled images: rank, mad and cka only)
    datasets: [digits, dtd:/data/dtd, voc2007:/data/voc]   # or several (not both keys)
    class_list: null
    protocols: [knn, linear, logreg, fewshot, rank, mad, cka]
    seed: 0
    device: auto
    features: {image_size: null, precision: fp32, batch_size: 256, num_workers: null, cache_dir: null,
               no_cache: false}
    settings:                        # per protocol, over mokd_bench.protocols.PROTOCOLS[...].defaults
      knn: {ks: [10, 20, 100, 200], temperature: 0.07}
      linear: {epochs: 100}
    checkpoints:                     # mokd_eval.spec.CheckpointSpec fields
      - {path: dino_vits16.pth, label: DINO ViT-S/16, arch: vit_small_patch16_224}
      - {path: runs/pair/last.pth, label: MOKD, model: net2}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mokd.errors import UserError
from mokd_bench.data import BenchData
from mokd_bench.protocols import PROTOCOLS
from mokd_eval.loader import file_sha256
from mokd_eval.spec import CheckpointSpec

FEATURE_KEYS = ("image_size", "precision", "batch_size", "num_workers", "cache_dir", "no_cache")


@dataclass
class BenchConfig:
    """Everything a bench run is told: the data sets, the protocols and their settings, the checkpoints."""
    entries: list[CheckpointSpec]
    datasets: list[str] = field(default_factory=list)  # data specs; empty: the embedded default (digits)
    class_list: str | None = None
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    settings: dict[str, dict] = field(default_factory=dict)  # protocol -> overrides of its defaults
    seed: int = 0
    device: str = "auto"
    image_size: int | None = None
    precision: str = "fp32"
    batch_size: int = 256  # images per forward when extracting features
    num_workers: int | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    skip_bad_images: bool = False

    def resolved_settings(self, protocol: str) -> dict:
        """The protocol's defaults with this config's overrides; unknown keys are errors naming the valid ones."""
        defaults = PROTOCOLS[protocol].defaults
        given = self.settings.get(protocol) or {}
        if not isinstance(given, dict):
            raise UserError(f"settings.{protocol}: expected a mapping such as {{{next(iter(defaults), 'k')}: ...}}, "
                            f"got {given!r}")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise UserError(f"settings.{protocol}: unknown key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(defaults) or '(none)'}")
        out = {**defaults, **given}
        check = PROTOCOLS[protocol].check
        if check:
            check(out)
        return out


def parse_protocols(value: str | list | None) -> list[str] | None:
    """'knn,linear' or a list -> checked names, in the given order."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise UserError(f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(names))


def parse_set(items: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """--set knn.ks=[10,20] --set linear.epochs=10 -> {"knn": {"ks": [10, 20]}, "linear": {"epochs": 10}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        protocol, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--set {item!r}: expected PROTOCOL.KEY=VALUE, such as knn.ks=[10,20] or linear.epochs=10")
        if protocol not in PROTOCOLS:
            raise UserError(f"--set {item!r}: unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        out.setdefault(protocol, {})[name] = yaml.safe_load(value)
    return out


MANIFEST_KEYS = ("data", "datasets", "class_list", "protocols", "seed", "device", "features", "settings", "checkpoints")


def load_manifest(path: str | Path) -> BenchConfig:
    """A YAML manifest (see the module docstring) -> BenchConfig; every key is checked, with one-line errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read manifest {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise UserError(f"manifest {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise UserError(f"manifest {path}: expected a mapping with `checkpoints` (a list), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(MANIFEST_KEYS))
    if unknown:
        raise UserError(f"manifest {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(MANIFEST_KEYS)}")
    items = raw.get("checkpoints")
    if not isinstance(items, list) or not items:
        raise UserError(f"manifest {path}: `checkpoints` must be a non-empty list of entries, each with a `path`")
    base = path.parent
    entries = []
    for i, item in enumerate(items):
        spec = CheckpointSpec.from_dict(item, where=f"manifest {path.name}, checkpoints[{i}]")
        if not Path(spec.path).expanduser().is_absolute():
            spec.path = str(base / Path(spec.path).expanduser())
        entries.append(spec)
    feats = raw.get("features") or {}
    if not isinstance(feats, dict) or set(feats) - set(FEATURE_KEYS):
        bad = sorted(set(feats) - set(FEATURE_KEYS)) if isinstance(feats, dict) else [repr(feats)]
        raise UserError(f"manifest {path}: features: unknown {', '.join(bad)}; valid keys: {', '.join(FEATURE_KEYS)}")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict) or set(settings) - set(PROTOCOLS):
        bad = sorted(set(settings) - set(PROTOCOLS)) if isinstance(settings, dict) else [repr(settings)]
        raise UserError(f"manifest {path}: settings: unknown protocol(s) {', '.join(bad)}; choose from "
                        f"{', '.join(PROTOCOLS)}")
    if "data" in raw and "datasets" in raw:
        raise UserError(f"manifest {path}: give `data` (one data set) or `datasets` (a list), not both")
    listed = raw.get("datasets", [raw["data"]] if raw.get("data") is not None else [])
    if not isinstance(listed, list) or not all(isinstance(d, str) and d for d in listed) or \
            ("datasets" in raw and not listed):
        raise UserError(f"manifest {path}: `datasets` must be a non-empty list of data specs (such as "
                        f"[digits, dtd:/data/dtd]), got {listed!r}")
    cfg = BenchConfig(entries=entries, datasets=[_relative_to(d, base) for d in listed],
                      class_list=raw.get("class_list"),
                      protocols=parse_protocols(raw.get("protocols")) or list(PROTOCOLS),
                      settings=settings, seed=int(raw.get("seed", 0)), device=str(raw.get("device", "auto")))
    for k, v in feats.items():
        setattr(cfg, k, str(base / Path(v).expanduser()) if k == "cache_dir" and v else v)
    return cfg


def _relative_to(data: str | None, base: Path) -> str | None:
    """A data spec whose path is relative is read from the manifest's folder (embedded sets have no path)."""
    if not isinstance(data, str) or data in ("digits", "photos"):
        return data
    kind, sep, rest = data.partition(":")
    # KIND:PATH for every named kind (cifar10:, dtd:, voc2007:, ...); a drive-less path has no such prefix
    with_path = sep and kind.isidentifier() and len(kind) > 1
    prefix, path = (f"{kind}:", rest) if with_path else ("", data)
    p = Path(path).expanduser()
    return prefix + str(p if p.is_absolute() else base / p)


@dataclass(frozen=True)
class Job:
    """One protocol on one checkpoint entry (or, for protocols across checkpoints, on several) and one data set
    (an index into Plan.datasets)."""
    protocol: str
    entries: tuple[int, ...]
    dataset: int
    settings: dict = field(hash=False, compare=False)


@dataclass
class Plan:
    config: BenchConfig
    datasets: list[BenchData | None]  # per data spec of the config; None when it failed to load
    jobs: list[Job]
    entry_ids: list[str | None]  # per entry: digest of its spec and file; None when it failed at planning
    planned_out: list[dict]  # {"checkpoint", "dataset", "protocol", "reason"}: not run, and why
    failures: list[dict]  # {"checkpoint", "dataset", "protocol", "reason"}: entries or data that failed early
    label_tags: list[LabelTag] = field(default_factory=list)  # per entry: what its default label gets

    def common(self, job: Job) -> dict:
        """What a job's result depends on besides its own settings and checkpoints: the data set, the features'
        settings, and the code that computes it (the package's version and the protocol's own, which a fix bumps),
        so that a bench resumed after an upgrade recomputes instead of reusing numbers of the old code."""
        c = self.config
        return {"data": str(self.datasets[job.dataset].spec), "image_size": c.image_size, "precision": c.precision,
                "seed": c.seed, "skip_bad_images": c.skip_bad_images, "code": code_version(job.protocol)}

    def job_id(self, job: Job, entries: tuple[int, ...] | None = None) -> str:
        """Names the job's records: protocol, settings, data set, common settings, code version and each entry's
        digest."""
        ids = [self.entry_ids[i] for i in (job.entries if entries is None else entries)]
        blob = json.dumps([job.protocol, job.settings, self.common(job), ids], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def live_datasets(self) -> list[int]:
        return [k for k, d in enumerate(self.datasets) if d is not None]


def code_version(protocol: str) -> str:
    """`mokd.__version__` and the protocol's implementation version (PROTOCOLS[...].version): "0.1.0/knn.1"."""
    import mokd

    return f"{mokd.__version__}/{protocol}.{PROTOCOLS[protocol].version}"


def entry_name(spec: CheckpointSpec) -> str:
    return spec.label or Path(spec.path).name


LabelTag = tuple[str | None, str | None]  # (tag if the file is ours, tag if it is third-party)


def label_tags(entries: list[CheckpointSpec]) -> list[LabelTag]:
    """Per entry, what its default label gets appended so that no two entries share a label: "#N" (N its place
    in the manifest, from 1) for an entry without a label whose default label another entry's could equal. Our
    training files are labelled by their run (folder) and model, so they clash when the run's name recurs (one
    file read twice, say with two `model`s); third-party files by their stem, so two `*/checkpoint.pth`, or one
    file read with two `key`s, clash. Which of the two applies is known once the file is read, so both are given.
    Derived from the plan alone, so a label (and the record it names) is the same in every run, resumed or not,
    whichever entries that run loads."""
    from mokd.naming import run_name

    stems = [Path(s.path).stem for s in entries]
    runs = [run_name(s.path) for s in entries]
    explicit = {s.label for s in entries if s.label}
    tags: list[LabelTag] = []
    for i, s in enumerate(entries):
        if s.label:
            tags.append((None, None))
            continue
        ours = runs.count(runs[i]) > 1 and sum(r == runs[i] and (e.model, e.branch) == (s.model, s.branch)
                                               for r, e in zip(runs, entries)) > 1
        theirs = stems.count(stems[i]) > 1 or stems[i] in explicit
        tags.append((f"#{i + 1}" if ours else None, f"#{i + 1}" if theirs else None))
    return tags


def make_plan(cfg: BenchConfig, datasets: list[BenchData | None], data_failures: list[dict] | None = None) -> Plan:
    """The jobs of `cfg` on each data set that loaded (None: failed, in `data_failures`). Protocols a data set
    cannot serve (labelled ones without labels; single-label ones on multi-label data) are planned out with the
    reason; an entry whose file cannot be read fails here, alone (the others are planned)."""
    settings = {p: cfg.resolved_settings(p) for p in cfg.protocols}
    labels = [s.label for s in cfg.entries if s.label]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UserError(f"label(s) {', '.join(repr(x) for x in twice)} given to more than one checkpoint: tables, "
                        f"figures and records tell checkpoints apart by label; give each its own")
    entry_ids: list[str | None] = []
    failures = list(data_failures or [])
    for spec in cfg.entries:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            entry_ids.append(None)
            failures.append({"checkpoint": entry_name(spec), "dataset": None, "protocol": None,
                             "reason": f"{path}: no such file (expected a checkpoint file)"})
            continue
        ident = json.dumps([spec.as_dict(), file_sha256(path)], sort_keys=True, default=str)
        entry_ids.append(hashlib.sha256(ident.encode()).hexdigest()[:16])
    live = tuple(i for i, e in enumerate(entry_ids) if e is not None)
    jobs, planned_out = [], []
    for k, data in enumerate(datasets):
        if data is None:
            continue
        for p in cfg.protocols:
            proto = PROTOCOLS[p]
            if proto.needs_labels and not data.labelled:
                planned_out.append({"checkpoint": "all", "dataset": data.name, "protocol": p,
                                    "reason": f"{p} needs class labels and a val split; {data.note}"})
                continue
            if proto.single_label and data.labelled and data.multilabel:
                planned_out.append({"checkpoint": "all", "dataset": data.name, "protocol": p,
                                    "reason": f"{p} needs one class per image; {data.name} has multi-label images "
                                              f"(its protocol is logreg, scored by {data.metric})"})
                continue
            if proto.across_models:  # run over the models that load (a MOKD pair alone gives two)
                jobs.append(Job(p, live, k, settings[p]))
                continue
            jobs += [Job(p, (i,), k, settings[p]) for i in live]
    return Plan(cfg, datasets, jobs, entry_ids, planned_out, failures, label_tags(cfg.entries))


def config_fields() -> list[str]:
    return [f.name for f in fields(BenchConfig)]


def merge_cli(cfg: BenchConfig, **given: Any) -> BenchConfig:
    """Command-line values over the manifest's: only those given (not None)."""
    for k, v in given.items():
        if v is None:
            continue
        if k == "settings":
            for p, s in v.items():
                cfg.settings[p] = {**(cfg.settings.get(p) or {}), **s}
        else:
            setattr(cfg, k, v)
    return cfg
