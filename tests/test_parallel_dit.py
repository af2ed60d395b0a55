"""A whole DiffMoE-DiT forward/backward at W=4, P=2, pool=dp equals one process on the global batch."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.experts import expert_modules
from diffmoe_dist.model.moe.layer import moe_layers
from diffmoe_dist.parallel import AllToAllDispatcher, build_parallel_dims, parallelize, reduce_gradients
from diffmoe_dist.parallel.compile import compile_blocks
from diffmoe_dist.parallel.groups import ParallelDims

EXPERTS, BATCH = 4, 2


def build_dit(dispatch: str = "exact") -> tuple[torch.nn.Module, MoEConfig]:
    torch.manual_seed(0)
    moe = MoEConfig(router="expert_choice_global", num_experts=EXPERTS, pool="dp", dispatch=dispatch)
    model = ModelConfig(size="tiny", depth=4, hidden_size=32, num_heads=4, image_size=8, class_dropout=0.0)
    dit = build_model(model, moe)
    with torch.no_grad():  # adaLN-Zero starts with zero gradients for most weights: move off it
        g = torch.Generator().manual_seed(1)
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return dit, moe


def dit_loss(dit, x, t, y, target) -> torch.Tensor:
    with (moe := MoECollector()).collect(dit):
        out = dit(x, t, y)
    return ((out - target) ** 2).mean() + moe.losses()["loss"]


def _dit_matches(rank: int, world_size: int, ep_size: int, compiled: bool = False, dispatches=("exact",)) -> float:
    g = torch.Generator().manual_seed(3)
    n = world_size * BATCH
    x, t = torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)
    y, target = torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g)
    ref, _ = build_dit()
    dit_loss(ref, x, t, y, target).backward()
    ref_params, worst = dict(ref.named_parameters()), 0.0

    dims = build_parallel_dims(ep_size, EXPERTS)
    for dispatch in dispatches:
        dit, moe = build_dit(dispatch)
        parallelize(dit, dims, moe)
        if compiled:
            assert compile_blocks(dit, backend="aot_eager") == len(dit.blocks)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        dit_loss(dit, x[rows], t[rows], y[rows], target[rows]).backward()
        reduce_gradients(dit, dims)

        for name, p in dit.named_parameters():
            expected = ref_params[name].grad
            if ".experts." in name:
                expected = expected[dims.ep_rank * (EXPERTS // ep_size) :][: EXPERTS // ep_size]
            msg = lambda m, n=name, d=dispatch: f"{d} {n}: {m}"  # noqa: E731
            torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-5, msg=msg)
            worst = max(worst, float((p.grad - expected).abs().max()))
        for (name, buf), (_, ref_buf) in zip(dit.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(buf, ref_buf, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return worst


@pytest.mark.slow
def test_dit_forward_backward_at_w4_ep2_matches_single_process_on_concatenated_batch():
    # moe.dispatch exact and padded, in the same processes
    worst = run_distributed(_dit_matches, 4, 2, False, ("exact", "padded"))
    assert max(worst) < 1e-5


@pytest.mark.slow
def test_compiled_dit_at_w2_ep2_matches_single_process_on_concatenated_batch():
    # train.compile: blocks compiled (MoE layers eager), the same exactness as eager at fp32
    # against an eager one-process reference; the thresholds (selection) equal within 1e-6.
    worst = run_distributed(_dit_matches, 2, 2, True)
    assert max(worst) < 1e-5


def _expert_names(model: torch.nn.Module) -> set[str]:
    return {f"{prefix}.{n}" for prefix, m in expert_modules(model).items() for n, _ in m.named_parameters()}


def test_parallelize_on_one_process_tags_model_and_ema_alike_and_checkpoints_only_the_model():
    ref, _ = build_dit()
    dit, moe = build_dit()
    ema = copy.deepcopy(dit)
    parallelize(dit, ParallelDims.single(), moe, ema=ema, activation_checkpointing=True)
    experts = _expert_names(ref)
    assert len(experts) == 2 * 4  # 2 MoE layers (interleaved) x 4 stacked tensors
    ref_state = ref.state_dict()
    for m in (dit, ema):
        for name, p in m.named_parameters():
            # DeepSpeed's tags on expert parameters only (parallelize's, not the model's)
            tags = (getattr(p, "allreduce", None), getattr(p, "group_name", None))
            assert tags == ((False, "ep_size_1") if name in experts else (None, None)), name
        for name, value in m.state_dict().items():  # one process: no weight changes
            assert torch.equal(value, ref_state[name]), name
    assert all("forward" in vars(b) for b in dit.blocks) and not any("forward" in vars(b) for b in ema.blocks)
    # checkpointed blocks recompute in backward: the same gradients and thresholds as without
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g)
    y, target = torch.randint(0, 10, (4,), generator=g), torch.randn(4, 1, 8, 8, generator=g)
    dit_loss(ref, x, t, y, target).backward()
    dit_loss(dit, x, t, y, target).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in dit.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    for (name, buf), (_, ref_buf) in zip(dit.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(buf, ref_buf), name


def _ema_parallelized_like_model(rank: int, world_size: int) -> bool:
    dims = build_parallel_dims(2, EXPERTS)  # W=2, EP=2: each rank its own 2 experts, EDP groups of one
    full, moe = build_dit()
    dit = copy.deepcopy(full)
    with torch.no_grad():  # replicas that differ before parallelize: the broadcast must fix the dense part
        for p in dit.parameters():
            p.add_(rank)
    ema = copy.deepcopy(dit)
    parallelize(dit, dims, moe, ema=ema)
    full_params, experts, per = dict(full.named_parameters()), _expert_names(full), EXPERTS // 2
    for m in (dit, ema):
        for name, p in m.named_parameters():
            if name in experts:  # this rank's shard, kept (its EDP group is itself), tagged for DeepSpeed
                expected = full_params[name][rank * per : (rank + 1) * per] + rank
                assert (p.allreduce, p.group_name) == (False, "ep_size_2"), name
            else:  # rank 0's replica
                expected = full_params[name]
                assert not hasattr(p, "allreduce"), name
            assert torch.equal(p, expected), name
        assert all(isinstance(layer.dispatcher, AllToAllDispatcher) for layer in moe_layers(m))
    return True


@pytest.mark.slow
def test_parallelize_shards_tags_and_broadcasts_the_ema_as_the_model_at_w2_ep2():
    assert run_distributed(_ema_parallelized_like_model, 2) == [True, True]
