"""Convolution (with groups) through cuDNN: forward, backward data / filter; the bias
gradient is ours (bias.cu).

x: (N, C, H, W)  w: (K, C/groups, R, S)  b: (K,)  y: (N, K, P, Q)
One `ConvPlan` per distinct (shapes, stride, pad, groups, dtype, tf32) holds the
descriptors and the algorithms chosen for it (by cudnnFind*, i.e. measured, unless
MPICONVNET_CUDNN_FIND=0 asks for the heuristic cudnnGet*_v7), so the search runs once
per layer shape, not once per step. For float32 with TF32 (or MPICONVNET_CUDNN_API=graph) a
`cudnn_graph.GraphConvPlan` takes its place: the same choice through cuDNN's graph API,
and an execution plan per kind, which costs less host time per call
(context.cudnn_api_from_env says when each API serves best).
"""
import ctypes
import math

from . import context, cudnn, cudnn_graph
from .memory import empty, given_or_new

_KINDS = {
    # kind: (find fn, heuristic fn, workspace-size fn, algorithm count)
    "forward": ("cudnnFindConvolutionForwardAlgorithm", "cudnnGetConvolutionForwardAlgorithm_v7",
                "cudnnGetConvolutionForwardWorkspaceSize", cudnn.FWD_ALGO_COUNT),
    "data": ("cudnnFindConvolutionBackwardDataAlgorithm", "cudnnGetConvolutionBackwardDataAlgorithm_v7",
             "cudnnGetConvolutionBackwardDataWorkspaceSize", cudnn.BWD_DATA_ALGO_COUNT),
    "filter": ("cudnnFindConvolutionBackwardFilterAlgorithm", "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
               "cudnnGetConvolutionBackwardFilterWorkspaceSize", cudnn.BWD_FILTER_ALGO_COUNT),
}


class ConvPlan:
    def __init__(self, st, x_shape, w_shape, stride, pad, groups, dtype):
        self.y_shape = cudnn.conv_output_shape(x_shape, w_shape, stride, pad)
        if min(self.y_shape[2:]) < 1:
            raise ValueError(f"convolution of {x_shape} with {w_shape}, stride {stride}, pad {pad} has an empty output")
        self.dtype = dtype
        self.w_shape = w_shape
        self.tf32 = st.tf32
        self.x = cudnn.TensorDesc(x_shape, dtype)
        self.y = cudnn.TensorDesc(self.y_shape, dtype)
        self.w = cudnn.FilterDesc(w_shape, dtype)
        # one convolution descriptor per kind: with TF32 each kind runs with the math type
        # its own search measured, which one shared descriptor could not hold (the last
        # search would set it for all three, and the workspace sizes would no longer fit)
        self.conv = {kind: cudnn.ConvDesc(stride, pad, groups, dtype, cudnn.conv_math_type(st.tf32))
                     for kind in _KINDS}
        self.algos = {}

    def _operands(self, kind):
        # the descriptor order of each kind's find / get / workspace functions
        conv = self.conv[kind].ptr
        if kind == "forward":
            return (self.x.ptr, self.w.ptr, conv, self.y.ptr)
        if kind == "data":
            return (self.w.ptr, self.y.ptr, conv, self.x.ptr)
        return (self.x.ptr, self.y.ptr, conv, self.w.ptr)

    def algorithm(self, st, kind):
        """(algo, workspace bytes) for `kind`, searched once."""
        if kind not in self.algos:
            find_fn, get_fn, size_fn, count = _KINDS[kind]
            perfs = (cudnn.AlgoPerf * count)()
            returned = ctypes.c_int(0)
            fn = find_fn if st.find_algorithms else get_fn
            cudnn.call(fn, st.dnn.ptr, *self._operands(kind), count, ctypes.byref(returned),
                       ctypes.cast(perfs, ctypes.c_void_p))
            algo, _, math_type = cudnn.choose_algo(perfs, returned.value, self.tf32, st.workspace_limit,
                                                   st.deterministic)
            if self.tf32:
                # run with the math type the search measured (cuDNN's advice)
                self.conv[kind].set_math_type(math_type)
            size = ctypes.c_size_t(0)
            cudnn.call(size_fn, st.dnn.ptr, *self._operands(kind), algo, ctypes.byref(size))
            self.algos[kind] = (algo, int(size.value))
        return self.algos[kind]

    def run(self, st, kind, x, w, y):
        """Queue `kind` on the backend stream; x, w, y are device addresses (for data, x is
        dx; for filter, w is dw)."""
        algo, ws_bytes = self.algorithm(st, kind)
        one, zero = cudnn.scalars(self.dtype)
        workspace, conv = ctypes.c_void_p(st.workspace_ptr(ws_bytes)), self.conv[kind].ptr
        if kind == "forward":
            cudnn.call("cudnnConvolutionForward", st.dnn.ptr, one, self.x.ptr, x, self.w.ptr, w, conv, algo,
                       workspace, ws_bytes, zero, self.y.ptr, y)
        elif kind == "data":
            cudnn.call("cudnnConvolutionBackwardData", st.dnn.ptr, one, self.w.ptr, w, self.y.ptr, y, conv, algo,
                       workspace, ws_bytes, zero, self.x.ptr, x)
        else:
            cudnn.call("cudnnConvolutionBackwardFilter", st.dnn.ptr, one, self.x.ptr, x, self.y.ptr, y, conv, algo,
                       workspace, ws_bytes, zero, self.w.ptr, w)


def _plan(x_shape, w_shape, stride, pad, groups, dtype):
    st = context.get()
    # looked up every call (14 times a step): the key is built from the arguments as they
    # come, and they are checked and normalised only when a new plan is made
    key = ("conv", tuple(x_shape), tuple(w_shape), stride, pad, groups, dtype.char, st.tf32, st.deterministic)
    plan = st.descriptors.get(key)
    if plan is None:
        x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
        if len(x_shape) != 4 or len(w_shape) != 4:
            raise ValueError(f"convolution needs 4-d x and w, got {x_shape} and {w_shape}")
        if x_shape[1] != w_shape[1] * groups or w_shape[0] % groups:
            raise ValueError(f"convolution: x {x_shape} and w {w_shape} do not fit groups={groups} "
                             f"(need C == w.shape[1] * groups and K divisible by groups)")
        kind = cudnn_graph.GraphConvPlan if st.conv_api(dtype) == "graph" else ConvPlan
        plan = st.descriptors[key] = kind(st, x_shape, w_shape, int(stride), int(pad), int(groups), dtype)
    return st, plan


def _same_dtype(*arrays):
    dtype = arrays[0].dtype
    for a in arrays[1:]:
        if a.dtype != dtype:
            raise TypeError(f"convolution operands mix {dtype} and {a.dtype}")
    return dtype


def conv_forward(x, w, b, stride, pad, groups):
    dtype = _same_dtype(x, w, b)
    st, plan = _plan(x.shape, w.shape, stride, pad, groups, dtype)
    y = empty(plan.y_shape, dtype)
    plan.run(st, "forward", x.ptr, w.ptr, y.ptr)
    # y += b over N, P, Q: our kernel (bias.cu), not cudnnAddTensor, whose call cost the
    # host ~70 us against ~12 us for a launch
    n, k, p, q = plan.y_shape
    planes = n * k
    grid = (max(1, min(planes, context.MAX_BLOCKS)), 1)
    st.launch_grid("bias_add_channels", dtype, grid, y.ptr, b.ptr, planes, k, p * q)
    return y


def conv_backward_data(dy, w, x_shape, stride, pad, groups):
    dtype = _same_dtype(dy, w)
    st, plan = _plan(x_shape, w.shape, stride, pad, groups, dtype)
    if tuple(dy.shape) != plan.y_shape:
        raise ValueError(f"conv_backward_data: dy has shape {tuple(dy.shape)}, expected {plan.y_shape}")
    dx = empty(x_shape, dtype)
    plan.run(st, "data", dx.ptr, w.ptr, dy.ptr)
    return dx


def conv_backward_filter(x, dy, w_shape, stride, pad, groups, out=None):
    dtype = _same_dtype(x, dy)
    st, plan = _plan(x.shape, w_shape, stride, pad, groups, dtype)
    if tuple(dy.shape) != plan.y_shape:
        raise ValueError(f"conv_backward_filter: dy has shape {tuple(dy.shape)}, expected {plan.y_shape}")
    dw = given_or_new(out, plan.w_shape, dtype, "conv_backward_filter")
    plan.run(st, "filter", x.ptr, dw.ptr, dy.ptr)
    return dw


def conv_backward_bias(dy, out=None):
    """db[k] = sum over N, P, Q of dy[:, k]: two passes of our kernels (bias.cu), over the
    batch, then over each channel's pixels. Not cudnnConvolutionBackwardBias, which took
    2.2 ms of an AlexNet step on an H100 against ~0.1 ms for reading dy once."""
    st = context.get()
    n, k = int(dy.shape[0]), int(dy.shape[1])
    pixels = math.prod(dy.shape[2:])
    over_batch = empty((k * pixels,), dy.dtype)
    grid = ((k * pixels + context.THREADS - 1) // context.THREADS, 1)
    st.launch_grid("sum_rows", dy.dtype, grid, over_batch.ptr, dy.ptr, n, k * pixels)
    db = given_or_new(out, (k,), dy.dtype, "conv_backward_bias")
    st.launch_warps("sum_cols", dy.dtype, k, db.ptr, over_batch.ptr, k, pixels)
    return db
