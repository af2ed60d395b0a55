"""`slurm_cluster`: a real SLURM cluster on loopback for the session (tests/slurm/cluster.py).

Skips, with the reason, where it cannot exist: not root, or SLURM missing and apt-get unavailable
or failing (no network). A cluster that is installed but fails to start is an error, not a skip.
A conftest serves only its own folder, so tests elsewhere import the fixture:
``from tests.slurm.conftest import slurm_cluster``.
DIFFMOE_SLURM_NODES (default 2) sets the number of nodes.
"""

from __future__ import annotations

import os
import shutil

import pytest

try:
    from tests.slurm.cluster import ClusterUnavailable, LocalSlurmCluster, missing_binaries
except ImportError:
    from slurm.cluster import ClusterUnavailable, LocalSlurmCluster, missing_binaries


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory):
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
