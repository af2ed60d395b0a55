"""The GPU suite's shared state: the device it targets and the results file.

``DIFFMOE_GPU_SUITE_DEVICE=cpu`` runs the same checks on the CPU (gloo, fp32 timings, tiny sizes):
how the suite itself is debugged on a machine without a GPU. Without it the suite targets CUDA and
every test skips where CUDA is absent. ``DIFFMOE_GPU_SMOKE_OUT`` (set by tests/gpu/run.sh) is where
the outcome of every check, and the numbers the checks recorded, are written as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import pytest
import torch

DEVICE = os.environ.get("DIFFMOE_GPU_SUITE_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
NO_GPU = ON_GPU and not torch.cuda.is_available()
SKIP_REASON = "no CUDA device (DIFFMOE_GPU_SUITE_DEVICE=cpu runs the suite on the CPU)"
RESULTS: dict = {"checks": {}, "numbers": {}}


@pytest.fixture(scope="session")
def smoke_numbers() -> dict:
    """Checks put their measured numbers here, by check name; they land in the JSON."""
    return RESULTS["numbers"]


def pytest_runtest_logreport(report):
    if "tests/gpu/" not in report.nodeid.replace(os.sep, "/"):
        return
    name = report.nodeid.split("::")[-1]
    if report.when == "call" or report.outcome != "passed":
        entry = {"outcome": report.outcome, "seconds": round(report.duration, 1)}
        if report.outcome == "failed":
            entry["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            entry["reason"] = report.longrepr[2]
        RESULTS["checks"].setdefault(name, entry)


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("DIFFMOE_GPU_SMOKE_OUT")
    if not out:
        return
    checks = RESULTS["checks"]
    doc = {
        "device": torch.cuda.get_device_name() if ON_GPU and torch.cuda.is_available() else f"{DEVICE} (no GPU)",
        "suite_device": DEVICE,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checks": checks,
        "numbers": RESULTS["numbers"],
        "passed": bool(checks) and all(c["outcome"] == "passed" for c in checks.values()) and ON_GPU,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
