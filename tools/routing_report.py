"""Plots and a short summary of a run's routing telemetry (``logging.routing_every > 0``).

    python tools/routing_report.py runs/main                 # -> runs/main/report/
    python tools/routing_report.py RUN --eval-json RUN/eval.json --out docs/img

Reads ``RUN/routing.jsonl`` (diffmoe_dist/train/telemetry.py) through the run's records reader
(diffmoe_dist/train/records.py: one record per step, the one the run continued with after a resume
or rollback) and writes:
- ``expert_load.png``: experts x MoE layers, each expert's load relative to uniform
  (``tokens_e E / N``; DiffMoE training gives exactly C everywhere, token choice does not), and,
  with expert parallelism, the rows each EP rank computed relative to the mean;
- ``ep_imbalance.png``: over training steps, the slowest EP rank's load / mean per layer (the step
  waits for it), all-to-all time, and the capacity predictor's precision / recall;
- ``capacity_steps.png``: achieved C_avg per sampling step at evaluation, from ``capacity_per_step``
  in ``--eval-json`` files, ``RUN/eval.json`` (diffmoe-eval) or ``RUN/capacity_sweep/
  capacity_sweep.json``; failing those, from ``--sample N`` images drawn here (class-conditional);
- ``summary.txt`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from diffmoe_dist.train.telemetry import ROUTING_FILE, read_routing


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".ffn", "")


def plot_expert_load(records: list[dict], path: str) -> None:
    plt = _plt()
    layers = [layer["name"] for layer in records[0]["layers"]]
    load = [
        [
            statistics.mean(r["layers"][i]["load_per_expert"][e] for r in records)
            for e in range(records[0]["num_experts"])
        ]
        for i in range(len(layers))
    ]
    world = records[-1]["world_size"]
    with_ranks = records[-1]["ep_size"] > 1 and world <= 64
    fig, axes = plt.subplots(
        1, 2 if with_ranks else 1, figsize=(12 if with_ranks else 6.5, 0.6 * len(layers) + 2.2), squeeze=False
    )
    ax = axes[0][0]
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [_short(n) for n in layers])
    ax.set_xlabel("expert")
    ax.set_title(f"expert load (tokens x E / N), mean of {len(records)} logged steps")
    fig.colorbar(im, ax=ax)
    if len(layers) * len(load[0]) <= 256:
        for i, row in enumerate(load):
            for e, v in enumerate(row):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    if with_ranks:
        ax = axes[0][1]
        recv = [
            [
                statistics.mean(r["layers"][i]["ep_recv_tokens"][w] / r["layers"][i]["ep_recv_mean"] for r in records)
                for w in range(world)
            ]
            for i in range(len(layers))
        ]
        im = ax.imshow(recv, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(layers)), [_short(n) for n in layers])
        ax.set_xticks(range(world))
        ax.set_xlabel(f"rank (EP groups of {records[-1]['ep_size']})")
        ax.set_title("rows computed per rank / mean")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_imbalance(records: list[dict], path: str) -> None:
    plt = _plt()
    steps = [r["step"] for r in records]
    names = [layer["name"] for layer in records[0]["layers"]]
    fig, (ax_imb, ax_a2a, ax_pred) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    for i, name in enumerate(names):
        ax_imb.plot(steps, [r["layers"][i]["ep_imbalance"] for r in records], lw=1, label=_short(name))
        ax_a2a.plot(steps, [1e3 * (r["layers"][i]["dispatch_s"] + r["layers"][i]["combine_s"]) for r in records], lw=1)
    ax_imb.plot(
        steps, [max(layer["ep_imbalance"] for layer in r["layers"]) for r in records], "k--", lw=1.5, label="max"
    )
    ax_imb.set_ylabel("EP rank load max / mean")
    ax_imb.set_title(
        f"{records[-1]['world_size']} ranks, EP {records[-1]['ep_size']}, {records[-1]['num_experts']} experts"
    )
    ax_imb.legend(fontsize=7, ncol=4)
    ax_a2a.set_ylabel("a2a fwd, ms (max rank)")
    for key, style in (("predictor_precision", "-"), ("predictor_recall", "--")):
        vals = [[layer[key] for layer in r["layers"] if layer[key] is not None] for r in records]
        if any(vals):
            ax_pred.plot(
                steps, [statistics.mean(v) if v else float("nan") for v in vals], style, label=key.split("_")[1]
            )
    taus = [[statistics.mean(layer["threshold"]) for layer in r["layers"] if layer["threshold"]] for r in records]
    if any(taus):
        ax_pred.plot(
            steps, [statistics.mean(t) if t else float("nan") for t in taus], ":", label="threshold (mean tau)"
        )
    ax_pred.set_ylabel("predictor (layer mean)")
    ax_pred.set_xlabel("training step")
    ax_pred.legend(fontsize=8)
    for ax in (ax_imb, ax_a2a, ax_pred):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capacity_curves(run_dir: str, eval_jsons: list[str]) -> list[tuple[str, list[float]]]:
    """(label, C_avg per sampling step) from evaluation outputs that carry ``capacity_per_step``."""
    paths = list(eval_jsons) or [
        p
        for p in (os.path.join(run_dir, "eval.json"), os.path.join(run_dir, "capacity_sweep", "capacity_sweep.json"))
        if os.path.isfile(p)
    ]
    curves = []
    for path in paths:
        with open(path) as f:
            text = f.read().strip()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # `diffmoe-eval | tee eval.json`: the JSON is the last line
            data = json.loads(text.splitlines()[-1])
        if "runs" in data:  # capacity_sweep.json
            for r in data["runs"]:
                label = r["mode"] if r["gamma"] is None else f"interval {r['gamma']:g}"
                curves.append((label, r["capacity_per_step"]))
        elif data.get("capacity_per_step"):
            curves.append((f"{data.get('routing') or 'eval'} ({os.path.basename(path)})", data["capacity_per_step"]))
    return curves


def sample_capacity(run_dir: str, num_samples: int, steps: int) -> list[tuple[str, list[float]]]:
    """Draws ``num_samples`` images per inference mode from the run's EMA weights; C_avg per step."""
    import torch

    from diffmoe_dist.diffusion.sampling import CapacityMeter, sample_images
    from diffmoe_dist.eval.cli import load_model
    from diffmoe_dist.model.moe.layer import moe_layers, set_inference_routing
    from diffmoe_dist.model.moe.routing import has_predictor
    from diffmoe_dist.train.telemetry import capacity_per_step

    model, cfg, _ = load_model(run_dir)
    if cfg.model.task != "c2i" or not has_predictor(cfg.moe):
        print("routing_report: --sample needs a class-conditional model with a capacity predictor; use --eval-json")
        return []
    labels = torch.arange(num_samples) % cfg.model.num_classes
    curves = []
    for mode in ("dynamic", "static"):
        set_inference_routing(model, mode)
        meter = CapacityMeter(model)
        sample_images(model, labels, cfg_scale=cfg.sample.cfg_scale, num_steps=steps, sampler="euler", seed=0)
        meter.close()
        curves.append((mode, capacity_per_step(meter.values, len(moe_layers(model)), steps)))
    return curves


def plot_capacity(curves: list[tuple[str, list[float]]], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    interval = [c for c in curves if c[0].startswith("interval")]
    colors = plt.cm.viridis([i / max(1, len(interval) - 1) for i in range(len(interval))])
    styles = {"dynamic": ("black", "-", 2.2), "static": ("tab:red", "--", 1.6)}
    for label, per_step in curves:
        if label.startswith("interval"):
            color, ls, lw = colors[interval.index((label, per_step))], "-", 1.0
        else:
            color, ls, lw = styles.get(label.split()[0], ("tab:orange", "-.", 1.8))
        marker = "." if len(per_step) < 60 else None
        ax.plot(range(1, len(per_step) + 1), per_step, color=color, ls=ls, lw=lw, marker=marker, label=label)
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("sampling step (noise -> data)")
    ax.set_ylabel("achieved capacity C_avg")
    ax.set_title("capacity over sampling steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(records: list[dict], curves: list[tuple[str, list[float]]]) -> str:
    last = records[-1]
    lines = [
        f"routing telemetry: {len(records)} logged steps ({records[0]['step']}..{last['step']}), "
        f"{len(last['layers'])} MoE layers, {last['num_experts']} experts, {last['world_size']} ranks, "
        f"EP {last['ep_size']}, "
        f"{last['tokens']} tokens per step",
    ]
    imb = [(layer["ep_imbalance"], layer["name"]) for r in records for layer in r["layers"]]
    worst = max(imb)
    lines.append(
        f"EP load imbalance (max rank / mean): mean {statistics.mean(v for v, _ in imb):.3f}, "
        f"worst {worst[0]:.3f} ({worst[1]})"
    )
    load = [v for layer in last["layers"] for v in layer["load_per_expert"]]
    lines.append(f"expert load (tokens E / N) at step {last['step']}: min {min(load):.3f}, max {max(load):.3f}")
    a2a = [sum(layer["dispatch_s"] + layer["combine_s"] for layer in r["layers"]) for r in records]
    sent = [sum(layer["dispatch_bytes"] + layer["combine_bytes"] for layer in r["layers"]) for r in records]
    lines.append(
        f"all-to-all per step (forward, all layers): {1e3 * statistics.mean(a2a):.2f} ms, "
        f"{statistics.mean(sent) / 1e6:.2f} MB sent per rank (backward mirrors it)"
    )
    prec = [layer["predictor_precision"] for layer in last["layers"] if layer["predictor_precision"] is not None]
    rec = [layer["predictor_recall"] for layer in last["layers"] if layer["predictor_recall"] is not None]
    if prec and rec:
        taus = [t for layer in last["layers"] for t in layer["threshold"]]
        lines.append(
            f"capacity predictor at step {last['step']}: precision {statistics.mean(prec):.3f}, "
            f"recall {statistics.mean(rec):.3f}, thresholds tau in [{min(taus):.3f}, {max(taus):.3f}]"
        )
    for label, per_step in curves:
        lines.append(
            f"C_avg over sampling steps ({label}): mean {statistics.mean(per_step):.3f}, "
            f"first {per_step[0]:.3f}, last {per_step[-1]:.3f}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN/report)")
    p.add_argument("--eval-json", action="append", default=[], help="diffmoe-eval or capacity_sweep JSON (repeatable)")
    p.add_argument(
        "--sample", type=int, default=16, help="images to draw for C_avg per step when no eval JSON has it (0: never)"
    )
    p.add_argument("--sample-steps", type=int, default=25)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run_dir, ROUTING_FILE)):
        print(
            f"routing_report: error: {args.run_dir}/{ROUTING_FILE} does not exist: "
            "train with logging.routing_every=N (N > 0)",
            file=sys.stderr,
        )
        return 2
    records = read_routing(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "report")
    os.makedirs(out, exist_ok=True)
    plot_expert_load(records, os.path.join(out, "expert_load.png"))
    plot_imbalance(records, os.path.join(out, "ep_imbalance.png"))
    curves = capacity_curves(args.run_dir, args.eval_json)
    if not curves and args.sample > 0 and os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
        curves = sample_capacity(args.run_dir, args.sample, args.sample_steps)
    if curves:
        plot_capacity(curves, os.path.join(out, "capacity_steps.png"))
    text = summary(records, curves)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    print(f"wrote {out}/: " + ", ".join(sorted(os.listdir(out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
