"""Dispatch: send each (token, expert) assignment to its expert and combine the results.

``AllToAllDispatcher`` (diffmoe_dist/parallel) has the same call signature and sends rows to the
owners of the experts (expert parallelism); ``LocalDispatcher`` requires all experts to be local.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmoe_dist.model.moe.experts import StackedExperts


class LocalDispatcher:
    def __call__(
        self,
        x_ND: Tensor,
        token_idx_M: Tensor,
        expert_idx_M: Tensor,
        weight_M: Tensor,
        experts: StackedExperts,
    ) -> Tensor:
        """``y_t = sum_{m: token_idx[m] = t} weight[m] * Expert_{expert_idx[m]}(x_t)``; zero for
        tokens with no assignment (DESIGN.md section 1: the residual carries them).

        Assignments must be sorted by (global) expert index, so that each expert's rows are one
        contiguous block for ``experts.forward_grouped``.
        """
        if experts.num_local != experts.num_experts:
            raise ValueError(
                f"LocalDispatcher needs all {experts.num_experts} experts local, got {experts.num_local} "
                f"(sharded for expert parallelism: use the all-to-all dispatcher)"
            )
        counts_E = torch.bincount(expert_idx_M - experts.offset, minlength=experts.num_local)
        # index_select, not x_ND[idx]: its backward is one index_add_ where advanced indexing's
        # is an accumulating index_put_, slower on CPU.
        y_MD = experts.forward_grouped(x_ND.index_select(0, token_idx_M), counts_E)
        # Combine in the router's fp32: the weights are softmax scores, and index_add_ of several
        # experts' outputs for one token accumulates better in fp32 than in bf16. A bf16 y_MD
        # times fp32 weights promotes to fp32 in one pass (the same products as y_MD.float()).
        y_MD = y_MD * weight_M.float().unsqueeze(1)
        y_ND = torch.zeros(x_ND.shape[0], y_MD.shape[1], dtype=y_MD.dtype, device=x_ND.device)
        y_ND.index_add_(0, token_idx_M, y_MD)
        return y_ND.to(x_ND.dtype)
