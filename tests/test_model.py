import torch
from conftest import TINY_MODEL

from diffmoe_dist.config import load_config
from diffmoe_dist.diffusion.ema import EMA
from diffmoe_dist.model.build import build_model


def _tiny(router="dense", **kw):
    over = [f"moe.router={router}", *TINY_MODEL]
    over += [f"{k}={v}" for k, v in kw.items()]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", over)
    return build_model(cfg.model, cfg.moe), cfg


def test_output_shape_matches_input_for_every_router():
    from diffmoe_dist.config import ROUTER_CHOICES

    for router in ROUTER_CHOICES:
        model, _ = _tiny(router)
        x = torch.randn(3, 1, 16, 16)
        out = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
        assert out.shape == x.shape


def test_adaln_zero_makes_the_initial_model_output_zero_and_blocks_identity():
    model, _ = _tiny("expert_choice_global")
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    out = model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0
    # but gradients still flow into the zero-initialised layers
    out = model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    (out - 1).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_label_dropout_uses_the_null_class_only_in_training():
    model, _ = _tiny(**{"model.class_dropout": 0.5})
    y = torch.zeros(1000, dtype=torch.long)
    model.train()
    dropped = (model.y_embedder.table(y) != model.y_embedder(y)).any(dim=1).float().mean()
    assert 0.4 < dropped < 0.6
    model.eval()
    assert torch.equal(model.y_embedder(y), model.y_embedder.table(y))


def test_cfg_scale_one_equals_conditional_and_guidance_extrapolates():
    model, _ = _tiny()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([3, 4])
    cond = model(x, t, y)
    null = model(x, t, torch.full_like(y, 10))
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), cond)
    assert torch.allclose(model.forward_with_cfg(x, t, y, 3.0), null + 3.0 * (cond - null), atol=1e-5)


def test_ema_tracks_weights_and_buffers_including_moe_thresholds():
    model, _ = _tiny("expert_choice_global")
    ema = EMA(model, decay=0.9, warmup=False)
    moe = model.blocks[1].ffn
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        moe.capacity_predictor.threshold_E.fill_(1.0)
    before = ema.model.blocks[1].ffn.capacity_predictor.threshold_E.clone()
    p_before = next(ema.model.parameters()).clone()  # the weights before the +1, as the EMA holds them
    ema.update(model)
    after = ema.model.blocks[1].ffn.capacity_predictor.threshold_E
    assert torch.allclose(after, 0.9 * before + 0.1 * 1.0)
    p_model = next(model.parameters())
    p_ema = next(ema.model.parameters())
    # against the held copy, not (p + 1) - 1, which is p only to fp32 rounding (missed near 0)
    assert torch.allclose(p_ema, 0.9 * p_before + 0.1 * p_model)
    assert all(not p.requires_grad for p in ema.model.parameters())
    # the warm-up schedule starts fast and approaches the configured decay
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == 0.1
    warm.num_updates = 10**6
    assert warm.current_decay() == 0.999


def test_stacked_adaln_equals_each_blocks_own_adaln():
    """`block_modulations` runs every block's adaLN in one GEMM: per block the values of
    ``adaLN_modulation(c).chunk(6)`` with 1 added to both scales, shift and gain in fp32."""
    model, _ = _tiny("expert_choice_global")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # off adaLN-Zero's zero weights
    c = torch.randn(3, model.blocks[0].adaLN_modulation[-1].in_features)
    for precision in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            stacked = model.block_modulations(c)
            for block, mod in zip(model.blocks, stacked, strict=True):
                own = list(block.adaLN_modulation(c).chunk(6, dim=1))
                own[1], own[4] = 1 + own[1], 1 + own[4]
                for i, (a, b) in enumerate(zip(mod, own)):
                    assert a.dtype == (b.dtype if i in (2, 5) else torch.float32), i
                    tol = 1e-6 if precision == torch.float32 else 1e-2
                    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
