"""Rank-0 metrics: JSONL in the run directory, optional wandb (offline by default), a rich progress bar.
Other ranks get a logger that does nothing, so they stay quiet unless they fail."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

from diffmoe_dist.config.validate import cluster_peak_flops
from diffmoe_dist.train import flops


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, wandb_mode: str, project: str, config: dict, total_steps: int):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        if wandb_mode != "disabled":
            try:
                import wandb

                # Never let a key in the environment leak into logs: only the mode and project are passed.
                self._wandb = wandb.init(
                    project=project, dir=run_dir, mode=wandb_mode, config=config, name=os.path.basename(run_dir)
                )
            except Exception as exc:  # wandb is a convenience; training must not die for it
                print(f"[diffmoe] wandb disabled: {type(exc).__name__}: {exc}")
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            # batch logs (no terminal) must not wrap long lines at 80 columns
            console=Console(width=None if os.isatty(1) else 200, soft_wrap=True),
            disable=os.environ.get("DIFFMOE_NO_PROGRESS") == "1",
        )
        self._task = self._progress.add_task("train", total=total_steps, info="")
        self._progress.start()

    def advance_to(self, step: int, info: str | None = "") -> None:
        """Moves the bar; ``info`` None keeps the last line (a step whose values were not read)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **({} if info is None else {"info": info}))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:  # per-rank lists stay in the JSONL (256 ranks: 256 series)
            self._wandb.log({k: v for k, v in values.items() if not isinstance(v, list)}, step=step)

    def log_image(self, step: int, key: str, path: str, caption: str | None = None) -> None:
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(path, caption=caption)}, step=step)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self._progress.console.print if self._progress else print)(msg)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()


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


class Throughput:
    """Tokens/s, TFLOPS, MFU and peak memory per rank for the training log. FLOPs are the model's
    per-rank training FLOPs (`train.flops.step_model_flops`: MoE layers at their active capacity,
    no activation-checkpointing recompute), MFU against ``logging.mfu_peak``."""

    def __init__(self, cfg, dims, device: torch.device):
        self.dims, self.device = dims, device
        self.flops_per_step = flops.step_model_flops(cfg, dims.world_size)
        self.tokens_per_step = flops.tokens_per_step(cfg)
        self.peak = resolve_mfu_peak(cfg.logging.mfu_peak, cfg.train.precision, device)

    def measure(self, steps: int, seconds: float) -> dict[str, Any]:
        """Collective at log steps (one all-gather of the ranks' peak memory, to rank 0's log)."""
        import torch.distributed as dist

        from diffmoe_dist.parallel.groups import comm_device

        mem = torch.tensor([float(peak_memory_bytes(self.device))], dtype=torch.float64)
        if self.dims.distributed:
            mem = mem.to(comm_device(self.dims.dp_group))
            parts = [torch.empty_like(mem) for _ in range(self.dims.world_size)]
            dist.all_gather(parts, mem, group=self.dims.dp_group)
            mem = torch.cat(parts)
        mem_gb = [round(v / 1e9, 3) for v in mem.tolist()]
        seconds = max(seconds, 1e-9)
        achieved = self.flops_per_step * steps / seconds
        out = {
            "tokens_per_s": self.tokens_per_step * steps / seconds,
            "tokens_per_s_per_rank": self.tokens_per_step * steps / seconds / self.dims.world_size,
            "tflops_per_rank": achieved / 1e12,
            "peak_memory_gb": mem_gb,
            "peak_memory_gb_max": max(mem_gb),
        }
        if self.peak:
            out["mfu"] = achieved / self.peak
            out["mfu_peak_tflops"] = self.peak / 1e12
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
