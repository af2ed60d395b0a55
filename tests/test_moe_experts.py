"""Specification of StackedExperts (grouped compute, init, sharding) and the local dispatcher."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffmoe_dist.model.ffn import FeedForward
from diffmoe_dist.model.moe.dispatch import LocalDispatcher
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment
from diffmoe_dist.parallel.grads import is_expert_param


def _experts(e=4, d=6, h=24, seed=0):
    torch.manual_seed(seed)
    experts = StackedExperts(e, d, h)
    with torch.no_grad():  # non-zero biases so that they are exercised
        experts.b1_EH.normal_()
        experts.b2_ED.normal_()
    return experts


def test_forward_grouped_equals_per_expert_feedforward_and_empty_experts_get_zero_grads():
    experts = _experts()
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 6)
    y = experts.forward_grouped(x, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        # the reference: expert e's stacked weights in a plain nn.Linear MLP (D -> H -> D, GELU tanh)
        fc1, fc2 = torch.nn.Linear(6, 24), torch.nn.Linear(24, 6)
        with torch.no_grad():
            fc1.weight.copy_(experts.w1_EDH[e].T)
            fc1.bias.copy_(experts.b1_EH[e])
            fc2.weight.copy_(experts.w2_EHD[e].T)
            fc2.bias.copy_(experts.b2_ED[e])
        ref = torch.nn.Sequential(fc1, torch.nn.GELU(approximate="tanh"), fc2)
        torch.testing.assert_close(y[start : start + n], ref(x[start : start + n]))
        start += n
    y.sum().backward()
    for p in experts.parameters():
        assert p.grad is not None
    assert experts.w1_EDH.grad[1].abs().sum() == 0 and experts.b2_ED.grad[1].abs().sum() == 0


def test_forward_grouped_rejects_counts_that_do_not_match_rows():
    with pytest.raises(ValueError, match="counts_E"):
        _experts().forward_grouped(torch.randn(5, 6), torch.tensor([1, 1, 1, 1]))


def test_experts_initialised_like_feedforward_xavier_and_zero_bias():
    d, h = 32, 128
    experts = StackedExperts(8, d, h)
    ffn = FeedForward(d, h)
    bound = math.sqrt(6 / (d + h))
    for w in (experts.w1_EDH, experts.w2_EHD, ffn.fc1.weight, ffn.fc2.weight):
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(-a, a) std
    assert experts.b1_EH.abs().sum() == 0 and experts.b2_ED.abs().sum() == 0
    assert ffn.fc1.bias.abs().sum() == 0 and ffn.fc2.bias.abs().sum() == 0
    assert not torch.equal(experts.w1_EDH[0], experts.w1_EDH[1])  # experts differ


def test_expert_params_are_known_as_such_without_deepspeed_tags_and_after_a_copy():
    experts = _experts()
    for p in [*experts.parameters(), *copy.deepcopy(experts).parameters()]:
        assert is_expert_param(p) and not hasattr(p, "allreduce")  # DeepSpeed's tags: parallelize's job


def test_shard_keeps_owned_slice_in_place_as_expert_params():
    experts = _experts(e=8)
    full = {n: p.detach().clone() for n, p in experts.named_parameters()}
    assert experts.shard(ep_rank=1, ep_size=4) is experts
    assert (experts.num_experts, experts.num_local, experts.offset) == (8, 2, 2)
    for n, p in experts.named_parameters():
        assert torch.equal(p, full[n][2:4])
        assert is_expert_param(p)
    with pytest.raises(ValueError, match="already sharded"):
        experts.shard(0, 2)
    with pytest.raises(ValueError, match="divide"):
        _experts(e=6).shard(0, 4)


def test_local_dispatcher_combines_weighted_outputs_and_zeros_unpicked_tokens():
    experts = _experts()
    x = torch.randn(5, 6)
    token_idx = torch.tensor([0, 2, 2, 0, 3])
    expert_idx = torch.tensor([0, 0, 1, 3, 3])
    weight = torch.tensor([0.5, 0.25, 0.125, 2.0, 1.0])
    y = LocalDispatcher()(x, Assignment(token_idx, expert_idx, weight), experts)
    ref = torch.zeros(5, 6)
    for t, e, w in zip(token_idx.tolist(), expert_idx.tolist(), weight.tolist(), strict=True):
        h = F.gelu(x[t] @ experts.w1_EDH[e] + experts.b1_EH[e], approximate="tanh")
        ref[t] += w * (h @ experts.w2_EHD[e] + experts.b2_ED[e])
    torch.testing.assert_close(y, ref.detach())
    assert y[1].abs().sum() == 0 and y[4].abs().sum() == 0


def test_local_dispatcher_refuses_sharded_experts():
    experts = _experts().shard(0, 2)
    with pytest.raises(ValueError, match="all-to-all"):
        LocalDispatcher()(torch.randn(2, 6), Assignment(torch.tensor([0]), torch.tensor([0]), torch.ones(1)), experts)


def test_grouped_mm_path_equals_the_per_expert_loop():
    # Unequal groups at 16-byte rows take one torch._grouped_mm per matmul (experts._grouped_mm_fits);
    # the per-expert addmm loop is the reference: the same outputs bit for bit, gradients within
    # fp32 rounding (the bias gradients sum their rows in another order).
    from diffmoe_dist.model.moe.experts import _grouped_mm_fits

    torch.manual_seed(0)
    experts = StackedExperts(4, 16, 32)
    counts = [5, 0, 11, 3]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    assert _grouped_mm_fits(x, experts.w1_EDH)
    y = experts.forward_grouped(x, counts)
    y_ref = experts._forward_loop(x, counts)
    assert torch.equal(y, y_ref)
    params = [x, *experts.parameters()]
    g = torch.randn(y.shape)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
