"""Specification of the token pool and the pure routing functions (no layer, no experts)."""

import torch

from diffmoe_dist.model.moe import routers
from diffmoe_dist.model.moe.pool import LocalPool


def _topk_reference(scores_NE, k_E):
    """Per column, the k_e largest by (score desc, index asc), written as a plain Python sort."""
    n, e = scores_NE.shape
    mask = torch.zeros(n, e, dtype=torch.bool)
    for j in range(e):
        col = scores_NE[:, j].tolist()
        for t in sorted(range(n), key=lambda t: (-col[t], t))[: int(k_E[j])]:
            mask[t, j] = True
    return mask


def test_pool_topk_breaks_ties_towards_lower_token_index():
    scores = torch.tensor([[0.5, 0.1], [0.5, 0.1], [0.7, 0.1], [0.5, 0.1], [0.5, 0.2]])
    mask = LocalPool().topk_mask(scores, torch.tensor([3, 2]))
    # expert 0: 0.7 (t=2), then the tied 0.5s in index order: t=0, t=1; expert 1: 0.2 (t=4), t=0
    assert mask[:, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[:, 1].nonzero().flatten().tolist() == [0, 4]


def test_pool_topk_with_per_expert_k_matches_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 6), generator=g).float()  # many ties
    k_E = torch.tensor([0, 1, 7, 13, 40, 3])
    mask = LocalPool().topk_mask(scores, k_E)
    assert torch.equal(mask, _topk_reference(scores, k_E))
    assert mask.sum(0).tolist() == k_E.tolist()


def test_pool_kth_largest_and_count():
    pool = LocalPool()
    values = torch.tensor([[0.1, 0.9], [0.4, 0.2], [0.3, 0.5], [0.8, 0.5]])
    assert torch.equal(pool.kth_largest(values, 1), torch.tensor([0.8, 0.9]))
    assert torch.equal(pool.kth_largest(values, 3), torch.tensor([0.3, 0.5]))
    assert pool.count(values > 0.35).tolist() == [2, 3]


def test_expert_capacity_is_floor_of_c_n_over_e():
    assert routers.expert_capacity(1.0, 256, 16) == 16
    assert routers.expert_capacity(1.0, 250, 16) == 15
    assert routers.expert_capacity(1.2, 10, 12) == 1  # float product 0.99999... must not floor to 0
    assert routers.expert_capacity(1.0, 3, 16) == 0
    assert routers.expert_capacity(64.0, 3, 16) == 3  # clamped to the pool


def test_router_scores_are_fp32_softmax_even_under_bf16_autocast():
    x = torch.randn(10, 8)
    w = torch.randn(4, 8) * 0.006
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = routers.router_scores(x.bfloat16(), w)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.sum(-1), torch.ones(10))


def test_expert_choice_local_never_crosses_samples():
    g = torch.Generator().manual_seed(1)
    b, seq, e = 3, 8, 4
    scores = torch.rand(b, seq, e, generator=g)
    scores[0] += 10.0  # sample 0 beats every other sample on every expert
    mask = routers.expert_choice_local(scores, capacity=1.0).view(b, seq, e)
    k = 8 // 4
    assert (mask.sum(1) == k).all()  # every expert takes k tokens from *each* sample
    for i in range(b):
        assert torch.equal(mask[i], _topk_reference(scores[i], torch.full((e,), k)))


def test_expert_choice_local_ties_select_lower_indices():
    mask = routers.expert_choice_local(torch.full((2, 6, 3), 1 / 3), capacity=1.0).view(2, 6, 3)
    assert mask[:, :2].all() and not mask[:, 2:].any()


def test_token_choice_top_k_and_aux_loss_values():
    g = torch.Generator().manual_seed(2)
    scores = torch.softmax(torch.randn(20, 5, generator=g), -1)
    mask = routers.token_choice(scores, top_k=2)
    for t in range(20):
        ref = sorted(range(5), key=lambda e: (-scores[t, e].item(), e))[:2]
        assert mask[t].nonzero().flatten().tolist() == sorted(ref)
    f = [sum(mask[t, i].item() for t in range(20)) / 40 for i in range(5)]
    p = [sum(scores[t, i].item() for t in range(20)) / 20 for i in range(5)]
    expected = 0.01 * 5 * sum(pi * fi for pi, fi in zip(p, f, strict=True))
    assert abs(routers.load_balancing_loss(scores, mask, 0.01).item() - expected) < 1e-7


def test_token_choice_ties_select_lower_expert_index():
    mask = routers.token_choice(torch.full((4, 6), 1 / 6), top_k=2)
    assert mask[:, :2].all() and not mask[:, 2:].any()


def test_assignment_is_sorted_by_expert_then_token():
    mask = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    scores = torch.arange(9.0).view(3, 3)
    a = routers.assignment_from_mask(mask, scores)
    assert a.expert_idx_M.tolist() == [0, 0, 1, 1, 2, 2]
    assert a.token_idx_M.tolist() == [0, 1, 1, 2, 0, 2]
    assert a.weight_M.tolist() == [0.0, 3.0, 4.0, 7.0, 2.0, 8.0]


def test_dynamic_counts_tokens_above_threshold_then_takes_top_by_router_score():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    prob = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.9, 0.9], [0.1, 0.1]])
    mask, k_E, n_pool = routers.expert_choice_dynamic(scores, prob, torch.tensor([0.5, 0.5]), LocalPool())
    assert k_E.tolist() == [1, 3]
    # expert 0 takes 1 token by *router score* (t=0), not the one the predictor flagged (t=2)
    assert mask[:, 0].tolist() == [True, False, False, False]
    assert mask[:, 1].tolist() == [False, True, True, True]
    assert routers.capacity_avg(k_E, 4) == (2 * 1 / 4 + 2 * 3 / 4) / 2


def test_router_scores_are_batch_invariant_bit_for_bit():
    # A row's score must not depend on how many rows share its matrix product (a rank of the dp
    # pool may hold 1 token) nor on its position: the dp pool's exactness rests on it.
    g = torch.Generator().manual_seed(0)
    for dim, experts in ((48, 16), (384, 16), (384, 4)):
        w = torch.randn(experts, dim, generator=g) * 0.02
        x = torch.randn(700, dim, generator=g)
        full = routers.router_scores(x, w)
        for n in [*range(1, 20), 127, 128, 129, 300]:
            for start in (0, 3, 131, 399):
                assert torch.equal(routers.router_scores(x[start : start + n], w), full[start : start + n]), (
                    dim,
                    experts,
                    n,
                    start,
                )


def test_assignment_at_a_known_size_equals_the_nonzero_enumeration():
    g = torch.Generator().manual_seed(4)
    for n, e in ((0, 3), (1, 1), (17, 4), (64, 16)):
        mask = torch.rand(n, e, generator=g) < 0.3
        scores = torch.rand(n, e, generator=g)
        ref = routers.assignment_from_mask(mask, scores)
        got = routers.assignment_from_mask(mask, scores, int(mask.sum()))
        assert torch.equal(got.token_idx_M, ref.token_idx_M) and torch.equal(got.expert_idx_M, ref.expert_idx_M)
        assert torch.equal(got.weight_M, ref.weight_M)


def test_padded_assignment_is_the_exact_one_in_blocks_padded_with_token_n_and_weight_0():
    """moe.dispatch=padded: block e holds expert e's rows of the exact assignment, in order, then
    padding (token index N, weight 0) up to the bound; every shape is the bound's, none the data's."""
    g = torch.Generator().manual_seed(5)
    for n, e in ((0, 3), (1, 1), (17, 4), (64, 16)):
        mask = torch.rand(n, e, generator=g) < 0.3
        scores = torch.rand(n, e, generator=g)
        bound = int(mask.sum(0).max()) + 2 if n else 0
        ref = routers.assignment_from_mask(mask, scores)
        got = routers.padded_assignment(mask, scores, bound)
        assert got.token_idx_M.shape == got.expert_idx_M.shape == got.weight_M.shape == (e * bound,)
        real = got.token_idx_M < n
        assert torch.equal(got.token_idx_M[real], ref.token_idx_M) and torch.equal(got.weight_M[real], ref.weight_M)
        assert torch.equal(got.expert_idx_M, torch.arange(e).repeat_interleave(bound))
        assert torch.equal(real.view(e, bound).sum(1), mask.sum(0)) and not got.weight_M[~real].any()
        assert (real.view(e, bound).int().diff(dim=1) <= 0).all()  # rows first, then padding
