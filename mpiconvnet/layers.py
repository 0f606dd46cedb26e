"""Layers: thin objects over backend ops that remember what backward needs.

A layer's `forward(x, ctx)` returns its output; `backward(dy)` returns the gradient with
respect to its input and writes its parameter gradients into `grads` (arrays owned by
the model, often views into a flat allreduce bucket). Layers never branch on the
backend: `ops` is whichever backend module the model was built with.
"""
import math

import numpy as np


class Layer:
    """Every layer has forward(x, ctx), backward(dy, need_dx) and output_shape(shape)."""
    params = ()          # names of this layer's parameters, e.g. ("conv1.weight", "conv1.bias")
    grads = None         # the model's {name: gradient array}, set when the model is built


class Conv(Layer):
    def __init__(self, ops, name, in_ch, out_ch, kernel, stride=1, pad=0, groups=1):
        self.ops, self.name = ops, name
        self.stride, self.pad, self.groups = stride, pad, groups
        self.weight_shape = (out_ch, in_ch // groups, kernel, kernel)   # PyTorch layout
        self.bias_shape = (out_ch,)
        self.params = (f"{name}.weight", f"{name}.bias")

    def output_shape(self, shape):
        n, c, h, w = shape
        k = self.weight_shape[2]
        size = lambda s: (s + 2 * self.pad - k) // self.stride + 1
        return (n, self.weight_shape[0], size(h), size(w))

    def forward(self, x, ctx):
        self.x = x   # x: (N, C, H, W)
        w, b = ctx.params[self.params[0]], ctx.params[self.params[1]]
        self.w = w
        return self.ops.conv_forward(x, w, b, self.stride, self.pad, self.groups)

    def backward(self, dy, need_dx):
        ops = self.ops
        # the gradients are written straight into the model's arrays (bucket views)
        ops.conv_backward_filter(self.x, dy, self.weight_shape, self.stride, self.pad, self.groups,
                                 out=self.grads[self.params[0]])
        ops.conv_backward_bias(dy, out=self.grads[self.params[1]])
        dx = None
        if need_dx:
            dx = ops.conv_backward_data(dy, self.w, self.x.shape, self.stride, self.pad, self.groups)
        self.x = self.w = None
        return dx


class Linear(Layer):
    def __init__(self, ops, name, in_features, out_features):
        self.ops, self.name = ops, name
        self.weight_shape = (out_features, in_features)   # PyTorch layout
        self.bias_shape = (out_features,)
        self.params = (f"{name}.weight", f"{name}.bias")

    def output_shape(self, shape):
        return (shape[0], self.weight_shape[0])

    def forward(self, x, ctx):
        self.x = x   # x: (N, F)
        self.w = ctx.params[self.params[0]]
        return self.ops.linear_forward(x, self.w, ctx.params[self.params[1]])

    def backward(self, dy, need_dx):
        ops = self.ops
        ops.linear_backward_filter(self.x, dy, out=self.grads[self.params[0]])
        ops.linear_backward_bias(dy, out=self.grads[self.params[1]])
        dx = ops.linear_backward_data(dy, self.w) if need_dx else None
        self.x = self.w = None
        return dx


class ReLU(Layer):
    def __init__(self, ops):
        self.ops = ops

    def output_shape(self, shape):
        return shape

    def forward(self, x, ctx):
        self.y = self.ops.relu_forward(x)
        return self.y

    def backward(self, dy, need_dx):
        dx = self.ops.relu_backward(self.y, dy)
        self.y = None
        return dx


class LRN(Layer):
    """Cross-channel local response normalisation, Caffe/PyTorch convention (alpha/size)."""

    def __init__(self, ops, size=5, alpha=1e-4, beta=0.75, k=2.0):
        self.ops, self.size, self.alpha, self.beta, self.k = ops, size, alpha, beta, k

    def output_shape(self, shape):
        return shape

    def forward(self, x, ctx):
        self.x = x
        self.y = self.ops.lrn_forward(x, self.size, self.alpha, self.beta, self.k)
        return self.y

    def backward(self, dy, need_dx):
        dx = self.ops.lrn_backward(self.x, self.y, dy, self.size, self.alpha, self.beta, self.k)
        self.x = self.y = None
        return dx


class MaxPool(Layer):
    def __init__(self, ops, size=3, stride=2):
        self.ops, self.size, self.stride = ops, size, stride

    def output_shape(self, shape):
        n, c, h, w = shape
        return (n, c, (h - self.size) // self.stride + 1, (w - self.size) // self.stride + 1)

    def forward(self, x, ctx):
        self.x = x
        self.y = self.ops.maxpool_forward(x, self.size, self.stride)
        return self.y

    def backward(self, dy, need_dx):
        dx = self.ops.maxpool_backward(self.x, self.y, dy, self.size, self.stride)
        self.x = self.y = None
        return dx


class Dropout(Layer):
    """Inverted dropout whose mask is a pure function of (seed, step, layer, sample).

    `ctx.dropout_counter(self.index)` gives a counter unique to this step and layer, and
    `ctx.sample_offset` is the position of this rank's first sample in the global batch,
    so N ranks draw exactly the masks one rank with the whole batch would draw.
    """

    def __init__(self, ops, p, index, columns=None):
        self.ops, self.p, self.index = ops, p, index
        # (start, width): x holds columns start.. of a (global batch, width) activation split
        # across ranks (--parallel hybrid); its mask is those columns of the whole one's
        self.columns = columns

    def output_shape(self, shape):
        return shape

    def forward(self, x, ctx):
        if not ctx.train or self.p == 0:
            self.mask = None
            return x
        counter = ctx.dropout_counter(self.index)
        if self.columns is not None:
            start, width = self.columns
            y, self.mask = self.ops.dropout_forward(x, self.p, ctx.seed, counter, start, row_stride=width)
            return y
        per_sample = math.prod(x.shape[1:])
        y, self.mask = self.ops.dropout_forward(x, self.p, ctx.seed, counter, ctx.sample_offset * per_sample)
        return y

    def backward(self, dy, need_dx):
        if self.mask is None:
            return dy
        dx = self.ops.dropout_backward(dy, self.mask, self.p)
        self.mask = None
        return dx


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C-order, as PyTorch's torch.flatten(x, 1)."""

    def __init__(self, ops):
        self.ops = ops

    def output_shape(self, shape):
        return (shape[0], int(np.prod(shape[1:])))

    def forward(self, x, ctx):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx):
        return dy.reshape(self.shape)
