"""Parameter averaging: theano_alexnet's way of training on several GPUs, and "local SGD"
when done less often than every step (`--sync params --average-every K`).

Every rank applies its own gradient (the mean over its slice of the global batch) to its
own replica; every K steps the ranks replace weights and momentum by their mean over
ranks. With K = 1 this is synchronous SGD again: the update is linear in the gradient, so
the mean of the updated replicas is the update with the mean gradient (tests/test_train.py
checks it against `--sync grads` to 1e-12 in float64). With K > 1 the ranks exchange
2 x 244 MB (AlexNet's weights and momentum) once per K steps instead of 244 MB of
gradients every step, and the replicas drift apart in between (Paine et al. 2013 exchange
with their parameter server every n steps for the same trade).

The exchange is blocking, between steps: nothing is left to overlap it with.
"""
import time


class ReplicaAverager:
    """Averages a fixed list of backend arrays over the ranks, in place."""

    def __init__(self, world, ops, tensors, cuda_aware=False):
        self.world, self.ops, self.tensors = world, ops, list(tensors)
        self.staged = not ops.HOST_MEMORY and not cuda_aware
        self.staging = None
        if self.staged and world.size > 1:
            # one page-locked buffer as large as the largest tensor, reused for each: the
            # copies are ordered on the backend stream, so a tensor's copy back is done
            # before the next tensor's copy out overwrites it
            largest = max(self.tensors, key=lambda t: t.size)
            self.staging = ops.pinned_host_empty((int(largest.size),), largest.dtype)

    def average(self):
        """Replace every tensor by its mean over the ranks; returns the seconds it took."""
        started = time.perf_counter()
        if self.world.size == 1:
            return 0.0
        from mpi4py import MPI
        for tensor in self.tensors:
            if self.ops.HOST_MEMORY:
                buffer = tensor
            elif self.staged:
                buffer = self.staging[:tensor.size].reshape(tuple(tensor.shape))
                self.ops.copy_to_host(buffer, tensor)      # complete on return
            else:
                self.ops.synchronize()                     # MPI must not read a buffer a kernel still writes
                buffer = self.ops.mpi_buffer(tensor)
            self.world.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            if self.staged:
                self.ops.copy_from_host(tensor, buffer)
            self.ops.scale_(tensor, 1.0 / self.world.size)
        self.ops.synchronize()
        return time.perf_counter() - started
