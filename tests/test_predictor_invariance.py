"""The capacity predictor is batch invariant like the router (model/moe/invariant.py), so dynamic and
interval inference keep the pool's contract even where a threshold sits one ulp from a probability:

- DiffMoE (``expert_choice_global``, pool ``dp``): the batch split unevenly over W=2 ranks selects
  bitwise what one process selects on the concatenated batch, with the same ``k_e``; each ``k_e``
  is the sum of the counts each sample gives alone; the training step's thresholds are bitwise equal;
- EC-DiT (``expert_choice_local``): each sample alone selects what it selects inside the batch, on
  one process or split over W=2 ranks; its thresholds too;
- under ``train.compile`` the MoE layers, predictor included, stay out of every compiled graph.
"""

from __future__ import annotations

import conftest
import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import MoEConfig, load_config
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.model.moe.predictor import CapacityPredictor
from diffmoe_dist.parallel import build_parallel_dims, parallelize
from diffmoe_dist.parallel.compile import compile_blocks


def _predictor_probabilities(predictor: CapacityPredictor, x_ND: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return predictor.probability(predictor(x_ND))


def test_predictor_probabilities_are_batch_invariant_bit_for_bit():
    # A row's probability must not depend on the rows around it: one row alone (a sample run alone,
    # a rank holding one token), any sub-batch, at any thread count, fp32 or under bf16 autocast.
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    try:
        for dim, experts in ((48, 4), (192, 16)):
            torch.manual_seed(dim)
            predictor = CapacityPredictor(dim, experts)
            x = torch.randn(700, dim, generator=g)
            for num_threads, dtype in ((1, None), (2, None), (2, torch.bfloat16)):
                torch.set_num_threads(num_threads)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    full = _predictor_probabilities(predictor, x)
                    for n in (1, 6, 127, 129, 300):
                        for start in (0, 131, 399):
                            part = _predictor_probabilities(predictor, x[start : start + n])
                            assert torch.equal(part, full[start : start + n]), (dim, num_threads, dtype, n, start)
    finally:
        torch.set_num_threads(threads)


def test_predictor_trains_as_the_plain_mlp_and_runs_in_bf16():
    """The blocked forward changes a logit's last bits only; its gradients are the MLP's to rounding
    (the backward is plain matrix products), finite where SiLU's exp overflows, and a bf16 model
    (benchmarks/moe_layer.py) runs in bf16."""
    torch.manual_seed(0)
    predictor = CapacityPredictor(48, 4)
    x = torch.randn(300, 48)
    x[0, :] = -1e4  # pre-activations far below -88: exp(-h) overflows in the forward formula
    target = (torch.rand(300, 4) > 0.5).float()
    grads = []
    for logits in (predictor, predictor.net):
        predictor.zero_grad()
        CapacityPredictor.loss(logits(x).float(), target).backward()
        grads.append([p.grad.clone() for p in predictor.parameters()])
    torch.testing.assert_close(predictor(x), predictor.net(x), rtol=1e-5, atol=1e-5)
    for ours, plain in zip(*grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    bf16 = CapacityPredictor(48, 4).to(torch.bfloat16)
    assert bf16(x.bfloat16()).dtype == torch.float32  # logits in fp32, as before


# ---- the layer: one process, each sample alone, W=2 --------------------------------------------
# 25 tokens. DiffMoE pools them all: one process sees them as one sequence, rank 0 holds token 0 alone
# (a 1-row batch: where a plain matmul rounded differently), rank 1 the other 24, and each token runs
# alone. EC-DiT selects inside samples of 5 tokens: rank 0 holds sample 0, rank 1 samples 1-4.
DIM, HIDDEN, EXPERTS, TOKENS = 48, 16, 4, 25
SEQ = {"expert_choice_global": TOKENS, "expert_choice_local": 5}
RANK0_SAMPLES = {"expert_choice_global": (slice(None), slice(0, 1)), "expert_choice_local": (slice(0, 1),)}
RANK1_SAMPLES = {"expert_choice_global": (slice(None), slice(1, None)), "expert_choice_local": (slice(1, None),)}
BOUNDARY_TOKENS = range(6)


def _layer(router: str, inference: str) -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(router=router, num_experts=EXPERTS, capacity=1.0, pool="dp", inference=inference)
    layer = MoEFeedForward(DIM, HIDDEN, cfg)
    with torch.no_grad():
        layer.router_weight_ED.mul_(30)
    return layer


def _tokens(router: str) -> torch.Tensor:
    # Seed 7: token 0's probability rounded differently alone under the plain MLP and torch.sigmoid
    # (the predictor before issue 25), and this test failed: W=2 k_e [3, 22, 7, 0] != [3, 21, 7, 0].
    return torch.randn(TOKENS // SEQ[router], SEQ[router], DIM, generator=torch.Generator().manual_seed(7))


def _one_ulp_thresholds(layer: MoEFeedForward, x: torch.Tensor, token: int, side: str) -> torch.Tensor:
    """Every expert's threshold at ``token``'s probability as the predictor gives it on the whole
    batch: ``at`` equal to it (the token is not counted), ``below`` one ulp under it (counted).
    Either way, a probability that rounds differently in a smaller batch crosses its threshold."""
    p_E = _predictor_probabilities(layer.capacity_predictor, x.reshape(-1, DIM))[token]
    return p_E if side == "at" else torch.nextafter(p_E, torch.zeros_like(p_E))


def _set_thresholds(layer: MoEFeedForward, inference: str, tau_E: torch.Tensor) -> None:
    if inference == "dynamic":
        layer.capacity_predictor.threshold_E.copy_(tau_E)
    else:  # interval: one gamma for every expert, at expert 0's boundary
        layer.gamma = float(tau_E[0])


def _select(layer: MoEFeedForward, x: torch.Tensor, training: bool = False):
    collector = MoECollector()
    layer.train(training)
    with collector.collect(layer), torch.set_grad_enabled(training):
        layer(x)
    return collector.last(layer), collector


def _local(router: str, x_all: torch.Tensor, rank: int) -> torch.Tensor:
    return x_all[(RANK0_SAMPLES if rank == 0 else RANK1_SAMPLES)[router]].contiguous()


def _inference_matches(rank: int, world_size: int) -> list[str]:
    dims = build_parallel_dims(1, EXPERTS)
    checked = []
    for router in ("expert_choice_global", "expert_choice_local"):
        x_all = _tokens(router)
        x = _local(router, x_all, rank)
        rows = slice(0, 1) if rank == 0 else slice(1, TOKENS)  # global rows of this rank's tokens
        if router == "expert_choice_local":
            rows = slice(0, SEQ[router]) if rank == 0 else slice(SEQ[router], TOKENS)
        for inference in ("dynamic", "interval"):
            ref = _layer(router, inference)
            mine = _layer(router, inference)
            parallelize(mine, dims, MoEConfig(pool="dp"))
            for token in BOUNDARY_TOKENS:
                for side in ("at", "below"):
                    what = f"{router} {inference}: tau {side} token {token}'s probability"
                    tau_E = _one_ulp_thresholds(ref, x_all, token, side)
                    _set_thresholds(ref, inference, tau_E)
                    _set_thresholds(mine, inference, tau_E)
                    whole, _ = _select(ref, x_all)
                    split, _ = _select(mine, x)
                    assert torch.equal(split.mask_NE, whole.mask_NE[rows]), f"{what}: W=2 selection"
                    if router == "expert_choice_global":  # k_e counts over the pool
                        assert torch.equal(split.k_E, whole.k_E), f"{what}: W=2 k_e {split.k_E} != {whole.k_E}"
                        if rank == 0:  # each token alone: its counts sum to the pool's
                            alone = [_select(ref, x_all[:, t : t + 1])[0].k_E for t in range(TOKENS)]
                            summed = torch.stack(alone).sum(0)
                            assert torch.equal(summed, whole.k_E), f"{what}: tokens alone count {summed}"
                    elif rank == 0:  # inside each sample: each sample alone selects the same
                        mask = whole.mask_NE.view(-1, SEQ[router], EXPERTS)
                        for b in range(x_all.shape[0]):
                            a = _select(ref, x_all[b : b + 1])[0].mask_NE
                            assert torch.equal(a, mask[b]), f"{what}: sample {b} alone"
                    checked.append(what)
    return checked


def _training_thresholds_match(rank: int, world_size: int) -> list[str]:
    dims = build_parallel_dims(1, EXPERTS)
    checked = []
    for router in ("expert_choice_global", "expert_choice_local"):
        x_all = _tokens(router)
        ref = _layer(router, "dynamic")
        _, collector = _select(ref, x_all, training=True)
        collector.update_thresholds()
        mine = _layer(router, "dynamic")
        parallelize(mine, dims, MoEConfig(pool="dp"))
        _, collector = _select(mine, _local(router, x_all, rank), training=True)
        collector.update_thresholds()
        tau, tau_ref = mine.capacity_predictor.threshold_E, ref.capacity_predictor.threshold_E
        assert torch.equal(tau, tau_ref), f"{router}: thresholds {tau.tolist()} != {tau_ref.tolist()}"
        checked.append(router)
    return checked


def _all(rank: int, world_size: int) -> list[str]:
    return _inference_matches(rank, world_size) + _training_thresholds_match(rank, world_size)


@pytest.mark.slow
def test_dynamic_and_interval_inference_at_one_ulp_from_the_threshold_equal_one_process():
    checked = run_distributed(_all, 2)
    assert checked[0] == checked[1] and len(checked[0]) == 2 * 2 * len(BOUNDARY_TOKENS) * 2 + 2


def test_compiled_blocks_leave_the_predictor_out_of_every_graph():
    """``train.compile``: a block's captured graphs hold none of the MoE layer's ops or parameters
    (router, predictor), so the predictor runs eager and batch invariant."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = load_config("configs/local/diffmoe-tiny.yaml", [*conftest.TINY_MODEL, "moe.num_experts=4"])
    model = build_model(cfg.model, cfg.moe).eval()
    assert compile_blocks(model, backend=recording_backend) == len(model.blocks)
    m = cfg.model
    with torch.no_grad():
        model(torch.randn(2, m.in_channels, m.image_size, m.image_size), torch.rand(2), y=torch.tensor([0, 1]))
    assert graphs, "nothing was compiled"
    names = [str(n.target) + " " + n.name for gm in graphs for n in gm.graph.nodes]
    leaked = [n for n in names if "capacity_predictor" in n or "router_weight" in n or "experts" in n]
    assert not leaked, leaked
    torch._dynamo.reset()
