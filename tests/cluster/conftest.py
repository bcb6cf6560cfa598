"""Fixtures of the cluster tests: a real one-node SLURM (slurm_up.sh), skipped in one line
where it cannot run (not root, no apt-get, someone else's slurm.conf)."""
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SLURM_UP = os.path.join(HERE, "slurm_up.sh")
CANNOT_RUN = 3  # slurm_up.sh's exit code for "not possible on this machine"


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real SLURM; tests/cluster/slurm_up.sh "
                                       "starts one (root, apt-get), else the test is skipped")


@pytest.fixture(scope="session")
def slurm():
    """Installs (if needed) and starts munged, slurmctld and slurmd; a no-op when they run."""
    proc = subprocess.run(["bash", SLURM_UP], capture_output=True, text=True, timeout=900)
    if proc.returncode == CANNOT_RUN:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"slurm_up.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
