"""Stopping cleanly: SIGTERM, SIGUSR1 and ``train.max_minutes`` end training at a step boundary that
every rank agrees on; the trainer then saves and the process exits with `EXIT_REQUEUE`.

- SIGTERM: what Slurm (preemption, ``scontrol requeue``, ``scancel``), torchrun and Kubernetes send
  before SIGKILL. SIGUSR1: Slurm's ``--signal=USR1@T`` time-limit warning. A handler only sets a
  flag; the current step finishes.
- A signal may reach only some ranks (a node's tasks, one process): after every step the ranks
  all-reduce (MAX) one small integer, so all stop after the same step. The cost is one 4-byte
  all-reduce per step (``check_every`` > 1 makes it rarer and the reaction slower).
- ``train.max_minutes``: stops when the next step would end past the limit.

The exit status 75 (sysexits.h EX_TEMPFAIL, "try again") is what ``launchers/common.sh``
(``DIFFMOE_EXIT_REQUEUE``) takes as "checkpoint saved, requeue me".

Signals stay caught until the process ends: `diffmoe-train` holds a `SignalGuard` around the whole
run (training, the stop or final save, sampling, the process group's teardown), so a late SIGTERM
or USR1 - Slurm's TERM after a USR1, a signal reaching one node after the other, a time-limit
warning after the last step - only sets the flag: it can neither kill a save nor turn a finished
(exit 0) or stopped (exit 75) run into a crash. The handlers are then set to ignore, not restored
to the default (CPython's finalisation resets Python handlers to the default; an ignore stays).
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from diffmoe_dist.parallel.groups import ParallelDims, comm_device

EXIT_REQUEUE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_REASONS = {0: None, 1: "time limit (train.max_minutes)", 2: "SIGUSR1", 3: "SIGTERM", 4: "unreadable data"}


class SignalGuard:
    """From enter to exit SIGTERM and SIGUSR1 only record themselves (main thread only); at exit the
    handlers become SIG_IGN (``ignore_after``, for a process that is ending) or the previous ones."""

    active: SignalGuard | None = None

    def __init__(self, ignore_after: bool = True):
        self.ignore_after = ignore_after
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received != signal.SIGTERM:  # SIGTERM (preemption, requeue) outranks a USR1 warning
            self.received = signum

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        SignalGuard.active = self
        return self

    def __exit__(self, *exc) -> None:
        SignalGuard.active = None
        for sig, handler in self._previous.items():
            if self.ignore_after or handler is None:
                handler = signal.SIG_IGN if self.ignore_after else signal.SIG_DFL
            signal.signal(sig, handler)
        self._previous = {}


class StopRequest:
    """Installs the handlers on construction (main thread only) and restores them on `close`; inside
    a `SignalGuard` (the CLI) it reads the guard's flag instead, and `close` leaves the guard's handlers."""

    def __init__(self, dims: ParallelDims, max_minutes: float = 0.0, check_every: int = 1):
        self.dims = dims
        self.deadline = time.monotonic() + max_minutes * 60.0 if max_minutes > 0 else None
        self.check_every = max(1, check_every)
        self._own: int | None = None
        self._guard = SignalGuard.active
        self._checks = 0
        self.save_due = False
        self.data_error: str | None = None
        self._last_check = time.monotonic()
        self._previous = {}
        if self._guard is None and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def received(self) -> int | None:
        return self._guard.received if self._guard is not None else self._own

    def _handle(self, signum, frame) -> None:
        if self._own != signal.SIGTERM:
            self._own = signum

    def _local_code(self, step_seconds: float) -> int:
        if self.received == signal.SIGTERM:
            return 3
        if self.received == signal.SIGUSR1:
            return 2
        if self.deadline is not None and time.monotonic() + step_seconds >= self.deadline:
            return 1
        return 0

    def should_stop(self, save_due: bool = False, data_error: str | None = None) -> str | None:
        """Collective (every rank calls it after every step): the reason to stop, identical on
        all ranks, or None. Precedence when ranks differ: unreadable data > SIGTERM > SIGUSR1 > time
        limit. ``save_due`` (one rank's clock: checkpoint.every_minutes) rides in the same all-reduce:
        afterwards `self.save_due` says, identically on every rank, whether any rank asked.
        ``data_error``: the loader could not read the next step's batch (one line naming the shard);
        every rank stops, and `self.data_error` holds that line on every rank (`raise_data_error`)."""
        now = time.monotonic()
        step_seconds, self._last_check = now - self._last_check, now
        self._checks += 1
        self.save_due = False
        if self._checks % self.check_every and data_error is None:
            return None
        code = 4 if data_error is not None else self._local_code(step_seconds)
        due = int(save_due)
        if self.dims.distributed:
            flag = torch.tensor([code, due], dtype=torch.int32, device=comm_device(self.dims.dp_group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dims.dp_group)
            code, due = (int(v) for v in flag.tolist())
            if code == 4:  # rare: which rank saw which shard
                errors = [None] * self.dims.world_size
                dist.all_gather_object(errors, data_error, group=self.dims.dp_group)
                data_error = next(e for e in errors if e)
        self.save_due = bool(due)
        self.data_error = data_error if code == 4 else None
        return _REASONS[code]

    def raise_data_error(self, step: int) -> None:
        """After the stop save: an unreadable shard ends the run (exit 1, no requeue: it would fail again)."""
        if self.data_error is not None:
            from diffmoe_dist.data.tar_index import ShardError

            raise ShardError(f"{self.data_error} (stopped at step {step}, checkpoint saved: fix the shard and resume)")

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
