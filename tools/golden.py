"""Reference loss curves of the tiny configs (tests/golden/*.json), as torchtitan keeps them.

    bash run.sh golden                 # regenerate every curve (python -m tools.golden)
    python -m tools.golden --check     # compare without writing: exit 1 on a difference

Each recipe trains a tiny config for a few steps in one process (the tiny model and run of
tests/conftest.py, deterministic kernels, data order and noise from the seed) and records the total
loss of every step. `tests/test_golden.py` trains the recipe recorded in each file again and
compares step by step: a change to the model, the routing, the loss, the optimizer or the data order
moves the curve. Regenerate only after a change that is meant to move it, and say why in the commit.
Curves are compared with a relative tolerance (`RTOL`): fp32 kernels differ in their last bits
between CPU generations, which a few Adam steps amplify to about 1e-6 relative.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
GOLDEN_DIR = REPO / "tests" / "golden"
STEPS = 8
RTOL = 1e-4


def recipes() -> dict[str, dict]:
    """name -> {"config", "overrides"}: the tiny run of tests/conftest.py, one process, EP 1."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY

    one_process = [*TINY, "parallel.expert_parallel_size=1", "checkpoint.every=0", f"train.steps={STEPS}"]
    return {
        "diffmoe-tiny": {"config": "configs/local/diffmoe-tiny.yaml", "overrides": one_process},
        "dense-tiny": {"config": "configs/local/dense-tiny.yaml", "overrides": one_process},
    }


def loss_curve(recipe: dict, data: str, run_dir: str) -> list[float]:
    """Trains ``recipe`` on the digits shards ``data`` into ``run_dir``; the loss of every step."""
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.train.trainer import Trainer

    cfg = load_config(
        str(REPO / recipe["config"]),
        [*recipe["overrides"], f"data.path={data}", f"train.run_dir={run_dir}", "logging.log_every=1"],
    ).validate(world_size=1)
    Trainer(cfg, None, torch.device("cpu")).fit()
    with open(Path(run_dir) / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if "loss" in r]


def differences(expected: list[float], got: list[float], rtol: float = RTOL) -> list[str]:
    """One line per step whose loss moved beyond ``rtol`` (and one for a different length)."""
    out = [] if len(expected) == len(got) else [f"{len(got)} steps logged, the golden curve has {len(expected)}"]
    for step, (a, b) in enumerate(zip(expected, got), 1):
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
            out.append(f"step {step}: golden {a:.7g}, now {b:.7g} ({(b - a) / a:+.2e} relative)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with tests/golden/ instead of writing")
    p.add_argument("names", nargs="*", help="recipes (default: all)")
    args = p.parse_args(argv)
    import torch

    from diffmoe_dist.data.digits import write_digits_shards

    all_recipes = recipes()
    names = args.names or list(all_recipes)
    unknown = sorted(set(names) - set(all_recipes))
    if unknown:
        print(f"golden: error: unknown recipe(s) {unknown}: use {sorted(all_recipes)}", file=sys.stderr)
        return 2
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "digits")
        write_digits_shards(data)
        for name in names:
            recipe = all_recipes[name]
            curve = loss_curve(recipe, data, str(Path(tmp) / name))
            path = GOLDEN_DIR / f"{name}.json"
            if args.check:
                diff = differences(json.loads(path.read_text())["loss"], curve)
                print(f"{name}: " + ("matches" if not diff else "; ".join(diff)))
                failed |= bool(diff)
                continue
            GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
            record = {
                **recipe,
                "loss": curve,
                "rtol": RTOL,
                "made_by": "bash run.sh golden",
                "date": datetime.date.today().isoformat(),
                "torch": torch.__version__,
            }
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"wrote {path.relative_to(REPO)}: {len(curve)} steps, loss {curve[0]:.4f} -> {curve[-1]:.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
