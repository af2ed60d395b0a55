"""What rank 0 prints while a run goes: one plain step line per log step, and a start and an end line
around every long phase, so a batch log (a SLURM ``.out`` file, nohup, CI) shows the run as it goes.

A terminal gets the rich progress bar instead of step lines (train/metrics.py); ``DIFFMOE_NO_PROGRESS=1``
turns the bar off and the step lines on. Every line is flushed: a batch log is block-buffered.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def plain_lines() -> bool:
    """Step lines instead of the progress bar: stdout is no terminal, or the bar is switched off."""
    return os.environ.get("DIFFMOE_NO_PROGRESS") == "1" or not sys.stdout.isatty()


def say(msg: str, file=None) -> None:
    print(msg, file=file or sys.stdout, flush=True)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Phase:
    """``Phase(log, "checkpoint save at step 5")`` prints the start line; ``end(detail)`` the end line
    with the wall time between them."""

    def __init__(self, log, what: str):
        self.log, self.what, self.t0 = log, what, time.perf_counter()
        log(f"[diffmoe] {what}: started")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def end(self, detail: str = "") -> float:
        seconds = self.seconds
        self.log(f"[diffmoe] {self.what}: done in {seconds:.1f} s" + (f" ({detail})" if detail else ""))
        return seconds


def step_line(step: int, total: int, values: dict[str, Any], elapsed: float, eta: float | None) -> str:
    """One log step: step/total, loss, lr, grad norm, throughput and MFU (with the peak it divides by),
    the ranks' step times (median, slowest and which) and data share, memory, elapsed, ETA."""
    v = values
    parts = [f"step {step}/{total}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.3g}", f"grad norm {v['grad_norm']:.3g}"]
    if "tokens_per_s" in v:
        speed = f"{v['tokens_per_s']:,.0f} tok/s {v['tflops_per_rank']:.3g} TFLOPS/rank"
        if "mfu" in v:
            speed += f" MFU {v['mfu']:.1%} of {v['mfu_peak_tflops']:.4g} TFLOPS ({v['mfu_peak_source']})"
        parts.append(speed)
    if "step_s_median" in v:
        parts.append(
            f"step {v['step_s_median']:.3g} s median, {v['step_s_max']:.3g} s max (rank {v['step_s_max_rank']})"
            f", data {v['data_share']:.1%}"
        )
    if "peak_memory_gb_max" in v:
        mem = f"mem {v['peak_memory_gb_max']:.2f} GB"
        if "reserved_memory_gb_max" in v:
            mem += f" reserved {v['reserved_memory_gb_max']:.2f} GB, {v['alloc_retries_max']} alloc retries"
        parts.append(mem)
    parts.append(f"elapsed {clock(elapsed)}")
    if eta is not None:
        parts.append(f"ETA {clock(eta)}")
    return "[diffmoe] " + " | ".join(parts)
