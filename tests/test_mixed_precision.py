"""One bf16 cast per block (parallel/mixed_precision.py) against autocast's cast per weight."""

import contextlib
import copy

import torch
import torch.nn as nn
from conftest import TINY_MODEL

from diffmoe_dist.config import load_config
from diffmoe_dist.model.build import build_model
from diffmoe_dist.parallel.mixed_precision import cast_blocks_once, linear_param_names


def _step(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)  # the same label dropout draws for both models
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 3, 5, 9]))
    (out.float() - 1).pow(2).mean().backward()
    return out


def test_one_cast_per_block_gives_the_bits_of_autocasts_cast_per_weight_and_keeps_none_gradients():
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["moe.router=expert_choice_global", *TINY_MODEL])
    torch.manual_seed(0)
    reference = build_model(cfg.model, cfg.moe)
    for block in reference.blocks:
        block.unused = nn.Linear(4, 4)  # in no forward: its gradient must stay None, not become zeros
    model = copy.deepcopy(reference)
    assert cast_blocks_once(model) == len(model.blocks)
    names = linear_param_names(model.blocks[1])
    assert any("experts" in n for n in names) and any("attn.qkv" in n for n in names)
    assert not any("router" in n for n in names)  # the router's weight is used in fp32
    assert torch.equal(_step(model), _step(reference))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if ".unused." in name:
            assert p.grad is None and q.grad is None, name
        elif q.grad is None:  # e.g. the capacity predictor: trained by its own loss, not by this output
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert sum(q.grad is not None for q in reference.parameters()) > 10


def _accumulated_in_place(rank: int, world_size: int) -> int:
    """Two bf16 micro-batches through a parallelized tiny DiT: each block's cast adds its gradient into
    the reducer's buckets (one add per contiguous run) vs autograd's add per parameter, bitwise."""
    from types import SimpleNamespace

    from test_parallel_dit import BATCH, EXPERTS, build_dit

    from diffmoe_dist.model.moe.collector import MoECollector
    from diffmoe_dist.parallel import build_parallel_dims, parallelize
    from diffmoe_dist.parallel.mixed_precision import accumulate_cast_gradients

    g = torch.Generator().manual_seed(3 + rank)
    batches = [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.rand(BATCH, generator=g)) for _ in range(2)]
    cfg = SimpleNamespace(grad_reduce_dtype="fp32", grad_bucket_mb=2**-7, overlap_grad_reduce=True)
    grads, direct = [], 0
    for ep_size, in_place in ((1, True), (1, False), (2, True), (2, False)):
        dims = build_parallel_dims(ep_size, EXPERTS)
        dit, moe = build_dit()
        reducer = parallelize(dit, dims, moe, grad_reduce=cfg)  # 8 KB buckets: blocks straddle them
        calls = []
        if in_place:  # counts the casts that added their gradient themselves

            def spy(params, make=reducer.accumulator, calls=calls):
                inner = make(params)
                return None if inner is None else (lambda flat, f=inner: calls.append(f(flat)) or calls[-1])

            assert accumulate_cast_gradients(dit, spy) == len(dit.blocks) + 1  # + the stacked adaLN's node
        else:
            assert accumulate_cast_gradients(dit, lambda params: None) == 0
        reducer.zero_grad()
        for i, (x, t) in enumerate(batches):
            with reducer.no_sync() if i == 0 else contextlib.nullcontext():
                with (c := MoECollector()).collect(dit), torch.autocast("cpu", dtype=torch.bfloat16):
                    out = dit(x, t, torch.arange(BATCH))
                ((out.float() - 1).pow(2).mean() + c.losses()["loss"]).backward()
        reducer.finish()
        direct += sum(calls)
        assert all(calls) if in_place else not calls
        grads.append({n: p.grad for n, p in dit.named_parameters()})
    for a, b in ((grads[0], grads[1]), (grads[2], grads[3])):
        for name in a:
            assert (a[name] is None) == (b[name] is None), name
            assert a[name] is None or torch.equal(a[name], b[name]), name
    return direct


def test_cast_adds_its_gradients_into_the_reducers_buckets_with_autograds_bits():
    from distributed import run_distributed

    direct = run_distributed(_accumulated_in_place, 2)
    assert min(direct) >= 2 * 2 * 5  # 2 micro-batches x 2 EP sizes x (4 blocks + the stacked adaLN)
