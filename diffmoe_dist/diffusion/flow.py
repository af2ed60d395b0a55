"""Rectified flow (docs/design.md section 1): t ~ U(0, 1), x_t = t * x + (1 - t) * eps, v = x - eps.

t = 0 is pure noise and t = 1 is data, so sampling integrates dx/dt = v(x, t) from 0 to 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x_B: torch.Tensor, eps_B: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    t = t_B.view(-1, *([1] * (x_B.dim() - 1)))
    return t * x_B + (1 - t) * eps_B


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raises unless ``generator`` (if any) draws on ``device``'s type."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"a {generator.device.type} generator cannot draw on {device}: create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def flow_targets(x_B: torch.Tensor, generator: torch.Generator | None = None, same_t: bool = False):
    """Draws (t, eps) and returns (x_t, t, v_target) for one training step. The generator must
    live on ``x_B``'s device (CUDA refuses a CPU generator; fake tensors would not notice).
    ``same_t``: one t for the whole batch (``diffusion.same_t_per_batch``, as the official code)."""
    check_generator(generator, x_B.device)
    t_B = torch.rand(1 if same_t else x_B.shape[0], device=x_B.device, generator=generator).expand(x_B.shape[0])
    eps_B = torch.randn(x_B.shape, device=x_B.device, generator=generator)
    return interpolate(x_B, eps_B, t_B), t_B, x_B - eps_B


def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    return torch.mean((v_pred.float() - v_target.float()) ** 2)


@torch.no_grad()
def sample_ode(velocity: VelocityFn, noise: torch.Tensor, num_steps: int, sampler: str = "euler") -> torch.Tensor:
    """Integrates dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) on a uniform grid.

    Heun (2nd order, 2 evaluations per step except the last) reaches Euler-50 quality at 25 steps.
    """
    x = noise
    ts = torch.linspace(0.0, 1.0, num_steps + 1, device=noise.device)
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t.expand(x.shape[0]))
        if sampler == "euler":
            x = x + dt * v
        elif sampler == "heun":
            x_euler = x + dt * v
            v_next = velocity(x_euler, t_next.expand(x.shape[0]))
            x = x + dt * 0.5 * (v + v_next)
        else:
            raise ValueError(f"sampler={sampler!r} is not known; use euler or heun")
    return x
