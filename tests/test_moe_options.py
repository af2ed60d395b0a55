"""The official code's MoE and diffusion options: shared experts, the training capacity schedule,
one noise level per batch."""

import conftest
import pytest
import torch
from test_moe_layer import Cfg, _layer, _run

from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.diffusion.flow import flow_targets
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.mlp import FeedForward
from diffmoe_dist.model.moe.layer import MoEFeedForward, moe_layers, schedule_capacity, scheduled_capacity


def test_shared_experts_add_one_dense_mlp_of_n_hidden_widths_for_every_token():
    torch.manual_seed(0)
    cfg = Cfg()
    cfg.num_shared_experts = 2
    layer = MoEFeedForward(8, 32, cfg)
    plain = _layer(seed=0)
    assert isinstance(layer.shared_experts, FeedForward) and layer.shared_experts.fc1.out_features == 64
    x = torch.randn(2, 6, 8)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_experts.")})
    y, rec = _run(layer, x)
    y_plain, rec_plain = _run(plain, x)
    assert torch.equal(rec.mask_NE, rec_plain.mask_NE)
    torch.testing.assert_close(y, y_plain + layer.shared_experts(x))
    assert _layer().shared_experts is None


def test_capacity_schedule_is_E_then_linear_then_C():
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml",
        [*conftest.TINY_MODEL, "moe.num_experts=4", "moe.capacity_full_steps=10", "moe.capacity_decay_steps=30"],
    )
    assert [scheduled_capacity(cfg.moe, s) for s in (0, 10, 20, 30, 31, 1000)] == [4.0, 4.0, 2.5, 1.0, 1.0, 1.0]
    model = build_model(cfg.model, cfg.moe).train()
    schedule_capacity(model, cfg.moe, 0)
    layer = moe_layers(model)[0]
    assert layer.capacity == 4.0 and layer.router.capacity == 4.0
    _, rec = _run(layer, torch.randn(2, 6, layer.router_weight_ED.shape[1]))
    assert rec.mask_NE.all()  # C = E: every expert takes every token
    schedule_capacity(model, cfg.moe, 20)
    assert all(m.capacity == 2.5 for m in moe_layers(model))
    cfg.moe.capacity_decay_steps = 0  # no schedule: the trainer's call leaves the layers alone
    schedule_capacity(model, cfg.moe, 1000)
    assert layer.capacity == 2.5


def test_capacity_schedule_needs_an_end_after_stage_one():
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["moe.capacity_full_steps=30", "moe.capacity_decay_steps=20"])
    with pytest.raises(ConfigError, match="^moe.capacity_decay_steps=20"):
        cfg.validate(world_size=1)


def test_same_t_per_batch_draws_one_noise_level():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4)
    _, t, _ = flow_targets(x, g, same_t=True)
    assert t.shape == (5,) and torch.all(t == t[0])
    _, t, _ = flow_targets(x, g)
    assert len(set(t.tolist())) == 5
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["diffusion.same_t_per_batch=true"])
    assert cfg.diffusion.same_t_per_batch is True
