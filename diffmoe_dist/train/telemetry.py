"""Routing telemetry: what the MoE layers did, every ``logging.routing_every`` steps (0 = off).

Per MoE layer and logged step, into ``RUN/routing.jsonl`` (rank 0) and wandb when a run is active:
- ``tokens_per_expert``: tokens each expert computed, summed over the pool (all ranks) and the
  step's micro-batches, and ``load_per_expert`` = that times E / N (expert e's own capacity;
  DiffMoE training gives exactly C for every expert, token choice does not);
- ``ep_recv_tokens``: rows each rank computed, i.e. received from its EP group (its own rows
  included); ``ep_imbalance`` = max / mean: the step waits for the busiest rank;
- ``dispatch_bytes`` / ``combine_bytes`` (payload sent to other ranks, mean per rank, summed over the
  step's micro-batch forwards; the backward all-to-alls mirror them, and an activation-checkpoint
  recompute sends them once more) and ``dispatch_s`` / ``combine_s`` (max over ranks, waiting for
  peers included);
- the capacity predictor against the selection mask: ``predictor_precision``, ``predictor_recall``
  of ``sigmoid(pred) > tau_e`` (the dynamic-inference rule) and ``threshold`` (tau_E).

Off (``routing_every: 0``) it costs an integer compare per step: no timers, no collective. The
per-layer numbers come from the step's records in the trainer's `MoECollector` (one per layer
and micro-batch; a recompute in backward records nothing), the dispatch figures from the
`DispatchStats` each layer's dispatch returned into its record (no dispatcher state); on a logged
step the collector asks the layers to time their dispatch phases (``time_dispatch``,
synchronising CUDA around each phase), and one all-reduce
of a small float64 buffer over the DP group (``layers x (W E + 3 E + 4 W + 1)`` values) gathers it.

``capacity_per_step`` turns a sampler's `CapacityMeter` values into C_avg per ODE step (eval).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel.groups import comm_device
from diffmoe_dist.train.records import ROUTING_FILE, read_continued

# Per-rank float slots in the reduce buffer: dispatch_s, combine_s, dispatch_bytes, combine_bytes.
_PHASES = ("dispatch_s", "combine_s", "dispatch_bytes", "combine_bytes")


class RoutingTelemetry:
    """Arms itself for every ``every``-th step; ``after_step(step)`` collects the armed step.

    ``dims``: the run's `ParallelDims` (None for one process). ``collector``: the trainer's
    `MoECollector`, whose records of the step just taken it reads. A collective on logged steps:
    every rank calls ``after_step`` with the same step.
    """

    def __init__(
        self, model: nn.Module, every: int, run_dir: str, dims=None, next_step: int = 1, collector: MoECollector = None
    ):
        self.every = max(0, int(every))
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
        self.names = [n for n, _ in named]
        self.layers = [m for _, m in named]
        self.collector = collector
        if self.enabled and collector is None:
            raise ValueError("RoutingTelemetry: logging.routing_every > 0 needs the trainer's MoECollector")
        self.dims = dims
        self.world_size = dims.world_size if dims is not None else 1
        self.rank = dims.rank if dims is not None else 0
        self.ep_size = dims.ep_size if dims is not None else 1
        self.path = os.path.join(run_dir, ROUTING_FILE)
        self._armed = False
        if self.enabled and next_step % self.every == 0:
            self._arm()

    @property
    def enabled(self) -> bool:
        return self.every > 0 and bool(self.layers)

    # ---- arming ------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._armed = True
        self.collector.time_dispatch = True

    def _disarm(self) -> None:
        self._armed = False
        self.collector.time_dispatch = False

    def _layer_sums(self, layer: MoEFeedForward) -> torch.Tensor | None:
        """[counts_E, tp_E, fp_E, fn_E, n] over the step's micro-batches: tokens per expert, and
        the predictor's ``sigmoid(pred) > tau_e`` against the selection, tau as the step met it."""
        records = self.collector.records(layer)
        if not records:
            return None
        predictor = layer.capacity_predictor
        tau_E = None
        if predictor is not None:
            tau_E = self.collector.thresholds_before.get(id(layer), predictor.threshold_E).view(1, -1)
        total = None
        for rec in records:
            mask_NE = rec.mask_NE
            counts_E = mask_NE.sum(0, dtype=torch.float64)
            tp_E = fp_E = fn_E = torch.zeros_like(counts_E)
            if rec.prob_NE is not None and tau_E is not None:
                predicted_NE = rec.prob_NE > tau_E
                tp_E = (predicted_NE & mask_NE).sum(0, dtype=torch.float64)
                fp_E = (predicted_NE & ~mask_NE).sum(0, dtype=torch.float64)
                fn_E = (~predicted_NE & mask_NE).sum(0, dtype=torch.float64)
            n = torch.full((1,), float(mask_NE.shape[0]), dtype=torch.float64, device=counts_E.device)
            now = torch.cat([counts_E, tp_E, fp_E, fn_E, n])
            total = now if total is None else total + now
        return total

    # ---- per step ----------------------------------------------------------------------------
    def after_step(self, step: int) -> dict | None:
        """Call once per training step, after it (``step`` = steps done). Returns the record on
        rank 0 of a logged step, else None."""
        if not self.enabled:
            return None
        record = None
        if self._armed:
            try:
                record = self._collect(step)
            finally:
                self._disarm()
            if record is not None:
                self._write(record)
        if (step + 1) % self.every == 0:
            self._arm()
        return record

    def _collect(self, step: int) -> dict | None:
        """One all-reduce (SUM over DP) of a buffer where each rank fills its own slots: its tokens
        per expert and phase timings/bytes (kept per rank, for max and mean), its predictor
        confusion counts and token count (summed)."""
        W, E = self.world_size, self.layers[0].num_experts
        buf = torch.zeros(len(self.layers), W * E + 3 * E + 4 * W + 1, dtype=torch.float64)
        for i, layer in enumerate(self.layers):
            row = buf[i]
            sums = self._layer_sums(layer)
            if sums is not None:
                sums = sums.cpu()
                row[self.rank * E : (self.rank + 1) * E] = sums[:E]
                row[W * E : W * E + 3 * E] = sums[E : 4 * E]
                row[-1] = sums[-1]
            stats = [r.dispatch for r in self.collector.records(layer) if r.dispatch is not None]
            o = W * E + 3 * E + 4 * self.rank
            row[o : o + 4] = torch.tensor(
                [sum(getattr(s, field) for s in stats) for field in _PHASES], dtype=torch.float64
            )
        if self.dims is not None and self.dims.distributed:  # NCCL reduces CUDA tensors only
            device_buf = buf.to(comm_device(self.dims.dp_group))
            dist.all_reduce(device_buf, group=self.dims.dp_group)
            buf = device_buf.cpu()
        if self.rank != 0:
            return None
        layers = [
            self._layer_record(name, layer, buf[i]) for i, (name, layer) in enumerate(zip(self.names, self.layers))
        ]
        return {
            "step": step,
            "time": time.time(),
            "world_size": W,
            "ep_size": self.ep_size,
            "num_experts": E,
            "tokens": int(buf[0, -1]),
            "layers": layers,
        }

    def _layer_record(self, name: str, layer: MoEFeedForward, row: torch.Tensor) -> dict:
        W, E, P = self.world_size, layer.num_experts, self.ep_size
        counts_WE = row[: W * E].view(W, E)
        n_tokens = float(row[-1])
        tokens_E = counts_WE.sum(0)
        # EP group g = ranks [gP, (g+1)P); its EP rank r owns experts [r E/P, (r+1) E/P) and computes
        # every row its group's ranks chose for them.
        group_counts_GE = counts_WE.view(W // P, P, E).sum(1)
        recv_W = group_counts_GE.view(W // P, P, E // P).sum(2).flatten()
        o = W * E
        tp, fp, fn = (row[o + j * E : o + (j + 1) * E].sum() for j in range(3))
        phases_W4 = row[o + 3 * E : o + 3 * E + 4 * W].view(W, 4)
        recv_mean = float(recv_W.mean())
        records = self.collector.records(layer)
        capacity = float(torch.stack([r.capacity_avg for r in records]).mean()) if records else None
        out = {
            "name": name,
            "tokens_per_expert": [int(c) for c in tokens_E.tolist()],
            "load_per_expert": [float(c) * E / n_tokens if n_tokens else 0.0 for c in tokens_E.tolist()],
            "capacity_avg": capacity,
            "ep_recv_tokens": [int(c) for c in recv_W.tolist()],
            "ep_recv_max": int(recv_W.max()),
            "ep_recv_mean": recv_mean,
            "ep_imbalance": float(recv_W.max()) / recv_mean if recv_mean > 0 else 1.0,
            "dispatch_s": float(phases_W4[:, 0].max()),
            "combine_s": float(phases_W4[:, 1].max()),
            "dispatch_bytes": float(phases_W4[:, 2].mean()),
            "combine_bytes": float(phases_W4[:, 3].mean()),
            "predictor_precision": None,
            "predictor_recall": None,
            "threshold": None,
        }
        if layer.capacity_predictor is not None:
            out["predictor_precision"] = float(tp / (tp + fp)) if tp + fp > 0 else None
            out["predictor_recall"] = float(tp / (tp + fn)) if tp + fn > 0 else None
            out["threshold"] = [float(t) for t in layer.capacity_predictor.threshold_E.tolist()]
        return out

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        wandb = sys.modules.get("wandb")  # only if the metrics logger started a run
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is not None:
            try:
                run.log(wandb_scalars(record), step=record["step"])
            except Exception:  # noqa: BLE001 - its service died (a SIGTERM): the JSONL has the record
                pass


def wandb_scalars(record: dict) -> dict[str, float]:
    """Flat scalars of one routing record for wandb: per layer and the worst layer."""
    out: dict[str, float] = {}
    for layer in record["layers"]:
        key = f"routing/{layer['name']}"
        for field in ("ep_imbalance", "dispatch_s", "combine_s", "predictor_precision", "predictor_recall"):
            if layer[field] is not None:
                out[f"{key}/{field}"] = layer[field]
        if layer["threshold"]:
            out[f"{key}/threshold_mean"] = sum(layer["threshold"]) / len(layer["threshold"])
    if record["layers"]:
        out["routing/ep_imbalance_max"] = max(layer["ep_imbalance"] for layer in record["layers"])
        out["routing/a2a_s"] = sum(layer["dispatch_s"] + layer["combine_s"] for layer in record["layers"])
    return out


def read_routing(run_dir: str) -> list[dict]:
    """The records of ``RUN/routing.jsonl`` in step order, one per step: those of the steps the run
    continued with after a resume or rollback (train/records.py)."""
    return read_continued(os.path.join(run_dir, ROUTING_FILE))


def capacity_per_step(values: list[float], num_layers: int, num_steps: int, evals_per_step: int = 1) -> list[float]:
    """C_avg per ODE step from a `CapacityMeter`'s values (one per MoE layer per model evaluation,
    in call order, over any number of equal sampling batches): the mean over layers, batches and
    the step's evaluations (Heun: 2)."""
    per_batch = num_layers * num_steps * evals_per_step
    if num_layers < 1 or not values or len(values) % per_batch:
        raise ValueError(
            f"capacity_per_step: {len(values)} values do not split into batches of {num_layers} layers x "
            f"{num_steps} steps x {evals_per_step} evaluations"
        )
    v = torch.tensor(values, dtype=torch.float64).view(-1, num_steps, evals_per_step * num_layers)
    return v.mean(dim=(0, 2)).tolist()
