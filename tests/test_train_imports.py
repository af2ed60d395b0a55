"""A training start imports neither the evaluation code (the digits classifier, FID's scipy) nor
DeepSpeed (only the ZeRO engine does): train/ sits below eval/ (docs/design.md section 3)."""

import subprocess
import sys

from conftest import HANG_TIMEOUT

CODE = """
import sys
import diffmoe_dist.train.cli, diffmoe_dist.train.trainer
heavy = ("diffmoe_dist.eval", "scipy", "deepspeed")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""


def test_training_start_imports_no_eval_code_no_scipy_no_deepspeed():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=HANG_TIMEOUT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
