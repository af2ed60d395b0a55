"""diffusion.objective=ddpm: DiT's recipe as the official DiffMoE code trains it (1,000-step linear
schedule, epsilon and learned-range variance, MSE + L_vb, the ancestral sampler on respaced steps,
CFG on a doubled batch that shares one token pool). Closed forms and a known answer for the sampler
here; the long legibility run lives in benchmarks/paper_table.py."""

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


class _OracleEps(torch.nn.Module):
    """The exact epsilon of Gaussian data x0 ~ N(mu, s^2) per pixel, read at the original step index
    that the sampler passes as time * 1000, and a fixed variance interpolation ``v``."""

    num_classes = 10

    def __init__(self, mu: torch.Tensor, s: float, v: float):
        super().__init__()
        self.mu, self.s, self.v = mu, s, v
        self.alpha_bar = torch.from_numpy(np.cumprod(1 - ddpm.linear_betas())).float()

    def forward(self, x, time_B, y):
        step_B = (time_B * 1000).round().long()
        assert torch.allclose(step_B.float(), time_B * 1000, atol=1e-3)  # an original step index, not a fraction
        ac = self.alpha_bar[step_B].view(-1, 1, 1, 1)
        # x_t ~ N(sqrt(ac) mu, ac s^2 + 1 - ac): E[eps | x_t] = sqrt(1 - ac) (x_t - sqrt(ac) mu) / (ac s^2 + 1 - ac)
        eps = (1 - ac).sqrt() * (x - ac.sqrt() * self.mu) / (ac * self.s**2 + 1 - ac)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def test_sampler_with_the_exact_epsilon_returns_the_data_distribution():
    """A known answer for the sampler (schedule, respacing, the model's time input, the posterior,
    the learned-range variance): fed the exact epsilon of Gaussian data, the full 1,000-step chain
    returns that Gaussian whichever end of the variance range it takes; respaced chains keep the
    mean, and their spread lies between the two ends (beta~: too narrow, beta: too wide)."""
    mu, s, n = torch.linspace(-0.6, 0.6, 16).view(1, 1, 4, 4), 0.15, 800
    labels = torch.zeros(n, dtype=torch.long)

    def moments(steps: int, v: float) -> tuple[float, float]:
        g = torch.Generator().manual_seed(0)
        out = ddpm.sample_ddpm(_OracleEps(mu, s, v), torch.randn(n, 1, 4, 4, generator=g), labels, 1.0, steps, g)
        return float((out.mean(0) - mu).abs().max()), float(out.std(0).mean())

    for v in (-1.0, 1.0):
        err, std = moments(1000, v)
        assert err < 0.025 and std == pytest.approx(s, rel=0.05), (v, err, std)
    for steps in (25, 100):
        (err_lo, std_lo), (err_hi, std_hi) = moments(steps, -1.0), moments(steps, 1.0)
        assert max(err_lo, err_hi) < 0.03, (steps, err_lo, err_hi)
        assert std_lo < s < std_hi, (steps, std_lo, std_hi)


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
