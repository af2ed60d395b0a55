"""DiT's MLP, the dense FFN of a block and the shared experts of an MoE layer."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class FeedForward(nn.Module):
    """DiT's MLP: Linear(D, H) -> GELU(tanh) -> Linear(H, D), with biases (H = 4D in DiT)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DiT's `_basic_init`: xavier-uniform weights, zero biases. Done here as well so that a
        # FeedForward and an expert of StackedExperts start from the same distribution whether or
        # not the enclosing model re-initialises its nn.Linear modules.
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
