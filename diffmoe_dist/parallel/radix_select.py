"""Exact k-th largest per column over rows spread across ranks, without moving the rows.

docs/design.md section 2. Pure functions: the collectives come in as two callables, so the whole search
runs (and is tested) in one process with a fake all-reduce; `parallel/pools.py` passes gloo / NCCL.
We radix-select on the order-preserving uint32 key of each fp32 value:

1. ``len(widths)`` rounds (default 11 + 11 + 10 bits); round p all-reduces a fixed-size
   (C x 2^bits) histogram of the next bits of the keys that match the prefix found so far
   (the others land in a dump bin). The digit where the descending running count reaches ``k_c``
   extends the prefix; after the last round the prefix is the k-th largest key.
2. The pool size comes free with round 1 (every row adds one key per column), so ``k`` may be a
   function of it (``k = floor(C N_pool / E)``): no size collective, and ranks may hold different
   numbers of rows. An ``extra`` payload rides along with round 1 (the dynamic-inference counts).
3. Ties at the k-th key (`tie_take_mask`): one exchange of per-rank tie counts tells each rank how
   many of its tied rows to take, lowest global (rank-major) index first, by a cumsum.

Everything stays on the device in fixed shapes (scatter_add into fixed histograms, cumsum,
gather): no host read, no data-dependent size. Bytes per call are O(C 2^bits passes + C W),
independent of the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]  # sum over the pool's ranks; returns the sum
RankPrefix = Callable[[Tensor], Tensor]  # sum over the pool's ranks before this one (0 on the first)

_SIGN = 0x80000000
DEFAULT_BITS = 11


def signed_order_key(x: Tensor) -> Tensor:
    """int32 keys with ``key(a) < key(b)`` iff ``a < b`` for finite fp32 values (signed compare).

    Non-negative floats order like their bit patterns; negative ones in reverse, so their 31 low
    bits are flipped. ``-0.0`` is folded into ``+0.0`` first so that equal values get equal keys.
    """
    bits = (x.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def order_preserving_key(x: Tensor) -> Tensor:
    """The uint32 radix key (held in int64): `signed_order_key` with its sign bit flipped, so that
    unsigned order, and hence digit-by-digit order from the top bit, is float order."""
    return signed_order_key(x).to(torch.int64) + _SIGN


def signed_key_to_float(signed: Tensor) -> Tensor:
    """Inverse of `signed_order_key`: fp32 values from int32 keys (a selection's ``kth_C``)."""
    signed = signed.to(torch.int32)
    return (signed ^ ((signed >> 31) & 0x7FFFFFFF)).view(torch.float32)


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of `order_preserving_key`: fp32 values from int64-held uint32 keys."""
    return signed_key_to_float(key - _SIGN)


def bit_widths(bits: int = DEFAULT_BITS) -> list[int]:
    """Digit widths of the passes: ``bits`` each, the remainder last (11 -> [11, 11, 10])."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits_per_pass={bits} is invalid: use 1 to 16 bits ({DEFAULT_BITS} by default)")
    widths = [bits] * (32 // bits)
    if 32 % bits:
        widths.append(32 % bits)
    return widths


def capacity_k(n_pool: Tensor, capacity: float | Tensor, num_experts: int) -> Tensor:
    """``k = floor(C N_pool / E)`` clamped to ``[0, N_pool]``, on the device, in float64: the same
    IEEE operations as `routers.expert_capacity` (1e-9 guard included), so the same k."""
    n = n_pool.to(torch.float64)
    k = torch.floor(n * capacity / num_experts + 1e-9).to(torch.int64)
    return torch.minimum(k.clamp(min=0), n_pool.to(torch.int64))


@dataclass
class Selection:
    kth_C: Tensor  # int32 signed key of each column's k-th largest (arbitrary where k = 0)
    need_C: Tensor  # int64: how many keys equal to kth_C the pool takes (>= 1 where k >= 1)
    k_C: Tensor  # int64 k per column, clamped to [0, N_pool]
    n_pool: Tensor  # int64 0-dim: rows in the whole pool
    extra: Tensor | None  # the all-reduced extra payload (int64), if one was given


def radix_select(
    keys_NC: Tensor,
    k_of: Callable[[Tensor, Tensor | None], Tensor],
    all_reduce: AllReduce,
    widths: list[int],
    extra: Tensor | None = None,
) -> Selection:
    """The k-th largest signed int32 key of each column over the pool, ``k_C = k_of(n_pool,
    extra_sum)`` (long, per column or a scalar), ``extra`` (int, any shape) summed over the pool
    with the first histogram. A collective: every rank calls it with the same C and widths."""
    n, c = keys_NC.shape
    device = keys_NC.device
    # Descending keys (0xFFFFFFFF - the uint32 key, in int64): the largest value has the smallest key,
    # so one cumsum over a histogram counts the keys "at or above" each digit, and the target's
    # digit is the number of bins whose running count is still short of the rank sought.
    dkeys_NC = (keys_NC ^ torch.iinfo(torch.int32).max).to(torch.int64) & 0xFFFFFFFF
    ones = torch.ones(n * c, dtype=torch.int32, device=device)
    mismatch_NC = prefix_C = remaining_C = k_C = n_pool = extra_sum = None
    shift = 32
    for p, width in enumerate(widths):
        shift -= width
        bins = 1 << width
        digit_NC = dkeys_NC >> shift if p == 0 else (dkeys_NC >> shift) & (bins - 1)
        slot_NC = digit_NC + torch.arange(0, c * bins, bins, dtype=torch.int64, device=device)
        if p > 0:  # only keys whose higher digits equal the prefix count; the rest go to the dump bin
            slot_NC.masked_fill_(mismatch_NC, c * bins)
        hist = torch.zeros(c * bins + 1, dtype=torch.int32, device=device)
        hist.scatter_add_(0, slot_NC.view(-1), ones)
        hist = hist[: c * bins]
        if p == 0 and extra is not None:
            reduced = all_reduce(torch.cat([hist, extra.flatten().to(torch.int32)]))
            hist, extra_sum = reduced[: c * bins], reduced[c * bins :].long().view_as(extra)
        else:
            hist = all_reduce(hist)
        hist_CB = hist.view(c, bins)
        if p == 0:
            n_pool = hist_CB[0].sum(dtype=torch.int64) if c else torch.zeros((), dtype=torch.int64, device=device)
            k_C = torch.minimum(k_of(n_pool, extra_sum).to(torch.int64).expand(c), n_pool).clamp(min=0)
            # 1-based rank of the target among the keys matching the prefix; k >= N_pool takes all
            remaining_C = k_C.clamp(min=1).minimum(n_pool.clamp(min=1))
        at_or_above_CB = hist_CB.cumsum(1)  # keys with this digit or a higher value's (int64)
        # The target's digit: the first whose running count reaches `remaining` (clamped: an empty pool).
        digit_C = (at_or_above_CB < remaining_C.view(-1, 1)).sum(1).clamp(max=bins - 1)
        above_CB = at_or_above_CB - hist_CB  # keys of higher values than each digit's
        remaining_C = remaining_C - above_CB.gather(1, digit_C.view(-1, 1)).view(-1)
        prefix_C = digit_C if p == 0 else torch.add(digit_C, prefix_C, alpha=bins)
        if p + 1 < len(widths):
            differs_NC = digit_NC != digit_C.view(1, -1)
            mismatch_NC = differs_NC if p == 0 else mismatch_NC | differs_NC
    kth_C = (0x7FFFFFFF - prefix_C).to(torch.int32)  # back from the descending key to the signed one
    return Selection(kth_C, remaining_C, k_C, n_pool, extra_sum)


def tie_take_mask(keys_NC: Tensor, sel: Selection, rank_prefix: RankPrefix) -> Tensor:
    """BoolTensor[N, C]: the local rows among each column's ``k_c`` largest of the pool. Ties at
    the k-th key go to the lowest global index: ranks before this one take theirs first (one
    exchange of per-rank tie counts), then this rank its first ones in row order (a cumsum)."""
    kth = sel.kth_C.view(1, -1)
    tie_NC = keys_NC == kth
    tie_counts_C = tie_NC.sum(0, dtype=torch.int64)
    take_C = (sel.need_C - rank_prefix(tie_counts_C)).clamp(min=0)
    mask_NC = (keys_NC > kth) | (tie_NC & (tie_NC.cumsum(0) <= take_C.view(1, -1)))
    return mask_NC & (sel.k_C > 0).view(1, -1)
