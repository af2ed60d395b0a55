"""diffusion.objective=ddpm: DiT's recipe as the official DiffMoE code trains it (1,000-step linear
schedule, epsilon and learned-range variance, MSE + L_vb, the ancestral sampler on respaced steps,
CFG on a doubled batch that shares one token pool). Closed forms here; the long legibility run
lives in benchmarks/paper_table.py."""

import conftest
import numpy as np
import pytest
import torch

from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.diffusion import ddpm
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector


def test_schedule_is_dits_linear_1000_and_respacing_keeps_alpha_bar():
    full = ddpm.GaussianDiffusion()
    assert full.num_timesteps == 1000 and full.betas[0] == pytest.approx(1e-4) and full.betas[-1] == pytest.approx(0.02)
    steps = ddpm.space_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 0 and steps[-1] == 999
    # the official respace.py accumulates the stride: ten additions of 49.95 give 499.49999999999994 -> 499,
    # where the product 10 * 49.95 = 499.5 rounds (half to even) to 500
    assert ddpm.space_timesteps(1000, 21)[10] == 499 and ddpm.space_timesteps(1000, 1) == [0]
    spaced = ddpm.GaussianDiffusion(steps)
    full_ac = np.cumprod(1 - full.betas)
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), full_ac[steps], rtol=1e-12)


def test_loss_vanishes_for_the_true_noise_and_the_true_posterior_variance():
    """eps = the drawn noise gives the true x0, and v = -1 the posterior's variance: MSE 0, KL 0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    x_t, time_B, state = ddpm.ddpm_targets(x0, g)
    _, _, _, t_B, noise = state
    assert torch.allclose(time_B * 1000, t_B.float())
    t_B = torch.tensor([1, 2, 5, 50, 500, 999])  # not 0: t = 0 scores the decoder NLL instead, never 0
    x_t = state[0].q_sample(x0, t_B, noise)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    loss = ddpm.ddpm_loss(perfect, (state[0], x0, x_t, t_B, noise))
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    worse = torch.cat([noise, torch.ones_like(noise)], dim=1)  # beta_t, not the posterior's: KL > 0 at small t
    assert float(ddpm.ddpm_loss(worse, (state[0], x0, x_t, t_B, noise))) > 1e-3


def test_ddpm_model_doubles_its_output_and_cfg_runs_one_doubled_pool():
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml", [*conftest.TINY_MODEL, "moe.num_experts=4", "diffusion.objective=ddpm"]
    )
    cfg.validate(world_size=2)
    model = build_model(cfg.model, cfg.moe, cfg.diffusion.objective).eval()
    x = torch.randn(3, 1, 16, 16)
    assert model(x, torch.rand(3), torch.arange(3)).shape == (3, 2, 16, 16)
    rows = []
    collector = MoECollector(on_record=lambda layer, rec: rows.append(rec.mask_NE.shape[0]))
    g = torch.Generator().manual_seed(0)
    with collector.collect(model):
        out = ddpm.sample_ddpm(model, x, torch.arange(3), 2.0, 3, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert set(rows) == {2 * 3 * 64}  # cond and null halves in one pool, every step


def test_ddpm_needs_a_class_conditional_model():
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["diffusion.objective=ddpm", "model.task=t2i"])
    with pytest.raises(ConfigError, match="^diffusion.objective='ddpm'"):
        cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="^diffusion.objective='score'"):
        load_config("configs/local/diffmoe-tiny.yaml", ["diffusion.objective=score"]).validate(world_size=2)
