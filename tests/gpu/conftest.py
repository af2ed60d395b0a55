"""The GPU suite's shared state: the device it targets and the results file.

``DIFFMOE_GPU_SUITE_DEVICE=cpu`` runs the same checks on the CPU (gloo, fp32 timings, tiny sizes):
how the suite itself is debugged on a machine without a GPU. Without it the suite targets CUDA and
every test skips where CUDA is absent. ``DIFFMOE_GPU_SMOKE_OUT`` (set by tests/gpu/run.sh) is where
the outcome of every check, the numbers the checks recorded and the table of figures (the README's)
are written as JSON: after every check, so that a run stopped by its time limit still leaves what
it measured.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess

import pytest
import torch

DEVICE = os.environ.get("DIFFMOE_GPU_SUITE_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
NO_GPU = ON_GPU and not torch.cuda.is_available()
SKIP_REASON = "no CUDA device (DIFFMOE_GPU_SUITE_DEVICE=cpu runs the suite on the CPU)"
RESULTS: dict = {"checks": {}, "numbers": {}, "table": []}


@pytest.fixture(scope="session")
def smoke_numbers() -> dict:
    """Checks put their measured numbers here, by check name; they land in the JSON."""
    return RESULTS["numbers"]


@pytest.fixture
def figure(request):
    """``figure(name, value)``: one row of the table the README shows (check, figure, value)."""

    def add(name: str, value: str) -> None:
        RESULTS["table"].append({"check": request.node.name, "figure": name, "value": value})

    return add


def pytest_runtest_logreport(report):
    """A check's seconds are its setup, call and teardown together: a module fixture (a training run,
    a benchmark) is charged to the first check that uses it."""
    if "tests/gpu/" not in report.nodeid.replace(os.sep, "/"):
        return
    entry = RESULTS["checks"].setdefault(report.nodeid.split("::")[-1], {"outcome": "passed", "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 1)
    if report.outcome != "passed" and entry["outcome"] == "passed":
        entry["outcome"] = report.outcome
        if report.outcome == "failed":
            entry["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            entry["reason"] = report.longrepr[2]
    if report.when == "teardown":
        _write()


def pytest_sessionfinish(session, exitstatus):
    _write(finished=True)


@functools.cache
def _device() -> dict:
    if not (ON_GPU and torch.cuda.is_available()):
        return {"device": f"{DEVICE} (no GPU)", "driver": None}
    props = torch.cuda.get_device_properties(0)
    try:  # the driver release (nvidia-smi); torch only knows the CUDA version it supports
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "--id=0"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    return {
        "device": props.name,
        "driver": driver,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
    }


def _write(finished: bool = False) -> None:
    """``finished``: the session ended (else a check just did: what ran so far, "passed" false)."""
    out = os.environ.get("DIFFMOE_GPU_SMOKE_OUT")
    if not out:
        return
    checks = RESULTS["checks"]
    doc = {
        **_device(),
        "suite_device": DEVICE,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if ON_GPU and torch.cuda.is_available() else None,
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checks": checks,
        "table": RESULTS["table"],
        "numbers": RESULTS["numbers"],
        "finished": finished,
        "passed": finished and bool(checks) and all(c["outcome"] == "passed" for c in checks.values()) and ON_GPU,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out)
