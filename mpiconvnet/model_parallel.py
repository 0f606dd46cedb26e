"""Hybrid parallelism (`--parallel hybrid`): convolutions data-parallel, fully connected
layers split across the ranks by output neuron (Krizhevsky 2014, "One weird trick for
parallelizing convolutional neural networks"). And model parallelism (`--parallel
model`, Yadan et al. 2013; Krizhevsky 2012's two GPUs): every layer split by output
unit, every rank running the whole global batch.

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

--parallel model splits the convolutions by output channel too. Every rank holds the
whole global batch, so no rows move: before a layer that needs every channel (a
convolution, LRN, the flattening for fc6) GatherChannels assembles them, and before a
grouped convolution ChannelSlice takes the input channels of the group this rank's
output channels belong to (a rank's share must lie in one group). Where those are the
rank's own channels already, nothing moves: on 2 ranks AlexNet's conv4 and conv5 run on
their own tower's maps, as on Krizhevsky's two GPUs. ReLU and pooling work
on this rank's channels. Each rank computes the same loss on the same logits, with
gradients scaled by 1/size, so the gathers' reductions add up to one loss's gradient.
Nothing is replicated, so nothing else is reduced. The maths is again one rank's
(tests/test_hybrid.py).

Collectives pass through host NumPy arrays (`ops.to_host`; pageable, where the gradient
buckets keep persistent pinned buffers). None of them runs while the gradient buckets'
communication thread does: that thread starts when conv5's gradients are ready, after
the last of them (GatherBatch's backward), and is done before the next forward, so MPI's
SERIALIZED thread level is enough.
"""
import numpy as np

from mpiconvnet.layers import Layer


class Shards:
    """This rank's share of the split layers, and the collectives the split needs.
    split_convs: --parallel model (every layer split, every rank holding the whole batch)
    rather than --parallel hybrid (fc layers split, each rank its own images)."""

    def __init__(self, comm, rank, size, ops, split_convs=False):
        self.comm, self.rank, self.size, self.ops = comm, rank, size, ops
        self.split_convs = split_convs
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

    def column_bounds(self, width, unit=1):
        """Every rank's first column of `width`, then width: the split is of width // unit
        neurons of `unit` columns each (a channel of an (N, C*H*W) activation is H*W columns)."""
        return [b * unit for b in self.bounds(width // unit)]

    def allgather_columns(self, y, width, unit=1):
        """y: (B, w), this rank's columns of `width` -> (B, width), the ranks' columns side by side."""
        if self.size == 1:
            return y
        host = np.ascontiguousarray(self.ops.to_host(y))
        rows, bounds = host.shape[0], self.column_bounds(width, unit)
        widths = [int(w) for w in np.diff(bounds)]
        blocks = np.empty(rows * width, dtype=host.dtype)   # the ranks' (B, w_j) blocks in turn
        self.comm.Allgatherv(host, [blocks, [rows * w for w in widths]])
        out = np.empty((rows, width), dtype=host.dtype)
        for j, start in enumerate(bounds[:-1]):
            out[:, start:start + widths[j]] = blocks[rows * start:rows * (start + widths[j])].reshape(rows, widths[j])
        return self.ops.to_device(out)

    def reduce_scatter_columns(self, dy, unit=1):
        """dy: (B, W), this rank's share of a sum -> (B, w): the sum's columns of this rank."""
        if self.size == 1:
            return dy
        host = self.ops.to_host(dy)
        rows, width = host.shape
        bounds = self.column_bounds(width, unit)
        widths = [int(w) for w in np.diff(bounds)]
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


class GatherChannels(Layer):
    """(N, c, H, W) of this rank's channels -> (N, channels, H, W) of all (--parallel model);
    backward sums the ranks' shares of dL/dx and keeps this rank's channels. A channel is
    H*W neighbouring columns of the (N, C*H*W) view, so this is GatherColumns by channel."""

    def __init__(self, shards, channels):
        self.shards, self.channels = shards, channels

    def output_shape(self, shape):
        return (shape[0], self.channels) + tuple(shape[2:])

    def forward(self, x, ctx):
        n, c, h, w = (int(s) for s in x.shape)
        whole = self.shards.allgather_columns(x.reshape(n, c * h * w), self.channels * h * w, unit=h * w)
        return whole.reshape(n, self.channels, h, w)

    def backward(self, dy, need_dx):
        n, _, h, w = (int(s) for s in dy.shape)
        part = self.shards.reduce_scatter_columns(dy.reshape(n, self.channels * h * w), unit=h * w)
        return part.reshape(n, int(part.shape[1]) // (h * w), h, w)


class ChannelSlice(Layer):
    """(N, C, H, W) -> (N, stop - start, H, W): the input channels of the one group whose
    output channels this rank computes, for a grouped convolution split by output channel
    (--parallel model); backward puts dL/dx there in a zero (N, C, H, W)."""

    def __init__(self, ops, start, stop):
        self.ops, self.start, self.stop = ops, start, stop

    def output_shape(self, shape):
        return (shape[0], self.stop - self.start) + tuple(shape[2:])

    def forward(self, x, ctx):
        self.shape = tuple(int(s) for s in x.shape)
        host = self.ops.to_host(x)
        return self.ops.to_device(np.ascontiguousarray(host[:, self.start:self.stop]))

    def backward(self, dy, need_dx):
        part = self.ops.to_host(dy)
        whole = np.zeros(self.shape, dtype=part.dtype)
        whole[:, self.start:self.stop] = part
        return self.ops.to_device(whole)
