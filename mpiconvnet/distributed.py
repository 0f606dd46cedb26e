"""All MPI set-up in one place: who am I, which GPU is mine, and how to fail loudly.

    world = distributed.init(backend="numpy")     # also fine without mpirun: size 1
    world.rank, world.size, world.local_rank, world.is_root
    world.print("only rank 0 says this")

Library traffic runs on a duplicate of COMM_WORLD, so it can never match a message of the
user's. Any uncaught exception in any rank aborts every rank at once instead of leaving
the others blocked in a collective. The local rank comes from the launcher's environment
when it is there (mpirun's and mpiexec's own variables first, then srun's SLURM_LOCALID:
a batch shell has SLURM_LOCALID=0 too, which an mpirun inside the job passes to every
rank), so the GPU can be chosen before MPI touches CUDA; otherwise from a shared-memory
split. Once MPI runs, the ranks of each node compare the GPUs they took, and every rank
stops with the same one-line error if two share one (unless sharing is allowed).
"""
import os
import sys
import threading
import time
import traceback

# (local rank, local size) variables per launcher: Open MPI, MPICH's Hydra, PMI, MVAPICH2,
# Cray PALS, then srun's (SLURM_STEP_TASKS_PER_NODE: tasks on each node of the step)
LAUNCHER_VARIABLES = (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                      ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                      ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
                      ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
                      ("PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE"),
                      ("SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"))


def tasks_per_node(value):
    """The tasks on every node from a Slurm list like "4(x3)" or "2,2", when all nodes have
    the same number; None when they differ or the value is not such a list."""
    counts = set()
    for part in value.split(","):
        count = part.split("(")[0]
        if not count.isdigit():
            return None
        counts.add(int(count))
    return counts.pop() if len(counts) == 1 else None


def local_rank_from_environment(environ=os.environ):
    """(local_rank, local_size) from the launcher's variables, or (None, None); the size is
    None where the launcher does not say it (the shared-memory split will, after MPI_Init)."""
    for rank_var, size_var in LAUNCHER_VARIABLES:
        if environ.get(rank_var, "").isdigit():
            return int(environ[rank_var]), tasks_per_node(environ.get(size_var, ""))
    return None, None


def set_blas_threads(n):
    """Limit BLAS/OpenMP threads of this process (one per rank by default: ranks share cores)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass   # the variables above still hold for libraries loaded later


class World:
    """This process's place among the ranks, and the communicator the library uses."""

    def __init__(self, comm, local_rank, local_size):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank, self.local_size = local_rank, local_size
        self.is_root = self.rank == 0
        self.watchdog = None

    def start_watchdog(self, timeout):
        """From here on a rank that makes no progress (see progress()) for `timeout`
        seconds ends the run with exit 3; returns the Watchdog (None for one rank)."""
        if self.size > 1 and self.watchdog is None:
            self.watchdog = Watchdog(self, timeout)
        return self.watchdog

    def progress(self, where):
        """Tell the watchdog, if one runs, that this rank moved on to `where`."""
        if self.watchdog is not None:
            self.watchdog.progress(where)

    def stop_watchdog(self):
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def print(self, *args, **kwargs):
        if self.is_root:
            print(*args, **kwargs, flush=True)

    def abort(self, code=1):
        cuda = sys.modules.get("mpiconvnet.backends.cuda.context")   # loaded only with --backend cuda
        if cuda is not None:
            cuda.release_before_abort()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        os._exit(code)

    def barrier(self):
        if self.size > 1:
            self.comm.Barrier()

    def allreduce_sum(self, values):
        """Sum a small host numpy array over ranks (metrics, counts)."""
        if self.size == 1:
            return values
        from mpi4py import MPI
        import numpy as np
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def broadcast_object(self, obj):
        return obj if self.size == 1 else self.comm.bcast(obj, root=0)

    def first_failure(self, error):
        """A collective of the ranks' set-up errors (None where a rank met none): None
        when no rank met one, else the line every rank stops with, for rank 0 to print.
        The same error on every rank is said as it is; otherwise the first failing rank
        is named (a file one node cannot read), instead of its line being lost."""
        texts = [None if error is None else str(error)]
        if self.size > 1:
            texts = self.comm.allgather(texts[0])
        return first_failure_line(texts)


def first_failure_line(texts):
    """The ranks' errors (None where a rank met none) as one line, or None: the same
    error on every rank as it is, else the first failing rank's, naming it."""
    failed = [(rank, text) for rank, text in enumerate(texts) if text is not None]
    if not failed:
        return None
    if len(failed) == len(texts) and len({text for _, text in failed}) == 1:
        return failed[0][1]
    rank, text = failed[0]
    return f"rank {rank}: {text}"


def _install_abort_hook(world):
    """An exception in one rank must end all ranks, not leave them waiting forever."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if world.size > 1 and not issubclass(kind, KeyboardInterrupt):
            text = "".join(traceback.format_exception(kind, value, tb))
            sys.stderr.write(f"[rank {world.rank}] uncaught exception, aborting all {world.size} ranks:\n{text}")
            sys.stderr.flush()
            world.abort(1)
        previous(kind, value, tb)

    sys.excepthook = hook


def launched_by_mpi(environ=os.environ):
    """True when a launcher (mpiexec, srun) started this process as one of several ranks."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_NTASKS"):
        if var in environ:
            return True
    return False


def first_rank_by_environment(environ=os.environ):
    """False only for a process its launcher numbered other than 0: before MPI starts, so
    that a bad flag, which every rank sees alike, is printed once rather than once a rank."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if environ.get(var, "").isdigit():
            return environ[var] == "0"
    return True


def ranks_by_environment(environ=os.environ):
    """How many ranks the launcher started, read from its environment without starting MPI
    (1 for a plain process): MPICH's and Intel MPI's PMI_SIZE, Open MPI's
    OMPI_COMM_WORLD_SIZE, else srun's tasks in this step (not SLURM_NTASKS, which the shell
    of a batch script has too). launched_by_mpi asks another question: whether to start
    MPI at all (yes under any launcher, for one rank too)."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


def refuse_several_ranks(program, environ=os.environ):
    """For a tool that writes one file (plot, export): False for one process; started as
    several ranks, which would all write it, True after rank 0 said so in one line."""
    ranks = ranks_by_environment(environ)
    if ranks == 1:
        return False
    if first_rank_by_environment(environ):
        print(f"{program}: started as {ranks} MPI ranks, which would all write the same --out; run it as one "
              f"process, without mpiexec/srun -n {ranks}", file=sys.stderr)
    return True


class SetupError(RuntimeError):
    """This rank cannot start: no pycuda or CUDA driver, no usable GPU or one shared with
    another rank, libraries not found, srun's --mpi not matching the MPI, or an MPI without
    the thread level the overlap needs. str() is one line, with
    the fix; entry points print it (when `echo`: a rank that stops because another rank
    cannot start says nothing, so the log holds each cause once) and exit 2."""

    def __init__(self, message, echo=True):
        super().__init__(message)
        self.echo = echo


def init(backend="numpy", threads=1, allow_gpu_sharing=False, need_threads=True, failure=None):
    """Set up MPI (when launched under it), pick this rank's GPU, and install the abort hook.
    Raises SetupError when this rank cannot start.

    `need_threads`: the gradient allreduce runs from a communication thread while the
    main thread computes, so MPI must allow calls from more than one thread (the main
    thread makes none while the communication thread runs: SERIALIZED is enough).
    `failure`: why this rank cannot start, met before MPI (a checkpoint one node cannot
    read). Such a rank still joins MPI, touching no GPU, so that every rank stops with
    SetupError and rank 0 says the line, naming the rank where not all met it. The ranks
    share their failures before any GPU collective, so the others may have chosen
    --backend cuda while this one knows no backend.
    """
    set_blas_threads(threads)
    local_rank, local_size = local_rank_from_environment()
    gpu_error, gpu_chosen = None, False
    if failure is not None:
        backend = None   # nothing of a GPU for a rank that stops
    if backend == "cuda" and local_rank is not None:
        # choose the GPU before MPI_Init: some CUDA-aware MPIs bind to the current device there
        gpu_error, gpu_chosen = _initialize_gpu(local_rank, local_size), True

    comm = node = None
    if launched_by_mpi():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Dup()
        if failure is not None and world_size_problem(comm.Get_size()):
            # srun's tasks, each a world of one, cannot share it: said as before MPI, once by
            # the launcher's rank 0 (a bad flag on every task), not hidden behind N lines about srun
            raise SetupError(failure, echo=first_rank_by_environment())
        check_world_size(comm.Get_size())
        provided = MPI.Query_thread()
        thread_problem = None
        if need_threads and provided < MPI.THREAD_SERIALIZED:
            thread_problem = (f"MPI gives thread level {provided}, the overlapped allreduce needs "
                              f"MPI_THREAD_SERIALIZED or better; run with --overlap false")
        # every rank takes part, a rank that stops too: one that left here would leave the
        # others waiting in the collectives below. A failure met before MPI comes first: the
        # rank that met it did not look at the thread level, so naming another rank's (the
        # same on every rank) would blame that rank and hide the cause
        shared = comm.allgather((failure, thread_problem))
        line = (first_failure_line([before for before, _ in shared])
                or first_failure_line([level for _, level in shared]))
        if line is not None:
            raise SetupError(line, echo=comm.Get_rank() == 0)
        # the ranks that share this node, as MPI sees them (the truth, whatever the
        # environment said)
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        unlink_node_segments(node)
    else:
        if failure is not None:
            raise SetupError(failure)
        local_rank, local_size = 0, 1
    try:
        if backend == "cuda":
            if not gpu_chosen:
                gpu_error = _initialize_gpu(local_rank, local_size)
            _agree_on_gpus(comm, node, gpu_error, allow_gpu_sharing)
    finally:
        if node is not None:
            node.Free()

    world = World(comm, local_rank, local_size)
    _install_abort_hook(world)
    return world


# MPICH's shared-memory segment, one per node and job, which every rank of the node maps
MPICH_SEGMENT = "/dev/shm/mpich_shm_"


def unlink_node_segments(node):
    """unlink_mpi_segments once every rank of `node` (the ranks that share this node, a
    COMM_TYPE_SHARED split) has mapped them."""
    node.Barrier()
    unlink_mpi_segments()


def unlink_mpi_segments(maps="/proc/self/maps"):
    """Remove the names of the MPI library's shared-memory segments that this process maps;
    returns them. MPICH removes its segment (2 MB for 2 ranks, more with more) only in
    MPI_Finalize, so every run that ends by MPI_Abort (exit 3, 5, evaluate's 130) or is
    killed (SIGKILL after Slurm's KillWait, the OOM killer) left it in /dev/shm, which is
    RAM, on every node, for good; a later job with the same PMI job id then hangs in
    MPI_Init (scripts/local-slurm.sh). Called once every rank of the node maps it, the
    memory stays mapped until the last rank ends, however it ends. Other MPIs: a no-op."""
    try:
        with open(maps) as stream:
            # address, permissions, offset, device, inode, then the path for a mapped file
            paths = {fields[5].rstrip("\n") for fields in (line.split(maxsplit=5) for line in stream)
                     if len(fields) == 6}
    except OSError:   # no /proc (not Linux): nothing to find
        return []
    removed = []
    for path in sorted(p for p in paths if p.startswith(MPICH_SEGMENT) and not p.endswith(" (deleted)")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:   # another rank of the node removed it first
            pass
    return removed


def world_size_problem(size, environ=os.environ):
    """srun with an --mpi plugin this MPI does not speak starts every task as a world of
    one: N trainers (or packers) would then write into the same directory. The one-line
    reason, or None."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    # only where srun itself launched the ranks: mpirun's (Open MPI) and mpiexec's (Hydra)
    # ranks inside a job carry the step of the launcher's daemons
    launched_by_srun = not any(v in environ for v in ("OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"))
    if size == 1 and tasks.isdigit() and int(tasks) > 1 and launched_by_srun:
        return (f"srun started {tasks} tasks but MPI sees each as a world of 1: srun's --mpi plugin does not "
                f"match this MPI (MPICH, and the pip mpich wheel: srun --mpi=pmi2; Open MPI: srun --mpi=pmix; "
                f"srun --mpi=list shows what the site has)")
    return None


def check_world_size(size, environ=os.environ):
    problem = world_size_problem(size, environ)
    if problem:
        raise SetupError(problem)


def _initialize_gpu(local_rank, local_size):
    """Make this rank's GPU current; the one-line reason it cannot, or None."""
    from mpiconvnet.backends import get_backend
    try:
        get_backend("cuda").initialize(local_rank, local_size)
    except Exception as e:
        # the CUDA backend's set-up errors (import_driver, choose_device, the library
        # search, cuDNN/cuBLAS handles, the device itself) are RuntimeErrors whose message
        # says what to do; a bad MPICONVNET_* setting is a ValueError that names it; anything
        # else must not leave the other ranks waiting in the collectives that follow either
        return _first_line(e)
    return None


def _first_line(error):
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def _agree_on_gpus(comm, node, error, allow_sharing):
    """Every rank raises SetupError if any rank has no usable GPU or, unless sharing is
    allowed, if ranks of a node took the same GPU; each cause is printed once."""
    from mpiconvnet.backends import get_backend
    from mpiconvnet.backends.cuda import device as device_policy
    if comm is None:
        if error:
            raise SetupError(error)
        return
    identity = None
    if not error:
        try:
            identity = get_backend("cuda").device_identity()
        except Exception as e:   # every rank must still reach the allgathers below
            error = f"cannot read the GPU's UUID: {_first_line(e)}"
    placements = node.allgather((comm.Get_rank(), identity))   # every rank of the node takes part
    mine, note = error, None
    if mine is None and node.Get_rank() == 0 and not device_policy.sharing_allowed(allow_sharing):
        mine = device_policy.shared_gpu_problem(placements)   # said by the node's first rank
        note = device_policy.unchecked_gpus_note(placements)
    problems = comm.allgather(mine)
    if note and not any(problems):   # a rank that could not start has no UUID to report either
        print(f"rank {comm.Get_rank()}: {note}", file=sys.stderr, flush=True)
    if mine:
        # the same cause on many ranks (no pycuda on any node) is said once, by the first
        same = [rank for rank, problem in enumerate(problems) if problem == mine]
        who = f"rank {same[0]}" if len(same) == 1 else f"ranks {_rank_list(same)}"
        raise SetupError(f"{who}: {mine}" if comm.Get_size() > 1 else mine, echo=same[0] == comm.Get_rank())
    first = next((rank for rank, problem in enumerate(problems) if problem), None)
    if first is not None:
        raise SetupError(f"rank {first} cannot start: {problems[first]}", echo=False)


def _rank_list(ranks, shown=8):
    """"0, 1, 2" or, for many, "0, 1, …, 63 (64 ranks)"."""
    if len(ranks) <= shown:
        return ", ".join(map(str, ranks))
    return f"{', '.join(map(str, ranks[:shown - 1]))}, …, {ranks[-1]} ({len(ranks)} ranks)"


class Watchdog:
    """The backstop for the collectives that block without a time limit: the evaluation's
    sums, a checkpoint's gathers and barrier, the layer gathers of --parallel hybrid and
    model. The trainer and the evaluation mark progress; a rank that makes none for
    `timeout` says where it was waiting and ends the run (exit 3), instead of every rank
    waiting until the job's time limit. A blocked MPI call cannot be polled, so unlike
    Heartbeat it cannot name the silent rank."""

    def __init__(self, world, timeout):
        from mpi4py import MPI
        self.world, self.timeout = world, timeout
        self.where, self.since = "the set-up", time.monotonic()
        # asked here, in the main thread: MPI_Abort from the watchdog's thread needs it
        self.can_abort = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def progress(self, where):
        self.where, self.since = where, time.monotonic()

    def close(self):
        self._stopped.set()
        self._thread.join()

    def _watch(self):
        while not self._stopped.wait(min(self.timeout / 4, 5.0)):
            idle = time.monotonic() - self.since
            if idle > self.timeout:
                sys.stderr.write(f"rank {self.world.rank}: no progress for {idle:.0f} s in {self.where}; another rank "
                                 f"is dead or hung (or the file system is); aborting all ranks\n")
                sys.stderr.flush()
                if self.can_abort:
                    self.world.abort(3)
                os._exit(3)   # MPI calls from this thread are not allowed: the launcher ends the others


def _seconds(t):
    """300 -> "300", 1.5 -> "1.5", 100/3 -> "33.3" (not "1e+06" or "33.3333")."""
    return f"{t:.1f}".rstrip("0").rstrip(".")


class Heartbeat:
    """Names the rank that stopped answering, instead of hanging silently in a collective.

    Every step each rank sends its step number to rank 0 and waits for rank 0's reply;
    all of it is non-blocking and polled, so after `timeout` seconds rank 0 can say which
    ranks never reported, and any rank can say it has not heard from rank 0. Two tiny
    messages per rank per step cost microseconds against a step of tens of milliseconds.

    The other ranks wait half as long again as rank 0 before blaming it: while rank 0
    waits for a silent rank it sends no reply, so with equal deadlines a healthy rank
    could abort the job first, naming rank 0 instead of the rank that hung.
    """
    TAG = 7301
    STALL_TAG = 7302
    PATIENCE_FOR_ROOT = 1.5   # the other ranks' deadline, in units of rank 0's

    def __init__(self, world, timeout):
        self.world, self.timeout = world, timeout

    def report_stall(self, step, what="the gradient allreduce"):
        """Called by every live rank when a collective has made no progress for `timeout`:
        the same exchange on its own tag names the ranks that are not live. Needs
        MPI_THREAD_MULTIPLE when the communication thread is still inside the collective."""
        from mpi4py import MPI
        if self.world.size > 1 and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            # every live rank has waited `timeout` already and enters this exchange within
            # their skew of each other: half of it names the silent ranks, so the whole
            # takes 1.5x --stall-timeout (1.75x on the other ranks), inside the watchdog's 2x
            self.beat(step, tag=self.STALL_TAG, timeout=self.timeout / 2,
                      after=f" after {what} made no progress for {self.timeout:.0f} s")
            self._die(f"rank {self.world.rank}: every rank answers but {what} made no progress "
                      f"for {self.timeout:.0f} s at step {step}; aborting all ranks")
        self._die(f"rank {self.world.rank}: {what} made no progress for {self.timeout:.0f} s at "
                  f"step {step}; another rank is dead or hung; aborting all ranks")

    def allreduce_sum(self, values, step, what="the step's loss allreduce"):
        """world.allreduce_sum of a small host array, waited for at most `timeout`: a rank
        that hangs between the gradient reduction and this one (which the heartbeat
        before the step cannot see) is named too, instead of every rank waiting forever."""
        return self._allreduce(values, step, "SUM", what)

    def allreduce_max(self, values, step, what):
        """The elementwise maximum over ranks, waited for as allreduce_sum."""
        return self._allreduce(values, step, "MAX", what)

    def _allreduce(self, values, step, op, what):
        if self.world.size == 1:
            return values
        import numpy as np
        from mpi4py import MPI
        out = np.empty_like(values)
        if self._wait([self.world.comm.Iallreduce(values, out, op=getattr(MPI, op))]):
            self.report_stall(step, what)
        return out

    def beat(self, step, tag=TAG, timeout=None, after=""):
        """Exchange step numbers with rank 0, each side waiting at most `timeout` (the
        other ranks PATIENCE_FOR_ROOT times that); `after` ends the silence's description."""
        world = self.world
        if world.size == 1:
            return
        import numpy as np
        from mpi4py import MPI
        timeout = self.timeout if timeout is None else timeout
        if world.is_root:
            steps = np.full(world.size, -1, np.int64)
            requests = [world.comm.Irecv(steps[r:r + 1], source=r, tag=tag) for r in range(1, world.size)]
            pending = self._wait(requests, timeout)
            if pending:
                silent = [r + 1 for r in pending]
                self._die(f"rank 0: ranks {silent} sent nothing for {_seconds(timeout)} s{after} at step {step} "
                          f"(dead, hung or stuck in I/O); aborting all ranks")
            reply = np.array([step], np.int64)
            MPI.Request.Waitall([world.comm.Isend(reply, dest=r, tag=tag) for r in range(1, world.size)])
        else:
            timeout *= self.PATIENCE_FOR_ROOT
            mine = np.array([step], np.int64)
            reply = np.empty(1, np.int64)
            send = world.comm.Isend(mine, dest=0, tag=tag)
            recv = world.comm.Irecv(reply, source=0, tag=tag)
            if self._wait([send, recv], timeout):
                self._die(f"rank {world.rank}: no word from rank 0 for {_seconds(timeout)} s{after} at step {step} "
                          f"(rank 0 is dead or hung: it names any other silent rank sooner); aborting all ranks")

    def _wait(self, requests, timeout=None, longest_pause=1e-4):
        """Poll until all complete or the timeout passes; return the indices still pending.
        Every 0.1 ms at most: the beat and the loss sum come every step, and a GPU step
        takes a few ms (a 10 ms pause, as before 2026-11-24, could add twice the ranks'
        skew to each step)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        done = [False] * len(requests)
        pause = 1e-5
        while True:
            for i, req in enumerate(requests):
                if not done[i]:
                    done[i] = req.Test()
            if all(done):
                return []
            if time.monotonic() > deadline:
                return [i for i, d in enumerate(done) if not d]
            time.sleep(pause)
            pause = min(pause * 2, longest_pause)

    def _die(self, message):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        self.world.abort(3)
