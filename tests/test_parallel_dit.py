"""A whole DiffMoE-DiT forward/backward at W=4, P=2, pool=dp equals one process on the global batch."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.dit import build_model
from diffmoe_dist.model.moe.layer import collect_moe_losses
from diffmoe_dist.parallel import build_parallel_dims, parallelize, reduce_gradients

EXPERTS, BATCH = 4, 2


def build_dit() -> tuple[torch.nn.Module, MoEConfig]:
    torch.manual_seed(0)
    moe = MoEConfig(router="expert_choice_global", num_experts=EXPERTS, pool="dp")
    model = ModelConfig(size="tiny", depth=4, hidden_size=32, num_heads=4, image_size=8, class_dropout=0.0)
    dit = build_model(model, moe)
    with torch.no_grad():  # adaLN-Zero starts with zero gradients for most weights: move off it
        g = torch.Generator().manual_seed(1)
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return dit, moe


def dit_loss(dit, x, t, y, target) -> torch.Tensor:
    return ((dit(x, t, y) - target) ** 2).mean() + collect_moe_losses(dit)["loss"]


def _dit_matches(rank: int, world_size: int, ep_size: int) -> float:
    g = torch.Generator().manual_seed(3)
    n = world_size * BATCH
    x, t = torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)
    y, target = torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g)
    ref, _ = build_dit()
    dit_loss(ref, x, t, y, target).backward()

    dims = build_parallel_dims(ep_size, EXPERTS)
    dit, moe = build_dit()
    parallelize(dit, dims, moe)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    dit_loss(dit, x[rows], t[rows], y[rows], target[rows]).backward()
    reduce_gradients(dit, dims)

    ref_params, worst = dict(ref.named_parameters()), 0.0
    for name, p in dit.named_parameters():
        expected = ref_params[name].grad
        if ".experts." in name:
            expected = expected[dims.ep_rank * (EXPERTS // ep_size) :][: EXPERTS // ep_size]
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, float((p.grad - expected).abs().max()))
    for (name, buf), (_, ref_buf) in zip(dit.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, ref_buf, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return worst


@pytest.mark.slow
def test_dit_forward_backward_at_w4_ep2_matches_single_process_on_concatenated_batch():
    worst = run_distributed(_dit_matches, 4, 2)
    assert max(worst) < 1e-5
