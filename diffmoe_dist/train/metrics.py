"""Rank-0 metrics: JSONL in the run directory, optional wandb (offline by default), a rich progress bar.
Other ranks get a logger that does nothing, so they stay quiet unless they fail."""

from __future__ import annotations

import json
import os
import time
from typing import Any


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

    def advance_to(self, step: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)

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
