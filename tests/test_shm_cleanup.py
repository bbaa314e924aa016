"""The suite's clean-up of DeepSpeed's CPU all-reduce buffers (tests/conftest.py) spares buffers a
live process maps: another session's run on this host may be using them."""

import mmap
import os

from synthunlearn.distributed import CPU_ALLREDUCE_SHM_PREFIX
from tests.conftest import _mapped_shm_buffers


def test_a_mapped_buffer_is_spared_and_an_unmapped_one_is_not():
    path = f"{CPU_ALLREDUCE_SHM_PREFIX}{os.getuid()}_test_{os.getpid()}_0"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"\0" * mmap.PAGESIZE)
        mapping = mmap.mmap(fd, mmap.PAGESIZE)
        assert path in _mapped_shm_buffers()
        mapping.close()
        assert path not in _mapped_shm_buffers()
    finally:
        os.close(fd)
        os.unlink(path)
