"""Gradient allreduce over buckets. Runs under plain pytest (one rank) and under
`mpiexec -n 2 python -m pytest tests/test_collectives.py` (.ci/run does both)."""
import threading

import numpy as np
import pytest

from mpiconvnet import distributed
from mpiconvnet.backends import numpy_backend as ops
from mpiconvnet.buckets import GradientBuckets, GradientReducer, plan_buckets
from mpiconvnet.models import build_layers

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def world():
    return distributed.init("numpy", threads=1)


SHAPES = {"conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,), "fc6.weight": (50, 72), "fc6.bias": (50,),
          "fc8.weight": (10, 50), "fc8.bias": (10,)}


@pytest.mark.parametrize("overlap", [True, False])
def test_rank_valued_allreduce_gives_the_mean_rank_twice(world, overlap):
    # rank r contributes r everywhere: the average is (size - 1) / 2. Twice, because lazy
    # set-up bugs (buffers registered on first use) show only on the second call.
    buckets = GradientBuckets(ops, SHAPES, np.float32, bucket_bytes=4000)
    assert len(buckets.buffers) > 2
    reducer = GradientReducer(world, buckets, overlap=overlap)
    try:
        for _ in range(2):
            for buf in buckets.buffers:
                buf[...] = world.rank
            reducer.begin()
            for name in reversed(list(SHAPES)):   # backward order, one layer at a time
                reducer.grads_ready([name])
            reducer.finish()
            for name, view in buckets.views.items():
                np.testing.assert_array_equal(view, np.full(SHAPES[name], (world.size - 1) / 2, np.float32), name)
    finally:
        reducer.close()


class QueuedDevice:
    """A stand-in GPU backend for the reducer: arrays in host memory, but HOST_MEMORY False,
    and queued work (backward's writes of the gradients, copies to the host) done only when
    an event recorded after it is waited for, as on a GPU. A reducer that let MPI read a
    bucket, or its host copy, before waiting for its event would reduce stale values (the
    NaN they start as)."""
    HOST_MEMORY = False
    zeros, flat_views, scale_ = staticmethod(ops.zeros), staticmethod(ops.flat_views), staticmethod(ops.scale_)

    def __init__(self):
        self.pending, self.lock = [], threading.Lock()
        self.threads = set()      # threads that called use_in_this_thread
        self.waited_from = set()  # threads that waited for an event

    def pinned_host_empty(self, shape, dtype):
        return np.full(shape, np.nan, dtype)

    def queue(self, work):
        with self.lock:
            self.pending.append(work)

    def drain(self):
        """The stream runs everything queued (what a later synchronize waits for); the
        test's own wait, not counted in waited_from."""
        with self.lock:
            for i, work in enumerate(self.pending):
                if work is not None:
                    work()
                    self.pending[i] = None

    def copy_to_host_async(self, dst, src):
        self.queue(lambda: np.copyto(dst, src))

    def mpi_buffer(self, array):   # a CUDA-aware MPI reads the device array itself
        return array

    def record_event(self):
        with self.lock:
            return len(self.pending)

    def wait_event(self, event):
        assert threading.get_ident() == threading.main_thread().ident or threading.get_ident() in self.threads, \
            "an event was waited for from a thread that did not call use_in_this_thread"
        self.waited_from.add(threading.get_ident())
        with self.lock:
            for i in range(event):
                if self.pending[i] is not None:
                    self.pending[i]()
                    self.pending[i] = None

    def copy_from_host(self, dst, src):
        np.copyto(dst, src)

    def use_in_this_thread(self):
        self.threads.add(threading.get_ident())


@pytest.mark.parametrize("cuda_aware", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_device_buckets_are_reduced_only_after_the_gpu_wrote_them(world, overlap, cuda_aware):
    # staged: MPI reduces the host copy, which exists once its event is waited for;
    # CUDA-aware: MPI reads the device bucket, which holds the gradients only then too
    device = QueuedDevice()
    buckets = GradientBuckets(device, SHAPES, np.float32, bucket_bytes=4000)
    reducer = GradientReducer(world, buckets, overlap=overlap, cuda_aware=cuda_aware)
    assert reducer.staged == (world.size > 1 and not cuda_aware)   # one rank reduces nothing
    try:
        for step in range(2):
            for buf in buckets.buffers:
                buf[...] = np.nan                                   # before backward runs
                device.queue(lambda buf=buf, value=world.rank + step: buf.fill(value))
            reducer.begin()
            for name in reversed(list(SHAPES)):
                reducer.grads_ready([name])
            reducer.finish()
            device.drain()   # as the next kernels on the stream would see the buckets
            for name, view in buckets.views.items():
                np.testing.assert_array_equal(view, np.full(SHAPES[name], (world.size - 1) / 2 + step, np.float32))
    finally:
        reducer.close()
    if world.size > 1:
        # the waits happened where the reductions run: the communication thread when it overlaps
        main = threading.main_thread().ident
        assert (main not in device.waited_from) == overlap and device.waited_from


def test_a_bucket_left_incomplete_is_an_error(world):
    buckets = GradientBuckets(ops, SHAPES, np.float32, bucket_bytes=4000)
    reducer = GradientReducer(world, buckets, overlap=False)
    reducer.begin()
    reducer.grads_ready(["fc8.weight"])
    with pytest.raises(RuntimeError, match="did not report gradients"):
        reducer.finish()


def test_gradients_are_views_into_the_buckets():
    buckets = GradientBuckets(ops, SHAPES, np.float32, bucket_bytes=4000)
    buckets.views["fc8.bias"][...] = 7
    b = buckets.bucket_of["fc8.bias"]
    assert (buckets.buffers[b] == 7).sum() == 10


def test_gradient_views_start_256_byte_aligned_and_do_not_overlap():
    # the backward ops write into the views directly; cuDNN and cuBLAS want aligned addresses
    shapes = {"a.weight": (3, 5), "a.bias": (3,), "b.weight": (7, 1), "b.bias": (1,)}
    buckets = GradientBuckets(ops, shapes, np.float32, bucket_bytes=1 << 20)
    (flat,) = buckets.buffers
    starts = {n: v.ctypes.data - flat.ctypes.data for n, v in buckets.views.items()}
    assert starts == {"b.bias": 0, "b.weight": 256, "a.bias": 512, "a.weight": 768}
    assert flat.size == 768 // 4 + 15
    for name, view in buckets.views.items():
        view[...] = 1
    assert flat.sum() == sum(int(np.prod(s)) for s in shapes.values())   # no overlap; the padding stays 0


def test_buckets_follow_reverse_layer_order_and_size():
    _, shapes = build_layers("alexnet", 1000, ops=None)
    plan = plan_buckets(shapes, 4, 25 * 2**20)
    assert plan[0][0] == "fc8.bias"                       # the first gradient backward produces
    assert plan[-1][-1] == "conv1.weight"                 # the last one
    assert [n for bucket in plan for n in bucket] == list(reversed(list(shapes)))
    assert ["fc6.weight"] in plan                         # 151 MB: a bucket of its own
    for bucket in plan:
        size = sum(int(np.prod(shapes[n])) * 4 for n in bucket)
        assert size <= 25 * 2**20 or len(bucket) == 1


def test_local_rank_from_launcher_variables():
    assert distributed.local_rank_from_environment({"SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == (3, 4)
    # nodes with different task counts, or none said: known after MPI_Init
    assert distributed.local_rank_from_environment({"SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}) \
        == (1, None)
    assert distributed.local_rank_from_environment({"SLURM_LOCALID": "1"}) == (1, None)
    # mpirun inside a job: the ranks inherit the batch shell's SLURM_LOCALID=0; the launcher's own wins
    assert distributed.local_rank_from_environment({"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "1",
                                                    "MPI_LOCALNRANKS": "2"}) == (1, 2)
    assert distributed.local_rank_from_environment({"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                                                    "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == (3, 4)
    assert distributed.local_rank_from_environment({"PALS_LOCAL_RANKID": "2", "PALS_LOCAL_SIZE": "4"}) == (2, 4)
    assert distributed.local_rank_from_environment({"OMPI_COMM_WORLD_LOCAL_RANK": "1",
                                                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == (1, 2)
    assert distributed.local_rank_from_environment({"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "8"}) == (0, 8)
    assert distributed.local_rank_from_environment({}) == (None, None)


def test_replica_averaging_gives_the_mean_of_the_ranks_twice(world):
    """--sync params: rank r's replica holds r + k in every tensor; the average is
    (size - 1) / 2 + k, in weights and momentum alike, on every rank."""
    from mpiconvnet.averaging import ReplicaAverager
    tensors = [np.empty(shape, np.float64) for shape in SHAPES.values()]
    averager = ReplicaAverager(world, ops, tensors)
    for k, _ in enumerate(range(2)):
        for tensor in tensors:
            tensor[...] = world.rank + k
        averager.average()
        for tensor in tensors:
            np.testing.assert_array_equal(tensor, np.full(tensor.shape, (world.size - 1) / 2 + k))


def test_heartbeat_sum_and_max_of_rank_values_twice(world):
    # the step's loss sum and the logged memory high water (largest over the ranks)
    heartbeat = distributed.Heartbeat(world, timeout=30)
    for step in range(2):
        mine = np.array([float(world.rank), 10.0 + world.rank])
        np.testing.assert_array_equal(heartbeat.allreduce_sum(mine, step),
                                      [world.size * (world.size - 1) / 2, 10.0 * world.size + world.size * (world.size - 1) / 2])
        np.testing.assert_array_equal(heartbeat.allreduce_max(mine, step, "a test's maximum"),
                                      [world.size - 1.0, 10.0 + world.size - 1])


def test_a_communication_thread_that_cannot_start_fails_the_step_at_once():
    # e.g. the CUDA context cannot be made current there: finish() must raise that, not
    # wait out the stall timeout and then blame another rank
    import time

    class TwoRanks:
        size, rank, comm = 2, 0, None

    class ContextlessOps:
        def __getattr__(self, name):
            return getattr(ops, name)

        def use_in_this_thread(self):
            raise RuntimeError("cuCtxPushCurrent failed: CUDA_ERROR_INVALID_CONTEXT")

    buckets = GradientBuckets(ContextlessOps(), SHAPES, np.float32, bucket_bytes=4000)
    reducer = GradientReducer(TwoRanks(), buckets, overlap=True, timeout=60)
    try:
        reducer.begin()
        for name in reversed(list(SHAPES)):
            reducer.grads_ready([name])
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match="cuCtxPushCurrent failed"):
            reducer.finish()
        assert time.perf_counter() - started < 10
    finally:
        reducer.close()


@pytest.mark.parametrize("case", ["own GPUs", "one GPU", "one GPU, sharing allowed", "rank 1 has no GPU",
                                  "rank 1 cannot read its GPU's UUID", "rank 1's driver names no GPU",
                                  "no rank has pycuda"])
def test_ranks_agree_on_their_gpus_before_training(world, monkeypatch, capsys, case):
    # the check distributed.init makes once MPI runs: every rank stops when any rank has no
    # GPU or ranks of a node took the same one, and each cause is printed by one rank only
    from mpi4py import MPI
    import mpiconvnet.backends.cuda as cuda
    uuid = "GPU-same" if case.startswith("one GPU") else f"GPU-{world.rank}"

    def identity():
        if case.endswith("UUID") and world.rank == 1:
            raise OSError("cuDeviceGetUuid_v2: undefined symbol")
        return None if case.endswith("names no GPU") and world.rank == 1 else uuid
    monkeypatch.setattr(cuda, "device_identity", identity)
    error = "no CUDA device visible" if case == "rank 1 has no GPU" and world.rank == 1 else None
    error = "--backend cuda needs pycuda" if case == "no rank has pycuda" else error
    comm = world.comm if world.comm is not None else MPI.COMM_SELF
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        raised = None
        try:
            distributed._agree_on_gpus(comm, node, error, allow_sharing=case.endswith("allowed"))
        except distributed.SetupError as e:
            raised = e
    finally:
        node.Free()
    fails = world.size > 1 and case in ("one GPU", "rank 1 has no GPU", "rank 1 cannot read its GPU's UUID")
    fails = fails or case == "no rank has pycuda"
    assert (raised is not None) == fails
    if case == "one GPU" and fails:
        says_it = world.rank == 0   # the node's first rank states the cause; the others stop quietly
        assert "all compute on GPU GPU-same" in str(raised) and raised.echo == says_it
        assert ("cannot start" in str(raised)) != says_it
    if case == "rank 1 has no GPU" and fails:
        assert raised.echo == (world.rank == 1)
        assert str(raised) == ("rank 1: no CUDA device visible" if world.rank == 1
                               else "rank 1 cannot start: no CUDA device visible")
    if case.endswith("UUID") and fails:
        assert "cannot read the GPU's UUID: cuDeviceGetUuid_v2: undefined symbol" in str(raised)
        assert "did not report the GPU UUID" not in capsys.readouterr().err   # the cause is said, not a guess
    if case == "no rank has pycuda":   # one cause, said once, naming every rank it stops
        assert raised.echo == (world.rank == 0)
        assert str(raised) == ("ranks 0, 1: " if world.size > 1 else "") + "--backend cuda needs pycuda"
    if case.endswith("names no GPU"):   # the run goes on, and the node's first rank says what went unchecked
        noted = "did not report the GPU UUID of rank(s) 1, so whether ranks of this node share a GPU was not checked"
        assert (noted in capsys.readouterr().err) == (world.size > 1 and world.rank == 0)


def test_a_world_of_one_under_srun_with_several_tasks_is_an_mpi_plugin_mismatch():
    with pytest.raises(distributed.SetupError, match=r"srun started 4 tasks .* srun --mpi=pmi2"):
        distributed.check_world_size(1, {"SLURM_STEP_NUM_TASKS": "4"})
    distributed.check_world_size(4, {"SLURM_STEP_NUM_TASKS": "4"})
    distributed.check_world_size(1, {"SLURM_STEP_NUM_TASKS": "1"})
    distributed.check_world_size(1, {})                                    # not in a job step
    # mpirun inside a job: its ranks carry the daemons' step; its own variables say so
    distributed.check_world_size(1, {"SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "1"})
