"""The training loop: composes config, model, parallelism, data, optimizer, EMA, checkpoints, metrics."""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from diffmoe_dist.config import Config, save_config
from diffmoe_dist.data.loader import GlobalBatchLoader
from diffmoe_dist.diffusion.ema import EMA
from diffmoe_dist.diffusion.flow import flow_loss, flow_targets
from diffmoe_dist.eval.sampling import sample_images, save_grid
from diffmoe_dist.model.dit import build_model
from diffmoe_dist.model.moe.layer import collect_moe_losses, mean_capacity
from diffmoe_dist.parallel.grads import clip_grad_norm_, reduce_gradients
from diffmoe_dist.parallel.groups import ParallelDims
from diffmoe_dist.train import checkpoint as ckpt
from diffmoe_dist.train.metrics import MetricsLogger
from diffmoe_dist.train.telemetry import RoutingTelemetry


def lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _threads(cfg: Config, local_world_size: int) -> int:
    """train.threads, else OMP_NUM_THREADS (set by our launchers and torchrun), else cores divided by
    the processes on this node, so torchrun, srun and mpirun runs compute with the same thread count."""
    if cfg.train.threads > 0:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims | None, device: torch.device, local_world_size: int = 1):
        self.cfg, self.device = cfg, device
        self.dims = dims if dims is not None else ParallelDims.single()
        self.rank0 = self.dims.rank == 0
        torch.set_num_threads(_threads(cfg, local_world_size))
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, cfg.moe).to(device)
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup)
        if self.dims.distributed:
            from diffmoe_dist.parallel.parallelize import parallelize

            parallelize(self.model, self.dims, cfg.moe)
            parallelize(self.ema.model, self.dims, cfg.moe)
        # Per-rank stream for t, noise and label dropout: ranks draw different noise for their samples.
        torch.manual_seed(cfg.train.seed * 7919 + self.dims.rank + 1)
        self.noise_gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 104729 + self.dims.rank)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o.warmup_steps))
        self.loader = self._build_loader()
        self.step = 0
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")

    def _build_loader(self) -> GlobalBatchLoader:
        from diffmoe_dist.data.shards import load_indexed

        data = load_indexed(os.path.join(self.cfg.data.path, "train"))
        if self.cfg.model.task == "t2i":
            from diffmoe_dist.data.captions import text_tensors

            # Keys are the model's forward kwargs (text, text_mask); class labels stay out of the
            # batch, which the loop hands to the model whole (the evaluator reads them from shards).
            tensors = {"x": data["latent"], **text_tensors(data, self.cfg, self.cfg.data.path)}
        else:
            tensors = {"x": data["latent"], "y": data["cls"]}
        return GlobalBatchLoader(
            tensors, self.cfg.data.global_batch_size, self.dims.rank, self.dims.world_size, self.cfg.train.seed
        )

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        t0 = time.time()
        model_sd = ckpt.full_state_dict(self.model, self.dims.ep_group, self.dims.ep_size)
        ema_sd = ckpt.full_state_dict(self.ema.model, self.dims.ep_group, self.dims.ep_size)
        shared = {
            "model": model_sd,
            "ema": ema_sd,
            "ema_num_updates": self.ema.num_updates,
            "config": self.cfg.to_dict(),
            "step": self.step,
        }
        per_rank = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_noise": self.noise_gen.get_state(),
            "ep_size": self.dims.ep_size,
            "world_size": self.dims.world_size,
        }
        path = ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.dims.rank,
            self.dims.world_size,
            shared if self.rank0 else None,
            per_rank,
            self.cfg.checkpoint.keep_last,
        )
        self.last_save_seconds = time.time() - t0
        return path

    def maybe_resume(self, log) -> None:
        mode = self.cfg.train.resume
        if mode == "never":
            return
        path = ckpt.find_resumable(self.ckpt_root, log) if mode == "auto" else ckpt.resolve_checkpoint(mode)
        if path is None:
            return
        shared = ckpt.load_file(path, "model.pt")
        ckpt.load_full_state_dict(self.model, shared["model"], self.dims.ep_rank, self.dims.ep_size)
        ckpt.load_full_state_dict(self.ema.model, shared["ema"], self.dims.ep_rank, self.dims.ep_size)
        self.ema.num_updates = int(shared["ema_num_updates"])
        self.step = int(shared["step"])
        rank_file = f"rank{self.dims.rank:05d}.pt"
        if os.path.isfile(os.path.join(path, rank_file)):
            mine = ckpt.load_file(path, rank_file)
            if mine["world_size"] != self.dims.world_size or mine["ep_size"] != self.dims.ep_size:
                raise ckpt.CheckpointError(
                    f"{path} was written at world size {mine['world_size']}, EP {mine['ep_size']}: "
                    "optimizer state is per rank; resume with the same topology"
                )
            self.optimizer.load_state_dict(mine["optimizer"])
            self.scheduler.load_state_dict(mine["scheduler"])
            self.loader.load_state_dict(mine["loader"])
            torch.set_rng_state(mine["rng_torch"])
            self.noise_gen.set_state(mine["rng_noise"])
        log(f"[diffmoe] resumed from {path} at step {self.step}")

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        batch = self.loader.next_batch()
        x = batch.pop("x").to(self.device)
        cond = {k: v.to(self.device) for k, v in batch.items()}  # y for class-conditional runs
        x_t, t, v_target = flow_targets(x, self.noise_gen)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        with autocast:
            v_pred = self.model(x_t, t, **cond)
        loss_flow = flow_loss(v_pred, v_target)
        moe = collect_moe_losses(self.model)
        # moe["loss"] = sum over layers of predictor_loss_weight * BCE + weighted TC aux loss
        loss = loss_flow + moe["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dims.distributed:
            reduce_gradients(self.model, self.dims)
        grad_norm = float(clip_grad_norm_(self.model, cfg.optim.grad_clip, self.dims))
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        # Logged losses are global means over the data-parallel batch (one tiny all-reduce), so a
        # run's curve does not depend on the world size.
        parts = torch.stack([loss, loss_flow, moe["predictor_bce"], moe["aux_loss"]]).detach().float()
        if self.dims.distributed:
            dist.all_reduce(parts, group=self.dims.dp_group)
            parts /= self.dims.world_size
        loss_v, flow_v, pred_v, aux_v = parts.tolist()
        return {
            "loss": loss_v,
            "loss_flow": flow_v,
            "loss_predictor": pred_v,
            "loss_aux": aux_v,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "capacity_avg": float(mean_capacity(self.model)),
        }

    # ---- samples -----------------------------------------------------------------------------
    def sample_grid(self, path: str) -> None:
        """Collective: each rank samples an equal share of the class grid; rank 0 writes it.
        Text-to-image grids have one column per held-out caption (one per digit), listed in a .txt."""
        s, nc = self.cfg.sample, self.cfg.model.num_classes
        model = self.ema.model
        if self.cfg.model.task == "t2i":
            from diffmoe_dist.data.captions import grid_prompts
            from diffmoe_dist.model.text import PromptConditioned

            prompts = grid_prompts(self.cfg.data.path, nc)
            model, nc = PromptConditioned(model, prompts["text"], prompts["mask"]), len(prompts["caption"])
            if self.rank0:
                with open(os.path.splitext(path)[0] + ".txt", "w") as f:
                    f.write("".join(f"column {i}: {c}\n" for i, c in enumerate(prompts["caption"])))
        labels = torch.arange(nc).repeat_interleave(s.per_class)
        W = self.dims.world_size
        padded = math.ceil(len(labels) / W) * W
        labels = torch.cat([labels, labels[: padded - len(labels)]])
        mine = labels.view(W, -1)[self.dims.rank]
        imgs = sample_images(
            model,
            mine,
            cfg_scale=s.cfg_scale,
            num_steps=s.num_steps,
            sampler=s.sampler,
            seed=self.cfg.train.seed + 1000 * self.dims.rank,
            device=self.device,
        ).cpu()
        if W > 1:
            parts = [torch.empty_like(imgs) for _ in range(W)]
            dist.all_gather(parts, imgs.contiguous())
            imgs = torch.cat(parts)
        if self.rank0:
            imgs = imgs[: nc * s.per_class]
            # rows = classes: transpose (class, k) -> (k, class) so each column is one class
            grid = imgs.view(nc, s.per_class, *imgs.shape[1:]).transpose(0, 1).reshape(-1, *imgs.shape[1:])
            save_grid(grid, path, nrow=nc)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.rank0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        logger = MetricsLogger(
            self.run_dir, self.rank0, cfg.logging.wandb, cfg.logging.wandb_project, cfg.to_dict(), cfg.train.steps
        )
        self.maybe_resume(logger.print)
        logger.advance_to(self.step)
        telemetry = RoutingTelemetry(self.model, cfg.logging.routing_every, self.run_dir, self.dims, self.step + 1)
        t_start = time.time()
        last = {}
        window_t, window_steps = time.time(), 0
        while self.step < cfg.train.steps:
            last = self.train_step()
            telemetry.after_step(self.step)  # routing.jsonl every logging.routing_every steps
            window_steps += 1
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                dt = time.time() - window_t
                last["steps_per_s"] = window_steps / max(dt, 1e-9)
                last["images_per_s"] = last["steps_per_s"] * cfg.data.global_batch_size
                last["epoch"] = self.loader.epoch
                logger.log(self.step, last)
                window_t, window_steps = time.time(), 0
            logger.advance_to(self.step, f"loss {last['loss']:.4f}")
            if cfg.sample.every and self.step % cfg.sample.every == 0 and self.step < cfg.train.steps:
                self._write_samples(logger)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.save()
        self.save()
        self._write_samples(logger)
        logger.close()
        return {"final": last, "seconds": time.time() - t_start, "step": self.step}

    def _write_samples(self, logger: MetricsLogger) -> None:
        path = os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png")
        if self.rank0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.sample_grid(path)
        logger.log_image(self.step, "samples", path)
        logger.print(f"[diffmoe] step {self.step}: samples -> {path}")
