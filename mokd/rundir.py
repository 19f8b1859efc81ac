"""The run folder (`--out`): who may write it, when a run in it may be started over, what a resume reads.

- A folder that holds a run (config.yaml, log.jsonl, last.pth, checkpoint_NNNN.pth) is continued with
  --resume or started over with --overwrite; anything else is refused before a file changes.
- One process owns a folder at a time: it holds an exclusive POSIX record lock on OUT/.lock, with its pid
  and host written in. The lock is the process's own (its forked loader workers do not hold it) and the
  kernel drops it when the process dies however it dies, so a lock file left by a killed run is recognised
  as stale and taken over.
- The owner removes temporary files that a killed atomic write left behind.
- A resume starts from the newest checkpoint that reads back: last.pth, or a numbered one when last.pth is
  damaged or older (a kill between the two writes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from mokd.checkpoint import TEMP_GLOB
from mokd.errors import UserError

LAST = "last.pth"
RUN_FILES = ("config.yaml", "log.jsonl", LAST)
NUMBERED = "checkpoint_*.pth"
LOCK = ".lock"


def numbered_checkpoints(out: Path) -> list[Path]:
    """checkpoint_NNNN.pth files, newest (highest epoch) first."""
    found = [p for p in out.glob(NUMBERED) if p.stem.split("_")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("_")[-1]), reverse=True)


def run_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return [n for n in RUN_FILES if (out / n).exists()] + [p.name for p in numbered_checkpoints(out)]


def holds_run(out: Path) -> bool:
    """A checkpoint (readable or not), or a log with a training step in it: what a start must not replace.

    A start that stopped before its first step (an unreadable image, a bad setting) leaves config.yaml and
    perhaps a log without steps; that is not a run, and its own rerun must not be refused."""
    if (out / LAST).exists() or numbered_checkpoints(out):
        return True
    log = out / "log.jsonl"
    if not log.is_file():
        return False
    with open(log, errors="replace") as f:
        for ln in f:
            try:
                record = json.loads(ln)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("type") in ("step", "epoch"):
                return True
    return False


def clear_failed_start(out: Path) -> list[str]:
    """Delete what a start that trained no step left (its config.yaml and log), so the rerun starts clean."""
    if holds_run(out):
        return []
    removed = run_files(out)
    for name in removed:
        (out / name).unlink()
    return removed


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run by accident (read-only)."""
    present = run_files(out)
    if present and not resume and not overwrite and holds_run(out):
        shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
        raise UserError(f"{out} already holds a run ({shown}); nothing was changed. Continue it with --resume, "
                        f"start it over with --overwrite (deletes its checkpoints and log), or choose another --out")


def make_writable(out: Path) -> None:
    """Create --out and prove a file can be written there (root ignores permission bits, so try it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}. Choose a folder you can write to") from e


def clear_run(out: Path) -> list[str]:
    """--overwrite: delete the run's files (and only those)."""
    removed = run_files(out)
    for name in removed:
        (out / name).unlink()
    if (out / "tensorboard").is_dir():  # train.loggers: [jsonl, tensorboard]
        shutil.rmtree(out / "tensorboard")
        removed.append("tensorboard/")
    return removed


def clean_temp_files(out: Path) -> int:
    """Remove what killed atomic writes left (call only while holding the lock: no other writer exists)."""
    n = 0
    for p in out.glob(TEMP_GLOB):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _owner_text(raw: str) -> str:
    try:
        o = json.loads(raw)
        return f"pid {o['pid']} on host {o['host']}, started {o['started']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


# Run folders this process holds (POSIX locks do not exclude their own process: this does).
_HELD: set[str] = set()
WAIT_S = 5.0  # how long a start waits for a held lock to go before it says what holds it


class RunLock:
    """An exclusive lock on OUT/.lock for the life of this process (released by release() or by its death).

    A POSIX record lock (fcntl F_SETLK, via lockf), not flock: flock belongs to the open file description,
    which forked DataLoader workers share, so workers orphaned by a kill -9 kept the folder locked after their
    parent was gone. A record lock belongs to the process that took it; a fork does not inherit it, and the
    kernel drops it when that process dies. The one catch: closing ANY descriptor of the lock file in the
    owning process drops it, so nothing else here opens OUT/.lock while the lock is held.
    """

    def __init__(self, out: Path):
        self.path, self.fd = out / LOCK, None

    def acquire(self, wait_s: float | None = None) -> str | None:
        """Take the lock; returns a note when it took over a stale lock. A held lock is retried for `wait_s`
        seconds (WAIT_S; a run that was just killed may still be going away), then UserError says what holds it."""
        import fcntl

        key = os.path.realpath(self.path)
        if key in _HELD:
            raise UserError(f"{self.path.parent} is in use by another mokd train (pid {os.getpid()}, this process); "
                            f"two runs cannot write one folder. Wait for it to end, stop it, or choose another --out")
        deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raw, holder = os.pread(fd, 4096, 0).decode(errors="replace"), _lock_holder(fd)
                    os.close(fd)  # (we hold no lock on it: closing drops nothing)
                    if time.monotonic() < deadline:
                        time.sleep(0.25)
                        continue
                    owner = _owner_text(raw)
                    if holder and f"pid {holder} " not in owner + " ":
                        owner += f"; the lock itself is held by pid {holder}"
                    raise UserError(f"{self.path.parent} is in use by another mokd train ({owner}; still held after "
                                    f"{WAIT_S if wait_s is None else wait_s:g} s); two runs cannot write one folder. "
                                    f"Wait for it to end, stop it, or choose another --out") from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                return self._acquire_without_flock(fd)
            try:  # the previous owner unlinks the file as it ends: make sure ours is still the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        self._write_owner(fd)
        self.fd = fd
        _HELD.add(key)
        if previous:
            return f"took over a stale lock ({_owner_text(previous)}; that process is gone)"
        return None

    def _acquire_without_flock(self, fd: int) -> str | None:
        """File systems without locks (some Lustre mounts): trust the pid when it is on this host."""
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        note = None
        if previous:
            try:
                o = json.loads(previous)
                pid, host = int(o["pid"]), str(o["host"])
            except (ValueError, KeyError, TypeError):
                pid, host = -1, ""
            if host == socket.gethostname() and pid != os.getpid() and _alive(pid):
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another mokd train ({_owner_text(previous)}); "
                                f"wait for it to end, stop it, or choose another --out")
            if host and host != socket.gethostname():
                os.close(fd)
                raise UserError(f"{self.path.parent} may be in use by a mokd train on another host "
                                f"({_owner_text(previous)}) and this file system has no locks to tell; if that "
                                f"run is over, delete {self.path}")
            note = f"took over a stale lock ({_owner_text(previous)}; that process is gone)"
        self._write_owner(fd)
        self.fd = fd
        _HELD.add(os.path.realpath(self.path))
        return note

    @staticmethod
    def _write_owner(fd: int) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.discard(os.path.realpath(self.path))
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a POSIX lock on fd's file (F_GETLK), None when unknown (or on another NFS client)."""
    import fcntl
    import struct

    try:  # struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t)
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except (OSError, struct.error):
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UnusableCheckpoint(UserError):
    """A checkpoint that does not read back or is damaged; a resume falls back past it."""


class NonFiniteCheckpoint(UnusableCheckpoint):
    """A checkpoint whose weights or optimiser state hold NaN/inf: resuming it would train on them."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def find_resume_checkpoint(out: Path, read: Callable[[Path], dict]) -> tuple[Path, dict, list[str]] | None:
    """The newest checkpoint of the run in `out` that `read` accepts, with notes on what was passed over.

    `read(path)` returns the checkpoint or raises UnusableCheckpoint (any other UserError, e.g. a config that
    builds a different model, stops the search: it would stop every file alike). None when there is nothing.
    A newest state with NaN/inf in it (NonFiniteCheckpoint) is refused, naming the newest clean checkpoint:
    falling back past it without being asked would lose epochs and meet the same divergence again.
    """
    notes, failures, poisoned = [], [], []
    best: tuple[Path, dict] | None = None
    last = out / LAST
    if last.exists():
        try:
            best = (last, read(last))
        except NonFiniteCheckpoint as e:
            poisoned.append((last, e))
        except UnusableCheckpoint as e:
            failures.append(str(e))
    for p in numbered_checkpoints(out):
        number = int(p.stem.split("_")[-1])
        if best is not None and number <= int(best[1]["epoch"]):
            break
        try:
            ckpt = read(p)
        except NonFiniteCheckpoint as e:
            poisoned.append((p, e))
            continue
        except UnusableCheckpoint as e:
            failures.append(str(e))
            continue
        if best is not None:
            notes.append(f"{p.name} (epoch {number}) is newer than {LAST} (a save was cut off between them)")
        best = (p, ckpt)
        break
    newer = [(p, e) for p, e in poisoned if best is None or e.step > int(best[1]["step"])]
    notes += [f"{e}; passing over it for {best[0].name} ({describe(best[1])})" for p, e in poisoned
              if (p, e) not in newer]
    if newer:
        clean = (f"the newest clean checkpoint is {best[0]} ({describe(best[1])}): move "
                 f"{', '.join(str(p) for p, _ in newer)} aside and --resume continues from it"
                 if best is not None else f"no checkpoint in {out} is clean: start over with --overwrite")
        raise UserError(f"--resume: {newer[0][1]}; {clean}. Lower the learning rate or use optim.precision=fp32 "
                        f"first, or the run may diverge again")
    if best is None:
        if failures:
            raise UserError(f"--resume: no checkpoint in {out} reads back ({'; '.join(failures)}). Start over "
                            f"with --overwrite, or put a good checkpoint back as {last}")
        return None
    if failures:
        notes.insert(0, f"{failures[0]}; passing over it")
    return best[0], best[1], notes


def roll_back(out: Path, source: Path, epoch: int) -> tuple[Path | None, list[str]]:
    """--resume-from: make `source` (a checkpoint after `epoch` completed epochs) the run's newest state.

    last.pth (unless it is `source`) and the numbered checkpoints past `epoch` move into OUT/rolled-back-TIME/
    (kept, not deleted), and a copy of `source` becomes last.pth: a later plain resume, which picks the newest
    checkpoint, continues the rolled-back run instead of the abandoned one. Returns (that folder, moved names).
    """
    from mokd.checkpoint import write_atomic

    last = out / LAST
    is_last = last.exists() and os.path.samefile(source, last)
    newer = [p for p in numbered_checkpoints(out)
             if int(p.stem.split("_")[-1]) > epoch and not os.path.samefile(p, source)]
    if last.exists() and not is_last:
        newer.append(last)
    aside = out / time.strftime("rolled-back-%Y%m%d-%H%M%S") if newer else None
    if aside is not None:
        aside.mkdir(exist_ok=True)
        for p in newer:
            p.rename(aside / p.name)
    if not is_last:
        write_atomic(last, lambda tmp: shutil.copyfile(source, tmp), size_hint=source.stat().st_size)
    return aside, [p.name for p in newer]


def describe(ckpt: dict[str, Any]) -> str:
    part = ckpt.get("partial_epoch")
    if part:
        return f"step {ckpt['step']}, batch {part['batches']} of {part['of']} in epoch {int(ckpt['epoch']) + 1}"
    return f"after epoch {ckpt['epoch']}"
