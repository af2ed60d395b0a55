"""A router is one object: its selection in training and at inference, what it needs (a capacity
predictor, a balance loss) and the facts the rest of the code reads about it (experts a token
visits on average, expert rows per rank for FLOPs and the planner, what its selection costs in
collectives). The layer, the collector, ``diffmoe-params``, train/flops.py and plan/ ask the
router class (`router_type(moe.router)`) instead of comparing its name.

A router sees the local rows of the pool only; questions about the whole pool go through the
``TokenPool`` it is handed (model/moe/pool.py), so whatever it selects over the ``dp`` pool equals
one process on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from diffmoe_dist.model.moe.pool import TokenPool, expert_capacity


@dataclass
class Selection:
    """What a router decided for one forward of one layer."""

    mask_NE: Tensor  # bool: expert e computes local token t
    k_E: Tensor  # long: tokens per expert over the pool
    n_pool: Tensor  # long, 0-dim: tokens in the pool
    losses: dict[str, Tensor] = field(default_factory=dict)  # named, as logged (raw BCE, weighted balance)
    loss: Tensor | None = None  # what the step adds to the diffusion loss (None: nothing)
    prob_NE: Tensor | None = None  # training with a predictor: detached sigmoid(pred), for the thresholds


@dataclass
class RouteInputs:
    """What a router may read in one forward besides the scores (the layer owns these: the parallel
    code swaps the pool, a sampler switches the inference mode)."""

    x_ND: Tensor
    seq: int  # tokens per sample (N = B seq)
    pool: TokenPool
    predictor: torch.nn.Module | None
    training: bool
    inference: str  # dynamic | static | interval
    gamma: float


class Router:
    """Base class; subclasses set ``name`` and implement `select`."""

    name: ClassVar[str]
    uses_predictor: ClassVar[bool] = False  # the layer builds a CapacityPredictor (thresholds EMA)
    # Its training selection is a collective over the pool (radix select): the planner prices it.
    pool_selection: ClassVar[bool] = False
    loss_names: ClassVar[tuple[str, ...]] = ()  # the named losses it reports, always all of them

    def __init__(self, moe_cfg):
        self.num_experts = moe_cfg.num_experts
        self.capacity = moe_cfg.capacity
        self.top_k = moe_cfg.top_k
        self.aux_loss_weight = moe_cfg.aux_loss_weight
        self.predictor_loss_weight = moe_cfg.predictor_loss_weight

    # ---- facts, from the config alone -------------------------------------------------------
    @classmethod
    def active_experts(cls, moe_cfg) -> float:
        """Experts a token visits on average (active parameters, activation memory)."""
        return float(moe_cfg.capacity)

    @classmethod
    def expert_rows(cls, moe_cfg, images: int, seq: int, pool_ranks: int) -> float:
        """Selected (token, expert) pairs one rank's experts compute per micro-batch of ``images``,
        averaged over the ``pool_ranks`` ranks that share one pool."""
        e = moe_cfg.num_experts
        return e * expert_capacity(moe_cfg.capacity, images * seq * pool_ranks, e) / pool_ranks

    @classmethod
    def selection_calls(cls, moe_cfg, widths: list[int]) -> list[tuple[str, int]]:
        """Collectives of one training selection over a pool of several ranks, as parallel/pools.py
        issues them: (op, bytes per rank). Radix select over the histogram's columns (one per
        expert), one all-reduce of an int32 ``columns x 2^width`` histogram per digit, then the tie
        counts (one all-gather); none for a router that selects inside the rank."""
        if not cls.pool_selection:
            return []
        cols = moe_cfg.num_experts
        return [("all_reduce", cols * (1 << w) * 4) for w in widths] + [("all_gather", cols * 8)]

    # ---- the selection ------------------------------------------------------------------------
    def select(self, scores_NE: Tensor, inp: RouteInputs) -> Selection:
        raise NotImplementedError

    def padded_rows(self, n_local: int, inp: RouteInputs) -> int | None:
        """``moe.dispatch: padded``: a bound, known on the host and equal on every rank, on the
        rows this forward's selection hands one expert from one rank's ``n_local`` tokens; None
        where there is none short of ``n_local`` (every expert could take every token): the layer
        then dispatches exactly. Training forwards only, where every rank holds ``n_local`` tokens
        (the loader's equal micro-batches) and the capacity fixes k. config/options.py lists the
        routers that define it (``PADDED_ROUTERS``)."""
        return None

    # ---- shared pieces ------------------------------------------------------------------------
    def _with_predictor(self, sel: Selection, inp: RouteInputs) -> Selection:
        """Training: the capacity predictor learns this selection's mask (BCE on the detached
        input) and hands its probabilities to the step's threshold EMA."""
        if not inp.training or inp.predictor is None:
            sel.losses.setdefault("predictor_bce", sel.mask_NE.new_zeros((), dtype=torch.float32))
            return sel
        pred_NE = inp.predictor(inp.x_ND)
        bce = inp.predictor.loss(pred_NE, sel.mask_NE)
        sel.losses["predictor_bce"] = bce
        sel.loss = self.predictor_loss_weight * bce if sel.loss is None else sel.loss + self.predictor_loss_weight * bce
        sel.prob_NE = inp.predictor.probability(pred_NE)
        return sel

    def predicted_counts(self, inp: RouteInputs) -> Tensor:
        """Dynamic / interval inference: ``sigmoid(pred[t, e]) > tau_e`` (tau = gamma for interval)."""
        prob_NE = inp.predictor.probability(inp.predictor(inp.x_ND))
        if inp.inference == "dynamic":
            tau_E = inp.predictor.threshold_E
        else:
            tau_E = prob_NE.new_full(prob_NE.shape[1:], inp.gamma)  # a rank may hold no token
        return prob_NE > tau_E.to(prob_NE).view(1, -1)
