"""DiffMoE layer under DP x EP equals one process on the rank-major concatenation of the local
batches (docs/design.md section 2): same selected (token, expert) set, outputs, thresholds and
gradients, for every pool (``rank``, ``ep``, ``dp``) and expert-parallel size."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.model.moe.pool import LocalPool
from diffmoe_dist.model.moe.routers import expert_capacity
from diffmoe_dist.parallel import build_parallel_dims, clip_grad_norm_, parallelize, reduce_gradients

DIM, HIDDEN, EXPERTS, BATCH, SEQ = 8, 16, 4, 2, 6
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_layer(pool: str, capacity: float = 1.0, tie_mode: str = "none", dispatch: str = "exact") -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(router="expert_choice_global", num_experts=EXPERTS, capacity=capacity, pool=pool, dispatch=dispatch)
    layer = MoEFeedForward(DIM, HIDDEN, cfg)
    with torch.no_grad():
        if tie_mode == "none":
            layer.router_weight_ED.mul_(30)  # spread the scores: selection must not hinge on one ulp
        elif tie_mode == "all":
            layer.router_weight_ED.zero_()  # every score is exactly 1/E: selection by index alone
        else:  # "some": exact integer logits on few distinct tokens, so tied rows tie bitwise
            layer.router_weight_ED.copy_(torch.randint(-4, 5, (EXPERTS, DIM)) / 64)
    return layer


def global_batch(world_size: int, tie_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (world_size * BATCH, SEQ, DIM)
    if tie_mode == "some":
        prototypes = torch.randint(-1, 2, (5, DIM), generator=g).float()
        x = prototypes[torch.randint(0, 5, shape[:2], generator=g)]
    else:
        x = torch.randn(shape, generator=g)
    return x, torch.randn(shape, generator=g)


def layer_loss(
    layer: MoEFeedForward, x: torch.Tensor, target: torch.Tensor, collector: MoECollector
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-mean loss: a linear readout of the MoE output plus the capacity predictor's BCE."""
    with collector.collect(layer):
        y = layer(x)
    return (y * target).sum(-1).mean() + collector.last(layer).predictor_bce, y


def selected(layer, collector: MoECollector) -> torch.Tensor:
    return collector.last(layer).mask_NE


def forward_mask(layer, x: torch.Tensor) -> torch.Tensor:
    collector = MoECollector()
    with collector.collect(layer):
        layer(x)
    return selected(layer, collector)


def reference(world_size: int, ep_size: int, pool: str, tie_mode: str, capacity: float) -> dict:
    """One process, all experts; ``pool: rank`` / ``ep`` apply the layer to each rank's / EP group's
    segment of the concatenated batch, ``dp`` to all of it."""
    layer = make_layer(pool, capacity, tie_mode)
    tau0 = layer.capacity_predictor.threshold_E.clone()
    x, target = global_batch(world_size, tie_mode)
    x.requires_grad_(True)
    ranks_per_segment = {"rank": 1, "ep": ep_size, "dp": world_size}[pool]
    seg = ranks_per_segment * BATCH
    losses, ys, masks, q = [], [], [], []
    for start in range(0, world_size * BATCH, seg):
        xs, ts = x[start : start + seg], target[start : start + seg]
        with torch.no_grad():
            prob = torch.sigmoid(layer.capacity_predictor(xs.reshape(-1, DIM)))
            k = expert_capacity(capacity, prob.shape[0], EXPERTS)
            if k > 0:  # k = 0 selects nothing and leaves the thresholds alone
                q.append(LocalPool().kth_largest(prob, k))
        loss, y = layer_loss(layer, xs, ts, collector := MoECollector())
        losses.append(loss)
        ys.append(y)
        masks.append(selected(layer, collector).view(-1, SEQ, EXPERTS))
    torch.stack(losses).mean().backward()
    m = layer.capacity_predictor.momentum
    norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), float("inf"))
    return {
        "layer": layer,
        "x_grad": x.grad,
        "y": torch.cat(ys).detach(),
        "mask": torch.cat(masks),
        "tau": m * tau0 + (1 - m) * torch.stack(q).mean(0) if q else tau0,
        "norm": norm,
    }


def _check_layer(
    rank: int, world_size: int, ep_size: int, pool: str, tie_mode: str, capacity: float, dispatch: str
) -> None:
    what = f"W={world_size} P={ep_size} pool={pool} ties={tie_mode} C={capacity} dispatch={dispatch}"
    ref = reference(world_size, ep_size, pool, tie_mode, capacity)
    dims = build_parallel_dims(ep_size, EXPERTS)
    layer = make_layer(pool, capacity, tie_mode, dispatch)
    parallelize(layer, dims, MoEConfig(pool=pool))
    x_all, target_all = global_batch(world_size, tie_mode)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    x = x_all[rows].clone().requires_grad_(True)
    collector = MoECollector()
    loss, y = layer_loss(layer, x, target_all[rows], collector)
    loss.backward()
    collector.update_thresholds()  # the trainer's call at the optimizer step
    reduce_gradients(layer, dims)

    mask = selected(layer, collector).view(BATCH, SEQ, EXPERTS)
    assert torch.equal(mask, ref["mask"][rows]), f"{what}: selected (token, expert) set differs"
    torch.testing.assert_close(y, ref["y"][rows], **TOL, msg=lambda m: f"{what}: output: {m}")
    # d(global mean)/dx_r = (1/W) d(local mean)/dx_r: selection is not differentiable.
    torch.testing.assert_close(x.grad / world_size, ref["x_grad"][rows], **TOL, msg=lambda m: f"{what}: dx: {m}")
    tau = layer.capacity_predictor.threshold_E
    torch.testing.assert_close(tau, ref["tau"], **TOL, msg=lambda m: f"{what}: threshold: {m}")
    local = range(layer.experts.offset, layer.experts.offset + layer.experts.num_local)
    ref_params = dict(ref["layer"].named_parameters())
    for name, p in layer.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("experts."):
            assert p.shape[0] == EXPERTS // ep_size, f"{what}: {name} not sharded"
            expected = expected[local.start : local.stop]
        torch.testing.assert_close(p.grad, expected, **TOL, msg=lambda m, n=name: f"{what}: grad {n}: {m}")
    norm = clip_grad_norm_(layer, float("inf"), dims)
    torch.testing.assert_close(norm, ref["norm"], **TOL, msg=lambda m: f"{what}: grad norm: {m}")


def _all_layouts_match(rank: int, world_size: int, cases: list[tuple[str, float]], dispatch: str) -> list[str]:
    checked = []
    for tie_mode, capacity in cases:
        # padded (moe.dispatch): its one new path is the all-to-all of fixed blocks, at EP 2
        for ep_size in (1, 2, 4) if dispatch == "exact" else (2,):
            if world_size % ep_size:
                continue
            for pool in ("rank", "ep", "dp"):
                if pool == "ep" and ep_size == 1 and world_size > 2:
                    continue  # same as pool=rank
                _check_layer(rank, world_size, ep_size, pool, tie_mode, capacity, dispatch)
                checked.append(f"ties={tie_mode} C={capacity} P={ep_size} pool={pool}")
    return checked


# (tie mode, capacity) cases per world size; one set of processes runs all of them.
# "none": distinct scores. "some": few distinct tokens, many exact ties. "all": every score is
# 1/E, so each expert takes the lowest global indices: with pool=dp the last ranks send no tokens
# at all and still take part in every all-to-all; at C=0.1, k = 0 and every all-to-all is empty.
CASES = {2: [("none", 1.0), ("all", 0.5), ("all", 0.1)], 4: [("none", 1.0), ("some", 1.5)]}


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["exact", "padded"])
@pytest.mark.parametrize("world_size", [2, 4], ids=["W2", "W4"])
def test_moe_layer_matches_single_process_on_concatenated_batch(world_size, dispatch):
    """Every valid P in {1, 2, 4} and pool in {rank, ep, dp}; ``moe.dispatch=padded`` at P = 2."""
    checked = run_distributed(_all_layouts_match, world_size, CASES[world_size], dispatch)
    assert checked[0] and all(c == checked[0] for c in checked)
    expected = {2: 3 * 6, 4: 2 * 8} if dispatch == "exact" else {2: 3 * 3, 4: 2 * 3}
    assert len(checked[0]) == expected[world_size]


def _empty_rank_matches(rank: int, world_size: int) -> None:
    """Rank 1 holds no tokens (batch 0): it still joins selection and both all-to-alls."""
    sizes = [3, 0]
    ref_layer = make_layer("dp")
    x_all, target_all = global_batch(world_size, "none")
    x_all, target_all = x_all[: sum(sizes)], target_all[: sum(sizes)]
    n_tokens = sum(sizes) * SEQ
    x_ref = x_all.clone().requires_grad_(True)
    ref = MoECollector()
    with ref.collect(ref_layer):
        y_ref = ref_layer(x_ref)
    ((y_ref * target_all).sum() / n_tokens).backward()

    dims = build_parallel_dims(2, EXPERTS)
    layer = make_layer("dp")
    parallelize(layer, dims, MoEConfig(pool="dp"))
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    x = x_all[rows].clone().requires_grad_(True)
    mine = MoECollector()
    with mine.collect(layer):
        y = layer(x)
    # Unequal batches: scale so that reduce_gradients' 1/W gives the global-token mean.
    (world_size * (y * target_all[rows]).sum() / n_tokens).backward()
    reduce_gradients(layer, dims)
    assert torch.equal(selected(layer, mine), selected(ref_layer, ref)[lo * SEQ : (lo + sizes[rank]) * SEQ])
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    torch.testing.assert_close(x.grad / world_size, x_ref.grad[rows], **TOL)
    off, n = layer.experts.offset, layer.experts.num_local
    for name in ("w1_EDH", "b1_EH", "w2_EHD", "b2_ED"):
        expected = getattr(ref_layer.experts, name).grad[off : off + n]
        torch.testing.assert_close(getattr(layer.experts, name).grad, expected, **TOL)
    torch.testing.assert_close(layer.router_weight_ED.grad, ref_layer.router_weight_ED.grad, **TOL)


@pytest.mark.slow
def test_rank_with_no_tokens_joins_selection_and_dispatch():
    run_distributed(_empty_rank_matches, 2)


def test_parallelize_keeps_one_process_model_unchanged():
    from diffmoe_dist.parallel.groups import ParallelDims

    layer = make_layer("dp")
    before = copy.deepcopy(layer.state_dict())
    parallelize(layer, ParallelDims.single(), MoEConfig(pool="dp"))
    assert isinstance(layer.pool, LocalPool) and layer.experts.num_local == EXPERTS
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name])


# ---- router scores are batch invariant: a 1-token rank and ties that straddle ranks -------------
TIE_DIM, TIE_EXPERTS = 48, 16


def _tie_layer(pool: str) -> MoEFeedForward:
    torch.manual_seed(3)
    cfg = MoEConfig(router="expert_choice_global", num_experts=TIE_EXPERTS, capacity=1.0, pool=pool)
    layer = MoEFeedForward(TIE_DIM, 16, cfg)
    with torch.no_grad():
        layer.router_weight_ED.normal_(0, 0.5)  # non-integer logits: their rounding depends on the kernel
    return layer


def _tie_tokens(seed: int) -> torch.Tensor:
    """64 tokens, copies of 5 prototypes (so every score ties with others bitwise); token 0 is rank
    0's only token and a copy of tokens on rank 1."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(5, TIE_DIM, generator=g)
    index = torch.randint(0, 5, (64,), generator=g)
    index[0] = index[1 + int(torch.randint(0, 63, (1,), generator=g))]
    return prototypes[index].view(1, 64, TIE_DIM)


def _one_token_rank_matches(rank: int, world_size: int, seeds: list[int]) -> list[int]:
    dims = build_parallel_dims(1, TIE_EXPERTS)
    layer = _tie_layer("dp")
    parallelize(layer, dims, MoEConfig(pool="dp"))
    ref_layer = _tie_layer("dp")
    rows = slice(0, 1) if rank == 0 else slice(1, 64)  # rank 0 holds one token, rank 1 the other 63
    differ = []
    for seed in seeds:
        x_all = _tie_tokens(seed)
        with torch.no_grad():
            mask = forward_mask(layer, x_all[:, rows].contiguous())
            ref_mask = forward_mask(ref_layer, x_all)
        if not torch.equal(mask, ref_mask[rows]):
            differ.append(seed)
    return differ


def test_one_token_rank_and_straddling_ties_select_as_one_process_on_the_concatenation():
    """Pool dp on 2 gloo ranks, rank 0 with a single token whose exact copies sit on rank 1: each
    expert's k-th score is a tie across ranks, broken by global index only if rank 0's lone score has
    the same bits as its copies' (a one-row matrix product rounds differently: routers.py)."""
    per_rank = run_distributed(_one_token_rank_matches, 2, list(range(12)))
    assert per_rank == [[], []], f"selection differs from one process for seeds {per_rank}"
