import os

import pytest

from tests.slurm import cluster as _cluster


@pytest.fixture(scope="session")
def slurm():
    """A running single-node cluster, installed and started on first use; skips with the reason
    when that is impossible here (not root, no apt-get, no package mirror), but fails under CI.
    Daemons this session started are stopped at its end; a cluster that was already running is
    left as it was."""
    c, reason, started = _cluster.start()
    if c is None:
        if os.environ.get("CI"):  # CI has root and Debian's packages: there the tests must run
            pytest.fail(f"no SLURM cluster in CI: {reason}")
        pytest.skip(f"no SLURM cluster: {reason}")
    yield c
    if started:
        _cluster.stop()
