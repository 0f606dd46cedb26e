"""Hybrid parallelism (`--parallel hybrid`): convolutions data-parallel, fully connected
layers split across the ranks by output neuron (Krizhevsky 2014, "One weird trick for
parallelizing convolutional neural networks").

The convolutions hold ~5 % of AlexNet's weights and do ~90 % of its arithmetic; the
fully connected layers the reverse. So each rank keeps a whole copy of the convolutions
and runs them on its own images (their gradients are summed with the bucketed
allreduce, as in `--parallel data`), but holds only its share of the rows of fc6, fc7
and fc8 (1/size, give or take a row, so any rank count up to a layer's width splits it),
applied to the whole global batch. Per step, instead of 58.6 M fully connected
gradients (234 MB) every rank moves activations: the global batch's conv features
(B x 9216) and fc outputs (B x 4096, B x classes) once forward and once backward.

With size ranks, b images each and B = size * b, the classifier runs as

    conv features (b, F) --GatherBatch--> (B, F) --fc6 rows of this rank--> (B, ~H/size)
      relu, dropout on this rank's columns --GatherColumns--> (B, H) --fc7 rows--> ...
      --fc8 rows--> (B, ~C/size) --GatherColumns--> (B, C) --LocalRows--> (b, C)

and backward runs each step's adjoint: an all-gather's adjoint is a reduce-scatter. A
split Linear's input gradient dy_part @ W_part is this rank's share of a sum, which the
gather before it reduces: GatherColumns sums over ranks and keeps this rank's columns,
GatherBatch sums and keeps this rank's rows. LocalRows pads its gradient with zeros for
the other ranks' rows, so the reduction after fc8 assembles the whole (B, C) gradient.
The maths is that of one rank with the whole batch (tests/test_hybrid.py, float64).

Collectives pass through host NumPy arrays (`ops.to_host`; pageable, where the gradient
buckets keep persistent pinned buffers). None of them runs while the gradient buckets'
communication thread does: that thread starts when conv5's gradients are ready, after
the last of them (GatherBatch's backward), and is done before the next forward, so MPI's
SERIALIZED thread level is enough.
"""
import numpy as np

from mpiconvnet.layers import Layer


class Shards:
    """This rank's share of the split layers, and the collectives the split needs."""

    def __init__(self, comm, rank, size, ops):
        self.comm, self.rank, self.size, self.ops = comm, rank, size, ops
        self.row_counts = [0] * size   # rows each rank brought to the last GatherBatch

    def bounds(self, count):
        """[0, ..., count]: rank j holds neurons bounds[j]:bounds[j+1] of `count` (rows of a
        split weight, columns of a split activation); shares differ by at most one."""
        return [j * count // self.size for j in range(self.size + 1)]

    def share(self, count):
        """(start, stop): this rank's neurons of `count`."""
        bounds = self.bounds(count)
        return bounds[self.rank], bounds[self.rank + 1]

    def widths(self, count):
        """Every rank's number of neurons of `count`."""
        return [int(w) for w in np.diff(self.bounds(count))]

    def gather_host_rows(self, host, counts):
        """host: (counts[rank], ...) on this rank -> (sum(counts), ...): every rank's rows in
        rank order, a host array (activations, or a split parameter made whole)."""
        per_row = int(np.prod(host.shape[1:]))
        out = np.empty((sum(counts),) + host.shape[1:], dtype=host.dtype)
        self.comm.Allgatherv(np.ascontiguousarray(host), [out, [n * per_row for n in counts]])
        return out

    def own_rows(self):
        start = sum(self.row_counts[:self.rank])
        return start, start + self.row_counts[self.rank]

    def _mpi(self):
        from mpi4py import MPI
        return MPI

    def allgather_rows(self, x):
        """x: (b, F) on this rank -> (B, F): every rank's rows in rank order (b may differ)."""
        if self.size == 1:
            self.row_counts = [x.shape[0]]
            return x
        self.row_counts = self.comm.allgather(x.shape[0])
        return self.ops.to_device(self.gather_host_rows(self.ops.to_host(x), self.row_counts))

    def reduce_scatter_rows(self, dx):
        """dx: (B, F), this rank's share of a sum -> (b, F): the sum's rows of this rank."""
        if self.size == 1:
            return dx
        host = np.ascontiguousarray(self.ops.to_host(dx))
        width = host.shape[1]
        out = np.empty((self.row_counts[self.rank], width), dtype=host.dtype)
        self.comm.Reduce_scatter(host, out, [n * width for n in self.row_counts], op=self._mpi().SUM)
        return self.ops.to_device(out)

    def allgather_columns(self, y, width):
        """y: (B, w), this rank's columns of `width` -> (B, width), the ranks' columns side by side."""
        if self.size == 1:
            return y
        host = np.ascontiguousarray(self.ops.to_host(y))
        rows, bounds, widths = host.shape[0], self.bounds(width), self.widths(width)
        blocks = np.empty(rows * width, dtype=host.dtype)   # the ranks' (B, w_j) blocks in turn
        self.comm.Allgatherv(host, [blocks, [rows * w for w in widths]])
        out = np.empty((rows, width), dtype=host.dtype)
        for j, start in enumerate(bounds[:-1]):
            out[:, start:start + widths[j]] = blocks[rows * start:rows * (start + widths[j])].reshape(rows, widths[j])
        return self.ops.to_device(out)

    def reduce_scatter_columns(self, dy):
        """dy: (B, W), this rank's share of a sum -> (B, w): the sum's columns of this rank."""
        if self.size == 1:
            return dy
        host = self.ops.to_host(dy)
        rows, width = host.shape
        bounds, widths = self.bounds(width), self.widths(width)
        # the ranks' column blocks one after another, as Reduce_scatter cuts its buffer
        blocks = np.concatenate([host[:, a:b].ravel() for a, b in zip(bounds[:-1], bounds[1:])])
        out = np.empty((rows, widths[self.rank]), dtype=host.dtype)
        self.comm.Reduce_scatter(blocks, out, [rows * w for w in widths], op=self._mpi().SUM)
        return self.ops.to_device(out)


class GatherBatch(Layer):
    """(b, F) of this rank's images -> (B, F) of the global batch; backward sums the
    ranks' shares of dL/dx and keeps this rank's rows."""

    def __init__(self, shards):
        self.shards = shards

    def output_shape(self, shape):
        return shape   # rows are not tracked in shapes, features are unchanged

    def forward(self, x, ctx):
        return self.shards.allgather_rows(x)

    def backward(self, dy, need_dx):
        return self.shards.reduce_scatter_rows(dy)


class GatherColumns(Layer):
    """(B, w) of this rank's neurons -> (B, width) of all; backward sums the ranks'
    shares and keeps this rank's columns."""

    def __init__(self, shards, width):
        self.shards, self.width = shards, width

    def output_shape(self, shape):
        return (shape[0], self.width)

    def forward(self, x, ctx):
        return self.shards.allgather_columns(x, self.width)

    def backward(self, dy, need_dx):
        return self.shards.reduce_scatter_columns(dy)


class LocalRows(Layer):
    """(B, C) logits of the global batch -> (b, C) of this rank's images, so the loss,
    evaluation and everything after the model see what --parallel data gives them.
    Backward puts dL/dlogits in this rank's rows of a zero (B, C): the other ranks' rows
    arrive through the reduction of the GatherColumns before."""

    def __init__(self, shards):
        self.shards = shards

    def output_shape(self, shape):
        return shape

    def forward(self, x, ctx):
        self.rows = x.shape[0]
        if self.shards.size == 1:
            return x
        start, stop = self.shards.own_rows()
        host = self.shards.ops.to_host(x)
        return self.shards.ops.to_device(np.ascontiguousarray(host[start:stop]))

    def backward(self, dy, need_dx):
        if self.shards.size == 1:
            return dy
        local = self.shards.ops.to_host(dy)
        padded = np.zeros((self.rows, local.shape[1]), dtype=local.dtype)
        start, stop = self.shards.own_rows()
        padded[start:stop] = local
        return self.shards.ops.to_device(padded)
