import glob
import os

import pytest

from synthunlearn.distributed import CPU_ALLREDUCE_SHM_PREFIX

_SHM_PATTERN = CPU_ALLREDUCE_SHM_PREFIX + "*"


def _mapped_shm_buffers() -> set:
    """The all-reduce buffers some live process has mapped (read from /proc/<pid>/maps)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as handle:
                for line in handle:
                    if CPU_ALLREDUCE_SHM_PREFIX in line:
                        mapped.add(line[line.index(CPU_ALLREDUCE_SHM_PREFIX):].split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_shm():
    """Runs killed on purpose (kill -9, crash-in-save) cannot unlink DeepSpeed's CPU all-reduce
    buffers (~69 MB of RAM each); remove the ones that appeared during this session when it ends.
    Only those no live process maps: a run of another session on this host (a second pytest, a
    `make demo`) may be using its buffers, and a rank whose peer's buffer is removed before it
    maps it waits for it for ever (DeepSpeed's shm_initialize retries the open without limit)."""
    before = set(glob.glob(_SHM_PATTERN))
    yield
    for path in set(glob.glob(_SHM_PATTERN)) - before - _mapped_shm_buffers():
        try:
            os.unlink(path)
        except OSError:
            pass
