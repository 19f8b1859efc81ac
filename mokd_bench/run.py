"""Step 2, run: each job of a plan reads features through one shared store and writes its record(s).

Features: every (model, data set) gets a store that asks mokd_eval.features.features_for once per (split, mode)
and keeps the answer for every protocol of the run; features_for reads and writes the on-disk cache, so a second
bench (or a `mokd eval` with the same settings) reads them back. Resuming: a record carries its job's id
(`bench.job`) and how many records the job writes; a job with all of them under OUT/records is skipped, and a
checkpoint whose jobs are all done is not even loaded. Failures: an entry that does not load, a data set that
does not load, or a protocol that raises, is recorded with its one-line reason and the run goes on.

Under torchrun every rank loads the entries and extracts its shard of every feature set the pending jobs read
(`Protocol.needs`; features_for shards and gathers), all of them first; then the other ranks are done and rank 0
alone runs the protocols from those features and writes the records, the status and the report. No rank waits in
a collective while rank 0 computes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from torch import nn

from mokd import distributed as dist
from mokd.checkpoint import seed_everything
from mokd.errors import UserError
from mokd_bench.plan import Job, Plan, entry_name
from mokd_bench.data import BenchData
from mokd_bench.protocols import PROTOCOLS, Inputs, ModelInputs
from mokd_eval.common import precision_for, setup_run
from mokd.models.backbones import is_vit
from mokd_eval.features import LASTN_MODES, effective_mode, features_for
from mokd_eval.linear import effective_blocks, probe_mode
from mokd_eval.records import scan_records, write_record
from mokd_eval.spec import load_spec
from mokd_eval.supervised import default_workers

STATUS = "bench_status.json"  # failures and planned-out jobs of the last run (not a record: `mokd report` skips it)
RECORDS = "records"


@dataclass
class RunResult:
    written: list[Path] = field(default_factory=list)
    reused: int = 0  # jobs whose records were already written
    failures: list[dict] = field(default_factory=list)
    planned_out: list[dict] = field(default_factory=list)
    job_ids: set[str] = field(default_factory=set)  # every job of the plan that has (or now has) its records
    extracted: int = 0  # feature sets computed (not read from the cache)


def completed_jobs(records_dir: Path) -> set[str]:
    """Ids of the jobs all of whose records are under `records_dir`."""
    if not records_dir.is_dir():
        return set()
    counts: dict[str, int] = {}
    need: dict[str, int] = {}
    for r in scan_records(records_dir)[0]:
        b = r.get("bench") or {}
        if isinstance(b, dict) and b.get("job"):
            counts[b["job"]] = counts.get(b["job"], 0) + 1
            need[b["job"]] = int(b.get("n", 1))
    return {j for j, c in counts.items() if c >= need[j]}


def cls_in_lastn(backbone: nn.Module) -> bool:
    """A timm ViT whose embedding (`backbone(x)`, the `cls` features) is its last block's CLS token through the
    final norm: the last block's part of the `lastn` features, which hold each block's normed CLS token."""
    return (is_vit(backbone) and getattr(backbone, "global_pool", None) == "token"
            and getattr(backbone, "attn_pool", None) is None
            and all(isinstance(getattr(backbone, name, None), nn.Identity) for name in ("fc_norm", "head")))


def one_line(e: BaseException) -> str:
    """A failure's reason: a UserError's own line, else the exception's type and first line."""
    from mokd.cli import user_message

    if isinstance(e, UserError):
        return user_message(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _previous_status(out: Path) -> dict:
    try:
        return json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        return {}


class BenchRun:
    """The state of one run: the device, the jobs already done, what has been written or has failed."""

    def __init__(self, plan: Plan, out: Path, log: Callable[[str], None], debug: bool):
        self.plan, self.cfg, self.out, self.log, self.debug = plan, plan.config, out, log, debug
        self.device = setup_run(self.cfg.device, self.cfg.seed)  # joins the torchrun process group, if any
        self.world = dist.world_size()
        self.precision = precision_for(self.cfg.precision, self.device)
        self.done = completed_jobs(out / RECORDS)
        self.res = RunResult(failures=list(plan.failures), planned_out=list(plan.planned_out))
        self.entry_of: dict[int, int] = {}  # id(LoadedModel) -> its manifest entry
        self.labels: dict[str, int] = {}  # label -> entry, of the models loaded in this run
        self.failed_entries: list[str] = []
        self.failed_jobs: set[str] = set()

    def is_done(self, jid: str) -> bool:
        if jid in self.done:
            self.res.job_ids.add(jid)
            self.res.reused += 1
            return True
        return False

    def fail(self, entry: str, protocol: str | None, e: BaseException, dataset: str | None = None) -> None:
        if self.debug:
            raise e
        reason = one_line(e)
        self.res.failures.append({"checkpoint": entry, "dataset": dataset, "protocol": protocol, "reason": reason})
        where = " / ".join(x for x in (entry, dataset, protocol) if x)
        self.log(f"FAILED {where}: {reason}")

    def workers(self, data: BenchData) -> int:
        return default_workers(data.spec.kind) if self.cfg.num_workers is None else self.cfg.num_workers

    def store(self, m, data: BenchData, lastn: tuple[int, bool] | None = None) -> Callable:
        """features(split, mode, n_last_blocks) for LoadedModel `m` on `data`: features_for once per key in this run.

        `lastn` (n_last_blocks, avgpool): the linear probe's ViT features, when the plan has them. A ViT whose
        embedding is its last block's CLS token (`cls_in_lastn`) then takes its `cls` features from those
        columns, so that each split is extracted once for every protocol. Under torchrun each rank extracts
        its shard of `batch_size / world` images a step, as `mokd eval knn` does."""
        memo: dict[tuple, object] = {}
        cfg = self.cfg
        batch = max(1, cfg.batch_size // self.world)

        def features(split: str, mode: str = "cls", n_last_blocks: int = 4):
            mode = effective_mode(m.backbone, mode)
            key = (split, mode, n_last_blocks if mode in LASTN_MODES else None)
            if key in memo:
                return memo[key]
            if mode == "cls" and lastn and cls_in_lastn(m.backbone):
                n = effective_blocks(m.backbone, lastn[0])
                wide = features(split, probe_mode(lastn[1], n), n)
                c = int(m.backbone.num_features)
                memo[key] = replace(wide, bank=wide.features[:, (n - 1) * c:n * c].contiguous(), mode="cls")
                return memo[key]
            fs = features_for(m, data.spec, split, device=self.device, dataset=data.splits[split],
                              batch_size=batch, precision=self.precision, mode=mode,
                              n_last_blocks=n_last_blocks, image_size=cfg.image_size, num_workers=self.workers(data),
                              cache=cfg.cache_dir, use_cache=not cfg.no_cache, log=self.log)
            self.res.extracted += not fs.from_cache
            memo[key] = fs
            return fs
        return features

    def label_models(self, i: int, models: list) -> None:
        """Each model's label, from the plan alone (so the same in every run, resumed or not): the entry's label,
        else the loader's (with the run's name for our pairs when the bench has several entries), with the plan's
        tag for entries whose default labels would coincide (`label_tags`). A clash left (two entries whose
        loaders give the same label from different file names) gets the entry's number, likewise stable."""
        spec = self.cfg.entries[i]
        ours, theirs = self.plan.label_tags[i] if i < len(self.plan.label_tags) else (None, None)
        for m in models:
            tag = ours if m.checkpoint.get("format") in ("mokd", "mokd-official") else theirs
            if spec.label is None and len(self.cfg.entries) > 1 and m.checkpoint.get("format") in ("mokd",
                                                                                                   "mokd-official"):
                m.label = f"{m.checkpoint['run']} {m.label}"  # two pairs would otherwise both be net1-teacher
            if tag:
                m.label = f"{m.label} {tag}"
            if self.labels.get(m.label, i) != i:
                m.label = f"{m.label} #{i + 1}"
            self.labels[m.label] = i
            m.checkpoint["label"] = m.label

    def load(self, i: int) -> list | None:
        """Entry i's models (LoadedModel), each labelled; None (and a failure) if it fails."""
        spec = self.cfg.entries[i]
        try:
            models = load_spec(spec)
        except Exception as e:  # noqa: BLE001 - a bad entry fails alone, with its reason
            self.failed_entries.append(self.plan.entry_ids[i])
            self.fail(entry_name(spec), None, e)
            return None
        self.label_models(i, models)
        for m in models:
            self.entry_of[id(m)] = i
            self.log(f"loaded {m.label}: {m.checkpoint['name']} from {spec.path} [{m.checkpoint['format']}]; "
                     f"{m.report.summary()}")
        return models

    def prefetch(self, job: Job, jid: str, models: list[ModelInputs], name: str) -> bool:
        """Extract (or read from the cache) every feature set `job` reads, on every rank: collective under
        torchrun. False (and the job's failure) when extraction raises."""
        data = self.plan.datasets[job.dataset]
        try:
            for mi in models:
                for split, mode, n in PROTOCOLS[job.protocol].needs(mi.loaded.backbone, job.settings, data):
                    mi.features(split, mode, n)
        except Exception as e:  # noqa: BLE001 - the job fails alone; a data error is the same on every rank
            self.failed_jobs.add(jid)
            self.fail(name, job.protocol, e, data.name)
            return False
        return True

    def run_job(self, job: Job, jid: str, models: list[ModelInputs], name: str) -> None:
        """One job: the protocol on `models`, its records written; a raise is this job's failure alone."""
        if jid in self.failed_jobs:
            return
        data = self.plan.datasets[job.dataset]
        t0 = time.time()
        seed_everything(self.cfg.seed)  # every job starts from the seed, whichever jobs ran before it (resuming)
        inputs = Inputs(models, data, self.device, self.precision, self.cfg.image_size, self.cfg.batch_size,
                        self.cfg.seed, self.log)
        try:
            bodies = PROTOCOLS[job.protocol].run(inputs, job.settings)
        except Exception as e:  # noqa: BLE001
            self.fail(name, job.protocol, e, data.name)
            return
        wall = time.time() - t0
        for b in bodies:
            m = b["model"].loaded
            i = self.entry_of[id(m)]
            ckpt = {**m.checkpoint, "load_report": m.report.as_dict_brief(), "entry": self.cfg.entries[i].as_dict()}
            self.res.written.append(write_record(
                self.out / RECORDS, task=job.protocol, checkpoint=ckpt, data=b["data"], settings=b["settings"],
                metrics=b["metrics"], wall_time_s=wall / len(bodies), device=self.device,
                extra={"bench": {"job": jid, "n": len(bodies), "entry": i, "dataset": data.name,
                                 "code": self.plan.common(job)["code"]}}))
        self.res.job_ids.add(jid)
        self.log(f"{name} / {data.name} / {job.protocol}: {len(bodies)} record(s) in {wall:.1f} s")

    def write_status(self) -> None:
        res = self.res
        datasets = [{"spec": str(d.spec), "name": d.name, "labelled": d.labelled, "metric": d.metric if d.labelled
                     else None} for d in self.plan.datasets if d is not None]
        status = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "datasets": datasets,
                  "data": ", ".join(d["name"] for d in datasets), "protocols": self.cfg.protocols,
                  "jobs": sorted(res.job_ids), "failures": res.failures, "planned_out": res.planned_out,
                  "failed_entries": self.failed_entries, "world_size": self.world,
                  "checkpoints": [s.as_dict() for s in self.cfg.entries]}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STATUS).write_text(json.dumps(status, indent=1, default=str) + "\n")


def _lastn(plan: Plan) -> tuple[int, bool] | None:
    linear = next((j for j in plan.jobs if j.protocol == "linear"), None)
    return (linear.settings["n_last_blocks"], linear.settings["avgpool"]) if linear else None


def run_plan(plan: Plan, out: str | Path, log: Callable[[str], None] = print, debug: bool = False) -> RunResult:
    """Run the jobs of `plan` not done yet, writing records into OUT/records and the run's status into
    OUT/bench_status.json (rank 0). Raises only for what stops every job (the device); entries, data sets and
    jobs fail alone.

    Per-checkpoint jobs run entry by entry (each entry loaded once, if any of its jobs is pending), over every
    data set; jobs across checkpoints (CKA, one per data set) run last, on the models that loaded. Under torchrun
    every rank first extracts the features of every pending job, then rank 0 runs them (see the module
    docstring); the other ranks return an empty result."""
    run = BenchRun(plan, Path(out), log, debug)
    spread = run.world > 1  # extract everything on every rank first, then compute on rank 0 alone
    # Entries that failed to load last time with the same file and spec will again: the cross-model jobs' ids
    # leave them out from the start, so that a finished bench with a broken entry loads nothing on resume.
    failed_before = set(_previous_status(run.out).get("failed_entries") or [])
    live = [i for i, e in enumerate(plan.entry_ids) if e is not None]
    expected = tuple(i for i in live if plan.entry_ids[i] not in failed_before)
    cross = [j for j in plan.jobs if PROTOCOLS[j.protocol].across_models]
    cross_pending = [j for j in cross if not run.is_done(plan.job_id(j, expected))]
    lastn = _lastn(plan)
    loaded: dict[int, dict[int, list[ModelInputs]]] = {}  # entry -> data set -> models with their feature store
    later: list[tuple[Job, str, list[ModelInputs], str]] = []
    for i in live:
        name = entry_name(plan.config.entries[i])
        jobs = [j for j in plan.jobs if j.entries == (i,) and not PROTOCOLS[j.protocol].across_models]
        pending = [(j, plan.job_id(j)) for j in jobs if not run.is_done(plan.job_id(j))]
        if not pending and not cross_pending:
            log(f"{name}: every job already has its records (resumed), not loaded")
            continue
        models = run.load(i)
        if models is None:
            continue
        per_data = {k: [ModelInputs(m, run.store(m, plan.datasets[k], lastn)) for m in models]
                    for k in plan.live_datasets}
        last = {j.dataset: n for n, (j, _) in enumerate(pending)}
        for n, (j, jid) in enumerate(pending):
            if run.prefetch(j, jid, per_data[j.dataset], name) and spread:
                later.append((j, jid, per_data[j.dataset], name))
            elif not spread:
                run.run_job(j, jid, per_data[j.dataset], name)
                if n == last[j.dataset] and not cross_pending:  # its features are no longer needed in memory
                    per_data[j.dataset] = []
        if cross_pending:
            loaded[i] = per_data
        if spread or not cross_pending:  # off the accelerator until a protocol that runs the model moves it back
            for m in models:
                m.backbone.to("cpu")
    cross_runs = []
    for j in cross_pending:
        members = tuple(i for i in j.entries if i in loaded)
        jid = plan.job_id(j, members)
        if jid in run.done:
            run.is_done(jid)
            continue
        models = [mi for i in members for mi in loaded[i][j.dataset]]
        if len(models) < 2:
            run.res.planned_out.append({"checkpoint": "all", "dataset": plan.datasets[j.dataset].name,
                                        "protocol": j.protocol, "reason": f"{j.protocol} compares models: "
                                        f"{len(models)} loaded, two or more needed"})
            continue
        if run.prefetch(j, jid, models, "all"):
            cross_runs.append((j, jid, models, "all"))
    if not dist.is_main():
        return run.res  # this rank's part (its shards of the features) is done; rank 0 computes and writes
    for job in later + cross_runs:
        run.run_job(*job)
    run.write_status()
    return run.res
