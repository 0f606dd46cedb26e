"""Fixtures for every test file."""
import glob
import os
import shutil
import signal

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


@pytest.fixture(autouse=True)
def kill_what_the_test_left_running():
    """A test that fails while a run it started still trains (mpiexec, its ranks, loader
    processes) must not leave it running: it would slow every test after it, and hold the
    output pipes. Torn down before the segment clean-up above, whose segments it frees."""
    yield
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(root):
    """The pids of root's children, their children, and so on (from /proc)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except OSError:   # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def as_an_ordinary_user(argv):
    """`argv` run so that file modes bind it even when the tests run as root, whom a mode
    of 000 does not stop: setpriv drops root's overriding capabilities from the bounding
    set, so the command runs with none, as an ordinary user's would."""
    if os.geteuid() != 0:
        return list(argv)
    if shutil.which("setpriv") is None:
        pytest.skip("the tests run as root and setpriv is missing: file modes cannot be made to bind")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
