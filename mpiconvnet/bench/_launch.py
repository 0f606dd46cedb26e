"""Start the MPI runs a benchmark measures, and end them with it."""
import os
import signal
import subprocess
import sys


def is_mpi_rank(environ=os.environ):
    """Whether a launcher started this process as an MPI rank. Not SLURM_NTASKS, which every
    shell inside an allocation has: there the benchmark still starts mpiexec itself."""
    return any(var in environ for var in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))


def mpiexec_path():
    """The mpiexec beside this Python (the venv's, from the mpich wheel), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else "mpiexec"


def run_child(command, env=None, capture=False):
    """Run `command` to its end and return (exit code, stdout, stderr; None unless captured).
    A SIGTERM to this process (a job's time limit, kill) is passed on to the child, whose
    mpiexec ends its ranks, and this process then exits too: killed alone it would leave
    them running, orphaned. ctrl-c reaches the whole process group by itself."""
    pipe = subprocess.PIPE if capture else None
    terminated, started = [], []

    def pass_on(signum, frame):
        terminated.append(signum)
        if started:
            started[0].send_signal(signum)
    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        try:
            child = subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe, text=True)
        except FileNotFoundError:
            raise SystemExit(f"mpiconvnet.bench: {command[0]} not found: install the project (pip install -e ., "
                             f"which brings the mpich wheel's mpiexec) or put the site's mpiexec on PATH") from None
        started.append(child)
        if terminated:   # the signal came while the child was being started
            child.send_signal(signal.SIGTERM)
        out, err = child.communicate()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait()
    if terminated:
        raise SystemExit(128 + signal.SIGTERM)
    return child.returncode, out, err


def refuse_a_task_of_a_foreign_srun():
    """srun -n N with an --mpi plugin this MPI does not speak starts N plain processes:
    each would start its own mpiexec and measure its own run. Exit 2 with the fix."""
    from mpiconvnet.distributed import world_size_problem
    problem = world_size_problem(1)
    if problem:
        print(f"mpiconvnet.bench: {problem}; or run the benchmark as one task (srun -n 1), which starts "
              f"mpiexec itself", file=sys.stderr)
        raise SystemExit(2)


def relaunch_under_mpiexec(module, argv, ranks):
    """If this process is not an MPI rank, run `python -m module argv` on `ranks` ranks
    with mpiexec, and return its exit code; else return None."""
    if is_mpi_rank():
        return None
    refuse_a_task_of_a_foreign_srun()
    command = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", module] + list(argv)
    print("running:", " ".join(command), flush=True)
    return run_child(command)[0]
