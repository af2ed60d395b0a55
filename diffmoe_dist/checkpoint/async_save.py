"""Saves that do not stop training: the step waits only for the copy of this rank's share to host
memory (`io.snapshot`); writing, fsync, the sha256 read-back, the manifest, the atomic rename,
``latest`` and retention (`io.write_snapshot`) run in a thread beside the next steps.

- One save at a time: the next save, and a stop or the end of the run, first wait for the one in
  flight (`wait`), so a preempted run still ends with a verified checkpoint of its stop step, and
  never with two writers in one run directory.
- The writer's collectives (gather of the index, the agreement on errors, the closing barrier) run
  over a gloo group of its own, created by every rank at the first asynchronous save (itself a
  collective point): they never interleave with the training step's collectives on the DP group.
- A failed background save raises its (agreed, identical) CheckpointError on every rank at the
  next `wait`: the next save, the stop or the end of the run.
- Host memory: one extra copy of the rank's share (about 1/W of model and EMA, plus the rank's
  optimizer fragments) while a save is in flight.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch.distributed as dist

from diffmoe_dist.checkpoint.io import snapshot_or_error, write_snapshot
from diffmoe_dist.checkpoint.layout import Slot, step_dir
from diffmoe_dist.parallel.groups import ParallelDims


class AsyncSaver:
    def __init__(self, dims: ParallelDims | None):
        self.dims = dims
        self._writer_dims: ParallelDims | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.started = time.monotonic()  # of the last save (checkpoint.every_minutes counts from here)
        self.blocked_seconds = 0.0  # the last save's wait for the previous one plus its snapshot

    def _dims_for_writer(self) -> ParallelDims | None:
        if self.dims is None or not self.dims.distributed:
            return self.dims
        if self._writer_dims is None:
            ranks = dist.get_process_group_ranks(self.dims.dp_group)
            group = dist.new_group(ranks=ranks, backend="gloo")
            self._writer_dims = dataclasses.replace(self.dims, dp_group=group)
        return self._writer_dims

    def save(
        self,
        root: str,
        step: int,
        slots: list[Slot],
        meta: dict,
        rank_state: dict,
        keep_last: int = 2,
        run_id: str | None = None,
        log=print,
        blocking: bool = True,
    ) -> str:
        """Collective. Returns the step directory the save will have; ``blocking``: written once it returns."""
        t0 = time.monotonic()
        self.wait()
        self.started = time.monotonic()
        args = (root, step, snapshot_or_error(slots, self.dims), meta, rank_state)
        if blocking:
            path = write_snapshot(*args, self.dims, keep_last, run_id, log)
            self.blocked_seconds = time.monotonic() - t0
            return path
        writer_dims = self._dims_for_writer()

        def run() -> None:
            try:
                write_snapshot(*args, writer_dims, keep_last, run_id, log)
            except BaseException as exc:  # noqa: BLE001 - raised by `wait` in the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()
        self.blocked_seconds = time.monotonic() - t0
        return step_dir(root, step)

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is written; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def minutes_due(self, every_minutes: float) -> bool:
        """Whether ``checkpoint.every_minutes`` passed since the last save started (rank 0 decides;
        the trainer shares the verdict in the stop check's all-reduce)."""
        return every_minutes > 0 and time.monotonic() - self.started >= 60.0 * every_minutes
