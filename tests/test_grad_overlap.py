"""Gradient reduction overlapped with backward (`GradReducer`), on real gloo ranks: the same
gradients as the serial reduction and as one process on the concatenated batch, buckets launched
during backward, none during a non-final micro-batch, a parameter unused on one rank, and bf16
payloads (dtype and bytes counted at the collective) within bf16 tolerance of fp32."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from distributed import run_distributed
from test_parallel_dit import BATCH, EXPERTS, build_dit, dit_loss

from diffmoe_dist.config import load_config
from diffmoe_dist.parallel import build_parallel_dims, parallelize, reduce_gradients
from diffmoe_dist.parallel.grads import GradReducer

SMALL_BUCKET = 8 * 1024  # bytes: the tiny DiT spreads over dozens of buckets


@contextlib.contextmanager
def counted_all_reduces():
    """Records (dtype, bytes) of every async all-reduce (the reducer's buckets); the collectives
    still run, through the real torch.distributed."""
    calls, real = [], dist.all_reduce

    def spy(tensor, *args, **kwargs):
        if kwargs.get("async_op"):
            calls.append((tensor.dtype, tensor.numel() * tensor.element_size()))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = spy
    try:
        yield calls
    finally:
        dist.all_reduce = real


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(world_size: int):
    g = torch.Generator().manual_seed(3)
    n = world_size * BATCH
    x, t = torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)
    return x, t, torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g)


def _overlap_matches(rank: int, world_size: int) -> dict:
    x, t, y, target = _batch(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    local = (x[rows], t[rows], y[rows], target[rows])
    ref, _ = build_dit()
    dit_loss(ref, x, t, y, target).backward()
    ref_grads = _grads(ref)
    out = {}
    for ep_size in (1, 2):  # experts in the DP buckets (P = 1); no EDP peers (P = W)
        dims = build_parallel_dims(ep_size, EXPERTS)

        def model(dims=dims):
            dit, moe = build_dit()
            parallelize(dit, dims, moe)
            return dit

        serial = model()
        dit_loss(serial, *local).backward()
        reduce_gradients(serial, dims)
        runs = {}
        for dtype in ("fp32", "bf16"):
            dit = model()
            reducer = GradReducer(dit, dims, dtype=dtype, bucket_bytes=SMALL_BUCKET, overlap=True)
            loss = dit_loss(dit, *local)
            with counted_all_reduces() as in_backward:
                loss.backward()
            with counted_all_reduces() as in_finish:
                reducer.finish()
            runs[dtype] = (
                dit,
                in_backward,
                in_finish,
                len([b for g in reducer.buckets for b in g if b.group is not None]),
            )
        dit, in_backward, in_finish, n_buckets = runs["fp32"]
        # Every bucket launched once, most of them while backward was still running.
        assert len(in_backward) + len(in_finish) == n_buckets
        assert len(in_backward) >= n_buckets // 2, (len(in_backward), n_buckets)
        for name, g in _grads(serial).items():
            assert torch.equal(dict(dit.named_parameters())[name].grad, g), name  # same sums, same order
            expected = ref_grads[name]
            if ".experts." in name:
                expected = expected[dims.ep_rank * (EXPERTS // ep_size) :][: EXPERTS // ep_size]
            torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        # bf16: every payload is bf16, half the bytes of the fp32 buckets; gradients within bf16 rounding.
        bf16, b_backward, b_finish, _ = runs["bf16"]
        fp32_calls, bf16_calls = in_backward + in_finish, b_backward + b_finish
        assert {d for d, _ in fp32_calls} == {torch.float32} and {d for d, _ in bf16_calls} == {torch.bfloat16}
        fp32_bytes, bf16_bytes = sum(b for _, b in fp32_calls), sum(b for _, b in bf16_calls)
        assert 2 * bf16_bytes == fp32_bytes
        bf16_params = dict(bf16.named_parameters())
        for name, p in dit.named_parameters():
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(bf16_params[name].grad, p.grad, atol=2**-7 * scale, rtol=2**-7)
        out[ep_size] = {"fp32_bytes": fp32_bytes, "bf16_bytes": bf16_bytes, "in_backward": len(in_backward)}
        out[ep_size]["bf16_max_rel"] = max(
            float((bf16_params[n].grad - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-30))
            for n, p in dit.named_parameters()
        )
    return out


@pytest.mark.slow
def test_overlapped_reduction_equals_serial_and_single_process_and_bf16_sends_half():
    per_rank = run_distributed(_overlap_matches, 2)
    for ep_size in (1, 2):
        assert per_rank[0][ep_size]["bf16_bytes"] * 2 == per_rank[0][ep_size]["fp32_bytes"]


def _accumulation_reduces_on_last_micro_batch(rank: int, world_size: int) -> dict:
    from diffmoe_dist.train.engine import PlainEngine

    x, t, y, target = _batch(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    halves = [tuple(a[rows][i::2] for a in (x, t, y, target)) for i in range(2)]
    dims = build_parallel_dims(2, EXPERTS)
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["optim.grad_accum_steps=2", "parallel.grad_bucket_mb=0.01"])

    def model():
        dit, moe = build_dit()
        parallelize(dit, dims, moe)
        return dit

    serial = model()
    for half in halves:
        (dit_loss(serial, *half) / 2).backward()
    reduce_gradients(serial, dims)

    dit, moe = build_dit()
    engine = PlainEngine(dit, cfg, dims, parallelize(dit, dims, moe, grad_reduce=cfg.parallel))
    counts = []
    for half in halves:
        loss = dit_loss(dit, *half)
        with counted_all_reduces() as calls:
            engine.backward(loss)
        counts.append(len(calls))
    engine.reducer.finish()  # what step() does before clipping
    for name, g in _grads(serial).items():
        assert torch.equal(dict(dit.named_parameters())[name].grad, g), name
    return {"counts": counts}


@pytest.mark.slow
def test_accumulation_reduces_only_during_the_last_micro_batch():
    for r in run_distributed(_accumulation_reduces_on_last_micro_batch, 2):
        first, last = r["counts"]
        assert first == 0 and last > 0, r


class Branchy(nn.Module):
    """``b`` is used on rank 0 only, ``never`` on no rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.never = nn.Parameter(torch.zeros(2))

    def forward(self, x, use_b: bool):
        h = self.a(x)
        return self.c(self.b(h) if use_b else h)


def _unused_on_one_rank(rank: int, world_size: int) -> None:
    dims = build_parallel_dims(1)
    xs = torch.randn(world_size, 3, 4, generator=torch.Generator().manual_seed(0))
    ref = Branchy()
    sum(ref(xs[r], r == 0).square().mean() for r in range(world_size)).div(world_size).backward()
    model = Branchy()
    reducer = GradReducer(model, dims, bucket_bytes=1, overlap=True)  # one parameter per bucket
    for step in range(3):  # later steps reuse the buckets; from step 1 grads stay views of them
        if step == 0:
            model.zero_grad(set_to_none=True)
        else:
            assert reducer.zero_grad()
        model(xs[rank], rank == 0).square().mean().backward()
        reducer.finish()
        if step > 0:  # backward accumulated straight into the flat buckets: no copy per parameter
            views = {id(v) for g in reducer.buckets for b in g for v in b.views}
            assert all(id(p.grad) in views for p in model.parameters() if p.grad is not None)
        for name, p in model.named_parameters():
            expected = dict(ref.named_parameters())[name].grad
            if expected is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, expected, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")


@pytest.mark.slow
def test_parameter_unused_on_one_rank_gets_the_mean_and_unused_everywhere_stays_none():
    run_distributed(_unused_on_one_rank, 2)
