"""What a training step needs from the MoE layers' forwards, handed to one explicit collector.

``forward`` only computes. While a `MoECollector` is open around a forward
(``with collector.collect(model): out = model(...)``), each MoE layer of ``model`` hands it a
`LayerRecord`: its losses (autograd scalars, to backpropagate), its selection mask and capacity
stats, and in training the detached predictor probabilities of its local tokens. Nothing is stored
on the modules. A forward outside an open collector records nothing: the recompute of activation
checkpointing runs inside backward, after the block closed, so it needs no special case; the EMA
model and evaluation open none (a sampler may open its own to read the capacity).

The trainer opens the collector around each micro-batch's forward and calls `update_thresholds`
once per optimizer step, just before ``engine.step()``: the threshold EMA of docs/design.md section 1,
``tau_e <- m tau_e + (1 - m) q_e``, with ``q_e`` the ``k_step``-th largest ``sigmoid(pred[:, e])``
over the step's whole pool (every micro-batch of every rank of the pool) and
``k_step = floor(C N_step_pool / E)``. The official DiffMoE code updates tau in every forward
(per micro-batch under gradient accumulation); we define it once per training step over the step's
pool, so ``grad_accum_steps`` does not change the thresholds. Layers with equal pools share one
selection (its histogram all-reduces), and pools smaller than DP (``rank``, ``ep``) average their
quantiles over the replicas with one all-reduce for all layers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from diffmoe_dist.model.moe import routers
from diffmoe_dist.model.moe.dispatch import DispatchStats

_ACTIVE = threading.local()  # the open collectors of this thread, innermost last


@dataclass
class LayerRecord:
    """One MoE layer's forward, as the step sees it."""

    mask_NE: Tensor  # bool, detached: which expert computed which local token
    k_E: Tensor  # long: tokens per expert over the pool
    n_pool: Tensor  # long, 0-dim: tokens in the pool
    losses: dict[str, Tensor]  # the router's named losses (autograd scalars): raw BCE, weighted balance losses
    loss: Tensor  # what the trainer adds: predictor_loss_weight * predictor_bce + the weighted balance loss
    prob_NE: Tensor | None = None  # detached sigmoid(pred), fp32 (training, routers with a predictor)
    dispatch: DispatchStats | None = None  # what its dispatch sent, and its phase seconds if timed

    @property
    def predictor_bce(self) -> Tensor:
        return self.losses.get("predictor_bce", self.loss.new_zeros(()))

    @property
    def aux_loss(self) -> Tensor:
        return self.losses.get("aux_loss", self.loss.new_zeros(()))

    @property
    def tokens_per_expert(self) -> Tensor:
        """Local tokens per expert (LongTensor[E])."""
        return self.mask_NE.sum(0)

    @property
    def capacity_avg(self) -> Tensor:
        """Achieved ``C_avg = mean_e(E k_e / N_pool)``, a float64 device tensor."""
        return routers.capacity_avg(self.k_E, self.n_pool)


def record(layer: nn.Module, make_record) -> None:
    """Called by a layer at the end of its forward: hands ``make_record()`` to every open collector
    that covers ``layer`` (built only if one does)."""
    collectors = [c for c in getattr(_ACTIVE, "stack", ()) if c.covers(layer)]
    if collectors:
        rec = make_record()
        for c in collectors:
            c._add(layer, rec)


def timed(layer: nn.Module) -> bool:
    """Whether an open collector that covers ``layer`` asks for its dispatch phases' seconds (routing
    telemetry's logged steps: timing synchronises CUDA, so it runs only then)."""
    return any(c.time_dispatch and c.covers(layer) for c in getattr(_ACTIVE, "stack", ()))


class MoECollector:
    """Collects `LayerRecord`s per micro-batch over one training step; see the module docstring."""

    def __init__(self, on_record=None):
        # on_record(layer, record): called instead of keeping the record (a sampler's meter keeps C_avg only)
        self.on_record = on_record
        self.time_dispatch = False  # routing telemetry sets it for its logged steps (`timed`)
        self.layers: list[nn.Module] = []  # the collected model's MoE layers, in the order they first ran
        self._layer_ids: set[int] = set()
        self._ids: set[int] = set()  # every module of the collected model
        self._model_id: int | None = None
        self.micro_batches: list[dict[int, list[LayerRecord]]] = []
        self.thresholds_before: dict[int, Tensor] = {}  # per layer, tau the step's forwards met
        self._device = torch.device("cpu")

    # ---- recording ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def collect(self, model: nn.Module) -> Iterator[MoECollector]:
        """Open around one forward (a micro-batch) of ``model``: its MoE layers record here.
        The collector learns the layers from their records (layer.py calls `record`; importing
        the layer class here would make the two modules import each other)."""
        if id(model) != self._model_id:  # another model: its modules, and a fresh step
            self._model_id, self._ids = id(model), {id(m) for m in model.modules()}
            self.layers, self._layer_ids = [], set()
            self.clear()
        first = next(model.parameters(), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self.micro_batches.append({})
        stack = _ACTIVE.__dict__.setdefault("stack", [])
        stack.append(self)
        try:
            yield self
        finally:
            stack.remove(self)

    def covers(self, layer: nn.Module) -> bool:
        return id(layer) in self._ids

    def _add(self, layer: nn.Module, rec: LayerRecord) -> None:
        if self.on_record is not None:
            self.on_record(layer, rec)
            return
        if id(layer) not in self._layer_ids:
            self._layer_ids.add(id(layer))
            self.layers.append(layer)
        self.micro_batches[-1].setdefault(id(layer), []).append(rec)

    def clear(self) -> None:
        """Forget the step's records (the trainer calls it at the start of a step)."""
        self.micro_batches = []
        self.thresholds_before = {}

    # ---- reading -----------------------------------------------------------------------------
    def records(self, layer: nn.Module) -> list[LayerRecord]:
        """``layer``'s records over the step's micro-batches, in order."""
        return [r for mb in self.micro_batches for r in mb.get(id(layer), [])]

    def last(self, layer: nn.Module) -> LayerRecord:
        """``layer``'s record of the latest forward it ran in."""
        recs = self.records(layer)
        if not recs:
            raise LookupError("no MoE record for this layer: was its forward run inside collect()?")
        return recs[-1]

    def losses(self) -> dict[str, Tensor]:
        """The latest micro-batch's MoE losses summed over layers, by name: ``loss`` (the term the
        trainer adds to the diffusion loss) and every router's named losses; ``predictor_bce``
        (raw) and ``aux_loss`` (weighted) are always present, zeros where no layer reports them."""
        recs = [r for rs in (self.micro_batches[-1].values() if self.micro_batches else ()) for r in rs]
        zero = torch.zeros((), device=self._device)
        out = {"loss": zero, "predictor_bce": zero, "aux_loss": zero}
        for r in recs:
            out["loss"] = out["loss"] + r.loss
            for name, value in r.losses.items():
                out[name] = out.get(name, zero) + value
        return out

    def capacity_avg(self) -> Tensor:
        """Mean ``C_avg`` over the step's layer forwards (float64 device tensor, 0 if none)."""
        recs = [r for mb in self.micro_batches for rs in mb.values() for r in rs]
        if not recs:
            return torch.zeros((), dtype=torch.float64, device=self._device)
        if len({tuple(r.k_E.shape) for r in recs}) > 1:
            return torch.stack([r.capacity_avg for r in recs]).mean()
        # All layers in one go: a few ops per step instead of six per layer (issue 23's kernel count).
        n_L = torch.stack([torch.as_tensor(r.n_pool, device=r.k_E.device) for r in recs])
        return routers.capacity_avg(torch.stack([r.k_E for r in recs]), n_L).mean()

    # ---- the step's threshold EMA ------------------------------------------------------------
    @torch.no_grad()
    def update_thresholds(self) -> None:
        """Once per optimizer step, before it: each layer's tau moves towards the quantile of its
        step's pool (module docstring). A collective over the pools: every rank calls it."""
        groups: dict[tuple, list[tuple[nn.Module, Tensor]]] = {}
        for layer in self.layers:
            probs = [r.prob_NE for r in self.records(layer) if r.prob_NE is not None]
            if not probs or layer.capacity_predictor is None:
                continue
            key = (layer.pool.batch_key, float(layer.capacity), layer.num_experts)
            groups.setdefault(key, []).append((layer, torch.cat(probs)))
        quantiles: list[tuple[nn.Module, Tensor, Tensor]] = []
        for (_, capacity, num_experts), members in groups.items():
            rows = {p.shape[0] for _, p in members}
            if len(rows) != 1:
                raise ValueError(f"update_thresholds: layers of one pool saw different token counts {sorted(rows)}")
            values = torch.cat([p for _, p in members], dim=1)  # layers side by side: one selection
            q_C, k_C = members[0][0].pool.capacity_kth_largest(values, capacity, num_experts)
            for i, (layer, _) in enumerate(members):
                cols = slice(i * num_experts, (i + 1) * num_experts)
                quantiles.append((layer, q_C[cols], k_C[cols] > 0))
        # Pools smaller than DP: average the replicas' quantiles (where they had one), all layers at once.
        local = [i for i, (layer, _, _) in enumerate(quantiles) if not layer.pool.thresholds_global]
        if local:
            # where, not a product: an empty pool's quantile is NaN, and NaN * 0 is NaN
            q = torch.stack([torch.where(quantiles[i][2], quantiles[i][1].double(), 0.0) for i in local])
            valid = torch.stack([quantiles[i][2].double() for i in local])
            summed = quantiles[local[0]][0].pool.replica_sum(torch.stack([q, valid]))
            for j, i in enumerate(local):
                count = summed[1, j]
                quantiles[i] = (quantiles[i][0], (summed[0, j] / count.clamp(min=1)).float(), count > 0)
        for layer, q_E, valid_E in quantiles:
            predictor = layer.capacity_predictor
            self.thresholds_before[id(layer)] = predictor.threshold_E.clone()
            predictor.update_threshold(q_E, valid_E)
