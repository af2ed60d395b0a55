"""E full-size experts stored as stacked tensors, computed group by group without padding.

Initialisation is a pure function of (the global seed, the layer, the global expert index): each
module draws one integer from the global RNG when it is built (same draw on every rank, since every
rank builds the same modules in the same order) and expert e's weights come from a generator seeded
with (that integer, e). So a rank can build only its own experts (`expert_shard`) and get exactly
the weights a full build holds at those indices, at every EP size, without allocating the others.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_SHARD = threading.local()


@contextlib.contextmanager
def expert_shard(ep_rank: int, ep_size: int) -> Iterator[None]:
    """Inside, `StackedExperts` are built holding only experts ``[ep_rank E/P, (ep_rank + 1) E/P)``
    (docs/design.md section 2): a rank of a 16-expert, EP-8 model allocates 2 experts per layer, never 16."""
    previous = getattr(_SHARD, "value", None)
    _SHARD.value = (ep_rank, ep_size)
    try:
        yield
    finally:
        _SHARD.value = previous


def _expert_seed(init_seed: int, e: int) -> int:
    return (init_seed * 1_000_003 + e * 7_919 + 1) % (1 << 63)


def _local_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global indices of the experts EP rank ``ep_rank`` of ``ep_size`` holds: the one place that
    checks that the EP size divides the expert count (the config checks it first, by field name)."""
    if ep_size < 1 or num_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise ValueError(
            f"{num_experts} experts cannot be split over EP rank {ep_rank} of {ep_size}: "
            "num_experts must divide by ep_size and 0 <= ep_rank < ep_size"
        )
    per = num_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def _grouped_mm_fits(x_MD: Tensor, w_EDH: Tensor) -> bool:
    """Where one ``torch._grouped_mm`` replaces the per-expert loop (measured, torch 2.13):
    CPU in fp32 (the same bits as the loop's matmuls, forward and backward); CUDA in bf16 weights on
    compute capability 9.0+ (its kernel is Hopper's); rows of a multiple of 16 bytes (the op
    refuses others). Elsewhere (bf16 on CPU refused by the op, fp32 on CUDA, older GPUs, weights
    in another dtype than the rows: fp32 master weights under autocast) the loop of ``addmm`` runs.
    A bf16 model without autocast on an H100 takes the grouped path (tests/gpu checks it)."""
    if not hasattr(torch, "_grouped_mm") or x_MD.shape[0] == 0:
        return False
    if any(n * x_MD.element_size() % 16 for n in w_EDH.shape[1:]) or not x_MD.is_contiguous():
        return False
    device = x_MD.device.type
    if torch.is_autocast_enabled(device) or x_MD.dtype != w_EDH.dtype:
        return False  # autocast would cast per call; the loop's addmm casts as autocast does
    if device == "cpu":
        return x_MD.dtype == torch.float32
    return device == "cuda" and x_MD.dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9


class ExpertParameter(nn.Parameter):
    """A parameter stacking experts along dim 0. Its type says so: a copy keeps it (the EMA model is
    a deepcopy; an attribute would be dropped), and `parallel.grads.is_expert_param` reads
    ``is_expert`` on any model, parallelized or not. How its gradients are reduced is the parallel
    code's business (`parallel.parallelize`)."""

    is_expert = True


class StackedExperts(nn.Module):
    """``num_local`` experts, each the DiT MLP ``D -> H -> D`` (GELU tanh), with weights stacked as
    ``w1_EDH, b1_EH, w2_EHD, b2_ED``. ``offset`` is the global index of the first local expert;
    ``num_experts`` stays the global count after ``shard``."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, offset: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.num_local = num_experts
        self.offset = offset
        shard = getattr(_SHARD, "value", None)
        if shard is not None and offset == 0:
            local = _local_range(num_experts, *shard)
            self.num_local, self.offset = len(local), local.start
        self.dim, self.hidden_dim = dim, hidden_dim
        # One draw from the global RNG, identical on every rank: the seed of this module's experts.
        self.init_seed = int(torch.randint(0, 1 << 62, (), device="cpu"))
        n = self.num_local
        self.w1_EDH = ExpertParameter(torch.empty(n, dim, hidden_dim))
        self.b1_EH = ExpertParameter(torch.empty(n, hidden_dim))
        self.w2_EHD = ExpertParameter(torch.empty(n, hidden_dim, dim))
        self.b2_ED = ExpertParameter(torch.empty(n, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert as FeedForward.reset_parameters: xavier-uniform per expert matrix (bound
        # sqrt(6 / (D + H)), symmetric in fan-in/fan-out, so the transposed storage does not change
        # it) and zero biases, expert e drawn from its own generator (module docstring).
        with torch.no_grad():
            if not self.w1_EDH.is_meta:
                for i in range(self.num_local):
                    g = torch.Generator(device="cpu").manual_seed(_expert_seed(self.init_seed, self.offset + i))
                    for w in (self.w1_EDH[i], self.w2_EHD[i]):
                        # drawn on the host (the generator's device), so CPU and GPU builds agree
                        w.copy_(nn.init.xavier_uniform_(torch.empty(w.shape, dtype=w.dtype, device="cpu"), generator=g))
            self.b1_EH.zero_()
            self.b2_ED.zero_()

    def forward_grouped(self, x_MD: Tensor, counts_E: Tensor | list[int]) -> Tensor:
        """Rows of ``x_MD`` are contiguous per local expert, in expert order, ``counts_E[e]`` rows
        for local expert e (a host list from the dispatcher's plan; a tensor is read here).
        Returns ``y_MD``, each row computed by its expert."""
        counts = [int(c) for c in (counts_E.tolist() if isinstance(counts_E, Tensor) else counts_E)]
        if len(counts) != self.num_local or sum(counts) != x_MD.shape[0]:
            raise ValueError(
                f"forward_grouped: counts_E has {len(counts)} entries summing to {sum(counts)}, "
                f"expected {self.num_local} local experts and {x_MD.shape[0]} rows"
            )
        if counts and min(counts) == max(counts):
            # Equal groups (every training step of a single-process pool: each expert takes
            # exactly k tokens): one batched matmul per layer, whose backward writes the stacked
            # weight gradients directly. Within a few % of a dense FFN (benchmarks/moe_layer.py).
            x_EKD = x_MD.reshape(self.num_local, counts[0], self.dim)
            h_EKH = F.gelu(torch.baddbmm(self.b1_EH.unsqueeze(1), x_EKD, self.w1_EDH), approximate="tanh")
            return torch.baddbmm(self.b2_ED.unsqueeze(1), h_EKH, self.w2_EHD).view(-1, self.dim)
        if _grouped_mm_fits(x_MD, self.w1_EDH):
            # Unequal groups, one launch per matmul: torch._grouped_mm over the row offsets. Empty
            # experts take part (zero gradients, so DDP / ZeRO need no find_unused_parameters).
            counts_E = torch.tensor(counts, device=x_MD.device)
            offs_E = counts_E.cumsum(0).to(torch.int32)
            m = x_MD.shape[0]
            b1_MH = self.b1_EH.repeat_interleave(counts_E, dim=0, output_size=m)
            b2_MD = self.b2_ED.repeat_interleave(counts_E, dim=0, output_size=m)
            h_MH = F.gelu(torch._grouped_mm(x_MD, self.w1_EDH, offs=offs_E) + b1_MH, approximate="tanh")
            return torch._grouped_mm(h_MH, self.w2_EHD, offs=offs_E) + b2_MD
        return self._forward_loop(x_MD, counts)

    def _forward_loop(self, x_MD: Tensor, counts: list[int]) -> Tensor:
        # split / unbind, never x_MD[a:b] or w[e]: the backward of each slice or select would
        # materialise a zero-filled gradient of the whole stacked tensor and add the E of them
        # up, O(E) times the work of the matmuls' own gradients; split and unbind concatenate
        # the per-expert gradients once.
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1_EDH, self.b1_EH, self.w2_EHD, self.b2_ED))
        outs = []
        for e, x in enumerate(x_MD.split(counts, dim=0)):
            # Empty experts are not skipped: a 0-row addmm yields zero (not None) gradients, so
            # every expert parameter takes part in every backward (DDP / ZeRO need no
            # find_unused_parameters).
            h = F.gelu(torch.addmm(b1[e], x, w1[e]), approximate="tanh")
            outs.append(torch.addmm(b2[e], h, w2[e]))
        return torch.cat(outs, dim=0)

    def shard(self, ep_rank: int, ep_size: int) -> StackedExperts:
        """Keep only experts ``[ep_rank * E/P, (ep_rank + 1) * E/P)`` (docs/design.md section 2), in
        place, as new Parameters. Returns self."""
        if self.num_local != self.num_experts:
            raise ValueError(f"shard: experts are already sharded (offset {self.offset}, {self.num_local} local)")
        local = _local_range(self.num_experts, ep_rank, ep_size)
        per, lo = len(local), local.start
        for name in ("w1_EDH", "b1_EH", "w2_EHD", "b2_ED"):
            old = getattr(self, name)
            setattr(self, name, ExpertParameter(old.detach()[lo : lo + per].clone()))
        self.num_local, self.offset = per, self.offset + lo
        return self

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, num_local={self.num_local}, offset={self.offset}, "
            f"dim={self.dim}, hidden_dim={self.hidden_dim}"
        )


def expert_modules(model: nn.Module) -> dict[str, StackedExperts]:
    """The model's `StackedExperts` by module name: their parameters are its expert parameters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}
