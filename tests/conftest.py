"""What the test modules share: the tiny-run overrides, the digits data sets, a tiny VAE, and the
loopback SLURM cluster.

pytest puts tests/ on ``sys.path`` (tests/ has no ``__init__.py``; the default "prepend" import
mode), from any working directory, and the processes that ``distributed.run_distributed`` spawns
inherit that path. So the helpers beside this file import by their plain names, one way only:

    from conftest import TINY, TINY_MODEL        # constants and plain helpers of this file
    from distributed import run_distributed      # tests/distributed.py
    from slurm.cluster import ENDED              # tests/slurm/ and tests/gpu/ are packages

Fixtures need no import. The data fixtures are session-wide (made once, read-only: a test that
damages shards copies them first, as tests/test_config.py does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Timeouts catch hangs, never slowness: a benchmark's quick mode that takes a few minutes on quiet
# cores took 3-10x longer at load 7-36, and a 2-rank run that takes 30 s quiet can take minutes on a
# busy CI machine. Every limit of the suite (subprocesses, spawned ranks, SLURM jobs, waits for a
# file or a state) is this (seconds): a hang still ends the test, a loaded machine does not fail it.
# Not this: tests/slow_save.py's wait for its release file (it bounds a child process, not a test) and
# tests/slurm/cluster.py's own limits on one daemon round trip (its callers pass this to wait_job).
HANG_TIMEOUT = 3600

# The tiny DiT of every CPU run: 2 blocks of width 48 with 4 heads.
TINY_MODEL = ["model.depth=2", "model.hidden_size=48", "model.num_heads=4"]
# A tiny training run of configs/local/diffmoe-tiny.yaml: 4 experts, batches of 16, a short warm-up,
# a 2-step one-image-a-class sample grid, a log line every step, no wandb. Modules append their own.
TINY = [
    *TINY_MODEL,
    "moe.num_experts=4",
    "data.global_batch_size=16",
    "sample.num_steps=2",
    "sample.per_class=1",
    "logging.wandb=disabled",
    "logging.log_every=1",
    "optim.warmup_steps=2",
]


# The `slow` tier: every test that trains, spawns ranks or launchers, or starts the SLURM cluster.
# `bash run.sh test` runs everything (CI); `bash run.sh test-fast` deselects these (``-m "not slow"``)
# for the edit-test loop. A test is slow when it carries ``@pytest.mark.slow``, uses one of these
# fixtures (they build data sets by subprocess or start daemons), or lives in one of these modules
# (each of their tests trains or spawns processes). New slow tests: mark them, or list them here.
SLOW_FIXTURES = {"digits", "digits_t2i", "slurm_cluster", "torchrun_run", "mpirun_run"}
SLOW_MODULES = {
    "test_benchmarks_moe_layer",
    "test_benchmarks_paper_table",
    "test_benchmarks_train_throughput",
    "test_launchers",
    "test_preemption",
    "test_resume_distributed",
    "test_slurm",
    "test_teardown",
    "test_train_single",
    "test_zero",
}

# Single tests elsewhere that spawn ranks or train (the slowest of the fast tier on 2 loaded cores).
SLOW_TESTS = {
    "test_a2a_bench_under_torchrun_reports_latency_bandwidth_and_fit",
    "test_a_process_that_drops_a_stream_trainer_unclosed_still_exits",
    "test_classifier_training_is_deterministic",
    "test_dp_and_ep_pools_match_local_pool_on_concatenation_with_ties_and_empty_ranks",
    "test_image_folder_with_sidecar_captions_becomes_vae_latent_shards",
    "test_one_token_rank_and_straddling_ties_select_as_one_process_on_the_concatenation",
    "test_side_by_side_microbenchmarks_run_real_gloo_ranks_within_physical_bounds",
    "test_training_leaves_the_global_rng_untouched",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES
        if slow or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def make_shards(kind: str, out: Path) -> str:
    """``tools/make_shards.py KIND --out OUT`` (the captioned digits need the tool's text encoder), from
    any working directory."""
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), kind, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=HANG_TIMEOUT)
    return str(out)


@pytest.fixture(scope="session", autouse=True)
def in_repository():
    """Tests name configs and tools relative to the repository (``configs/local/diffmoe-tiny.yaml``):
    run them there whatever directory pytest was started from."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield REPO


@pytest.fixture(scope="session", autouse=True)
def classifier_cache(tmp_path_factory):
    """One digits classifier per session: ``DIFFMOE_CACHE_DIR`` points every test, and every process
    a test starts (``diffmoe-eval``, the benchmarks), at one session directory, so the first user
    trains it and all others load it (diffmoe_dist/eval/classifier.py caches by sha256)."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFMOE_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    """The class-conditional digits shards (``train/`` and ``heldout/``), as a path string."""
    from diffmoe_dist.data.digits import write_digits_shards

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits_shards(out)
    return str(out)


@pytest.fixture(scope="session")
def digits_t2i(tmp_path_factory) -> Path:
    """The captioned digits shards of the text-to-image runs."""
    return Path(make_shards("digits-t2i", tmp_path_factory.mktemp("data") / "digits-t2i"))


def tiny_vae(path: Path, seed: int = 0):
    """A randomly initialised 2-level diffusers ``AutoencoderKL`` (4 latent channels), saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae.eval()


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory):
    """A real SLURM cluster on loopback for the session (tests/slurm/cluster.py).

    Skips, with the reason, where it cannot exist: not root, or SLURM missing and apt-get
    unavailable or failing (no network). A cluster that is installed but fails to start is an
    error, not a skip. DIFFMOE_SLURM_NODES (default 2) sets the number of nodes.
    """
    from slurm.cluster import ClusterUnavailable, LocalSlurmCluster, missing_binaries

    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmctld, slurmd and munged as root; not root here")
    if missing_binaries() and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install slurmctld slurmd munge")
    nodes = int(os.environ.get("DIFFMOE_SLURM_NODES", "2"))
    cluster = LocalSlurmCluster(nodes=nodes, root=tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"local SLURM cluster unavailable: {exc}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[slurm] {nodes} nodes idle in {cluster.start_seconds:.1f} s ({cluster.root})")
    yield cluster
    cluster.stop()
