"""The optimizer side of training behind one small interface: plain data parallelism or DeepSpeed ZeRO.

- `PlainEngine` (``train.zero_stage: 0``): torch AdamW on every rank, gradients reduced by
  a `parallel.grads.GradReducer` (non-expert over DP, experts over their EDP group) and clipped by
  the whole model's norm. Optimizer states are replicated: 2 x 4 bytes per local parameter.
- `ZeroEngine` (``1`` or ``2``): `deepspeed.initialize` with ZeRO stage 1 (optimizer states
  partitioned) or 2 (and gradients). Expert parameters form DeepSpeed's MoE optimizer groups,
  partitioned and reduced over their EDP group; everything else over all DP ranks. torch AdamW
  (DeepSpeed's fused CPU Adam JIT-builds for minutes).

Both run the same micro-batch protocol (`forward`, `backward` per micro-batch, `step` once per
global batch) and expose `state_fragments()`: the flat ranges of each parameter's Adam moments
that this rank holds, which the checkpoint writes and reads without gathering anything.

Precision: fp32 weights are the master weights in both engines; ``train.precision: bf16`` runs
the forward under autocast. DeepSpeed's own bf16 / fp16 modes are refused (see `_ds_config`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from diffmoe_dist.config import Config, ConfigError, deepspeed_config_path
from diffmoe_dist.parallel.grads import GradReducer, clip_grad_norm_, is_expert_param, split_params
from diffmoe_dist.parallel.groups import ParallelDims
from diffmoe_dist.train.deepspeed import EngineModule, create_deepspeed_expert_groups, engine_args, quiet_deepspeed
from diffmoe_dist.train.optim import adamw, lr_schedule

ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class StateFragment:
    """A contiguous flat range of one parameter's optimizer state held by this rank."""

    name: str  # the parameter's name in the model
    start: int  # flat offset inside this rank's local tensor of the parameter
    tensors: dict[str, torch.Tensor]  # 1-D views, keyed by state name ("exp_avg", ...)
    replicated: bool  # True: every replica of the parameter holds the same values


class _Engine:
    """Shared parts: the scheduler, the optimizer step count, micro-batch bookkeeping."""

    zero_stage = 0

    def __init__(self, model: nn.Module, cfg: Config, dims: ParallelDims):
        self.model, self.cfg, self.dims = model, cfg, dims
        self.grad_accum_steps = cfg.optim.grad_accum_steps
        self._names = {p: n for n, p in model.named_parameters()}

    def _adamw(self, params) -> torch.optim.AdamW:
        return adamw(params, self.cfg.optim)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return lr_schedule(optimizer, self.cfg.optim.warmup_steps)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _state_params(self) -> list[torch.Tensor]:
        """The tensors the torch optimizer keeps state for."""
        return [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def ensure_optimizer_state(self) -> None:
        """Creates AdamW's state (zeros, step 0) where it does not exist yet, so that a checkpoint
        can be loaded before the first step. AdamW initialises lazily and treats a present state
        exactly like the one it would create."""
        state = self.base_optimizer.state
        for p in self._state_params():
            if len(state[p]) == 0:
                state[p]["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p))
                for key in ADAM_STATES:
                    state[p][key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_device(self, p: torch.Tensor) -> torch.device:
        """Where AdamW keeps a parameter's step count: on the parameter's device for the fused and
        capturable kernels (they refuse a CPU step on CUDA), on the host otherwise (torch's choice)."""
        group = next((g for g in self.base_optimizer.param_groups if any(q is p for q in g["params"])), {})
        return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")

    def optimizer_steps(self) -> int:
        steps = {int(s["step"]) for s in self.base_optimizer.state.values() if "step" in s}
        return steps.pop() if len(steps) == 1 else 0

    def set_optimizer_steps(self, steps: int) -> None:
        self.ensure_optimizer_state()
        for p, s in self.base_optimizer.state.items():
            s["step"] = torch.tensor(float(steps), dtype=torch.float32, device=self._step_device(p))

    def set_schedule_step(self, step: int) -> None:
        """Puts the LambdaLR where it is after ``step`` optimizer steps (its lr is a pure function
        of the step, so this is exact and independent of the number of parameter groups)."""
        sched = self.scheduler
        lrs = [base * sched.lr_lambdas[0](step) for base in sched.base_lrs]
        for group, lr in zip(self.base_optimizer.param_groups, lrs):
            group["lr"] = lr
        state = sched.state_dict()
        state.update(last_epoch=step, _step_count=step + 1, _last_lr=lrs)
        sched.load_state_dict(state)

    def zero_grad(self) -> None:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, decide=None) -> float | torch.Tensor:
        """One optimizer step after ``grad_accum_steps`` backwards; returns the gradient norm
        (a 0-d tensor where reading it would cost a host sync). ``decide`` (train/guard.py): called
        on every rank with the gradients' non-finite flag before the update; False skips it (no
        optimizer, moment or scheduler change; the gradients are dropped)."""
        raise NotImplementedError

    def state_fragments(self) -> list[StateFragment]:
        raise NotImplementedError

    def after_load(self) -> None:
        """Called after the checkpoint wrote model weights and optimizer states."""


class PlainEngine(_Engine):
    """Plain data parallelism: AdamW on every rank over all of its (local) parameters. Gradients
    are reduced by a `GradReducer` (buckets launched during the last micro-batch's backward with
    ``parallel.overlap_grad_reduce``, in ``parallel.grad_reduce_dtype``); ``self.model`` stays the
    plain module, so parameter names and checkpoints do not change."""

    def __init__(self, model: nn.Module, cfg: Config, dims: ParallelDims, reducer: GradReducer | None = None):
        super().__init__(model, cfg, dims)
        self.optimizer = self._adamw(model.parameters())
        self.scheduler = self._scheduler(self.optimizer)
        if reducer is None and dims.distributed:
            raise ValueError(
                "PlainEngine on several processes reduces gradients with the GradReducer that "
                "parallelize(..., grad_reduce=cfg.parallel) returns: pass it as reducer="
            )
        self.reducer = reducer if reducer is not None else GradReducer(model, dims)  # one process: no-op
        self._micro = 0  # backwards since the last step

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def zero_grad(self) -> None:
        if not self.reducer.zero_grad():  # gradients stay views of the reducer's flat buckets
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        # Only the step's last micro-batch reduces: the others accumulate locally.
        last = self._micro % self.grad_accum_steps == 0
        with contextlib.nullcontext() if last else self.reducer.no_sync():
            (loss / self.grad_accum_steps if self.grad_accum_steps > 1 else loss).backward()

    def step(self, decide=None) -> torch.Tensor:
        self._micro = 0
        self.reducer.finish()  # waits for the buckets launched in backward (no host read)
        norm = clip_grad_norm_(self.model, self.cfg.optim.grad_clip, self.dims)  # read at log time
        if decide is not None and not decide(~torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def state_fragments(self) -> list[StateFragment]:
        out = []
        for p in self.model.parameters():
            state = self.optimizer.state.get(p)
            if state:
                views = {k: state[k].view(-1) for k in ADAM_STATES}
                out.append(StateFragment(self._names[p], 0, views, replicated=True))
        return out


# DeepSpeed keys the YAML sets (its one source): a JSON that sets one is refused, naming the field.
_YAML_OWNED = {
    "train_batch_size": "data.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.global_batch_size",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "communication_data_type": "parallel.grad_reduce_dtype",
    "zero_optimization.overlap_comm": "parallel.overlap_grad_reduce",
    "zero_optimization.reduce_bucket_size": "parallel.grad_bucket_mb",
    "zero_optimization.allgather_bucket_size": "parallel.grad_bucket_mb",
}
# ZeRO bucket sizes in elements when parallel.grad_bucket_mb is 0. CPU: 5M (20 MB fp32): a 50M
# bucket is a fresh mmap and page faults every step (measured 0.64 -> 0.125 s per step, tiny
# model, 4 ranks; docs/design.md section 4). GPU: 2e8, few large NCCL calls.
_ZERO_BUCKET_ELEMENTS = {"cpu": 5_000_000, "cuda": 200_000_000}


def _ds_config(cfg: Config, dims: ParallelDims) -> dict:
    path = deepspeed_config_path(cfg.train)  # existence and stage checked by Config.validate
    with open(path) as f:
        ds = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    for mode in ("bf16", "fp16"):
        if ds.get(mode, {}).get("enabled"):
            raise ConfigError(
                f"{path} enables DeepSpeed {mode}: use train.precision=bf16 instead (autocast over fp32 master "
                "weights, the same numerics with and without ZeRO)"
            )
    zero = ds.setdefault("zero_optimization", {})
    for key, field in _YAML_OWNED.items():
        section, _, name = key.rpartition(".")
        if name in (zero if section else ds):
            raise ConfigError(f"{path} sets {key}: remove it, {field} in the YAML sets it")
    # The YAML is the one source of batch, accumulation, clipping and gradient communication.
    gas = cfg.optim.grad_accum_steps
    p = cfg.parallel
    ds.update(
        train_batch_size=cfg.data.global_batch_size,
        train_micro_batch_size_per_gpu=cfg.data.global_batch_size // (dims.world_size * gas),
        gradient_accumulation_steps=gas,
        gradient_clipping=cfg.optim.grad_clip,
        communication_data_type={"fp32": "fp32", "bf16": "bf16"}[p.grad_reduce_dtype],
    )
    nccl = torch.distributed.is_initialized() and torch.distributed.get_backend(dims.dp_group) == "nccl"
    device = "cuda" if nccl else "cpu"
    elements = int(p.grad_bucket_mb * 2**20 / 4) if p.grad_bucket_mb > 0 else _ZERO_BUCKET_ELEMENTS[device]
    # On CPU DeepSpeed's reduction "stream" is None (its CPU accelerator is synchronous): with
    # overlap_comm the buckets are still reduced inside backward's hooks, only not concurrently.
    zero.update(overlap_comm=p.overlap_grad_reduce, reduce_bucket_size=elements, allgather_bucket_size=elements)
    return ds


class ZeroEngine(_Engine):
    """DeepSpeed ZeRO stage 1 / 2 over our own expert-parallel model (docs/design.md section 4)."""

    def __init__(self, model: nn.Module, cfg: Config, dims: ParallelDims):
        super().__init__(model, cfg, dims)
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        quiet_deepspeed()
        # Wraps the process group we started (deepspeed.comm needs its own handle on it).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        self.zero_stage = cfg.train.zero_stage
        group_name = create_deepspeed_expert_groups(dims)
        for p in model.parameters():
            if is_expert_param(p) and getattr(p, "group_name", group_name) != group_name:
                raise RuntimeError(f"{self._names[p]} is tagged for {p.group_name}, DeepSpeed groups are {group_name}")
        dense, expert = split_params(model)
        groups = split_params_into_different_moe_groups_for_optimizer({"params": dense + expert, "name": "dense"})
        base = self._adamw(groups)
        self.scheduler = self._scheduler(base)  # ZeRO keeps the base optimizer's param-group dicts
        wrapper = EngineModule(model, cfg.moe.num_experts, dims.ep_size)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            args=engine_args(next(model.parameters()).device),  # our device, not cuda:LOCAL_RANK
            model=wrapper,
            optimizer=base,
            config=_ds_config(cfg, dims),
            dist_init_required=False,
        )
        if not self.ds.has_moe_layers and expert:
            raise RuntimeError(
                "DeepSpeed did not enable its MoE paths: expert gradients would be reduced over all ranks"
            )
        self._base = base

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self._base

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears gradients in its step

    def forward(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # divides by grad_accum_steps itself
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # DeepSpeed's micro-step bookkeeping; the real step comes in step()

    def step(self, decide=None) -> float:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("ZeroEngine.step: call backward once per micro-batch, grad_accum_steps times")
        steps, samples = self.ds.global_steps, self.ds.global_samples
        # ZeRO's fp32 optimizer tests the reduced gradients itself (all-reduced, before updating)
        # and skips a non-finite step ("overflow"): its verdict is the guard's gradient flag.
        self.ds.step()
        overflow = bool(getattr(self.optimizer, "overflow", False))
        if decide is not None and not decide(overflow):
            if not overflow:  # the loss folds into the gradients (guard.fold_loss): cannot happen
                raise RuntimeError("ZeroEngine.step: a non-finite step that DeepSpeed applied")
            self.ds.global_steps, self.ds.global_samples = steps, samples  # as if the batch never came
            return float("nan")
        self.scheduler.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _link_states(self) -> None:
        # ZeRO links each parameter to its optimizer-state fragment lazily after the first param
        # group's step, before the other groups have state: re-link once they exist (docs/design.md
        # section 4, trap 2).
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def state_fragments(self) -> list[StateFragment]:
        if not any(self._base.state[p] for p in self._state_params()):
            return []
        self._link_states()
        out = []
        for p in self.model.parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue  # no element of p lies in this rank's partition
            views = {k: mapping.get_optim_state_fragment(k) for k in ADAM_STATES}
            out.append(StateFragment(self._names[p], mapping.lp_fragment_address.start, views, replicated=False))
        return out

    def ensure_optimizer_state(self) -> None:
        super().ensure_optimizer_state()
        self._link_states()

    def after_load(self) -> None:
        # The fp32 partitions are the master weights ZeRO steps: refresh them from the loaded model
        # weights (an exact copy: both are fp32).
        self.optimizer.refresh_fp32_params()

    def set_schedule_step(self, step: int) -> None:
        super().set_schedule_step(step)
        self.ds.global_steps = step
        self.ds.global_samples = step * self.cfg.data.global_batch_size


def uses_deepspeed(cfg: Config, dims: ParallelDims) -> bool:
    """True where `build_engine` builds the `ZeroEngine` (DeepSpeed then reduces the gradients): on
    several processes, or on one forced onto the distributed path (the GPU suite's ZeRO-1 check)."""
    return cfg.train.zero_stage > 0 and dims.distributed


def build_engine(
    model: nn.Module, cfg: Config, dims: ParallelDims, reducer: GradReducer | None = None, log=print
) -> _Engine:
    """`ZeroEngine` for ``train.zero_stage`` 1 / 2 on several processes, else `PlainEngine` with
    the ``reducer`` `parallelize` returned. Call after `parallelize` (sharding replaces the expert
    parameters)."""
    if uses_deepspeed(cfg, dims):
        return ZeroEngine(model, cfg, dims)
    if cfg.train.zero_stage > 0:
        log(f"[diffmoe] train.zero_stage={cfg.train.zero_stage} with one process: nothing to partition, plain AdamW")
    return PlainEngine(model, cfg, dims, reducer)
