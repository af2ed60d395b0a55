"""Issue 21: the 256-GPU job (configs/t2i/diffmoe-e16-256gpu.yaml: W=256 as 32 nodes x 8, EP 8,
EDP 32, pool dp) run by the real trainer on 256 threads of one threaded process group
(tests/scale_twin.py), at tiny widths. One twin run serves the tests of this module: a training
step, the sample grid with the config's grid (8 prompt columns x 4 images: fewer images than ranks,
which crashed `Trainer.sample_grid` for every W >= 128), a save of 256 rank files, and the stop-flag
agreement when a single rank is signalled. The MoE layer at W=256 equals one process on the
concatenated batch. Longer runs (resume, resharding, gradient accumulation, counts): benchmarks/scale_twin.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from scale_twin import run_threaded, train_rank, twin_config

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel import parallelize, reduce_gradients

W, EP = 256, 8


@pytest.fixture(scope="module")
def twin256(digits_t2i, tmp_path_factory):
    run = tmp_path_factory.mktemp("twin") / "run"
    # 2 images per rank; one step, then (the last step) a save and the grid; rank 255 alone is
    # "signalled" after step 1: every rank must agree to stop there (it is the last step anyway).
    cfg = twin_config(
        str(digits_t2i), str(run), W, "data.global_batch_size=512", "train.steps=1", "logging.routing_every=1"
    )
    results = run_threaded(train_rank, W, EP, cfg, (0, W - 1), (W - 1, 1))
    return cfg, run, results


@pytest.mark.slow
def test_sample_grid_at_256_ranks_with_the_256gpu_grid_settings(twin256):
    cfg, run, results = twin256
    assert (cfg.sample.per_class, cfg.model.num_classes, cfg.parallel.expert_parallel_size) == (4, 8, 8)
    path = run / "samples" / "step_0000001.png"
    assert results[0]["grids"] == [str(path)] and all(r["grids"] == [str(path)] for r in results)
    with Image.open(path) as grid:  # 8 columns (prompts) x 4 rows of 16 px digits, 1 px apart, x4
        assert grid.size == ((8 * 17 + 1) * 4, (4 * 17 + 1) * 4)
    assert len((run / "samples" / "step_0000001.txt").read_text().splitlines()) == 8


@pytest.mark.slow
def test_training_step_at_256_ranks_logs_one_global_loss_and_saves_every_rank(twin256):
    cfg, run, results = twin256
    losses = {r["metrics"][0]["loss"] for r in results}
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses.pop()))
    step_dir = run / "checkpoints" / "step_0000001"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    index = json.loads((step_dir / "index.json").read_text()) if (step_dir / "index.json").exists() else None
    if index is not None:
        assert index.get("world_size", W) == W
    # Dense weights identical on all ranks; expert shards identical along each EDP group of 32.
    ref = results[0]["weights"]
    for r in (7, 8, 255):
        mine = results[r]["weights"]
        for k, v in mine.items():
            if ".experts." not in k:
                assert torch.equal(v, ref[k]), f"rank {r}: {k} differs from rank 0"
    assert all(torch.equal(results[255]["weights"][k], results[7]["weights"][k]) for k in ref)


@pytest.mark.slow
def test_one_signalled_rank_of_256_stops_every_rank_after_the_same_step(twin256):
    _, _, results = twin256
    assert {r["step"] for r in results} == {1}
    # The run ended at its last step: the agreement still ran (every rank called it) and no
    # rank stopped early; a stop before the last step is covered by benchmarks/scale_twin.py.
    assert {r["stopped"] for r in results} == {None}


@pytest.mark.slow
def test_twin_counts_of_a_step_by_group(twin256):
    """The counted step: EP all-to-alls stay in the EP group of 8, expert gradients in EDP of 32."""
    _, _, results = twin256
    for r in (0, W - 1):
        comm = results[r]["counts"]["comm"]
        assert comm[("ep", "AllToAllBase")] >= 2 and comm[("edp", "AllReduce")] >= 1
        assert comm[("dp", "collectives")] >= 3  # selection histograms, tie counts, losses, dense grads
    assert results[0]["counts"]["comm"] == results[W - 1]["counts"]["comm"] | {
        k: v for k, v in results[0]["counts"]["comm"].items() if k[0] == "ep" and k[1] == "bytes"
    }


# ---- (d) the MoE layer at W=256 equals one process on the concatenated batch -----------------
DIM, HIDDEN, EXPERTS, BATCH, SEQ = 8, 16, 16, 1, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _layer() -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(DIM, HIDDEN, MoEConfig(router="expert_choice_global", num_experts=EXPERTS, pool="dp"))
    with torch.no_grad():
        layer.router_weight_ED.mul_(30)  # spread the scores: selection must not hinge on one ulp
    return layer


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(W * BATCH, SEQ, DIM, generator=g), torch.randn(W * BATCH, SEQ, DIM, generator=g)


def _forward(layer, x, target):
    collector = MoECollector()
    with collector.collect(layer):
        y = layer(x)
    return (y * target).sum(-1).mean() + collector.last(layer).predictor_bce, y, collector


def _reference() -> dict:
    layer = _layer()
    x, target = _batch()
    x.requires_grad_(True)
    loss, y, collector = _forward(layer, x, target)
    loss.backward()
    collector.update_thresholds()
    return {
        "mask": collector.last(layer).mask_NE.view(W * BATCH, SEQ, EXPERTS),
        "y": y.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in layer.named_parameters()},
        "tau": layer.capacity_predictor.threshold_E.clone(),
    }


def _rank_layer(dims, ref) -> int:
    layer = _layer()
    parallelize(layer, dims, MoEConfig(pool="dp"))
    x_all, target_all = _batch()
    rows = slice(dims.rank * BATCH, (dims.rank + 1) * BATCH)
    x = x_all[rows].clone().requires_grad_(True)
    loss, y, collector = _forward(layer, x, target_all[rows])
    loss.backward()
    collector.update_thresholds()
    reduce_gradients(layer, dims)
    mask = collector.last(layer).mask_NE.view(BATCH, SEQ, EXPERTS)
    assert torch.equal(mask, ref["mask"][rows]), f"rank {dims.rank}: selected (token, expert) set differs"
    torch.testing.assert_close(y, ref["y"][rows], **TOL)
    torch.testing.assert_close(x.grad / W, ref["x_grad"][rows], **TOL)
    torch.testing.assert_close(layer.capacity_predictor.threshold_E, ref["tau"], **TOL)
    local = range(layer.experts.offset, layer.experts.offset + layer.experts.num_local)
    for name, p in layer.named_parameters():
        expected = ref["grads"][name]
        if name.startswith("experts."):
            assert p.shape[0] == EXPERTS // EP
            expected = expected[local.start : local.stop]
        torch.testing.assert_close(p.grad, expected, **TOL)
    return int(mask.sum())


@pytest.mark.slow
def test_moe_layer_at_256_ranks_ep8_matches_one_process_on_the_concatenated_batch():
    ref = _reference()
    picked = run_threaded(_rank_layer, W, EP, ref)
    assert sum(picked) == int(ref["mask"].sum()) == EXPERTS * (W * BATCH * SEQ // EXPERTS)
