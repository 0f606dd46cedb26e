"""Start the MPI runs a benchmark measures, end them with it, and stop on ctrl-c or SIGTERM."""
import os
import signal
import subprocess
import sys
import threading
import time

EXIT_INTERRUPTED = 130                  # ctrl-c, the shell's code
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process SIGTERM killed

# set in the environment of the ranks a benchmark starts itself: their driver says why they stopped
QUIET_RANKS = "MPICONVNET_BENCH_DRIVER"

# seconds a child (mpiexec) has to end after a ctrl-c or SIGTERM is passed on to it, before
# its process group is killed: its ranks end within a second or two, but one stopped inside
# a blocking MPI call never reaches its Python handler, and its peer, which did, then waits
# in MPI_Finalize for it, so mpiexec would wait for ever
STOP_GRACE_S = 5


class Terminated(BaseException):
    """A SIGTERM (a job's time limit, kill), raised where the benchmark is, so that its
    finally: blocks remove its scratch files; a BaseException, as KeyboardInterrupt is, so
    that no `except Exception` takes it for a failure."""


class _Stops:
    """The state of stop_on_signals, one per process: what SIGTERM raises, when each
    signal last raised, and the unraisable hook it replaced."""

    def __init__(self):
        self.sigterm_raises = Terminated
        self.raised_at = {}         # signum -> time.monotonic() of its last raise
        self.last_signum = None     # the signal of the last raise, delivered again if it is swallowed
        self.previous_hook = None


_stops = _Stops()


def stop_on_signals(sigterm_raises=Terminated):
    """From here on ctrl-c raises KeyboardInterrupt and SIGTERM `sigterm_raises`. The same
    signal delivered twice within a second (a terminal's ctrl-c reaches mpiexec's ranks both
    directly and forwarded by mpiexec) raises once, not a traceback in the clean-up; another
    signal (a SIGTERM after a ctrl-c) still raises. One raised where Python drops exceptions
    (a destructor, a C library's callback, which print "Exception ignored") is delivered
    again, or the benchmark would run on. A second call changes what SIGTERM raises and
    keeps the rest: one hook, one memory of the last signals."""
    _stops.sigterm_raises = sigterm_raises
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    if sys.unraisablehook is not _deliver_again:
        _stops.previous_hook = sys.unraisablehook
        sys.unraisablehook = _deliver_again


def _raise_stop(signum, frame):
    now = time.monotonic()
    if now - _stops.raised_at.get(signum, -1e9) < 1:
        return
    _stops.raised_at[signum] = now
    _stops.last_signum = signum
    raise KeyboardInterrupt if signum == signal.SIGINT else _stops.sigterm_raises


def _deliver_again(unraisable):
    stops = (KeyboardInterrupt, Terminated, _stops.sigterm_raises)
    if _stops.last_signum is not None and issubclass(unraisable.exc_type, stops):
        _stops.raised_at.pop(_stops.last_signum, None)
        # from another thread, a moment later: delivered in here, it would be dropped again.
        # A real signal, not _thread.interrupt_main, which sets Python's flag alone and
        # leaves the main thread in its sleep, join or wait until that returns by itself
        threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, _stops.last_signum)).start()
    else:
        _stops.previous_hook(unraisable)


def says_why_it_stopped(environ=os.environ):
    """Whether this process prints the line of a stop: one process of the run, the driver
    where a benchmark started mpiexec itself, else rank 0."""
    from mpiconvnet.distributed import first_rank_by_environment
    return QUIET_RANKS not in environ and first_rank_by_environment(environ)


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
    The child runs in a process group of its own, and this process passes ctrl-c and
    SIGTERM (a job's time limit, kill) on to it: mpiexec passes them on to its ranks, which
    end cleanly, and this process raises KeyboardInterrupt or Terminated once the child has
    ended. Killed alone it would leave them running, orphaned; a terminal's ctrl-c reaching
    mpiexec's proxy as well killed the proxy mid-shutdown, with MPICH's error lines. A child
    still running STOP_GRACE_S after the stop, or at a second one, has its group killed
    (SIGKILL; mpiexec's proxies then kill their ranks)."""
    pipe = subprocess.PIPE if capture else None
    env = dict(os.environ if env is None else env, **{QUIET_RANKS: str(os.getpid())})
    stops, started, passed_on = [], [], []

    def kill_group():
        try:
            os.killpg(started[0].pid, signal.SIGKILL)
        except ProcessLookupError:   # ended meanwhile
            pass

    def stop_child():
        if len(stops) > 1:   # the user insists, or a job's time limit follows a ctrl-c: no more waiting
            kill_group()
        elif not passed_on:
            passed_on.append(threading.Timer(STOP_GRACE_S, kill_group))
            started[0].send_signal(stops[0])
            passed_on[0].start()

    def pass_on(signum, frame):
        stops.append(signum)
        if started:
            stop_child()
    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            child = subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe, text=True, process_group=0)
        except FileNotFoundError:
            raise SystemExit(f"mpiconvnet.bench: {command[0]} not found: install the project (pip install -e ., "
                             f"which brings the mpich wheel's mpiexec) or put the site's mpiexec on PATH") from None
        started.append(child)
        if stops:   # the signal came while the child was being started
            stop_child()
        out, err = child.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for timer in passed_on:
            timer.cancel()
        for child in started:
            if child.poll() is None:
                kill_group()
                child.wait()
    if stops:
        raise KeyboardInterrupt if stops[0] == signal.SIGINT else Terminated
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

