"""Who am I among the packers: a plain run, an MPI rank, or one task of a SLURM array.

MPI is imported only when a launcher says we run under it (PMI_RANK from MPICH/hydra and
srun --mpi=pmi2, OMPI_COMM_WORLD_RANK from Open MPI, PMIX_RANK from PMIx launchers), so a
plain `python -m preprocess` never initialises MPI. Array tasks (--rank R --size N) share
nothing but the file system: each plans for itself (the plan is deterministic) and the
task that finds every shard finished writes the index.
"""
import multiprocessing
import os
import sys
from dataclasses import dataclass

MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


@dataclass
class Team:
    rank: int
    size: int
    comm: object = None     # a duplicated MPI communicator, or None

    @property
    def is_root(self):
        return self.rank == 0

    def share(self, build):
        """Run build() on rank 0 and hand its result (or its error) to every rank."""
        if self.comm is None:
            return build()
        result, error = None, None
        if self.is_root:
            try:
                result = build()
            except Exception as caught:   # re-raised on every rank, so all exit the same way
                error = caught
        result, error = self.comm.bcast((result, error), root=0)
        if error is not None:
            raise error
        return result

    def sum(self, value):
        return value if self.comm is None else self.comm.allreduce(value)

    def first_failure(self, text):
        """The ranks' problems (None where a rank has none) as the one line rank 0 says, or
        None when no rank has one (mpiconvnet.distributed.first_failure_line)."""
        from mpiconvnet.distributed import first_failure_line
        return first_failure_line([text] if self.comm is None else self.comm.allgather(text))

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    def abort(self, code):
        """Stop every rank: one rank failing must not leave the others waiting forever."""
        if self.comm is not None and self.comm.Get_size() > 1:
            sys.stderr.flush()
            self.comm.Abort(code)


def launched_under_mpi():
    return any(name in os.environ for name in MPI_RANK_VARIABLES)


def make_team(rank=None, size=None):
    """A Team from --rank/--size (array tasks), the MPI launcher, or a single process."""
    if rank is not None or size is not None:
        if rank is None or size is None or not 0 <= rank < size:
            raise ValueError(f"--rank {rank} --size {size}: give both, with 0 <= rank < size "
                             f"(e.g. --rank $SLURM_ARRAY_TASK_ID --size $SLURM_ARRAY_TASK_COUNT)")
        return Team(rank, size)
    from mpiconvnet.distributed import unlink_node_segments, world_size_problem
    team = Team(0, 1)
    if launched_under_mpi():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Dup()   # our traffic never mixes with a caller's COMM_WORLD
        team = Team(comm.Get_rank(), comm.Get_size(), comm)
        # a pack that fails ends by MPI_Abort, after which MPICH's segment would stay in /dev/shm
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        unlink_node_segments(node)
        node.Free()
    problem = world_size_problem(team.size)   # N tasks each packing everything into one --out
    if problem:
        raise ValueError(problem)
    return team


def worker_context():
    """fork is cheapest, but forking an MPI process is unsafe with some MPIs: spawn there."""
    return multiprocessing.get_context("spawn" if launched_under_mpi() else "fork")
