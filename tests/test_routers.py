"""Routers as objects (model/moe/routing/): the registry matches the config's option list, the facts
other code reads come from the router, and Expert Race and EC-DiT's dynamic intra-sample inference
select what a brute-force loop written here selects."""

import pytest
import torch
from test_moe_layer import _layer, _loop_reference, _run, _scores

from diffmoe_dist.config import ROUTERS, MoEConfig
from diffmoe_dist.model.moe.routing import ROUTER_TYPES, has_predictor, router_type
from diffmoe_dist.model.moe.routing.race import similarity_loss


def test_every_configurable_router_is_one_registered_class():
    assert tuple(ROUTER_TYPES) == ROUTERS
    assert not has_predictor(MoEConfig(router="dense"))
    assert has_predictor(MoEConfig(router="expert_choice_local"))
    with pytest.raises(ValueError, match="moe.router"):
        router_type("dense")
    tc = MoEConfig(router="token_choice", num_experts=8, top_k=2, capacity=1.0)
    assert router_type("token_choice").active_experts(tc) == 2.0


def _race_picks(scores_NE, k_total):
    """The top ``k_total`` entries of the flattened score matrix, ties to the lower t E + e."""
    n, e = scores_NE.shape
    flat = scores_NE.reshape(-1).tolist()
    order = sorted(range(n * e), key=lambda i: (-flat[i], i))[:k_total]
    picks = {j: [] for j in range(e)}
    for i in order:
        picks[i % e].append(i // e)
    return {j: sorted(v) for j, v in picks.items()}


@pytest.mark.parametrize("capacity", [1.0, 0.5, 2.0])
def test_expert_race_takes_the_top_C_N_entries_of_the_whole_score_matrix(capacity):
    layer = _layer(router="expert_race", capacity=capacity)
    assert layer.capacity_predictor is None
    x = torch.randn(3, 8, 8)
    y, rec = _run(layer, x)
    x_ND = x.view(24, 8)
    s = _scores(layer, x_ND)
    picks = _race_picks(s.float(), int(capacity * 24))
    got = {e: rec.mask_NE[:, e].nonzero().view(-1).tolist() for e in range(4)}
    assert got == picks
    assert int(rec.k_E.sum()) == int(capacity * 24) and int(rec.n_pool) == 24
    torch.testing.assert_close(y.view(24, 8), _loop_reference(layer, x_ND, picks).float(), rtol=1e-4, atol=1e-4)
    assert rec.capacity_avg == pytest.approx(capacity)


def test_expert_race_ties_go_to_the_lower_flat_index():
    layer = _layer(router="expert_race", capacity=0.5)
    with torch.no_grad():
        layer.router_weight_ED.zero_()  # every score 1/E: the first C N flat entries win
    _, rec = _run(layer, torch.randn(1, 8, 8))
    assert rec.mask_NE.reshape(-1).nonzero().view(-1).tolist() == list(range(4))


def test_race_similarity_loss_is_the_papers_weighted_score_correlation():
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(10, 3), -1)
    m = torch.zeros(10, 3, dtype=torch.bool)
    m[:4, 0] = m[2:7, 1] = m[5:, 2] = True
    pairs = (m.unsqueeze(2) & m.unsqueeze(1)).sum(0)
    e = 3
    diag = sum(int(pairs[i, i]) for i in range(e))
    off = sum(int(pairs[i, j]) for i in range(e) for j in range(e) if i != j)
    expected = 0.0
    for i in range(e):
        for j in range(e):
            p = sum(float(s[t, i] * s[t, j]) for t in range(10)) / 10
            w = e * int(pairs[i, i]) / diag if i == j else e * (e - 1) * int(pairs[i, j]) / off
            expected += w * p
    assert float(similarity_loss(s, pairs)) == pytest.approx(expected / e, rel=1e-5)


def test_expert_race_balance_loss_trains_the_router_and_is_logged_as_aux_loss():
    layer = _layer(router="expert_race", aux_loss_weight=0.5)
    _, rec = _run(layer, torch.randn(2, 8, 8))
    assert rec.aux_loss.requires_grad and rec.aux_loss.item() > 0
    rec.loss.backward()
    assert layer.router_weight_ED.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        _, rec = _run(layer, torch.randn(2, 8, 8))
    assert rec.aux_loss.item() == 0 and rec.loss.item() == 0


@pytest.mark.parametrize("mode", ["dynamic", "interval"])
def test_ec_dit_dynamic_inference_counts_per_sample_from_the_predictor(mode):
    """EC-DiT row 4: k_{b,e} = #{t in sample b: sigmoid(pred[t, e]) > tau_e}, then the top k_{b,e}
    tokens of sample b by router score (never across samples)."""
    layer = _layer(router="expert_choice_local", gamma=0.45)
    with torch.no_grad():
        layer.capacity_predictor.threshold_E.copy_(torch.tensor([0.3, 0.45, 0.5, 0.7]))
    layer.eval()
    layer.inference = mode
    x = torch.randn(3, 8, 8)
    with torch.no_grad():
        y, rec = _run(layer, x)
        x_ND = x.view(24, 8)
        prob = torch.sigmoid(layer.capacity_predictor(x_ND))
    tau = layer.capacity_predictor.threshold_E if mode == "dynamic" else torch.full((4,), 0.45)
    s = _scores(layer, x_ND)
    picks = {e: [] for e in range(4)}
    for b in range(3):
        for e in range(4):
            k = int((prob[8 * b : 8 * b + 8, e] > tau[e]).sum())
            col = s[8 * b : 8 * b + 8, e].tolist()
            picks[e] += sorted(8 * b + t for t in sorted(range(8), key=lambda t: (-col[t], t))[:k])
    got = {e: rec.mask_NE[:, e].nonzero().view(-1).tolist() for e in range(4)}
    assert got == picks
    torch.testing.assert_close(y.view(24, 8), _loop_reference(layer, x_ND, picks).float(), rtol=1e-4, atol=1e-4)


def test_ec_dit_static_inference_equals_training_selection():
    layer = _layer(router="expert_choice_local")
    x = torch.randn(2, 8, 8)
    _, train = _run(layer, x)
    layer.eval()
    layer.inference = "static"
    with torch.no_grad():
        _, infer = _run(layer, x)
    assert torch.equal(train.mask_NE, infer.mask_NE)
