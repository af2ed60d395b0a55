"""A step whose loss or gradients are not finite is skipped, never trained on, saved or kept.

How every rank learns it, with no collective and no host read of its own:

- The loss enters backward multiplied by ``where(isfinite(loss), 1, nan)``: bitwise the same loss
  and gradients when it is finite, NaN gradients on every parameter when it is not. So "the loss
  or any gradient is non-finite" is one fact: the reduced gradient is non-finite, on every rank
  (dense gradients are all-reduced over DP, the norm's expert part over the EP group).
- Plain engine: ``isfinite`` of the global gradient norm (computed on the device for clipping
  anyway) travels in the stop flag's all-reduce (`StopRequest.agree`, train/preemption.py), the
  one small collective and host read a step already had. DeepSpeed ZeRO checks the same itself
  (its fp32 optimizer's overflow test, an all-reduce and host read inside ``step``) and skips the
  update; the guard reads its verdict.
- A skipped step changes no weight, optimizer state, EMA, threshold, scheduler or step count; the
  RNG streams go back to where the step began, so the run equals one whose data never held that
  batch. It is logged with its step and what was non-finite (the loss somewhere, or only gradients).
- ``train.max_skipped_steps`` skips in a row raise `NonFiniteError` (diffmoe-train: one line,
  exit 3, which no launcher requeues). `check_state_finite` refuses a save of non-finite weights
  or EMA, so no kept checkpoint is poisoned and retention can only drop older finite ones.

Fault injection: ``DIFFMOE_INJECT_NAN=STEP[,STEP...][@RANK]`` makes the loss of the next attempt
at each listed step (1-based, the step being taken) NaN, on every rank or on ``RANK`` only; a step
listed twice fails twice in a row. A way to see the guard work on a real run (tests/test_guard.py).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from diffmoe_dist.config import ConfigError
from diffmoe_dist.parallel.groups import ParallelDims, comm_device

INJECT_ENV = "DIFFMOE_INJECT_NAN"
EXIT_NON_FINITE = 3  # not EXIT_REQUEUE (75): a rerun would hit the same step


class NonFiniteError(RuntimeError):
    """The run cannot go on (or save) with finite numbers; one line."""


def parse_injection(text: str) -> tuple[list[int], int | None]:
    """``"3"``, ``"3,5"``, ``"3@1"`` -> (steps, rank or None); a ConfigError naming the variable."""
    steps, _, rank = text.partition("@")
    try:
        parsed = sorted(int(s) for s in steps.split(","))
        who = int(rank) if rank else None
    except ValueError:
        raise ConfigError(f"{INJECT_ENV}={text!r}: use STEP[,STEP...][@RANK], e.g. 3 or 3@1") from None
    if min(parsed) < 1 or (who is not None and who < 0):
        raise ConfigError(f"{INJECT_ENV}={text!r}: steps count from 1, ranks from 0")
    return parsed, who


class StepGuard:
    def __init__(self, dims: ParallelDims, max_skipped: int, log=print):
        self.dims, self.max_skipped, self.log = dims, max_skipped, log
        self.stop = None  # the run's StopRequest: its per-step all-reduce carries the guard's flags
        self.skipped = False  # the latest step was skipped
        self.in_a_row = 0
        self.total = 0
        text = os.environ.get(INJECT_ENV, "")
        self._inject, who = parse_injection(text) if text else ([], None)
        if who is not None and who != dims.rank:
            self._inject = []
        self._fired = None
        self._loss_bad = None
        self._rng = None

    def begin(self, noise_gen: torch.Generator, device: torch.device) -> None:
        """Start of a step: remembers where the RNG streams are (a skip puts them back)."""
        self.skipped, self._loss_bad = False, None
        if self._fired is not None:  # each listed step fails once per listing
            self._inject.remove(self._fired)
            self._fired = None
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._rng = (torch.get_rng_state(), noise_gen.get_state(), cuda, noise_gen, device)

    def fold_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss`` unchanged when finite, NaN (and so NaN gradients everywhere) when not. No host read."""
        if step in self._inject:
            loss, self._fired = loss * float("nan"), step
        finite = torch.isfinite(loss)
        bad = (~finite).to(torch.int32)
        self._loss_bad = bad if self._loss_bad is None else torch.maximum(self._loss_bad, bad)
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def decide(self, grads_bad: torch.Tensor | bool) -> bool:
        """Collective (every rank, once per step, before the optimizer update): True to apply the step.
        ``grads_bad``: this rank's verdict on the reduced gradients (identical on every rank)."""
        device = comm_device(self.dims.dp_group) if self.dims.distributed else torch.device("cpu")
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.int32)
        flags = torch.stack([loss_bad.to(device).reshape(()), torch.as_tensor(grads_bad).to(device, torch.int32)])
        if self.stop is not None:
            flags = self.stop.agree(flags)
        elif self.dims.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dims.dp_group)
        loss_bad, grads_bad = (bool(v) for v in flags.tolist())
        self.skipped = loss_bad or grads_bad
        self._what = "the loss (on some rank)" if loss_bad else "the reduced gradients"
        return not self.skipped

    def after_skip(self, step: int) -> None:
        """Puts the RNG streams back, logs the skip, and stops the run after too many in a row."""
        torch.set_rng_state(self._rng[0])
        self._rng[3].set_state(self._rng[1])
        if self._rng[2] is not None:
            torch.cuda.set_rng_state(self._rng[2], self._rng[4])
        self.in_a_row += 1
        self.total += 1
        self.log(
            f"[diffmoe] step {step}: {self._what} not finite: batch skipped, nothing updated "
            f"({self.in_a_row} in a row, {self.total} in this process)"
        )
        if self.in_a_row >= self.max_skipped:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row were not finite (last: step {step}, {self._what}); "
                f"train.max_skipped_steps={self.max_skipped}: lower optim.lr or check the data, then resume "
                "from the last checkpoint (every saved one is finite)"
            )

    def after_apply(self) -> None:
        self.in_a_row = 0


def check_state_finite(modules: dict, dims: ParallelDims, step: int) -> None:
    """Collective: raises NonFiniteError on every rank when any rank's weights or buffers in
    ``modules`` (name -> nn.Module) hold a NaN or inf. One host read, at save time only."""
    flags = torch.stack(
        [
            torch.stack([~torch.isfinite(t).all() for t in m.state_dict().values() if t.is_floating_point()]).any()
            for m in modules.values()
        ]
    ).to(torch.int32)
    if dims.distributed:
        flags = flags.to(comm_device(dims.dp_group))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=dims.dp_group)
    bad = [name for name, f in zip(modules, flags.tolist()) if f]
    if bad:
        raise NonFiniteError(
            f"step {step}: the {' and '.join(bad)} weights are not finite: not saved (the newest kept "
            "checkpoint is the last finite one); lower optim.lr and resume from it"
        )
