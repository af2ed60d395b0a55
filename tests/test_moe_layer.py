"""Specification of MoEFeedForward against plain per-expert loops written independently here."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.ffn import FeedForward, build_ffn, is_moe_block
from diffmoe_dist.model.moe import MoECollector, MoEFeedForward, routers, set_inference_routing


def Cfg(**kw) -> MoEConfig:  # noqa: N802 (reads as the config it builds)
    """The real MoEConfig, with this module's defaults: DiffMoE's router over 4 experts."""
    return MoEConfig(**{"router": "expert_choice_global", "num_experts": 4, **kw})


D, H = 8, 32


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoEFeedForward(D, H, Cfg(**kw))
    with torch.no_grad():
        layer.router_weight_ED.normal_()  # spread the scores so that selections are clear-cut
        layer.experts.b1_EH.normal_()
        layer.experts.b2_ED.normal_()
    return layer


def _scores(layer, x_ND):
    return torch.softmax(x_ND.double() @ layer.router_weight_ED.double().T, -1)


def _top(col, k):
    """Indices of the k largest entries of a Python list, ties to the lower index."""
    return sorted(sorted(range(len(col)), key=lambda t: (-col[t], t))[:k])


def _loop_reference(layer, x_ND, picks):
    """y_t = sum over experts e that picked t of S[t, e] * Expert_e(x_t), one token at a time."""
    s = _scores(layer, x_ND)
    ex = layer.experts
    y = torch.zeros(x_ND.shape, dtype=torch.float64)
    for e, tokens in picks.items():
        for t in tokens:
            h = F.gelu(x_ND[t].double() @ ex.w1_EDH[e].double() + ex.b1_EH[e].double(), approximate="tanh")
            y[t] += s[t, e] * (h @ ex.w2_EHD[e].double() + ex.b2_ED[e].double())
    return y.float()


def _run(layer, x, collector=None):
    """One forward inside a collector (as the trainer runs it): the output and the layer's record."""
    collector = MoECollector() if collector is None else collector
    with collector.collect(layer):
        y = layer(x)
    return y, collector.last(layer)


def _picks(rec):
    mask = rec.mask_NE
    return {e: mask[:, e].nonzero().flatten().tolist() for e in range(mask.shape[1])}


def test_global_router_takes_k_per_expert_over_the_whole_batch():
    layer = _layer()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        x[0] += 2.0 * layer.router_weight_ED[0]  # sample 0 wants expert 0 far beyond its share
    y, rec = _run(layer, x)
    x_ND = x.view(16, D)
    s = _scores(layer, x_ND)
    k = 16 // 4
    picks = _picks(rec)
    for e in range(4):
        assert picks[e] == _top(s[:, e].tolist(), k)
    assert all(t < 8 for t in picks[0])  # all of expert 0's k tokens come from sample 0
    assert rec.tokens_per_expert.tolist() == [k] * 4
    assert rec.capacity_avg == 1.0
    torch.testing.assert_close(y.view(16, D), _loop_reference(layer, x_ND, picks).detach(), rtol=1e-4, atol=1e-4)


def test_global_router_capacity_two_and_fractional_pool():
    layer = _layer(capacity=2.0)
    x = torch.randn(3, 5, D)  # N = 15: k = floor(2 * 15 / 4) = 7
    y, rec = _run(layer, x)
    s = _scores(layer, x.view(15, D))
    picks = _picks(rec)
    assert all(picks[e] == _top(s[:, e].tolist(), 7) for e in range(4))
    torch.testing.assert_close(
        y.view(15, D), _loop_reference(layer, x.view(15, D), picks).detach(), rtol=1e-4, atol=1e-4
    )
    assert float(rec.capacity_avg) == pytest.approx(4 * 7 / 15)


def test_global_router_ties_select_lower_token_indices():
    layer = _layer()
    with torch.no_grad():
        layer.router_weight_ED.zero_()  # every score is exactly 1/E
    _, rec = _run(layer, torch.randn(2, 6, D))
    assert all(tokens == [0, 1, 2] for tokens in _picks(rec).values())


def test_local_router_never_crosses_samples_and_matches_loop():
    layer = _layer(router="expert_choice_local")
    x = torch.randn(3, 8, D)
    with torch.no_grad():
        x[0] += 2.0 * layer.router_weight_ED[0]
    y, rec = _run(layer, x)
    x_ND = x.view(24, D)
    s = _scores(layer, x_ND)
    expected = {e: [] for e in range(4)}
    for b in range(3):
        for e in range(4):
            expected[e] += [8 * b + t for t in _top(s[8 * b : 8 * b + 8, e].tolist(), 2)]
    assert _picks(rec) == {e: sorted(v) for e, v in expected.items()}
    torch.testing.assert_close(y.view(24, D), _loop_reference(layer, x_ND, expected).detach(), rtol=1e-4, atol=1e-4)
    # EC-DiT trains a capacity predictor on its intra-sample masks (dynamic intra-sample inference)
    expected_bce = layer.capacity_predictor.loss(layer.capacity_predictor(x_ND), rec.mask_NE)
    torch.testing.assert_close(rec.predictor_bce, expected_bce)


def test_token_choice_top_k_output_and_aux_loss():
    layer = _layer(router="token_choice", top_k=2)
    x = torch.randn(2, 6, D)
    y, rec = _run(layer, x)
    x_ND = x.view(12, D)
    s = _scores(layer, x_ND)
    picks = {e: [] for e in range(4)}
    for t in range(12):
        for e in _top(s[t].tolist(), 2):
            picks[e].append(t)
    assert _picks(rec) == picks
    # combine weights are the raw softmax probabilities (not renormalised over the chosen 2)
    torch.testing.assert_close(y.view(12, D), _loop_reference(layer, x_ND, picks).detach(), rtol=1e-4, atol=1e-4)
    f = [len(picks[i]) / 24 for i in range(4)]
    p = s.mean(0).tolist()
    expected_aux = 0.01 * 4 * sum(pi * fi for pi, fi in zip(p, f, strict=True))
    assert rec.aux_loss.item() == pytest.approx(expected_aux, rel=1e-5)
    assert float(rec.capacity_avg) == pytest.approx(2.0)
    layer.eval()
    _, rec = _run(layer, x)
    assert rec.aux_loss.item() == 0  # no aux loss at inference


def test_predictor_input_is_detached_and_target_is_the_selection_mask():
    layer = _layer()
    x = torch.randn(2, 8, D, requires_grad=True)
    _, rec = _run(layer, x)
    bce = rec.predictor_bce
    pred = layer.capacity_predictor.net(x.detach().view(16, D))
    mask = rec.mask_NE
    assert mask.sum().item() == 16 and torch.equal(mask.sum(0), torch.full((4,), 4))
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(pred, mask.float()))
    bce.backward()
    assert x.grad is None and layer.router_weight_ED.grad is None
    assert all(p.grad is None for p in layer.experts.parameters())
    assert all(p.grad is not None for p in layer.capacity_predictor.parameters())


def test_threshold_ema_update_value():
    layer = _layer(threshold_momentum=0.9)
    tau0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    layer.capacity_predictor.threshold_E.copy_(tau0)
    x = torch.randn(3, 4, D)  # N = 12, k = 3
    with torch.no_grad():
        prob = torch.sigmoid(layer.capacity_predictor.net(x.view(12, D)))
    q = torch.tensor([sorted(prob[:, e].tolist(), reverse=True)[2] for e in range(4)])
    collector = MoECollector()
    _run(layer, x, collector)
    assert torch.equal(layer.capacity_predictor.threshold_E, tau0)  # forward only computes
    collector.update_thresholds()  # the trainer's call, once per optimizer step
    torch.testing.assert_close(layer.capacity_predictor.threshold_E, 0.9 * tau0 + 0.1 * q)
    assert "capacity_predictor.threshold_E" in layer.state_dict()  # checkpointed (and EMA'd) buffer
    layer.eval()
    collector.clear()
    _run(layer, x, collector)
    collector.update_thresholds()
    torch.testing.assert_close(layer.capacity_predictor.threshold_E, 0.9 * tau0 + 0.1 * q)  # frozen in eval


def test_static_inference_equals_training_selection():
    layer = _layer()
    x = torch.randn(2, 8, D)
    y_train, rec = _run(layer, x)
    train_mask = rec.mask_NE
    layer.eval()
    layer.inference = "static"
    with torch.no_grad():
        y_eval, rec = _run(layer, x)
    assert torch.equal(rec.mask_NE, train_mask)
    torch.testing.assert_close(y_eval, y_train.detach())
    assert rec.capacity_avg == 1.0 and rec.predictor_bce.item() == 0


def test_dynamic_inference_takes_k_e_from_predictor_and_threshold():
    layer = _layer().eval()
    tau = torch.tensor([0.3, 0.45, 0.5, 0.6])
    layer.capacity_predictor.threshold_E.copy_(tau)
    with torch.no_grad():
        layer.capacity_predictor.net[2].weight.mul_(20)  # spread the predicted probabilities
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        y, rec = _run(layer, x)
        prob = torch.sigmoid(layer.capacity_predictor.net(x.view(20, D)))
    k = [sum(p > tau[e].item() for p in prob[:, e].tolist()) for e in range(4)]
    assert len(set(k)) > 1  # the test exercises different k per expert
    s = _scores(layer, x.view(20, D))
    picks = {e: _top(s[:, e].tolist(), k[e]) for e in range(4)}
    assert _picks(rec) == picks
    torch.testing.assert_close(y.view(20, D), _loop_reference(layer, x.view(20, D), picks), rtol=1e-4, atol=1e-4)
    assert float(rec.capacity_avg) == pytest.approx(sum(4 * ke / 20 for ke in k) / 4)


def test_interval_inference_uses_one_gamma_for_every_expert():
    layer = _layer().eval()
    layer.capacity_predictor.threshold_E.fill_(0.99)  # must be ignored
    with torch.no_grad():
        layer.capacity_predictor.net[2].weight.mul_(20)
    set_inference_routing(layer, "interval", gamma=0.4)
    assert layer.inference == "interval" and layer.gamma == 0.4
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        _, rec = _run(layer, x)
        prob = torch.sigmoid(layer.capacity_predictor.net(x.view(20, D)))
    k = (prob > 0.4).sum(0).tolist()
    assert rec.mask_NE.sum(0).tolist() == k
    with pytest.raises(ValueError, match="choose one of"):
        set_inference_routing(layer, "adaptive")


def test_dynamic_inference_at_batch_size_one_is_sensible():
    """Paper Fig. 6: k_e counts tokens, so one sample still gets a capacity near C, not 0 or E."""
    torch.manual_seed(0)
    layer = MoEFeedForward(D, H, Cfg(num_experts=4))
    with torch.no_grad():
        layer.router_weight_ED.normal_()
    opt = torch.optim.Adam(layer.capacity_predictor.parameters(), lr=1e-2)
    collector = MoECollector()
    for _ in range(150):  # train the predictor alone on the router's choices over a batch of 16
        collector.clear()
        _, rec = _run(layer, torch.randn(16, 16, D), collector)
        opt.zero_grad()
        rec.predictor_bce.backward()
        collector.update_thresholds()
        opt.step()
    layer.eval()
    caps = []
    for _ in range(8):
        with torch.no_grad():
            _, rec = _run(layer, torch.randn(1, 16, D))
        counts = rec.tokens_per_expert
        assert (counts > 0).sum() >= 3  # not collapsed onto few experts
        assert rec.mask_NE.any(1).float().mean() > 0.4  # most tokens computed
        caps.append(float(rec.capacity_avg))
    assert 0.5 < sum(caps) / len(caps) < 1.6, caps


def test_bf16_autocast_keeps_scores_and_selection_in_fp32():
    layer = _layer()
    x = torch.randn(2, 8, D)
    _, rec = _run(layer, x)
    fp32_mask = rec.mask_NE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, rec = _run(layer, x)
        scores = routers.router_scores(x.view(16, D), layer.router_weight_ED)
    assert torch.equal(rec.mask_NE, fp32_mask)
    assert scores.dtype == torch.float32  # the combine weights
    assert y.dtype == torch.float32 and rec.predictor_bce.dtype == torch.float32


def test_build_ffn_places_moe_on_odd_blocks():
    cfg = Cfg()
    assert [is_moe_block(cfg, i) for i in range(4)] == [False, True, False, True]
    assert [is_moe_block(replace(cfg, interleave=3), i) for i in range(6)] == [False, False, True] * 2
    assert not is_moe_block(replace(cfg, router="dense"), 1)
    assert type(build_ffn(D, H, cfg, 0)) is FeedForward
    assert type(build_ffn(D, H, cfg, 1)) is MoEFeedForward
    assert type(build_ffn(D, H, replace(cfg, router="dense"), 1)) is FeedForward
    with pytest.raises(ValueError, match="moe.router"):
        MoEFeedForward(D, H, replace(cfg, router="expert_choice"))


def test_model_helpers_collect_losses_capacity_and_routing():
    torch.manual_seed(0)
    model = nn.Sequential(*[build_ffn(D, H, Cfg(predictor_loss_weight=2.0), i) for i in range(4)])
    collector = MoECollector()
    assert collector.capacity_avg() == 0.0 and collector.losses()["loss"].item() == 0
    x = torch.randn(2, 8, D)
    with collector.collect(model):
        model(x)
    layers = [model[1], model[3]]
    losses = collector.losses()
    bce = collector.last(layers[0]).predictor_bce + collector.last(layers[1]).predictor_bce
    torch.testing.assert_close(losses["predictor_bce"], bce)
    torch.testing.assert_close(losses["loss"], 2.0 * bce)
    assert losses["aux_loss"].item() == 0 and losses["loss"].requires_grad
    assert collector.capacity_avg() == 1.0
    set_inference_routing(model, "static")
    assert all(layer.inference == "static" for layer in layers)


def test_layer_deepcopies_after_a_training_forward_for_the_ema_model():
    layer = _layer()
    collector = MoECollector()
    _run(layer, torch.randn(2, 4, D), collector)
    ema = copy.deepcopy(layer)  # no per-step state on the module: nothing to drop
    assert not collector.covers(ema) and collector.records(layer)
    assert torch.equal(ema.capacity_predictor.threshold_E, layer.capacity_predictor.threshold_E)
    assert torch.equal(ema.experts.w1_EDH, layer.experts.w1_EDH) and ema.experts.w1_EDH.is_expert


def test_pool_smaller_than_experts_over_capacity_selects_nothing_without_error():
    layer = _layer(num_experts=4)
    x = torch.randn(1, 3, D, requires_grad=True)  # k = floor(1 * 3 / 4) = 0
    tau0 = layer.capacity_predictor.threshold_E.clone()
    collector = MoECollector()
    y, rec = _run(layer, x, collector)
    collector.update_thresholds()
    assert y.abs().sum() == 0 and rec.capacity_avg == 0.0
    assert torch.equal(layer.capacity_predictor.threshold_E, tau0)  # no quantile, no EMA update
    (y.sum() + rec.predictor_bce).backward()
    assert layer.experts.w1_EDH.grad is not None  # every expert still takes part in backward
