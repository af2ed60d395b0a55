"""Rank-0 metrics: JSONL in the run directory (train/records.py), optional wandb (offline by default,
one W&B run per run id), and a rich progress bar in a terminal or a plain step line per log step
elsewhere (train/progress.py); the throughput, MFU and operator telemetry of each log step.
Other ranks get a logger that does nothing, so they stay quiet unless they fail."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

from diffmoe_dist.config.validate import cluster_peak_flops
from diffmoe_dist.train import flops
from diffmoe_dist.train.progress import plain_lines, say, step_line
from diffmoe_dist.train.records import METRICS_FILE, append_record


class MetricsLogger:
    """``run_id``: the run's id (train/run_dir.py), also its W&B run id: every start of the run,
    requeues and resumes included, continues one W&B run, whose step axis is the training step."""

    def __init__(
        self,
        run_dir: str,
        enabled: bool,
        wandb_mode: str,
        project: str,
        config: dict,
        total_steps: int,
        run_id: str | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.total_steps = total_steps
        self._wandb = None
        self._progress = None
        self._t0, self._first_step = time.time(), None
        # Without a terminal (a SLURM .out file) the bar renders nothing: one plain line per log step.
        self.lines = plain_lines()
        if not enabled:
            return
        if wandb_mode != "disabled":
            try:
                import wandb

                # Never let a key in the environment leak into logs: only the mode and project are passed.
                self._wandb = wandb.init(
                    project=project, dir=run_dir, mode=wandb_mode, config=config, name=os.path.basename(run_dir),
                    id=run_id, resume="allow" if run_id else None,
                )  # fmt: skip
            except Exception as exc:  # wandb is a convenience; training must not die for it
                say(f"[diffmoe] wandb disabled: {type(exc).__name__}: {exc}")
        if self.lines:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(soft_wrap=True),
        )
        self._task = self._progress.add_task("train", total=total_steps, info="")
        self._progress.start()

    def advance_to(self, step: int, info: str | None = "") -> None:
        """Moves the bar; ``info`` None keeps the last line (a step whose values were not read)."""
        if self._first_step is None:
            self._first_step = step  # this start's first step: elapsed and ETA count from here
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **({} if info is None else {"info": info}))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_record(self.path, {"step": step, "time": time.time(), **values})
        if self._wandb is not None:  # per-rank lists stay in the JSONL (256 ranks: 256 series)
            scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb_call("log", scalars, step=step)
        if self.lines:
            elapsed = time.time() - self._t0
            done = step - (self._first_step or 0)
            eta = elapsed / done * (self.total_steps - step) if done > 0 else None
            say(step_line(step, self.total_steps, values, elapsed, eta))

    def log_image(self, step: int, key: str, path: str, caption: str | None = None) -> None:
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb_call("log", {key: wandb.Image(path, caption=caption)}, step=step)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self._progress.console.print if self._progress else say)(msg)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb_call("finish")

    def _wandb_call(self, method: str, *args, **kwargs) -> None:
        """W&B's service is a child process: a SIGTERM to the job step (scontrol requeue, preemption)
        kills it while the trainer saves and stops. W&B then stops here with one line; metrics.jsonl
        keeps every record."""
        try:
            getattr(self._wandb, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - wandb is a convenience; training must not die for it
            say(f"[diffmoe] WARNING: wandb {method} failed ({type(exc).__name__}: {exc}); wandb is off for this start")
            self._wandb = None


class PhaseTimer:
    """Wall seconds per phase of `Trainer.train_step(timer=...)`: each ``lap(name)`` charges the time
    since the previous lap to ``name`` (after a device synchronise, so a phase is charged for the
    kernels it launched). ``lap(None)`` starts the clock. Phases add up to the timed step."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        flops.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


def untimed_lap(phase: str | None) -> None:
    pass


class StepClock:
    """The trainer's ``lap`` at every step (no device synchronise, a clock read per phase): host seconds
    in ``train_step`` and in its data phase over the log window, for the operator telemetry. The first
    step of each start is left out: it holds the start-up skew between ranks (rank 0 opens W&B while
    its peers wait for it in the first collective)."""

    def __init__(self):
        self.step_s = self.data_s = 0.0
        self.steps = 0
        self._cur = [0.0, 0.0]
        self._open, self._first = False, True
        self._t = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        now = time.perf_counter()
        if phase is None:  # a step starts: the previous one is complete
            self._close()
            self._cur, self._open = [0.0, 0.0], True
        else:
            self._cur[0] += now - self._t
            if phase == "data":
                self._cur[1] += now - self._t
        self._t = now

    def _close(self) -> None:
        if self._open and not self._first:
            self.step_s += self._cur[0]
            self.data_s += self._cur[1]
            self.steps += 1
        self._first = self._first and not self._open
        self._open = False

    def take(self) -> tuple[float, float]:
        """Mean seconds per step in train_step and in its data phase since the last take (NaN: none)."""
        self._close()
        n = self.steps
        out = (self.step_s / n, self.data_s / n) if n else (math.nan, math.nan)
        self.step_s = self.data_s = 0.0
        self.steps = 0
        return out


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: allocated device memory on CUDA, resident set size on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_mfu_peak(value: str, precision: str, device: torch.device) -> float | None:
    """``logging.mfu_peak`` as FLOP/s per rank: ``off`` -> None; ``measure`` -> a matmul of the run's
    precision timed now, at this rank's threads; a number in TFLOPS; a cluster YAML's
    ``peak_flops`` for the precision (tools/clusters/*.yaml)."""
    value = str(value)
    if value == "off":
        return None
    dtype = "bf16" if precision == "bf16" else "fp32"
    if value == "measure":
        # The fastest of 10: ranks start together and contend; the peak is what a core can do.
        dtype_ = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        return flops.matmul_peak(dtype_, device=device, repeats=10, best=True)
    try:
        return float(value) * 1e12
    except ValueError:  # not a number: a cluster YAML (Config.validate checked it gives this peak)
        return cluster_peak_flops(value, dtype)


def mfu_peak_source(value: str, precision: str) -> str:
    """What MFU divides by, in words for the log: a peak measured at start-up is no datasheet figure."""
    dtype = "bf16" if precision == "bf16" else "fp32"
    value = str(value)
    if value == "measure":
        return f"{dtype} matmul measured at start-up"
    try:
        float(value)
        return f"logging.mfu_peak={value}"
    except ValueError:
        return f"{value} peak_flops.{dtype}"


class Throughput:
    """Tokens/s, TFLOPS, MFU, memory and the operator telemetry per rank for the training log. FLOPs
    are the model's per-rank training FLOPs (`train.flops.step_model_flops`: MoE layers at their
    active capacity, no activation-checkpointing recompute), MFU against ``logging.mfu_peak``.
    ``clock``: the `StepClock` the trainer laps in every step."""

    def __init__(self, cfg, dims, device: torch.device):
        self.dims, self.device = dims, device
        self.flops_per_step = flops.step_model_flops(cfg, dims.world_size)
        self.tokens_per_step = flops.tokens_per_step(cfg)
        self.peak = resolve_mfu_peak(cfg.logging.mfu_peak, cfg.train.precision, device)
        self.peak_source = mfu_peak_source(cfg.logging.mfu_peak, cfg.train.precision)
        self.clock = StepClock()

    def _per_rank(self) -> torch.Tensor:
        """(W, 5): peak memory, seconds per step, data seconds per step, reserved memory, allocator retries; one
        all-gather over the DP group at log steps (the only collective of the telemetry)."""
        step_s, data_s = self.clock.take()
        reserved = retries = 0.0
        if self.device.type == "cuda":
            reserved = float(torch.cuda.max_memory_reserved(self.device))
            retries = float(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))
        mine = [float(peak_memory_bytes(self.device)), step_s, data_s, reserved, retries]
        row = torch.tensor([mine], dtype=torch.float64)
        if not self.dims.distributed:
            return row
        import torch.distributed as dist

        from diffmoe_dist.parallel.groups import comm_device

        row = row.to(comm_device(self.dims.dp_group))
        parts = [torch.empty_like(row) for _ in range(self.dims.world_size)]
        dist.all_gather(parts, row, group=self.dims.dp_group)
        return torch.cat(parts).cpu()

    def measure(self, steps: int, seconds: float) -> dict[str, Any]:
        """Collective at log steps."""
        ranks = self._per_rank()
        mem_gb = [round(v / 1e9, 3) for v in ranks[:, 0].tolist()]
        step_s = ranks[:, 1]
        seconds = max(seconds, 1e-9)
        achieved = self.flops_per_step * steps / seconds
        out = {
            "tokens_per_s": self.tokens_per_step * steps / seconds,
            "tokens_per_s_per_rank": self.tokens_per_step * steps / seconds / self.dims.world_size,
            "tflops_per_rank": achieved / 1e12,
            "peak_memory_gb": mem_gb,
            "peak_memory_gb_max": max(mem_gb),
        }
        if not step_s.isnan().any():  # each rank's own clock in train_step (StepClock)
            share = ranks[:, 2] / step_s.clamp_min(1e-9)
            out.update(
                {
                    "step_s_per_rank": [round(v, 4) for v in step_s.tolist()],
                    "step_s_median": float(step_s.median()),
                    "step_s_max": float(step_s.max()),
                    "step_s_max_rank": int(step_s.argmax()),
                    "data_share": float(share.mean()),
                    "data_share_max": float(share.max()),
                }
            )
        if self.device.type == "cuda":
            out["reserved_memory_gb_max"] = round(float(ranks[:, 3].max()) / 1e9, 3)
            out["alloc_retries_max"] = int(ranks[:, 4].max())
            out["alloc_retries_rank"] = int(ranks[:, 4].argmax())
        if self.peak:
            out["mfu"] = achieved / self.peak
            out["mfu_peak_tflops"] = self.peak / 1e12
            out["mfu_peak_source"] = self.peak_source
        return out


def progress_info(last: dict[str, Any]) -> str:
    """The progress line's fields: loss, and at log steps throughput, MFU and the largest peak memory."""
    info = f"loss {last['loss']:.4f}"
    if "tflops_per_rank" in last:
        info += f" | {last['tokens_per_s_per_rank']:,.0f} tok/s/rank {last['tflops_per_rank']:.3g} TFLOPS"
        if "mfu" in last:
            info += f" MFU {last['mfu']:.1%}"
        info += f" | mem {last['peak_memory_gb_max']:.2f} GB"
    return info


class StepMetrics(MutableMapping):
    """A step's logged values, read from the device only when first looked at (issue 23: on a GPU
    a host read drains the stream; the loop reads at log steps only). ``device_values`` (float64,
    one tensor) fill the names in ``device_names`` in one ``tolist``; ``host`` holds values already
    on the host. Key order: ``order``, then keys set later."""

    def __init__(self, device_values: torch.Tensor, device_names: list[str], host: dict[str, Any], order: list[str]):
        self._pending, self._names = device_values, device_names
        self._values: dict[str, Any] = dict(host)
        self._order = order

    @property
    def read(self) -> bool:
        return self._pending is None

    def _materialize(self) -> dict[str, Any]:
        if self._pending is not None:
            self._values.update(zip(self._names, self._pending.tolist(), strict=True))  # the host read
            self._pending = None
            ordered = {k: self._values[k] for k in self._order if k in self._values}
            self._values = {**ordered, **self._values}
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._materialize()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        del self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialize())

    def __len__(self) -> int:
        return len(self._materialize())

    def __repr__(self) -> str:
        return f"StepMetrics({self._materialize()!r})"
