"""The one FLOP count (diffmoe_dist.train.flops) against torch's FlopCounterMode on a real forward
and backward of tiny models, and the matmul peak against a physical bound."""

from __future__ import annotations

import conftest
import pytest
import torch

from diffmoe_dist.config import load_config
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.train import flops

TINY = [*conftest.TINY_MODEL, "moe.num_experts=4"]
T2I = ["model.task=t2i", "model.text_dim=32", "model.text_len=8"]
CASES = {
    "dense": ["moe.router=dense"],
    "diffmoe": [],
    "diffmoe-C1.5": ["moe.capacity=1.5"],
    "token_choice": ["moe.router=token_choice", "moe.top_k=2"],
    "expert_choice_local": ["moe.router=expert_choice_local"],
    "expert_race": ["moe.router=expert_race", "moe.capacity=1.5"],
    "shared-experts": ["moe.num_shared_experts=2"],
    "t2i-diffmoe": T2I,
    "t2i-dense": [*T2I, "moe.router=dense"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_flops_equal_the_flop_counter_on_a_real_forward_and_backward(case):
    torch.manual_seed(0)
    cfg = load_config("configs/local/diffmoe-tiny.yaml", TINY + CASES[case])
    model = build_model(cfg.model, cfg.moe).train()
    b, m = 6, cfg.model
    x = torch.randn(b, m.in_channels, m.image_size, m.image_size)
    cond = {"y": torch.arange(b) % m.num_classes}
    if m.task == "t2i":
        text = torch.randn(b, m.text_len, m.text_dim)
        cond = {"text": text, "text_mask": torch.ones(b, m.text_len, dtype=torch.bool)}
    collector = MoECollector()
    with flops.flop_counter() as fwd_counter, collector.collect(model):
        out = model(x, torch.rand(b), **cond)
    with flops.flop_counter() as bwd_counter:
        (out.square().mean() + collector.losses()["loss"]).backward()  # the trainer's loss
    counted = flops.step_flops(cfg, b)
    assert fwd_counter.get_total_flops() == pytest.approx(sum(f for f, _ in counted.values()), rel=1e-9)
    assert bwd_counter.get_total_flops() == pytest.approx(sum(g for _, g in counted.values()), rel=1e-9)
    assert flops.train_flops(cfg, b) == fwd_counter.get_total_flops() + bwd_counter.get_total_flops()


def test_active_expert_rows_follow_capacity_and_pool():
    cfg = load_config("configs/local/diffmoe-tiny.yaml", TINY + ["moe.capacity=1.0"])
    # 3 images x 64 tokens on each of 2 ranks, one pool of 384 tokens: 4 experts x 96 rows, 192 per rank
    assert flops.expert_rows(cfg, 3, pool_ranks=2) == 192
    # one rank's pool of 192 tokens: 4 x floor(192 / 4) = 192 rows; at capacity 0.5: 96
    assert flops.expert_rows(cfg, 3) == 192
    cfg.moe.capacity = 0.5
    assert flops.expert_rows(cfg, 3) == 96


def test_matmul_peak_is_positive_and_below_a_physical_bound():
    peak = flops.matmul_peak(torch.float32, n=256, threads=1, repeats=3)
    # one core does at most 2 FMA units x 16 fp32 lanes x 2 FLOPs at <= 6 GHz (AVX-512): 384 GFLOP/s
    assert 1e8 < peak < 384e9


def test_mfu_peak_reads_a_number_a_cluster_file_or_off_and_refuses_anything_else():
    from diffmoe_dist.config import ConfigError
    from diffmoe_dist.train.metrics import mfu_peak_source, resolve_mfu_peak

    cpu = torch.device("cpu")
    assert resolve_mfu_peak("989", "bf16", cpu) == 989e12
    assert resolve_mfu_peak("tools/clusters/h100_32x8.yaml", "bf16", cpu) == 989e12
    assert resolve_mfu_peak("tools/clusters/h100_32x8.yaml", "fp32", cpu) == 67e12
    assert resolve_mfu_peak("off", "fp32", cpu) is None
    # the log names what MFU divides by (the GPU config's is the cluster file's datasheet peak)
    gpu = load_config("configs/t2i/diffmoe-e16-256gpu.yaml").validate(world_size=256)
    assert mfu_peak_source(gpu.logging.mfu_peak, "bf16") == "tools/clusters/h100_32x8.yaml peak_flops.bf16"
    assert resolve_mfu_peak(gpu.logging.mfu_peak, gpu.train.precision, cpu) == 989e12
    assert mfu_peak_source("989", "bf16") == "logging.mfu_peak=989"
    assert mfu_peak_source("measure", "fp32") == "fp32 matmul measured at start-up"
    with pytest.raises(ConfigError, match=r"^logging.mfu_peak='fast' is invalid: .*use measure, off, TFLOPS per rank"):
        load_config("configs/local/diffmoe-tiny.yaml", ["logging.mfu_peak=fast"]).validate(world_size=2)


def test_shared_experts_are_active_parameters_and_priced_by_the_planner():
    from diffmoe_dist.model.params import count_parameters
    from diffmoe_dist.plan.cost import count_params

    base = load_config("configs/local/diffmoe-tiny.yaml", TINY)
    shared = load_config("configs/local/diffmoe-tiny.yaml", [*TINY, "moe.num_shared_experts=2"])
    counts = [count_parameters(build_model(c.model, c.moe), c.moe) for c in (base, shared)]
    depth, d, _ = base.model.resolved()
    h = int(d * base.model.mlp_ratio)
    extra = (depth // 2) * (2 * d * 2 * h + 2 * h + d)  # one MLP of 2H per MoE layer, with biases
    assert counts[1]["total"] - counts[0]["total"] == extra
    assert counts[1]["active"] - counts[0]["active"] == extra  # every token passes through them
    # the planner: dense (DP-reduced) parameters and the shared FLOPs
    assert count_params(shared)["dense"] - count_params(base)["dense"] == extra
    assert "moe_shared" in flops.step_flops(shared, 2) and "moe_shared" not in flops.step_flops(base, 2)
