"""The planner's cost model (diffmoe_dist.plan) against hand-computed cases, autograd's own saved
tensors and physical bounds; never against its own sum. The measured CPU comparison is
benchmarks/plan_check.py (too slow and noisy for a test on a shared 2-core machine)."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch

from diffmoe_dist.config import load_config
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.plan.cluster import Cluster, Link, all_gather_s, all_reduce_s, load_cluster
from diffmoe_dist.plan.cost import activation_bytes, plan

TINY = [*conftest.TINY_MODEL, "moe.num_experts=4"]
T2I = "configs/t2i/diffmoe-e16-256gpu.yaml"
H100 = "tools/clusters/h100_32x8.yaml"


def _gpu_cluster(rails: int) -> Cluster:
    """2 nodes x 8 GPUs, latency-free links: NVLink 400 GB/s, NICs 50 GB/s."""
    return Cluster(
        name="t", nodes=2, devices_per_node=8, peak_flops={"bf16": 1e15}, compute_efficiency=0.5,
        memory_bytes=80e9, memory_bandwidth=3e12, intra_node=Link(400e9, 0.0), inter_node=Link(50e9, 0.0),
        rails_per_node=rails,
    )  # fmt: skip


def test_all_reduce_over_nodes_spreads_the_bytes_over_every_rail():
    # 8 GB over 16 ranks (8 per node). NVLink: reduce-scatter + all-gather, 2 x 7/8 x 8 GB / 400 GB/s
    # = 35 ms. Between the 2 nodes each GPU all-reduces its 1 GB eighth over its own NIC: a 2-rank
    # ring moves 2 x 1/2 x 1 GB at 50 GB/s = 20 ms. One NIC for 8 GPUs: 6.25 GB/s each, 160 ms.
    assert all_reduce_s(_gpu_cluster(8), 8e9, 16, 8) == pytest.approx(0.035 + 0.020)
    assert all_reduce_s(_gpu_cluster(1), 8e9, 16, 8) == pytest.approx(0.035 + 0.160)
    # An expert-data-parallel group, one rank per node: a ring over the nodes on one NIC each.
    assert all_reduce_s(_gpu_cluster(8), 1e9, 2, 1) == pytest.approx(2 * 0.5 * 1e9 / 50e9)
    # All-gather of 0.5 GB per rank (8 GB in all): NVLink 7/8 x 8 GB / 400 GB/s, NIC 1/2 x 1 GB / 50 GB/s.
    assert all_gather_s(_gpu_cluster(8), 0.5e9, 16, 8) == pytest.approx(0.0175 + 0.010)


def test_h100_cluster_file_describes_eight_rails():
    cluster = load_cluster(H100)
    assert cluster.rails_per_node == 8 and cluster.devices_per_node == 8 and cluster.nodes == 32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["c2i", "t2i"])
def test_activation_bytes_match_what_autograd_saves(precision, task):
    extra = ["model.task=t2i", "model.text_dim=32", "model.text_len=8"] if task == "t2i" else []
    cfg = load_config("configs/local/diffmoe-tiny.yaml", [*TINY, *extra, f"train.precision={precision}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe).train()
    b, m = 8, cfg.model
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() > 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    cond = {"y": torch.arange(b) % m.num_classes}
    if task == "t2i":
        cond = {"text": torch.randn(b, m.text_len, m.text_dim), "text_mask": torch.ones(b, m.text_len).bool()}
    collector = MoECollector()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with collector.collect(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(torch.randn(b, m.in_channels, m.image_size, m.image_size), torch.rand(b), **cond)
        collector.losses()
    saved = sum(seen.values())
    # Under autocast the bf16 copies of the weights are saved too (the plan's "weight_casts").
    casts = 2 * sum(p.numel() for p in model.parameters() if p.dim() > 1) if precision == "bf16" else 0
    assert activation_bytes(cfg, b, margin=1.0) + casts == pytest.approx(saved, rel=0.1)
    del out


def test_bf16_gradients_halve_the_bytes_and_overlap_hides_them_behind_backward():
    cfg = load_config(T2I, ["data.global_batch_size=8192"])
    cluster = load_cluster(H100)
    fp32 = plan(cfg, cluster, 256, 8, zero=0, overlap=False, grad_dtype="fp32")
    bf16 = plan(cfg, cluster, 256, 8, zero=0, overlap=False, grad_dtype="bf16")
    hidden = plan(cfg, cluster, 256, 8, zero=0, overlap=True, grad_dtype="bf16")
    assert bf16["comm"]["grad_bytes"] * 2 == fp32["comm"]["grad_bytes"]
    assert bf16["time"]["grad_reduce_s"] < fp32["time"]["grad_reduce_s"]
    t = hidden["time"]
    assert t["grad_reduce_s"] == pytest.approx(bf16["time"]["grad_reduce_s"])
    # Overlap hides at most the backward pass, and never the last bucket.
    assert t["grad_reduce_s"] - t["backward_s"] <= t["grad_exposed_s"] < t["grad_reduce_s"]
    assert t["grad_exposed_s"] > 0 and hidden["time"]["step_s"] < bf16["time"]["step_s"]


def test_plan_respects_physical_bounds_and_hand_counts():
    cfg = load_config(T2I, ["data.global_batch_size=2048"])
    cluster = load_cluster(H100)
    p = plan(cfg, cluster, 256, 8)
    # No step beats the executed FLOPs at the device peak, and MFU stays below compute efficiency.
    assert p["time"]["step_s"] > p["flops"]["executed_per_rank"] / 989e12
    assert 0 < p["throughput"]["mfu"] < cluster.compute_efficiency
    # 8 images x 256 tokens; each all-to-all moves 7/8 of the C N rows: dispatch fp32, combine bf16,
    # forward and backward, per MoE layer (12).
    tokens, d = 2048, 1536
    assert p["layout"]["tokens_per_rank"] == tokens and p["layout"]["edp"] == 32
    assert p["comm"]["a2a_bytes"] == pytest.approx(12 * 2 * tokens * 7 / 8 * d * (4 + 2))
    # fp32 weights, grads, EMA and 2 Adam moments of this rank's 1/8 of the experts and all the rest.
    local = p["params"]["dense"] + p["params"]["expert"] / 8
    assert p["memory"]["weights"] == p["memory"]["grads"] == p["memory"]["ema"] == pytest.approx(4 * local)
    assert p["memory"]["optimizer"] == pytest.approx(8 * local)
    # Doubling the batch doubles all-to-all bytes but not selection bytes (independent of tokens).
    big = copy.deepcopy(cfg)
    big.data.global_batch_size *= 2
    q = plan(big, cluster, 256, 8)
    assert q["comm"]["a2a_bytes"] == pytest.approx(2 * p["comm"]["a2a_bytes"])
    assert q["comm"]["selection_bytes"] == p["comm"]["selection_bytes"]


def test_cpu_ranks_sharing_cores_get_their_share():
    cpu = Cluster(
        name="c", nodes=1, devices_per_node=2, peak_flops={"fp32": 90e9}, compute_efficiency=0.5, memory_bytes=16e9,
        memory_bandwidth=20e9, intra_node=Link(1e9, 1e-4), kind="cpu",
    )  # fmt: skip
    assert cpu.rank_peak("fp32", 2) == 90e9 and cpu.rank_peak("fp32", 4) == 45e9
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["parallel.expert_parallel_size=2"])
    two, four = plan(cfg, cpu, 2), plan(cfg, cpu, 4)
    # Half the images per rank at half a core each: the same compute time per step.
    assert four["time"]["compute_s"] == pytest.approx(two["time"]["compute_s"], rel=0.05)


def test_side_by_side_microbenchmarks_run_real_gloo_ranks_within_physical_bounds():
    from diffmoe_dist.plan.calibrate import side_by_side

    got = side_by_side(2, sizes=(64 * 1024, 1024 * 1024), iters=2)
    # One rank of two sharing the cores: positive, and below what one core can do (384 GFLOP/s fp32).
    assert 1e8 < got["rank_peak_flops"]["fp32"] < 384e9
    for op in ("all_reduce", "all_to_all"):
        link = got["collectives"][op]
        assert 0 < link["latency"] < 1.0 and 1e6 < link["bandwidth"] <= 1e11  # loopback: below 100 GB/s


def test_the_data_term_says_when_shard_opens_not_compute_bound_the_256gpu_step():
    cluster = load_cluster(H100)
    big = "configs/t2i/diffmoe-e16-256gpu.yaml"
    # at bf16 reduction (the faster step: more samples a second to read); fp32 hides the same effect
    windowed = plan(load_config(big, ["parallel.grad_reduce_dtype=bf16"]), cluster, 256)
    today = plan(load_config(big, ["parallel.grad_reduce_dtype=bf16", "data.shuffle_window=0"]), cluster, 256)
    step = windowed["time"]["step_s"]
    assert today["time"]["step_s"] == step  # the data term never changes the compute estimate
    # ~1 MB a sample (fp32 latent + 120 x 4096 bf16 text features), read once per step
    per_sample = 4 * 32 * 32 * 4 + 120 * 4096 * 2 + 120
    assert windowed["data"]["bytes_per_s"] == pytest.approx(8192 / step * per_sample)
    assert today["data"]["opens_per_sample"] == 1.0 and windowed["data"]["opens_per_sample"] <= 0.01
    assert today["data"]["bound"] == "data" and any("data, not compute" in w for w in today["warnings"])
    assert windowed["data"]["bound"] == "compute" and not any("data, not" in w for w in windowed["warnings"])
