"""Fixtures for every test file."""
import glob
import os

import pytest


@pytest.fixture(autouse=True)
def remove_leftover_mpich_segments():
    """Ranks killed or aborted by the tests leave MPICH's shared-memory segment behind
    (/dev/shm/mpich_shm_*): remove the ones that appeared during the test and that no
    live process maps, so repeated runs do not fill /dev/shm. A segment some process
    still maps belongs to another MPI job on this machine (one starting up, or another
    test suite's), which removing it would hang in MPI_Init."""
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    yield
    for path in set(glob.glob("/dev/shm/mpich_shm_*")) - before:
        if not _mapped_by_a_live_process(path):
            try:
                os.remove(path)
            except OSError:
                pass


def _mapped_by_a_live_process(path):
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as stream:
                if path in stream.read():
                    return True
        except OSError:   # the process ended meanwhile, or is not ours to read
            continue
    return False
