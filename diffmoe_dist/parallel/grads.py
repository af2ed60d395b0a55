"""Gradient reduction and clipping for DP x EP without DDP, matching one process on the global batch.

Each rank's loss is the mean over its own tokens, so the global-mean loss is ``L = (1/W) sum_r L_r``.
- Non-expert parameters are replicated on all W ranks: all-reduce SUM over the DP group, / W.
- Expert parameters: backward through the all-to-all already brings every rank of the EP group
  its experts' gradient from all of the group's tokens; summing over the EDP group (the replicas of
  the shard) then covers all W ranks' losses, / W. This is what DeepSpeed ZeRO does with our
  expert tags (docs/design.md section 4): it divides every gradient by the full DP size and reduces
  expert gradients over EDP.
This assumes equal token counts per rank (equal local batches); the trainer enforces that.

Gradients travel in flat buckets (few, large calls instead of one per tensor), launched during
backward as they become ready (`GradReducer`), in fp32 or bf16.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.parallel.groups import ParallelDims, comm_device

BUCKET_BYTES = 32 * 1024 * 1024


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert shards carry DeepSpeed's tags (``allreduce=False``; ours also ``is_expert=True``)."""
    return getattr(p, "is_expert", False) or getattr(p, "allreduce", True) is False


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, expert) trainable parameters, in the model's (rank-independent) order."""
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def default_bucket_bytes(device: torch.device) -> int:
    """Bucket size when ``parallel.grad_bucket_mb`` is 0: on CUDA DDP's 25 MB (a few large NCCL
    calls); on CPU 4 MB, small enough that the first buckets start while most of backward is still
    ahead, large enough that gloo's per-call cost stays small (benchmarks/ep_step.py)."""
    return 25 * 1024 * 1024 if device.type == "cuda" else 4 * 1024 * 1024


class _Bucket:
    """Parameters whose gradients travel together in one flat all-reduce.

    Their ``.grad`` tensors are views of one flat buffer (``grads``, the parameters' dtype and
    device; as DDP's ``gradient_as_bucket_view``): backward accumulates into it, so no op per
    parameter is needed to pack or unpack (issue 23). After it the buffer holds one "has a
    gradient here" flag per parameter, so a rank that produced no gradient for a parameter learns
    from the same call whether any rank did. When the reduction's dtype or device differs (bf16,
    or gloo beside CUDA parameters) one extra buffer (``comm``) is sent, filled by one copy.
    A ``.grad`` that is not such a view (the first step, or after ``zero_grad(set_to_none=True)``)
    is copied in once and replaced by its view."""

    def __init__(self, params: list[nn.Parameter], group, dtype: torch.dtype, device: torch.device):
        self.params, self.group, self.dtype, self.device = params, group, dtype, device
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        p0 = params[0]
        self.storage = torch.zeros(self.numel + len(params), dtype=p0.dtype, device=p0.device)
        self.views = [v.view_as(p) for v, p in zip(self.storage[: self.numel].split(self.sizes), params)]
        device = torch.device(device)
        same_device = device.type == p0.device.type and device.index in (None, p0.device.index)
        in_place = group is not None and dtype == p0.dtype and same_device
        n = self.numel + len(params)
        self.comm = None if group is None or in_place else torch.empty(n, dtype=dtype, device=device)
        self.ready: set[int] = set()  # ids of parameters whose gradient is final for this step
        self.got: set[int] = set()  # ids of parameters that received a gradient since zero_grad
        self.work = None
        self.launched = False

    @property
    def flat(self) -> torch.Tensor:
        """The buffer the all-reduce sends (gradients, then flags)."""
        return self.comm if self.comm is not None else self.storage

    def _is_view(self, i: int) -> bool:
        g = self.params[i].grad
        return g is not None and g.data_ptr() == self.views[i].data_ptr() and g.shape == self.views[i].shape

    def zero_grad(self) -> None:
        """Zeroes the flat buffer (one op) and attaches the views as ``.grad``."""
        self.storage.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view
        self.got.clear()

    def _pack(self) -> list[bool]:
        """Puts every local gradient into the flat buffer; returns the has-a-gradient flags."""
        has = []
        for i, p in enumerate(self.params):
            if not self._is_view(i):
                if p.grad is None:
                    self.views[i].zero_()
                else:
                    self.views[i].copy_(p.grad)
                    self.got.add(id(p))
                p.grad = self.views[i]
            has.append(id(p) in self.got)
        return has

    def launch(self, divisor: int) -> None:
        self.launched = True
        has = self._pack()
        if self.group is None:
            return  # nothing to sum (P = W experts): finish() only divides
        flags = self.storage[self.numel :]
        if all(has):
            flags.fill_(1)
        else:
            flags.copy_(torch.tensor(has, dtype=flags.dtype))
        if self.comm is not None:
            grads = self.storage[: self.numel]
            # bf16: divided first in fp32, so the sum of W rounded terms cannot overflow
            self.comm[: self.numel].copy_(grads if self.dtype == torch.float32 else grads / divisor)
            self.comm[self.numel :].copy_(flags)
        self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)
        self._has = has

    def finish(self, divisor: int) -> None:
        grads = self.storage[: self.numel]
        if self.group is None:
            grads.div_(divisor)
            none = [i for i, p in enumerate(self.params) if id(p) not in self.got]
        else:
            self.work.wait()
            if self.comm is not None:
                grads.copy_(self.comm[: self.numel])
            if self.dtype == torch.float32:
                grads.div_(divisor)  # summed, then divided: as one process would average
            none = []
            if not all(self._has):  # a host read, only on a rank that lacked a gradient
                flags = self.flat[self.numel :].tolist()
                none = [i for i, f in enumerate(flags) if not f]
        for i in none:  # no rank produced one: stays None, as without reduction
            self.params[i].grad = None
        self.ready.clear()
        self.got.clear()
        self.work, self.launched = None, False


class GradReducer:
    """Gradient reduction of a DP x EP model, bucketed and overlapped with backward.

    Turns each rank's gradients of its local-mean loss into the gradients of the global-mean loss
    (module docstring): non-expert parameters summed over the DP group, expert parameters over
    their EDP group (nothing to sum when P = W), all divided by W.

    With ``overlap`` a post-accumulate-grad hook on every parameter marks it ready; a bucket is
    launched (async all-reduce) once all its parameters are ready and every earlier bucket of its
    group has been launched, so every rank issues the same collectives in the same order, whatever
    the order in which its gradients became ready. Buckets hold parameters in reverse order of
    registration (about the reverse order of use, the order backward produces them). `finish`
    launches what backward left (a parameter without a gradient on this rank joins with zeros)
    and waits for all of it. Without ``overlap``, `finish` does all of it after backward.

    ``dtype`` is the reduction's: fp32 gives the single-process gradients, bf16 sends half the
    bytes (each rank's gradient rounded to bf16, summed in bf16, back into the fp32 ``.grad``).

    Why not torch DDP for the dense part: with ``find_unused_parameters=False`` it fails at the
    next step when a parameter gets no gradient (``TextEmbedder.null_text_TE`` at
    ``model.class_dropout=0``); with ``True`` it walks the graph from forward's outputs and misses
    the MoE losses that are added to the loss beside forward's output (predictor BCE, token-choice
    aux loss, from the MoECollector), marks the predictor unused and fails when its gradient
    arrives ("mark a variable ready only once"); and it reduces over one group, so experts need
    this code anyway. megatron-core's
    DistributedDataParallel allocates its buffers with ``torch.cuda.current_device()``: no CPU.

    Usage: `parallelize(..., grad_reduce=cfg.parallel)` builds it after sharding (or construct it
    yourself, before the optimizer's first step); run the
    backwards of all but the last micro-batch inside `no_sync()`; call `finish()` before clipping
    and the optimizer step. Hooks do no host read (they copy and launch on the comm device).
    """

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
        *,
        dtype: str | torch.dtype = torch.float32,
        bucket_bytes: int = 0,
        overlap: bool = True,
        contiguous: list[list[nn.Parameter]] = (),
    ):
        self.dims = dims
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype, dtype)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"parallel.grad_reduce_dtype={dtype!r} is invalid: use fp32 or bf16")
        self.overlap = overlap and dims.distributed
        self._sync = True
        self._handles = []
        self.buckets: list[list[_Bucket]] = []  # one list per process group, in launch order
        self._bucket_of: dict[int, tuple[int, _Bucket]] = {}
        if not dims.distributed:
            return
        dense, expert = split_params(model)
        kinds = [(dims.dp_group, dense)]
        if dims.ep_size == 1:  # EDP = DP: experts are replicated like everything else
            kinds[0] = (dims.dp_group, dense + expert)
        elif dims.edp_size > 1 or dims.force_distributed:
            kinds.append((dims.edp_group, expert))
        else:  # P = W: each rank holds its own experts, nothing to sum (only the 1/W)
            kinds.append((None, expert))
        for group, params in kinds:
            device = comm_device(group) if group is not None else None
            chunks = _chunks(_together(list(reversed(params)), contiguous), bucket_bytes)
            buckets = [_Bucket(chunk, group, self.dtype, device or chunk[0].device) for chunk in chunks]
            self.buckets.append(buckets)
        for g, buckets in enumerate(self.buckets):
            for b in buckets:
                for p in b.params:
                    self._bucket_of[id(p)] = (g, b)
        self._next = [0] * len(self.buckets)  # per group: the first bucket not launched yet
        # Hooks on every parameter: they record which parameters got a gradient (the flags), and
        # with overlap launch the buckets that are complete.
        for p in dense + expert:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    @property
    def divisor(self) -> int:
        return self.dims.world_size

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate into ``.grad`` and launch nothing (micro-batches before
        the last of a step)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        g, bucket = self._bucket_of[id(p)]
        bucket.got.add(id(p))
        if not (self._sync and self.overlap):
            return
        if bucket.launched:
            raise RuntimeError(
                "GradReducer: a gradient arrived after its bucket was reduced: run one backward per "
                "micro-batch, the non-final ones inside no_sync(), and finish() before the next"
            )
        bucket.ready.add(id(p))
        self._launch_ready(g)

    def accumulator(self, params: list[nn.Parameter]):
        """For a block's one-cast backward (parallel/mixed_precision.py): a callable that adds the
        concatenated gradients of ``params`` (in that order) into their ``.grad``, one ``add_`` per run
        of them contiguous in one bucket (``contiguous=cast_groups(model)`` lays them out so), the same
        fp32 sums as autograd's ``add_`` per parameter. It returns False (autograd accumulates) unless
        every ``.grad`` is its bucket view. The post-accumulate hooks still run (autograd calls them
        with no gradient). None when a parameter is not reduced here."""
        where = [self._bucket_of.get(id(p), (None, None))[1] for p in params]
        if not params or any(b is None for b in where):
            return None
        members = [(b, next(i for i, q in enumerate(b.params) if q is p)) for b, p in zip(where, params)]
        runs, flat_at = [], 0  # (bucket, first, last + 1 in its storage, offset in the flat gradient)
        for (b, i), p in zip(members, params):
            lo = sum(b.sizes[:i])
            if runs and runs[-1][0] is b and runs[-1][2] == lo:
                runs[-1][2] += p.numel()
            else:
                runs.append([b, lo, lo + p.numel(), flat_at])
            flat_at += p.numel()

        def accumulate(flat: torch.Tensor) -> bool:
            if not all(b._is_view(i) for b, i in members):
                return False
            for b, lo, hi, at in runs:
                b.storage[lo:hi].add_(flat[at : at + hi - lo])
            return True

        return accumulate

    def _launch_ready(self, g: int) -> None:
        buckets = self.buckets[g]
        while self._next[g] < len(buckets) and len(buckets[self._next[g]].ready) == len(buckets[self._next[g]].params):
            buckets[self._next[g]].launch(self.divisor)
            self._next[g] += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launches the buckets backward did not (all of them without overlap), in order, and
        waits for every reduction: afterwards ``.grad`` holds the global-mean gradients."""
        for g, buckets in enumerate(self.buckets):
            for b in buckets[self._next[g] :]:
                b.launch(self.divisor)
            self._next[g] = 0
        for buckets in self.buckets:
            for b in buckets:
                b.finish(self.divisor)

    @torch.no_grad()
    def zero_grad(self) -> bool:
        """Zeroes the gradients in place, one op per bucket, keeping them views of the buckets
        (``optimizer.zero_grad(set_to_none=True)`` would drop the views). False on one process
        (no buckets): use the optimizer's."""
        for buckets in self.buckets:
            for b in buckets:
                b.zero_grad()
        return bool(self.buckets)

    def remove(self) -> None:
        """Removes the hooks (the reducer reduces nothing during backward afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _together(params: list[nn.Parameter], groups: list[list[nn.Parameter]]) -> list[nn.Parameter]:
    """``params`` with each group's members in it placed together, in the group's order, where the
    last of them appears (so that `GradReducer.accumulator` finds them contiguous; in reverse order of
    registration that is about where backward produces the group's gradient)."""
    group_of = {id(p): g for g in groups for p in g}
    last = {id(group_of[id(p)]): i for i, p in enumerate(params) if id(p) in group_of}
    here, out = {id(p) for p in params}, []
    for i, p in enumerate(params):
        g = group_of.get(id(p))
        if g is None or last[id(g)] == i:
            out += [p] if g is None else [q for q in g if id(q) in here]
    return out


def _chunks(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` of one dtype and device, each about ``bucket_bytes``; a last run
    under an eighth of that joins the one before (one collective less for a few parameters)."""
    if params and bucket_bytes <= 0:
        bucket_bytes = default_bucket_bytes(params[0].device)
    out, bucket, size = [], [], 0
    for p in params:
        if bucket and (p.dtype, p.device) != (bucket[0].dtype, bucket[0].device):
            out.append(bucket)
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            out.append(bucket)
            bucket, size = [], 0
    if bucket and out and size < bucket_bytes / 8 and (out[-1][0].dtype, out[-1][0].device) == (p.dtype, p.device):
        out[-1] = out[-1] + bucket
    elif bucket:
        out.append(bucket)
    return out


def reduce_gradients(model: nn.Module, dims: ParallelDims, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Turns each rank's gradients of its local-mean loss into the gradients of the global-mean loss
    (identical on all replicas), after backward, in fp32: `GradReducer` without overlap. A parameter
    without a gradient on some rank joins with zeros; it keeps ``grad=None`` only where no rank
    produced one. Call after ``backward`` and before clipping / the optimizer step."""
    if dims.distributed:
        GradReducer(model, dims, bucket_bytes=bucket_bytes, overlap=False).finish()


@torch.no_grad()
def grad_norm(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) model's gradient, identical on every rank, after
    `reduce_gradients`: non-expert grads are replicated, and each EP group holds every expert
    exactly once, so the expert part is summed over the EP group only."""
    dense, expert = split_params(model)
    device = next(model.parameters()).device

    def sq(params: list[nn.Parameter]) -> torch.Tensor:
        # One _foreach_norm per (dtype, device) group instead of three ops per parameter.
        grads = [p.grad for p in params if p.grad is not None]  # no_grad: no detach op
        if not grads:
            return torch.zeros((), device=device)
        norms = [n.float() for n in torch._foreach_norm(grads)] if len(grads) > 1 else [grads[0].float().norm()]
        return torch.stack(norms).to(device).square().sum()

    expert_sq = sq(expert).reshape(1)
    if dims.ep_size > 1 or dims.force_distributed:
        dist.all_reduce(expert_sq, group=dims.ep_group)
    return (sq(dense) + expert_sq[0]).sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model: every rank scales by the same
    factor, computed from the full model's norm. Returns that norm (before clipping)."""
    total = grad_norm(model, dims)
    if max_norm > 0:
        # No host read of the norm (a sync per step on CUDA): a non-finite norm scales by 1.
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.grad is not None:
                by_device.setdefault(p.grad.device, []).append(p.grad)
        for dev, grads in by_device.items():
            torch._foreach_mul_(grads, scale.to(dev))
    return total
