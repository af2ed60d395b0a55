"""The tiny configs' loss curves against their golden files (tests/golden/*.json, `bash run.sh golden`).

A change to the model, the routing, the losses, the optimizer or the data order moves the curve and
fails here with the steps that moved. If the change is intended, regenerate the files with
`bash run.sh golden` and say why in the commit.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from conftest import REPO

GOLDEN = runpy.run_path(str(REPO / "tools" / "golden.py"))
FILES = sorted((REPO / "tests" / "golden").glob("*.json"))


def test_every_recipe_has_a_golden_file():
    assert sorted(p.stem for p in FILES) == sorted(GOLDEN["recipes"]())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_loss_curve_matches_the_golden_file(path: Path, digits, tmp_path):
    golden = json.loads(path.read_text())
    recipe = GOLDEN["recipes"]()[path.stem]
    assert golden["config"] == recipe["config"] and golden["overrides"] == recipe["overrides"], (
        f"{path.name} was made from another recipe: regenerate it with `bash run.sh golden`"
    )
    curve = GOLDEN["loss_curve"](recipe, digits, str(tmp_path / "run"))
    moved = GOLDEN["differences"](golden["loss"], curve, golden["rtol"])
    assert not moved, f"{path.name}: " + "; ".join(moved) + " (intended? `bash run.sh golden`)"


def test_a_moved_curve_is_reported_step_by_step():
    moved = GOLDEN["differences"]([2.0, 1.5, 1.2], [2.0, 1.5 * (1 + 1e-3), 1.2])
    assert moved == ["step 2: golden 1.5, now 1.5015 (+1.00e-03 relative)"]
    assert GOLDEN["differences"]([2.0], [2.0, 1.0]) == ["2 steps logged, the golden curve has 1"]
