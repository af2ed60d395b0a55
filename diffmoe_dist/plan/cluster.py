"""A cluster as the planner sees it, and the alpha-beta cost of the collectives the trainer issues.

GPU clusters (tools/clusters/h100_32x8.yaml): per-GPU peak, NVLink inside a node, ``rails_per_node``
NICs per node. NCCL runs one ring / tree channel per rail, so a node's inter-node traffic spreads
over all of its NICs: an all-reduce over every rank of several nodes reduce-scatters over NVLink,
all-reduces 1/g of the buffer per GPU over that GPU's own NIC, and all-gathers over NVLink (a
hierarchical all-reduce); a group with one rank per node (expert-data-parallel) uses one NIC per
rank, all groups at once.

CPU "clusters" (tools/clusters/cpu_local.yaml, written by `diffmoe_dist.plan.calibrate`): one node
of ``cores_per_node`` cores; what a rank computes and how fast gloo moves bytes depend on how many
ranks share the cores, so the file holds, per rank count, the matmul FLOP/s one rank gets while all
of them run (``rank_peak_flops``) and gloo's all-reduce and all-to-all alpha and bandwidth on
loopback (``collectives``), all measured side by side.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import yaml


class ClusterError(ValueError):
    """A cluster file that cannot be used; the message names the file and the field."""


@dataclass
class Link:
    bandwidth: float  # bytes/s per rank, one direction
    latency: float  # seconds per collective step (alpha)


@dataclass
class Cluster:
    name: str
    nodes: int
    devices_per_node: int  # GPUs, or cores for a CPU node
    peak_flops: dict[str, float]  # per device (CPU: per core at one thread), by precision
    compute_efficiency: float  # achieved fraction of the matmul peak for the model's compute (not MFU: no comm)
    memory_bytes: float  # per device (CPU: per node)
    memory_bandwidth: float  # bytes/s per device (CPU: one core's)
    intra_node: Link
    inter_node: Link | None = None  # per NIC
    rails_per_node: int = 1  # NICs per node
    kind: str = "gpu"
    notes: str = ""
    # CPU only, by ranks on the node: one rank's fp32 matmul FLOP/s with all of them running, and
    # gloo's links {"all_reduce": Link, "all_to_all": Link}.
    rank_peak_flops: dict[int, dict[str, float]] = field(default_factory=dict)
    collectives: dict[int, dict[str, Link]] = field(default_factory=dict)
    # Eager overhead (GPU): host seconds to launch one op, and the idle time one host read costs
    # (the stream drains, then refills from the host). CPU: 0, its measured efficiency holds them.
    host_op_s: float = 0.0
    host_read_s: float = 0.0
    # What the shared file system gives one job: read_bandwidth (bytes/s), metadata_ops (opens/s),
    # optionally samples_per_shard (plan/data_io.py); None: no data term.
    file_system: dict | None = None

    def ranks_per_node(self, world: int) -> int:
        return min(world, self.devices_per_node) if self.kind == "gpu" else world

    def rank_peak(self, precision: str, ranks_on_node: int, threads: int = 1) -> float:
        """FLOP/s one rank's matmuls reach. GPU: the device's peak. CPU: measured side by side at
        this rank count where the file has it, else a core's peak times the cores it gets."""
        if self.kind == "gpu":
            return self.peak_flops.get(precision) or next(iter(self.peak_flops.values()))
        measured = self.rank_peak_flops.get(ranks_on_node, {}).get(precision)
        if measured and threads == 1:
            return measured
        core = self.peak_flops.get(precision) or next(iter(self.peak_flops.values()))
        return core * min(float(threads), self.devices_per_node / ranks_on_node)

    def link(self, op: str, ranks_on_node: int, spans_nodes: bool) -> Link:
        if spans_nodes and self.inter_node is not None:
            return self.inter_node
        if self.collectives:
            near = min(self.collectives, key=lambda n: (abs(n - ranks_on_node), -n))
            return self.collectives[near].get(op, self.intra_node)
        return self.intra_node


def _link(raw: dict, path: str, name: str) -> Link:
    try:
        return Link(float(raw["bandwidth"]), float(raw["latency"]))
    except (KeyError, TypeError, ValueError):
        raise ClusterError(f"{path}: {name} needs bandwidth (bytes/s) and latency (s)") from None


def load_cluster(path: str) -> Cluster:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    try:
        devices = raw.get("gpus_per_node") or raw.get("cores_per_node") or raw["devices_per_node"]
        peak = raw["peak_flops"]
        peak = {k: float(v) for k, v in peak.items()} if isinstance(peak, dict) else {"bf16": float(peak)}
        inter = raw.get("inter_node")
        cluster = Cluster(
            name=raw.get("name", os.path.splitext(os.path.basename(path))[0]),
            nodes=int(raw.get("nodes", 1)),
            devices_per_node=int(devices),
            peak_flops=peak,
            compute_efficiency=float(raw.get("compute_efficiency", 0.4)),
            memory_bytes=float(raw["memory_bytes"]),
            memory_bandwidth=float(raw["memory_bandwidth"]),
            intra_node=_link(raw["intra_node"], path, "intra_node"),
            inter_node=_link(inter, path, "inter_node") if inter else None,
            rails_per_node=int(raw.get("rails_per_node", 1)),
            host_op_s=float(raw.get("host_op_s", 0.0)),
            host_read_s=float(raw.get("host_read_s", 0.0)),
            kind=raw.get("kind", "gpu"),
            notes=raw.get("notes", ""),
            rank_peak_flops={
                int(k): {p: float(x) for p, x in v.items()} for k, v in raw.get("rank_peak_flops", {}).items()
            },
            collectives={
                int(k): {op: _link(x, path, f"collectives.{k}.{op}") for op, x in v.items()}
                for k, v in raw.get("collectives", {}).items()
            },
            file_system=raw.get("file_system"),
        )
    except KeyError as exc:
        raise ClusterError(f"{path} lacks {exc.args[0]!r}: see tools/clusters/h100_32x8.yaml for the fields") from None
    if cluster.nodes > 1 and cluster.inter_node is None:
        raise ClusterError(f"{path} has nodes={cluster.nodes} but no inter_node link")
    for name in ("read_bandwidth", "metadata_ops"):
        if cluster.file_system is not None and not float(cluster.file_system.get(name, 0)) > 0:
            raise ClusterError(f"{path}: file_system.{name} must be a positive number (bytes/s, opens/s)")
    if cluster.kind not in ("gpu", "cpu"):
        raise ClusterError(f"{path}: kind={cluster.kind!r} is invalid: use gpu or cpu")
    return cluster


# ---- collectives (alpha-beta) -------------------------------------------------------------------
def _ring_or_tree(link: Link, nbytes: float, n: int) -> float:
    """Ring 2(n-1) alpha + 2 (n-1)/n S / bw, or a (double binary) tree 2 log2(n) alpha + 2 S / bw."""
    ring = 2 * (n - 1) * link.latency + 2 * (n - 1) / n * nbytes / link.bandwidth
    tree = 2 * math.ceil(math.log2(n)) * link.latency + 2 * nbytes / link.bandwidth
    return min(ring, tree)


def all_reduce_s(cluster: Cluster, nbytes: float, ranks: int, per_node: int) -> float:
    """All-reduce of ``nbytes`` over ``ranks`` ranks, ``per_node`` of them on each node. Across
    nodes, per_node > 1: hierarchical (NVLink reduce-scatter, 1/per_node of the buffer over each
    GPU's own rail, NVLink all-gather); per_node = 1: a ring over the nodes, one NIC per rank."""
    if ranks <= 1:
        return 0.0
    if cluster.collectives:  # CPU: gloo's whole all-reduce at this rank count, fitted as alpha + S / bw
        link = cluster.link("all_reduce", ranks, False)
        return link.latency + nbytes / link.bandwidth
    nodes = math.ceil(ranks / per_node)
    if nodes <= 1 or cluster.inter_node is None:
        return _ring_or_tree(cluster.link("all_reduce", ranks, False), nbytes, ranks)
    inter = cluster.inter_node
    if per_node > 1:
        rails = min(per_node, cluster.rails_per_node)
        nic = Link(inter.bandwidth * rails / per_node, inter.latency)  # each GPU's share of the rails
        intra = cluster.intra_node
        local = 2 * ((per_node - 1) * intra.latency + (per_node - 1) / per_node * nbytes / intra.bandwidth)
        return local + _ring_or_tree(nic, nbytes / per_node, nodes)
    return _ring_or_tree(inter, nbytes, nodes)


def all_gather_s(cluster: Cluster, nbytes_per_rank: float, ranks: int, per_node: int) -> float:
    """All-gather of ``nbytes_per_rank`` from each of ``ranks`` ranks (hierarchical across nodes, as
    `all_reduce_s`: NVLink inside the node, each GPU's share of the rails between nodes)."""
    if ranks <= 1:
        return 0.0
    total = nbytes_per_rank * ranks
    nodes = math.ceil(ranks / per_node)
    if cluster.collectives or nodes <= 1 or cluster.inter_node is None:
        link = cluster.link("all_reduce", ranks, False)  # CPU: the all-reduce fit (a ring moves as much)
        return math.ceil(math.log2(ranks)) * link.latency + (ranks - 1) / ranks * total / link.bandwidth
    inter, intra = cluster.inter_node, cluster.intra_node
    nic_bw = inter.bandwidth * min(per_node, cluster.rails_per_node) / per_node
    local = (per_node - 1) * intra.latency + (per_node - 1) / per_node * total / intra.bandwidth if per_node > 1 else 0
    return local + (nodes - 1) * inter.latency + (nodes - 1) / nodes * total / per_node / nic_bw


def all_to_all_s(cluster: Cluster, offrank_bytes: float, ranks: int, per_node: int) -> float:
    """One all-to-all of ``offrank_bytes`` leaving each of ``ranks`` consecutive ranks: peers in the
    node over NVLink (CPU: gloo's measured all-to-all), the rest through this GPU's share of the
    node's rails, in parallel."""
    if ranks <= 1:
        return 0.0
    local = min(ranks, per_node)
    intra = cluster.link("all_to_all", ranks, False)
    if ranks <= per_node or cluster.inter_node is None:
        return intra.latency + offrank_bytes / intra.bandwidth
    inter = cluster.inter_node
    nic_bw = inter.bandwidth * min(per_node, cluster.rails_per_node) / per_node
    per_peer = offrank_bytes / (ranks - 1)
    return inter.latency + max((local - 1) * per_peer / intra.bandwidth, (ranks - local) * per_peer / nic_bw)
