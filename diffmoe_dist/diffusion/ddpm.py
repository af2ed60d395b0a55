"""DDPM as the official DiffMoE code trains it (DiT's GaussianDiffusion: Ho et al. with Nichol &
Dhariwal's learned variance). A 1,000-step linear beta schedule (1e-4 to 0.02, scaled for 1,000
steps); the model predicts epsilon and, in as many further channels, ``v`` in [-1, 1] that
interpolates the log variance between the posterior's ``beta~_t`` and ``beta_t`` ("learned range");
the loss is ``MSE(eps) + L_vb``, the variational bound with the mean's gradient stopped (so it trains
the variance only), in bits per dimension, the decoder NLL at t = 0. Sampling is DiT's ancestral
sampler on a respaced schedule (``space_timesteps``: ``num_steps`` of the 1,000, evenly), with
classifier-free guidance on epsilon only (the variance comes from the conditional half); the
conditional and null halves run as one doubled batch, so MoE layers see one token pool, as in the
official ``forward_with_cfg``. The model's time input is the original step index / 1000, so its
embedder (which multiplies by 1000) sees DiT's integer timestep.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_TIMESTEPS = 1000


def linear_betas(num_steps: int = NUM_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """DiT's ``space_timesteps(T, str(count))``: ``count`` steps spread evenly over ``[0, T)``, the
    stride accumulated in floating point and rounded half to even as there (21 steps of 1,000 keep
    step 499, not 500: a product ``i * stride`` would round differently at 278 of the 1,000 counts)."""
    if count >= num_timesteps:
        return list(range(num_timesteps))
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    steps, at = [], 0.0
    for _ in range(count):
        steps.append(round(at))
        at += stride
    return sorted(set(steps))


class GaussianDiffusion:
    """The schedule's constants (float64, as DiT) on ``use_timesteps`` (all 1,000 for training)."""

    def __init__(self, use_timesteps: list[int] | None = None):
        base = linear_betas()
        alphas_cumprod = np.cumprod(1.0 - base)
        steps = list(range(NUM_TIMESTEPS)) if use_timesteps is None else sorted(use_timesteps)
        betas, last = [], 1.0
        for i in steps:  # respacing keeps alpha-bar at the kept steps
            betas.append(1 - alphas_cumprod[i] / last)
            last = alphas_cumprod[i]
        self.timestep_map = torch.tensor(steps, dtype=torch.float32)
        self.betas = b = np.array(betas)
        self.num_timesteps = len(b)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac, self.sqrt_1m_ac = np.sqrt(ac), np.sqrt(1 - ac)
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = np.sqrt(1 / ac), np.sqrt(1 / ac - 1)
        var = b * (1 - ac_prev) / (1 - ac)
        self.post_log_var = np.log(np.append(var[1], var[1:]))  # clipped: var[0] = 0
        self.post_c1 = b * np.sqrt(ac_prev) / (1 - ac)
        self.post_c2 = (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac)
        self.log_betas = np.log(b)

    @staticmethod
    def _at(a: np.ndarray, t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(a).to(like.device)[t_B].float().view(-1, *([1] * (like.dim() - 1)))

    def model_time(self, t_B: torch.Tensor) -> torch.Tensor:
        """The model's time input: the original step index / 1000 (its embedder multiplies by 1000)."""
        return self.timestep_map.to(t_B.device)[t_B] / 1000.0

    def q_sample(self, x0: torch.Tensor, t_B: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_ac, t_B, x0) * x0 + self._at(self.sqrt_1m_ac, t_B, x0) * noise

    def posterior(self, x0, x_t, t_B):
        mean = self._at(self.post_c1, t_B, x_t) * x0 + self._at(self.post_c2, t_B, x_t) * x_t
        return mean, self._at(self.post_log_var, t_B, x_t)

    def p_mean_logvar(self, eps, v, x_t, t_B):
        """Learned range: ``log var = f log beta_t + (1 - f) log beta~_t`` with ``f = (v + 1) / 2``."""
        frac = (v.float() + 1) / 2
        log_var = frac * self._at(self.log_betas, t_B, x_t) + (1 - frac) * self._at(self.post_log_var, t_B, x_t)
        x0 = self._at(self.sqrt_recip_ac, t_B, x_t) * x_t - self._at(self.sqrt_recipm1_ac, t_B, x_t) * eps.float()
        return self.posterior(x0, x_t, t_B)[0], log_var


def ddpm_targets(x_B: torch.Tensor, generator: torch.Generator | None = None, same_t: bool = False):
    """Draws (t, noise) for one training step: returns (x_t, the model's time input, state for the loss)."""
    diffusion = GaussianDiffusion()
    t_B = torch.randint(0, NUM_TIMESTEPS, (1 if same_t else x_B.shape[0],), device=x_B.device, generator=generator)
    t_B = t_B.expand(x_B.shape[0])
    noise = torch.randn(x_B.shape, device=x_B.device, generator=generator)
    x_t = diffusion.q_sample(x_B, t_B, noise)
    return x_t, diffusion.model_time(t_B), (diffusion, x_B, x_t, t_B, noise)


def ddpm_loss(out: torch.Tensor, state) -> torch.Tensor:
    """``mean(MSE(eps)) + mean(L_vb)`` (DiT's LossType.MSE with a learned range variance)."""
    diffusion, x0, x_t, t_B, noise = state
    eps, v = out.float().chunk(2, dim=1)
    mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.dim())))
    mean, log_var = diffusion.p_mean_logvar(eps.detach(), v, x_t, t_B)  # the vb term trains the variance only
    true_mean, true_log_var = diffusion.posterior(x0, x_t, t_B)
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var))
    kl = kl + 0.5 * (true_mean - mean) ** 2 * torch.exp(-log_var)
    dims = tuple(range(1, x0.dim()))
    kl = kl.mean(dim=dims) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=dims) / math.log(2.0)
    return (mse + torch.where(t_B == 0, nll, kl)).mean()


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 8 bits (DiT's diffusion_utils)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


@torch.no_grad()
def sample_ddpm(model, noise, labels_B, cfg_scale: float, num_steps: int, generator=None, on_evaluation=None):
    """DiT's ``p_sample_loop`` on ``num_steps`` respaced steps, the noise drawn from ``noise``'s
    generator state (torch.randn on its device). CFG as the official code: eps of the null half
    guided towards the conditional half, the conditional half's variance, one doubled batch.
    ``generator`` (CPU) draws each step's noise, so a seed gives the same images on any device."""
    diffusion = GaussianDiffusion(space_timesteps(NUM_TIMESTEPS, num_steps))
    x = noise
    null_B = torch.full_like(labels_B, model.num_classes)
    c = x.shape[1]
    for i in reversed(range(diffusion.num_timesteps)):
        t_B = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        time_B = diffusion.model_time(t_B)
        if cfg_scale == 1.0:
            out = model(x, time_B, labels_B).float()
            eps, v = out[:, :c], out[:, c:]
        else:
            out = model(torch.cat([x, x]), torch.cat([time_B, time_B]), torch.cat([labels_B, null_B])).float()
            cond, null = out.chunk(2)
            eps = null[:, :c] + cfg_scale * (cond[:, :c] - null[:, :c])
            v = cond[:, c:]
        if on_evaluation is not None:
            on_evaluation()
        mean, log_var = diffusion.p_mean_logvar(eps, v, x, t_B)
        if i > 0:
            z = torch.randn(x.shape, generator=generator).to(x.device)
            x = mean + torch.exp(0.5 * log_var) * z
        else:
            x = mean
    return x
