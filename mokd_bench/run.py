"""Step 2, run: each job of a plan reads features through one shared store and writes its record(s).

Features: every model gets a store that asks mokd_eval.features.features_for once per (split, mode) and keeps the
answer for every protocol of the run; features_for reads and writes the on-disk cache, so a second bench (or a
`mokd eval` with the same settings) reads them back. Resuming: a record carries its job's id (`bench.job`) and
how many records the job writes; a job with all of them under OUT/records is skipped, and a checkpoint whose
jobs are all done is not even loaded. Failures: an entry that does not load, or a protocol that raises, is
recorded with its one-line reason and the run goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mokd import distributed as dist
from mokd.checkpoint import seed_everything
from mokd.errors import UserError
from mokd_bench.plan import Job, Plan, entry_name
from mokd_bench.protocols import PROTOCOLS, Inputs, ModelInputs
from mokd_eval.common import precision_for, setup_run
from mokd_eval.features import LASTN_MODES, effective_mode, features_for
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


def run_plan(plan: Plan, out: str | Path, log: Callable[[str], None] = print, debug: bool = False) -> RunResult:
    """Run the jobs of `plan` not done yet, writing records into OUT/records and the run's status into
    OUT/bench_status.json. Raises only for what stops every job (the device); entries and jobs fail alone."""
    cfg, data = plan.config, plan.data
    out = Path(out)
    records_dir = out / RECORDS
    if dist.world_size() > 1:
        raise UserError("mokd bench runs in one process (each protocol of `mokd eval` runs under torchrun)")
    device = setup_run(cfg.device, cfg.seed)
    precision = precision_for(cfg.precision, device)
    num_workers = default_workers(data.spec.kind) if cfg.num_workers is None else cfg.num_workers
    done = completed_jobs(records_dir)
    res = RunResult(failures=list(plan.failures), planned_out=list(plan.planned_out))

    def fail(entry: str, protocol: str | None, e: BaseException) -> None:
        if debug:
            raise e
        reason = one_line(e)
        res.failures.append({"checkpoint": entry, "protocol": protocol, "reason": reason})
        log(f"FAILED {entry}{' / ' + protocol if protocol else ''}: {reason}")

    def store(m) -> Callable:
        memo: dict[tuple, object] = {}

        def features(split: str, mode: str = "cls", n_last_blocks: int = 4):
            mode = effective_mode(m.backbone, mode)
            key = (split, mode, n_last_blocks if mode in LASTN_MODES else None)
            if key not in memo:
                fs = features_for(m, data.spec, split, device=device, dataset=data.splits[split],
                                  batch_size=cfg.batch_size, precision=precision, mode=mode,
                                  n_last_blocks=n_last_blocks, image_size=cfg.image_size, num_workers=num_workers,
                                  cache=cfg.cache_dir, use_cache=not cfg.no_cache, log=log)
                res.extracted += not fs.from_cache
                memo[key] = fs
            return memo[key]
        return features

    def write(job: Job, jid: str, bodies: list[dict], entry_of: dict[int, int], wall: float) -> None:
        for b in bodies:
            m = b["model"].loaded
            i = entry_of[id(b["model"])]
            ckpt = {**m.checkpoint, "load_report": m.report.as_dict_brief(), "entry": cfg.entries[i].as_dict()}
            path = write_record(records_dir, task=job.protocol, checkpoint=ckpt, data=b["data"],
                                settings=b["settings"], metrics=b["metrics"], wall_time_s=wall / len(bodies),
                                device=device, extra={"bench": {"job": jid, "n": len(bodies), "entry": i}})
            res.written.append(path)

    def inputs(models: list[ModelInputs]) -> Inputs:
        seed_everything(cfg.seed)  # every job starts from the seed, whichever jobs ran before it (resuming)
        return Inputs(models, data, device, precision, cfg.image_size, cfg.batch_size, cfg.seed, log)

    # Entries that failed to load last time with the same file and spec will again: the cross-model jobs' ids
    # leave them out from the start, so that a finished bench with a broken entry loads nothing on resume.
    failed_before = set(_previous_status(out).get("failed_entries") or [])
    live = [i for i, e in enumerate(plan.entry_ids) if e is not None]
    expected = tuple(i for i in live if plan.entry_ids[i] not in failed_before)
    cross = [j for j in plan.jobs if PROTOCOLS[j.protocol].across_models]
    cross_pending = []
    for j in cross:
        jid = plan.job_id(j, expected)
        if jid in done:
            res.job_ids.add(jid)
            res.reused += 1
        else:
            cross_pending.append(j)
    loaded: dict[int, list[ModelInputs]] = {}
    entry_of: dict[int, int] = {}
    failed_entries, labels_used = [], set()
    for i in live:
        spec, name = cfg.entries[i], entry_name(cfg.entries[i])
        pending = []
        for j in (j for j in plan.jobs if j.entries == (i,) and not PROTOCOLS[j.protocol].across_models):
            jid = plan.job_id(j)
            if jid in done:
                res.job_ids.add(jid)
                res.reused += 1
            else:
                pending.append((j, jid))
        if not pending and not cross_pending:
            log(f"{name}: every job already has its records (resumed), not loaded")
            continue
        try:
            models = load_spec(spec)
        except Exception as e:  # noqa: BLE001 - a bad entry fails alone, with its reason
            failed_entries.append(plan.entry_ids[i])
            fail(name, None, e)
            continue
        for m in models:
            if spec.label is None and len(cfg.entries) > 1 and m.checkpoint.get("format") in ("mokd", "mokd-official"):
                m.label = f"{m.checkpoint['run']} {m.label}"  # two pairs would otherwise both be net1-teacher
            base, k = m.label, 2
            while m.label in labels_used:
                m.label, k = f"{base} #{k}", k + 1
            labels_used.add(m.label)
            m.checkpoint["label"] = m.label
            log(f"loaded {m.label}: {m.checkpoint['name']} from {spec.path} [{m.checkpoint['format']}]; "
                f"{m.report.summary()}")
        mis = [ModelInputs(m, store(m)) for m in models]
        entry_of.update({id(mi): i for mi in mis})
        for j, jid in pending:
            t0 = time.time()
            try:
                bodies = PROTOCOLS[j.protocol].run(inputs(mis), j.settings)
            except Exception as e:  # noqa: BLE001
                fail(name, j.protocol, e)
                continue
            write(j, jid, bodies, entry_of, time.time() - t0)
            res.job_ids.add(jid)
            log(f"{name} / {j.protocol}: {len(bodies)} record(s) in {time.time() - t0:.1f} s")
        if cross_pending:
            loaded[i] = mis
        else:
            for mi in mis:
                mi.loaded.backbone.to("cpu")
    for j in cross_pending:
        members = tuple(i for i in j.entries if i in loaded)
        jid = plan.job_id(j, members)
        res.job_ids.add(jid)
        if jid in done:
            res.reused += 1
            continue
        models = [mi for i in members for mi in loaded[i]]
        if len(models) < 2:
            res.planned_out.append({"checkpoint": "all", "protocol": j.protocol,
                                    "reason": f"{j.protocol} compares models: {len(models)} loaded, two or more needed"})
            continue
        t0 = time.time()
        try:
            bodies = PROTOCOLS[j.protocol].run(inputs(models), j.settings)
        except Exception as e:  # noqa: BLE001
            fail("all", j.protocol, e)
            continue
        write(j, jid, bodies, entry_of, time.time() - t0)
        log(f"{j.protocol} across {len(models)} models: {len(bodies)} record(s) in {time.time() - t0:.1f} s")
    status = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": str(data.spec),
              "labelled": data.labelled, "protocols": cfg.protocols, "jobs": sorted(res.job_ids),
              "failures": res.failures, "planned_out": res.planned_out, "failed_entries": failed_entries,
              "checkpoints": [s.as_dict() for s in cfg.entries]}
    out.mkdir(parents=True, exist_ok=True)
    (out / STATUS).write_text(json.dumps(status, indent=1, default=str) + "\n")
    return res
