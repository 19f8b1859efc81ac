"""Preemption as a normal event: SIGTERM (what SLURM and Kubernetes send), SIGINT (Ctrl-C) and SIGUSR1
(SLURM's `--signal` requeue pattern) ask the trainer to finish its current step, save a resumable
checkpoint and exit; `--resume` continues from it exactly.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class StopRequest:
    """Records the first stop signal; `requested()` is the same answer on every rank."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook worker thread)
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without a checkpoint
        self.signum = signum
        print(f"\ncaught {signal.Signals(signum).name}: saving a checkpoint after this step "
              f"({_at_once(signum)})", file=sys.stderr, flush=True)

    def requested(self, device: torch.device) -> bool:
        """True once any rank got a stop signal (all ranks must stop after the same step)."""
        from mokd import distributed

        if not distributed.is_enabled():
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None


def _at_once(signum: int) -> str:
    """How to stop at once, for the signal received: only a second Ctrl-C is handled as 'now'."""
    if signum == signal.SIGINT:
        return "Ctrl-C again stops at once, without one"
    name = signal.Signals(signum).name
    return f"a second {name} changes nothing; SIGKILL stops at once, without one"


class StoppedBySignal(Exception):
    """Training stopped on a signal after saving a resumable checkpoint; exit status 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the main process decides when to stop; a worker killed by the same SIGTERM
    or Ctrl-C would fail the batch that the checkpoint is waiting for."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
