import math

import torch

from diffmoe_dist.diffusion.flow import flow_targets, interpolate, sample_ode


def test_flow_convention_t0_is_noise_t1_is_data_and_target_is_data_minus_noise():
    x, eps = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(interpolate(x, eps, torch.zeros(4)), eps)
    assert torch.equal(interpolate(x, eps, torch.ones(4)), x)
    g = torch.Generator().manual_seed(0)
    x_t, t, v = flow_targets(x, g)
    g = torch.Generator().manual_seed(0)
    t_ref = torch.rand(4, generator=g)
    eps_ref = torch.randn(4, 3, generator=g)
    assert torch.equal(t, t_ref)
    assert torch.allclose(v, x - eps_ref)
    assert torch.allclose(x_t, t_ref[:, None] * x + (1 - t_ref[:, None]) * eps_ref)
    # moving along v for the remaining time lands on the data: x_t + (1 - t) v = x
    assert torch.allclose(x_t + (1 - t_ref[:, None]) * v, x, atol=1e-6)


def _gaussian_velocity(mu: float, s: float):
    """Exact velocity E[x - eps | x_t] for data x ~ N(mu, s^2) under x_t = t x + (1 - t) eps."""

    def v(x_t, t):
        t = t.view(-1, *([1] * (x_t.dim() - 1)))
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (x_t - t * mu)

    return v


def test_samplers_map_noise_to_the_data_distribution_with_the_exact_velocity():
    mu, s = 1.5, 0.5
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler, steps, tol in (("euler", 200, 0.02), ("heun", 25, 0.005)):
        out = sample_ode(_gaussian_velocity(mu, s), noise, steps, sampler)
        # The exact flow between two Gaussians is affine: each noise sample goes to mu + s * noise.
        assert torch.allclose(out, mu + s * noise, atol=tol), sampler
        assert math.isclose(out.mean().item(), mu, abs_tol=0.02)
        assert math.isclose(out.std().item(), s, abs_tol=0.02)


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    mu, s = -1.0, 0.3
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = mu + s * noise
    err_euler = (sample_ode(_gaussian_velocity(mu, s), noise, 10, "euler") - exact).abs().max()
    err_heun = (sample_ode(_gaussian_velocity(mu, s), noise, 10, "heun") - exact).abs().max()
    assert err_heun < err_euler / 5
