"""Stopping cleanly: SIGTERM, SIGUSR1 and ``train.max_minutes`` end training at a step boundary that
every rank agrees on; the trainer then saves and the process exits with `EXIT_REQUEUE`.

- SIGTERM: what Slurm (preemption, ``scontrol requeue``, ``scancel``), torchrun and Kubernetes send
  before SIGKILL. SIGUSR1: Slurm's ``--signal=USR1@T`` time-limit warning. A handler only sets a
  flag; the current step finishes.
- A signal may reach only some ranks (a node's tasks, one process): every ``check_every`` steps
  (`CHECK_EVERY`, counted from the loop's start, identical on every rank) the ranks all-reduce
  (MAX) one small integer and read it, so all stop after the same step. The read is a host sync
  on a GPU (the stream drains): once every few steps, not every step (issue 23); a stop then
  reacts up to ``check_every - 1`` steps later. In training the step guard (train/guard.py) must
  agree before every optimizer update whether the step is finite; that one all-reduce and read per
  step carries the stop code too (`StopRequest.agree`), so the trainer stops after the very step.
- ``train.max_minutes``: stops when the steps until the next check would end past the limit.

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
CHECK_EVERY = 4  # steps between stop checks: a host read per check (module docstring)
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
    a `SignalGuard` (the CLI) it reads the guard's flag instead, and `close` leaves the guard's handlers.

    ``save_due`` (rank 0's clock: checkpoint.every_minutes) and ``data_error`` (the loader could not
    read the next step's batch: one line naming the shard) are asked at each agreement; after it
    `self.save_due` and `self.data_error` hold the agreed answers, identical on every rank."""

    def __init__(
        self,
        dims: ParallelDims,
        max_minutes: float = 0.0,
        check_every: int = CHECK_EVERY,
        save_due=lambda: False,
        data_error=lambda: None,
    ):
        self.dims = dims
        self.check_every = max(1, check_every)
        self._checks = 0
        self.deadline = time.monotonic() + max_minutes * 60.0 if max_minutes > 0 else None
        self._own: int | None = None
        self._guard = SignalGuard.active
        self._ask_save, self._ask_error = save_due, data_error
        self.save_due = False
        self.data_error: str | None = None
        self._last_check = time.monotonic()
        self._agreed: list[str | None] = []  # the reason `agree` settled within the step, for should_stop
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

    def should_stop(self) -> str | None:
        """Collective (every rank calls it after every step): the reason to stop, identical on all
        ranks, or None. Precedence when ranks differ: unreadable data > SIGTERM > SIGUSR1 > time
        limit. In the trainer the step guard's `agree` (every step, before the update) has settled
        it already; without one, every ``check_every``-th call all-reduces and reads."""
        if self._agreed:  # settled by `agree` inside the step (train/guard.py): no second collective
            return self._agreed.pop()
        self._checks += 1
        self.save_due = False
        if self._checks % self.check_every:
            return None
        now = time.monotonic()
        step_seconds, self._last_check = (now - self._last_check) / self.check_every, now
        # Until the next check: check_every more steps (a first check counts the start-up in).
        return self._reduce(self._local_code(step_seconds * self.check_every), torch.zeros(0, dtype=torch.int32))[0]

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """The stop agreement, taken inside the step (before its optimizer update) and carrying
        ``flags`` (int32, e.g. the step guard's non-finite flags, train/guard.py) in the same
        all-reduce (MAX): one collective and one host read per step for both. Returns the reduced
        flags; the next `should_stop` returns the agreed reason without communicating."""
        now = time.monotonic()
        step_seconds, self._last_check = now - self._last_check, now
        reason, flags = self._reduce(self._local_code(step_seconds), flags)
        self._agreed = [reason]
        return flags

    def agree_on_data(self) -> str | None:
        """Collective, before the first step (its batches read ahead, ``data_error``): "unreadable
        data" on every rank if any rank cannot read its first batches, else None. Signals and the
        time limit wait for the first step's agreement, as before."""
        return self._reduce(0, torch.zeros(0, dtype=torch.int32))[0]

    def _reduce(self, code: int, flags: torch.Tensor) -> tuple[str | None, torch.Tensor]:
        data_error = self._ask_error()
        code = 4 if data_error is not None else code
        device = comm_device(self.dims.dp_group) if self.dims.distributed else flags.device
        head = torch.tensor([code, int(self._ask_save())], dtype=torch.int32, device=device)
        both = torch.cat([head, flags.to(device, torch.int32).reshape(-1)])
        if self.dims.distributed:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.dims.dp_group)
        values = both.tolist()
        code, self.save_due = values[0], bool(values[1])
        if code == 4 and self.dims.distributed:  # rare: which rank saw which shard
            errors = [None] * self.dims.world_size
            dist.all_gather_object(errors, data_error, group=self.dims.dp_group)
            data_error = next(e for e in errors if e)
        self.data_error = data_error if code == 4 else None
        return _REASONS[code], torch.tensor(values[2:], dtype=torch.int32)

    def raise_data_error(self, step: int) -> None:
        """After the stop save: an unreadable shard ends the run (exit 1, no requeue: it would fail again)."""
        if self.data_error is not None:
            from diffmoe_dist.data.tar_index import ShardError

            raise ShardError(f"{self.data_error} (stopped at step {step}, checkpoint saved: fix the shard and resume)")

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
