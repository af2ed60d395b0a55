"""Bytes a resume reads from the checkpoint files, per rank and per node, at the 256-GPU layout's
shape (EP 8 inside a node of 8 ranks, ZeRO-0: model, EMA and both Adam moments replicated over the
data-parallel ranks, experts over their EDP group), on the threaded process group of the scale twin
(tests/scale_twin.py): W ranks as W threads, real collectives, real checkpoint files.

The state is the 256-GPU model's, scaled down by ``scale``: its 1.07B dense and 3.63B expert
parameters (16 experts) become ``1.07e9 / scale`` and ``3.63e9 / 16 / scale`` fp32 elements per
tensor kind, so every byte count here times ``scale`` is the full model's. Each rank's reader
records the ranges it copies out of the files (`RecordingReader`): a node's ranks must read each
byte at most once between them, and the job each byte exactly once.

Used by tests/test_checkpoint.py (W=16: 2 nodes of 8) and benchmarks/resume_reads.py (W=16 and 256).
"""

from __future__ import annotations

import torch

from diffmoe_dist import checkpoint as ckpt

DENSE_PARAMS, EXPERT_PARAMS, EXPERTS = 1.07e9, 3.63e9, 16  # the 256-GPU model (docs/performance.md)
DENSE_TENSORS = 8  # the dense parameters as a few tensors (a model has many), each owned in ranges
STATES = ("model", "ema", "optim/exp_avg", "optim/exp_avg_sq")
RANKS_PER_NODE = 8


def sizes(scale: int) -> tuple[int, int]:
    """(elements per dense tensor, elements per expert) per state at 1/scale of the 256-GPU model."""
    return round(DENSE_PARAMS / DENSE_TENSORS / scale), round(EXPERT_PARAMS / EXPERTS / scale)


def numels(scale: int) -> dict[str, int]:
    """Every global tensor of the checkpoint and its element count."""
    dense, expert = sizes(scale)
    out = {}
    for state in STATES:
        out.update({f"{state}/dense{i}": dense for i in range(DENSE_TENSORS)})
        out[f"{state}/experts"] = EXPERTS * expert
    return out


def slots(dims, scale: int, fill: float | None = None) -> list[ckpt.Slot]:
    """This rank's slots: the dense state replicated over all W ranks, its EXPERTS / EP experts
    replicated over its EDP group."""
    dense, expert = sizes(scale)
    g = torch.Generator().manual_seed(0)
    n = EXPERTS // dims.ep_size
    out = []
    for state in STATES:
        for i in range(DENSE_TENSORS):
            t = torch.randn(dense, generator=g)
            out.append(ckpt.Slot(f"{state}/dense{i}", t, (dense,), 0, dims.world_size, dims.rank))
        mine = torch.randn(EXPERTS, expert, generator=g)[dims.ep_rank * n : (dims.ep_rank + 1) * n]
        out.append(ckpt.Slot(f"{state}/experts", mine.clone(), (EXPERTS, expert), dims.ep_rank * n * expert,
                             dims.edp_size, dims.edp_rank))  # fmt: skip
    if fill is not None:
        for s in out:
            s.tensor.fill_(fill)
    return out


class RecordingReader(ckpt.ShardReader):
    """The real reader, recording (key, first element, elements) of every range it copies out."""

    def __init__(self, path: str):
        super().__init__(path)
        self.ranges: list[tuple[str, int, int]] = []

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        self.ranges.append((key, start, out.numel()))
        super().read_into(key, start, out)


def save_and_count(dims, root: str, scale: int) -> dict:
    """Collective: saves this layout's state, then loads it as a resume did before (every rank reads
    all it holds) and as it does now (`load_slots_once`). Returns per way the bytes read, the ranges
    and whether the loaded state is bitwise the saved one."""
    path = ckpt.save(root, 1, slots(dims, scale), {}, {}, dims)
    out = {"rank": dims.rank}
    for how in ("before", "now"):
        reader, mine = RecordingReader(path), slots(dims, scale, fill=7.0)
        if how == "now":
            ckpt.load_slots_once(reader, mine, dims)
        else:
            ckpt.load_slots(reader, mine)
        same = all(torch.equal(a.tensor, b.tensor) for a, b in zip(mine, slots(dims, scale), strict=True))
        out[how] = {"bytes": reader.bytes_read, "ranges": reader.ranges, "bitwise": same}
    return out


def per_node(results: list[dict], how: str, scale: int) -> dict:
    """Bytes read per node (RANKS_PER_NODE consecutive ranks) and the most times any element of any
    tensor was read inside one node and in the whole job."""
    numel = numels(scale)
    nodes = len(results) // RANKS_PER_NODE
    job = {k: torch.zeros(n, dtype=torch.int16) for k, n in numel.items()}
    most_in_node, bytes_per_node = 0, []
    for node in range(nodes):
        counts = {k: torch.zeros(n, dtype=torch.int16) for k, n in numel.items()}
        total = 0
        for r in results[node * RANKS_PER_NODE : (node + 1) * RANKS_PER_NODE]:
            total += r[how]["bytes"]
            for key, start, count in r[how]["ranges"]:
                counts[key][start : start + count] += 1
        most_in_node = max(most_in_node, *(int(c.max()) for c in counts.values()))
        for k in job:
            job[k] += counts[k]
        bytes_per_node.append(total)
    return {
        "bytes_per_node": bytes_per_node,
        "most_reads_of_a_byte_in_a_node": most_in_node,
        "least_reads_of_a_byte_in_the_job": min(int(c.min()) for c in job.values()),
        "most_reads_of_a_byte_in_the_job": max(int(c.max()) for c in job.values()),
        "checkpoint_bytes": 4 * sum(numel.values()),
    }
