import glob
import os

import pytest

from synthunlearn.distributed import CPU_ALLREDUCE_SHM_PREFIX

_SHM_PATTERN = CPU_ALLREDUCE_SHM_PREFIX + "*"


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_shm():
    """Runs killed on purpose (kill -9, crash-in-save) cannot unlink DeepSpeed's CPU all-reduce
    buffers (~69 MB of RAM each); remove the ones this session created when it ends."""
    before = set(glob.glob(_SHM_PATTERN))
    yield
    for path in set(glob.glob(_SHM_PATTERN)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
