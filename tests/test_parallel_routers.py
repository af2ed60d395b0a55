"""Routers beyond DiffMoE's keep the pool's contract (docs/design.md section 2): Expert Race training
selection (one radix select over all N x E keys of the dp pool) and EC-DiT's dynamic intra-sample
inference, under DP x EP, equal one process on the rank-major concatenation of the local batches:
selected set, outputs, balance loss, input and parameter gradients, thresholds."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel import build_parallel_dims, parallelize, reduce_gradients

DIM, HIDDEN, EXPERTS, BATCH, SEQ = 8, 16, 4, 2, 6
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_layer(router: str, capacity: float, ties: bool, mode: str) -> MoEFeedForward:
    torch.manual_seed(0)
    inference = "dynamic" if mode == "train" else mode
    cfg = MoEConfig(
        router=router, num_experts=EXPERTS, capacity=capacity, pool="dp", aux_loss_weight=0.5, inference=inference
    )
    cfg.gamma = 0.45
    cfg.num_shared_experts = 1 if capacity == 1.0 else 0  # replicated dense experts: reduced over all of DP
    layer = MoEFeedForward(DIM, HIDDEN, cfg)
    with torch.no_grad():
        if ties:
            layer.router_weight_ED.zero_()  # every score 1/E: the selection is decided by index alone
        else:
            layer.router_weight_ED.mul_(30)
        if layer.capacity_predictor is not None:
            layer.capacity_predictor.threshold_E.copy_(torch.tensor([0.35, 0.45, 0.5, 0.6]))
    return layer


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    shape = (world_size * BATCH, SEQ, DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def run(layer, x, target, training: bool):
    collector = MoECollector()
    layer.train(training)
    with collector.collect(layer):
        y = layer(x)
    rec = collector.last(layer)
    return y, rec, (y * target).sum(-1).mean() + rec.loss, collector


def _check(rank: int, world_size: int, router: str, capacity: float, ties: bool, mode: str) -> str:
    """``mode``: train (selection, loss and gradients, thresholds) or an inference mode."""
    training = mode == "train"
    what = f"W={world_size} {router} C={capacity} ties={ties} {mode}"
    ref_layer = make_layer(router, capacity, ties, mode)
    x_all, target_all = global_batch(world_size)
    x_ref = x_all.clone().requires_grad_(training)
    y_ref, rec_ref, loss_ref, ref_collector = run(ref_layer, x_ref, target_all, training)

    dims = build_parallel_dims(2, EXPERTS)
    layer = make_layer(router, capacity, ties, mode)
    parallelize(layer, dims, MoEConfig(pool="dp"))
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    x = x_all[rows].clone().requires_grad_(training)
    y, rec, loss, collector = run(layer, x, target_all[rows], training)
    n = BATCH * SEQ
    assert torch.equal(rec.mask_NE, rec_ref.mask_NE[rank * n : (rank + 1) * n]), f"{what}: selection differs"
    if layer.router.pool_selection:  # counts over the pool; EC-DiT selects inside each sample: local counts
        assert torch.equal(rec.k_E, rec_ref.k_E) and int(rec.n_pool) == int(rec_ref.n_pool), f"{what}: pool counts"
    else:
        assert torch.equal(rec.k_E, rec.mask_NE.sum(0)) and int(rec.n_pool) == n, f"{what}: local counts"
    torch.testing.assert_close(y, y_ref[rows], **TOL, msg=lambda m: f"{what}: output: {m}")
    if not training:
        return what
    # each rank's balance loss uses the pool's pair counts and its local token mean: their mean is
    # the loss on the concatenation
    aux = rec.aux_loss.detach().reshape(1).clone()
    torch.distributed.all_reduce(aux)
    assert float(aux) / world_size == pytest.approx(float(rec_ref.aux_loss), rel=1e-5), f"{what}: aux loss"
    loss_ref.backward()
    loss.backward()
    collector.update_thresholds()
    ref_collector.update_thresholds()
    reduce_gradients(layer, dims)
    torch.testing.assert_close(x.grad / world_size, x_ref.grad[rows], **TOL, msg=lambda m: f"{what}: dx: {m}")
    local = slice(layer.experts.offset, layer.experts.offset + layer.experts.num_local)
    ref_params = dict(ref_layer.named_parameters())
    for name, p in layer.named_parameters():
        expected = ref_params[name].grad
        expected = expected[local] if name.startswith("experts.") else expected
        torch.testing.assert_close(p.grad, expected, **TOL, msg=lambda m, k=name: f"{what}: grad {k}: {m}")
    if layer.capacity_predictor is not None:
        torch.testing.assert_close(layer.capacity_predictor.threshold_E, ref_layer.capacity_predictor.threshold_E)
    return what


CASES = [
    ("expert_race", 1.0, False, "train"),  # with a shared expert (make_layer), as every C = 1 case
    ("expert_race", 0.5, True, "train"),  # ties across ranks: the lower flat index of the pool wins
    ("expert_race", 2.0, False, "static"),
    ("expert_choice_local", 1.0, False, "train"),  # predictor BCE on the intra-sample masks, thresholds
    ("expert_choice_local", 1.0, False, "dynamic"),
    ("expert_choice_local", 1.0, False, "interval"),
]


def _all_cases(rank: int, world_size: int) -> list[str]:
    return [_check(rank, world_size, *case) for case in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4], ids=["W2", "W4"])
def test_race_and_ec_dynamic_match_one_process_on_the_concatenation_with_ep2(world_size):
    checked = run_distributed(_all_cases, world_size)
    assert all(c == checked[0] for c in checked) and len(checked[0]) == len(CASES)
