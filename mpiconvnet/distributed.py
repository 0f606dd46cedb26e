"""All MPI set-up in one place: who am I, which GPU is mine, and how to fail loudly.

    world = distributed.init(backend="numpy")     # also fine without mpirun: size 1
    world.rank, world.size, world.local_rank, world.is_root
    world.print("only rank 0 says this")

Library traffic runs on a duplicate of COMM_WORLD, so it can never match a message of the
user's. Any uncaught exception in any rank aborts every rank at once instead of leaving
the others blocked in a collective. The local rank comes from the launcher's environment
(SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID) when it is there, so the
GPU can be chosen before MPI touches CUDA; otherwise from a shared-memory split.
"""
import os
import sys
import time
import traceback

LOCAL_RANK_VARIABLES = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
LOCAL_SIZE_VARIABLES = ("SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")


def local_rank_from_environment(environ=os.environ):
    """(local_rank, local_size) from the launcher's variables, or (None, None)."""
    for rank_var, size_var in zip(LOCAL_RANK_VARIABLES, LOCAL_SIZE_VARIABLES):
        if environ.get(rank_var, "").isdigit():
            size = environ.get(size_var, "")
            # SLURM_NTASKS_PER_NODE can read "2(x3)" on heterogeneous allocations
            size = int(size.split("(")[0]) if size.split("(")[0].isdigit() else None
            return int(environ[rank_var]), size
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

    def print(self, *args, **kwargs):
        if self.is_root:
            print(*args, **kwargs, flush=True)

    def abort(self, code=1):
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


class SetupError(RuntimeError):
    """This rank cannot start: no pycuda or CUDA driver, no GPU left for it, libraries not
    found, or an MPI without the thread level the overlap needs. str() is one line, with
    the fix; entry points print it and exit 2."""


def init(backend="numpy", threads=1, allow_gpu_sharing=False, need_threads=True):
    """Set up MPI (when launched under it), pick this rank's GPU, and install the abort hook.
    Raises SetupError when this rank cannot start.

    `need_threads`: the gradient allreduce runs from a communication thread while the
    main thread computes, so MPI must allow calls from more than one thread (the main
    thread makes none while the communication thread runs: SERIALIZED is enough).
    """
    set_blas_threads(threads)
    local_rank, local_size = local_rank_from_environment()
    gpu_chosen = False
    if backend == "cuda" and local_rank is not None:
        # choose the GPU before MPI_Init: some CUDA-aware MPIs bind to the current device there
        _initialize_gpu(local_rank, local_size or 1, allow_gpu_sharing)
        gpu_chosen = True

    comm = None
    if launched_by_mpi():
        from mpi4py import MPI
        provided = MPI.Query_thread()
        if need_threads and provided < MPI.THREAD_SERIALIZED:
            raise SetupError(f"MPI gives thread level {provided}, the overlapped allreduce needs "
                             f"MPI_THREAD_SERIALIZED or better; run with --overlap false")
        comm = MPI.COMM_WORLD.Dup()
        if local_rank is None or local_size is None:
            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            local_rank, local_size = node.Get_rank(), node.Get_size()
            node.Free()
    else:
        local_rank, local_size = 0, 1
    if backend == "cuda" and not gpu_chosen:
        _initialize_gpu(local_rank, local_size, allow_gpu_sharing)

    world = World(comm, local_rank, local_size)
    _install_abort_hook(world)
    return world


def _initialize_gpu(local_rank, local_size, allow_sharing):
    from mpiconvnet.backends import get_backend
    try:
        get_backend("cuda").initialize(local_rank, local_size, allow_sharing)
    except (RuntimeError, ValueError) as e:
        # the CUDA backend's set-up errors (import_driver, choose_device, the library
        # search, cuDNN/cuBLAS handles) are RuntimeErrors whose message says what to do;
        # a bad MPICONVNET_* setting is a ValueError that names it
        raise SetupError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


class Heartbeat:
    """Names the rank that stopped answering, instead of hanging silently in a collective.

    Every step each rank sends its step number to rank 0 and waits for rank 0's reply;
    all of it is non-blocking and polled, so after `timeout` seconds rank 0 can say which
    ranks never reported, and any rank can say it has not heard from rank 0. Two tiny
    messages per rank per step cost microseconds against a step of tens of milliseconds.
    """
    TAG = 7301
    STALL_TAG = 7302

    def __init__(self, world, timeout):
        self.world, self.timeout = world, timeout

    def report_stall(self, step, what="the gradient allreduce"):
        """Called by every live rank when a collective has made no progress for `timeout`:
        the same exchange on its own tag names the ranks that are not live. Needs
        MPI_THREAD_MULTIPLE when the communication thread is still inside the collective."""
        from mpi4py import MPI
        if self.world.size > 1 and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self.beat(step, tag=self.STALL_TAG)
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
        # polled every 0.1 ms at most: the loss sum ends every step, so it must not add latency
        if self._wait([self.world.comm.Iallreduce(values, out, op=getattr(MPI, op))], longest_pause=1e-4):
            self.report_stall(step, what)
        return out

    def beat(self, step, tag=TAG):
        world = self.world
        if world.size == 1:
            return
        import numpy as np
        from mpi4py import MPI
        if world.is_root:
            steps = np.full(world.size, -1, np.int64)
            requests = [world.comm.Irecv(steps[r:r + 1], source=r, tag=tag) for r in range(1, world.size)]
            pending = self._wait(requests)
            if pending:
                silent = [r + 1 for r in pending]
                self._die(f"rank 0: ranks {silent} sent nothing for {self.timeout:.0f} s at step {step} "
                          f"(dead, hung or stuck in I/O); aborting all ranks")
            reply = np.array([step], np.int64)
            MPI.Request.Waitall([world.comm.Isend(reply, dest=r, tag=tag) for r in range(1, world.size)])
        else:
            mine = np.array([step], np.int64)
            reply = np.empty(1, np.int64)
            send = world.comm.Isend(mine, dest=0, tag=tag)
            recv = world.comm.Irecv(reply, source=0, tag=tag)
            if self._wait([send, recv]):
                self._die(f"rank {world.rank}: no word from rank 0 for {self.timeout:.0f} s at step {step}; "
                          f"aborting all ranks")

    def _wait(self, requests, longest_pause=0.01):
        """Poll until all complete or the timeout passes; return the indices still pending."""
        deadline = time.monotonic() + self.timeout
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
