"""Exact top-k per expert over a token pool spread across ranks, without moving the scores.

DESIGN.md section 2: each expert e keeps the ``k_e`` best tokens of the pool (the rank-major
concatenation of the local batches of ``group``). Gathering the scores would cost O(N E) bytes per
layer; instead we radix-select on the order-preserving uint32 key of each fp32 score:

1. ``passes = 32 / bits`` rounds; round p all-reduces an (E x 2^bits) histogram of the next
   ``bits`` key bits, counting only keys that match the prefix found so far. The digit where the
   descending running count reaches ``k_e`` extends the prefix. After the last round the prefix is
   the k-th largest key and we know how many keys lie strictly above it.
2. Ties at the k-th key: an all-gather of per-rank tie counts (E ints per rank) and an exclusive
   prefix over ranks tell each rank how many of its tied tokens to take, lowest global index first.

Bytes sent per call are O(E 2^bits passes + E W), independent of the number of tokens
(``bytes_sent`` counts them; tests/test_parallel_selection.py asserts it is flat from 1K to 64K
tokens per rank). Everything here is a collective over ``group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from diffmoe_dist.model.moe.pool import LocalPool
from diffmoe_dist.parallel.groups import comm_device

_SIGN = 0x80000000
_ALL = 0xFFFFFFFF


def signed_order_key(x: Tensor) -> Tensor:
    """int32 keys with ``key(a) < key(b)`` iff ``a < b`` for finite fp32 values (signed compare).

    Non-negative floats order like their bit patterns; negative ones in reverse, so their 31 low
    bits are flipped. ``-0.0`` is folded into ``+0.0`` first so that equal values get equal keys.
    int32, not int64: shifts and compares on int32 run several times faster on CPU.
    """
    bits = (x.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def order_preserving_key(x: Tensor) -> Tensor:
    """The uint32 radix key (held in int64): `signed_order_key` with its sign bit flipped, so that
    unsigned order, and hence digit-by-digit order from the top bit, is float order."""
    return signed_order_key(x).to(torch.int64) + _SIGN


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of `order_preserving_key`: fp32 values from int64-held uint32 keys."""
    signed = (key - _SIGN).to(torch.int32)
    return (signed ^ ((signed >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _bit_widths(bits: int) -> list[int]:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits_per_pass={bits} is invalid: use 1 to 16 bits (8 by default)")
    widths = [bits] * (32 // bits)
    if 32 % bits:
        widths.append(32 % bits)
    return widths


class RankPool(LocalPool):
    """The pool is this rank's own batch (``moe.pool: rank``), but the predictor thresholds are
    averaged over ``dp_group`` so that every replica keeps the same buffer."""

    def __init__(self, dp_group=None):
        self.dp_group = dp_group
        self.bytes_sent = 0  # payload bytes this rank handed to collectives
        self.collectives = 0

    def replica_mean(self, t: Tensor) -> Tensor:
        if self.dp_group is None:
            return t
        out = t.detach().clone()
        self._all_reduce(out, self.dp_group)
        return out / dist.get_world_size(self.dp_group)

    def _all_reduce(self, t: Tensor, group) -> Tensor:
        self.bytes_sent += t.numel() * t.element_size()
        self.collectives += 1
        dist.all_reduce(t, group=group)
        return t

    def reset_stats(self) -> None:
        self.bytes_sent = 0
        self.collectives = 0


class DistributedPool(RankPool):
    """The pool is the rank-major concatenation of the local batches of ``group`` (the EP group
    for ``moe.pool: ep``, the whole DP world for ``moe.pool: dp``). Returns exactly what
    `LocalPool` returns on that concatenation, tie rule included."""

    def __init__(self, group, dp_group=None, bits_per_pass: int = 8):
        super().__init__(dp_group)
        self.group = group
        self.widths = _bit_widths(bits_per_pass)

    def size(self, n_local: int) -> int:
        n = torch.tensor([n_local], dtype=torch.int64, device=comm_device(self.group))
        return int(self._all_reduce(n, self.group))

    def count(self, mask_NE: Tensor) -> Tensor:
        return self._all_reduce(mask_NE.sum(dim=0, dtype=torch.long), self.group)

    @torch.no_grad()
    def topk_mask(self, scores_NE: Tensor, k_E: Tensor) -> Tensor:
        keys_NE = signed_order_key(scores_NE)
        k_E = k_E.to(device=keys_NE.device, dtype=torch.int64)
        kth_E, need_E, n_pool = self._radix_select(keys_NE, k_E)
        k_E = k_E.clamp(max=n_pool)  # LocalPool takes everything when k >= N_pool
        kth_E = (kth_E - _SIGN).to(torch.int32)  # as a signed key
        tie_NE = keys_NE == kth_E.view(1, -1)
        tie_counts_E = tie_NE.sum(dim=0, dtype=torch.int64)
        # Ranks before mine in the group hold lower global indices: they take their ties first.
        gathered = [torch.empty_like(tie_counts_E) for _ in range(dist.get_world_size(self.group))]
        self.bytes_sent += tie_counts_E.numel() * tie_counts_E.element_size()
        self.collectives += 1
        dist.all_gather(gathered, tie_counts_E, group=self.group)
        before_E = sum(gathered[: dist.get_rank(self.group)], torch.zeros_like(tie_counts_E))
        take_E = (need_E - before_E).clamp(min=0)
        mask_NE = keys_NE > kth_E.view(1, -1)
        mask_NE |= tie_NE & (take_E >= tie_counts_E).view(1, -1)  # all of this rank's ties
        partial = ((take_E > 0) & (take_E < tie_counts_E)).nonzero().flatten().tolist()
        for e in partial:  # the first take_E[e] ties, in local (hence global) index order
            tie_rows = tie_NE[:, e].nonzero().flatten()
            mask_NE[tie_rows[: int(take_E[e])], e] = True
        return mask_NE & (k_E > 0).view(1, -1)

    @torch.no_grad()
    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        keys_NE = signed_order_key(values_NE)
        k_E = torch.full((keys_NE.shape[1],), k, dtype=torch.int64, device=keys_NE.device)
        kth_E, _, n_pool = self._radix_select(keys_NE, k_E)
        if not 1 <= k <= n_pool:  # n_pool is the same on every rank: all raise together
            raise ValueError(f"kth_largest: k={k} outside [1, N_pool={n_pool}]")
        return key_to_float(kth_E).to(values_NE.dtype)

    def _radix_select(self, keys_NE: Tensor, k_E: Tensor) -> tuple[Tensor, Tensor, int]:
        """From signed int32 keys, returns (the k-th largest uint32 key per expert, in int64; how many
        keys equal to it to take; N_pool).

        Experts with ``k_e = 0`` get an arbitrary key (callers mask them); ``k_e > N_pool`` is
        treated as ``N_pool``.
        """
        num_experts = keys_NE.shape[1]
        device = keys_NE.device
        prefix_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
        remaining_E = k_E.clamp(min=1)  # 1-based rank of the target among keys matching the prefix
        # Flipping the sign bit turns the signed key into the uint32 key's bit pattern. Digits come
        # from arithmetic shifts plus a mask, which never reaches the sign-extended bits.
        cand_keys = keys_NE ^ torch.iinfo(torch.int32).min
        cand_expert = torch.arange(num_experts, dtype=torch.int32, device=device).view(1, -1)
        n_pool, shift = 0, 32
        for p, width in enumerate(self.widths):
            shift -= width
            bins = 1 << width
            digit = (cand_keys >> shift) & (bins - 1)
            hist = torch.bincount((digit + cand_expert * bins).flatten(), minlength=num_experts * bins)
            hist_EB = self._all_reduce(hist.to(torch.int32), self.group).view(num_experts, bins).long()
            if p == 0:
                n_pool = int(hist_EB[0].sum()) if num_experts else 0
                remaining_E = remaining_E.clamp(max=max(n_pool, 1))
            at_or_above_EB = hist_EB.flip(1).cumsum(1).flip(1)  # keys with this digit or a higher one
            # The target's digit: the highest d whose running count from the top reaches `remaining`.
            digit_E = ((at_or_above_EB >= remaining_E.view(-1, 1)).sum(1) - 1).clamp(min=0)
            in_bucket_E = hist_EB.gather(1, digit_E.view(-1, 1)).view(-1)
            remaining_E = remaining_E - (at_or_above_EB.gather(1, digit_E.view(-1, 1)).view(-1) - in_bucket_E)
            prefix_E = (prefix_E << width) | digit_E
            if p + 1 < len(self.widths):
                # Keep the pairs in their expert's chosen bucket: after a pass or two only a sliver
                # of the N x E keys is left, so later passes cost next to nothing.
                if p == 0:
                    keep = digit == digit_E.to(torch.int32).view(1, -1)
                    cand_expert = cand_expert.expand_as(keep)
                else:
                    keep = digit == digit_E.to(torch.int32)[cand_expert]
                cand_keys, cand_expert = cand_keys[keep], cand_expert[keep]
        return prefix_E, remaining_E, n_pool
