"""Resume reads each byte of a checkpoint once per job: every rank reads only the ranges it would
write (`layout.owned_ranges`: about 1/W of the replicated dense state, 1/EDP of its experts, its own
ZeRO fragments), and the replicas of a tensor exchange their ranges in one all-reduce per buffer.

Before this, every rank read every tensor it holds: the replicated dense state W times per job
(once per rank: a node of 8 ranks read it 8 times, or once plus 7 page-cache hits where the file
system caches) and each expert EDP times. Now the file system serves each byte once per job, and
the rest travels over the interconnect (the DP and EDP groups), which is faster than any shared
file system at this size.

Exactness: the exchange is a SUM of bit patterns (the buffer's bytes viewed as int32) in which every
element has exactly one owner and zeros elsewhere: integer addition of x and zeros is x, for any
dtype, NaN, -0.0 and bf16 pairs sharing a word included. Resharding is unchanged (the ranges are
those of the *current* layout, read from whatever layout wrote the files), and so is verification:
`io.verify_distributed` still hashes every file before anything is loaded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffmoe_dist.checkpoint.layout import Slot, owned_ranges
from diffmoe_dist.checkpoint.resume import ShardReader, check_slot_shapes, load_slots
from diffmoe_dist.parallel.groups import ParallelDims, comm_device

BUFFER_BYTES = 256 << 20  # exchanged per all-reduce: bounds the extra host (or device) memory


def _nbytes(slot: Slot) -> int:
    return slot.tensor.numel() * slot.tensor.element_size()


def _exchange(reader: ShardReader, batch: list[Slot], group) -> None:
    offsets, total = [], 0
    for slot in batch:
        offsets.append(total)
        total += -(-_nbytes(slot) // 4) * 4  # int32-aligned
    buf = torch.zeros(total, dtype=torch.uint8)
    for slot, offset in zip(batch, offsets, strict=True):
        mine = torch.empty(slot.tensor.numel(), dtype=slot.tensor.dtype)
        size = slot.tensor.element_size()
        for start, numel in owned_ranges(slot):
            part = mine[start : start + numel]
            reader.read_into(slot.key, slot.start + start, part)
            buf[offset + start * size : offset + (start + numel) * size] = part.view(torch.uint8)
    words = buf.view(torch.int32).to(comm_device(group))
    dist.all_reduce(words, group=group)
    buf = words.cpu().view(torch.uint8)
    for slot, offset in zip(batch, offsets, strict=True):
        flat = buf[offset : offset + _nbytes(slot)].view(slot.tensor.dtype)
        with torch.no_grad():
            slot.tensor.copy_(flat.view(slot.tensor.shape))


def load_slots_once(reader: ShardReader, slots: list[Slot], dims: ParallelDims | None) -> None:
    """Collective: `resume.load_slots`, each byte read once per job (module docstring)."""
    groups = {}
    if dims is not None and dims.distributed and dims.world_size > 1:
        groups = {dims.world_size: dims.dp_group}
        groups.setdefault(dims.edp_size, dims.edp_group)
    check_slot_shapes(reader, slots)
    load_slots(reader, [s for s in slots if s.replicas not in groups])
    for replicas, group in groups.items():  # the same order on every rank
        batch, size = [], 0
        for slot in (s for s in slots if s.replicas == replicas):
            if batch and size + _nbytes(slot) > BUFFER_BYTES:
                _exchange(reader, batch, group)
                batch, size = [], 0
            batch.append(slot)
            size += _nbytes(slot)
        if batch:
            _exchange(reader, batch, group)
