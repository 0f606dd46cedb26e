"""Re-run a benchmark under mpiexec when it was started as a single process."""
import os
import subprocess
import sys

from mpiconvnet.distributed import launched_by_mpi


def relaunch_under_mpiexec(module, argv, ranks):
    """If this process is not an MPI rank, run `python -m module argv` on `ranks` ranks
    with the mpiexec beside this Python, and return its exit code; else return None."""
    if launched_by_mpi():
        return None
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", module] + list(argv)
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command)
