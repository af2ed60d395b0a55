"""The capacity predictor's threshold EMA moves once per optimizer step, over the step's whole pool
(docs/design.md section 1; issue 15 item 3): gradient accumulation and activation checkpointing do not
change it. The forwards only compute; `MoECollector.update_thresholds` applies the step."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from distributed import run_distributed

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel import build_parallel_dims, parallelize

DIM, HIDDEN, EXPERTS, SEQ, MOMENTUM = 8, 16, 4, 6, 0.9


def _layer(pool: str = "dp") -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(
        router="expert_choice_global", num_experts=EXPERTS, capacity=1.0, pool=pool, threshold_momentum=MOMENTUM
    )
    layer = MoEFeedForward(DIM, HIDDEN, cfg)
    with torch.no_grad():
        layer.router_weight_ED.mul_(30)
        layer.capacity_predictor.net[2].weight.mul_(10)  # spread the probabilities
    return layer


def _batch(n_samples: int) -> torch.Tensor:
    return torch.randn(n_samples, SEQ, DIM, generator=torch.Generator().manual_seed(11))


def _step(layer: MoEFeedForward, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """One training step as the trainer runs it: forward in the collector, backward outside it,
    then the step's threshold update. Returns tau."""
    collector = MoECollector()
    for x in micro_batches:
        with collector.collect(layer):
            y = layer(x)
        ((y**2).mean() + collector.losses()["loss"]).backward()
    collector.update_thresholds()
    return layer.capacity_predictor.threshold_E.clone()


def _expected_tau(layer: MoEFeedForward, x_all: torch.Tensor) -> torch.Tensor:
    """Independent reference: the k-th largest sigmoid(pred) of the whole batch by a sort."""
    with torch.no_grad():
        prob = torch.sigmoid(layer.capacity_predictor.net(x_all.reshape(-1, DIM)))
    k = int(1.0 * prob.shape[0] / EXPERTS)
    q = prob.sort(dim=0, descending=True).values[k - 1]
    return MOMENTUM * layer.capacity_predictor.threshold_E + (1 - MOMENTUM) * q


def _accumulation_matches(rank: int, world_size: int) -> None:
    for ep_size in (1, 2):
        _accumulation_matches_at(rank, world_size, ep_size)


def _accumulation_matches_at(rank: int, world_size: int, ep_size: int) -> None:
    per_rank, micro = 4, 2
    x_all = _batch(world_size * per_rank)
    expected = _expected_tau(_layer(), x_all)
    mine = x_all[rank * per_rank : (rank + 1) * per_rank]
    dims = build_parallel_dims(ep_size, EXPERTS)
    layers = [_layer(), _layer()]
    for layer in layers:
        parallelize(layer, dims, MoEConfig(pool="dp"))
    tau_accum = _step(layers[0], list(mine.chunk(micro)))
    tau_one = _step(layers[1], [mine])
    tau_ref = _step(_layer(), [x_all])  # one process, the concatenated global batch
    tol = {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(tau_accum, tau_one, **tol)
    torch.testing.assert_close(tau_accum, tau_ref, **tol)
    torch.testing.assert_close(tau_accum, expected, **tol)
    # The test can tell: one EMA update per micro-batch pool (the official per-forward rule) differs.
    per_forward = _layer()
    for x in x_all.view(micro, world_size, per_rank // micro, SEQ, DIM).transpose(0, 1).reshape(micro, -1, SEQ, DIM):
        _step(per_forward, [x])
    assert not torch.allclose(per_forward.capacity_predictor.threshold_E, tau_accum, atol=1e-4)


def test_grad_accumulation_gives_the_thresholds_of_one_micro_batch_of_the_same_global_batch():
    """Pool dp on 2 gloo ranks (EP 1 and 2), 2 micro-batches per rank: tau equals one micro-batch
    per rank and one process on the concatenated global batch."""
    run_distributed(_accumulation_matches, 2)


class _Blocks(nn.Module):
    def __init__(self, checkpointed: bool):
        super().__init__()
        self.layers = nn.ModuleList([_layer(), _layer()])
        with torch.no_grad():
            self.layers[1].router_weight_ED.mul_(-1)  # a second layer that routes differently
        self.checkpointed = checkpointed

    def forward(self, x):
        for layer in self.layers:
            if self.checkpointed:  # plain non-reentrant checkpointing: no threshold workaround
                x = x + torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = x + layer(x)
        return x


def _checkpointed_step(checkpointed: bool):
    model = _Blocks(checkpointed)
    collector = MoECollector()
    x = _batch(4).requires_grad_(True)
    with collector.collect(model):
        y = model(x)
    ((y**2).mean() + collector.losses()["loss"]).backward()  # the recompute runs here, outside
    records = [len(collector.records(layer)) for layer in model.layers]
    collector.update_thresholds()
    taus = [layer.capacity_predictor.threshold_E.clone() for layer in model.layers]
    return taus, records, {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad


def test_activation_checkpointing_gives_the_thresholds_and_grads_of_no_checkpointing():
    taus_off, records_off, grads_off, dx_off = _checkpointed_step(False)
    taus_on, records_on, grads_on, dx_on = _checkpointed_step(True)
    assert records_on == records_off == [1, 1]  # the recompute in backward recorded nothing
    for on, off in zip(taus_on, taus_off, strict=True):
        assert torch.equal(on, off)
        assert not torch.equal(on, torch.full_like(on, 0.5))  # it did move
    for name, g in grads_off.items():
        assert torch.equal(grads_on[name], g), name
    assert torch.equal(dx_on, dx_off)
