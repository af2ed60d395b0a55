"""One bf16 cast per block (parallel/mixed_precision.py) against autocast's cast per weight."""

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
