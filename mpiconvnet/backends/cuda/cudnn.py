"""A thin ctypes layer over cuDNN's legacy API (cuDNN 9; unchanged since 8).

Covers what the convnet takes from cuDNN: 4-d tensor / filter / convolution (with groups)
/ LRN descriptors, convolution forward and both backwards with algorithm search, and
cross-channel LRN (pooling, ReLU and the bias ops are our kernels). Enum values and the
cudnnConvolution*AlgoPerf_t layout are copied from cudnn_graph.h / cudnn_cnn.h /
cudnn_ops.h of cuDNN 9: they are ABI, so a mismatch would be silent; the first GPU run
checks them through tests/test_cuda_ops.py.

All functions here take raw device pointers (ints); array handling is in ops modules.
"""
import ctypes

from . import libs

# cudnnStatus_t: 0 is success; the message comes from cudnnGetErrorString
CUDNN_STATUS_SUCCESS = 0
# cudnnDataType_t
CUDNN_DATA_FLOAT = 0
CUDNN_DATA_DOUBLE = 1
# cudnnTensorFormat_t
CUDNN_TENSOR_NCHW = 0
# cudnnConvolutionMode_t: cross-correlation is what PyTorch and Caffe call convolution
CUDNN_CROSS_CORRELATION = 1
# cudnnMathType_t
CUDNN_DEFAULT_MATH = 0
CUDNN_TENSOR_OP_MATH = 1
CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION = 2
CUDNN_FMA_MATH = 3
# cudnnNanPropagation_t
CUDNN_NOT_PROPAGATE_NAN = 0
CUDNN_PROPAGATE_NAN = 1
# cudnnLRNMode_t
CUDNN_LRN_CROSS_CHANNEL_DIM1 = 0
# cudnnDeterminism_t
CUDNN_DETERMINISTIC = 1
# algorithm counts (cudnnConvolution*Algo_t has 8 / 6 / 7 real members)
FWD_ALGO_COUNT = 8
BWD_DATA_ALGO_COUNT = 6
BWD_FILTER_ALGO_COUNT = 7
# cudnnSetLRNDescriptor accepts window sizes CUDNN_LRN_MIN_N .. CUDNN_LRN_MAX_N
LRN_MIN_N = 1
LRN_MAX_N = 16


class AlgoPerf(ctypes.Structure):
    """cudnnConvolutionFwdAlgoPerf_t, ...BwdDataAlgoPerf_t and ...BwdFilterAlgoPerf_t (the
    three share this layout in cuDNN 8 and 9): 48 bytes on x86-64 and aarch64."""
    _fields_ = [
        ("algo", ctypes.c_int),
        ("status", ctypes.c_int),
        ("time", ctypes.c_float),
        ("memory", ctypes.c_size_t),
        ("determinism", ctypes.c_int),
        ("mathType", ctypes.c_int),
        ("reserved", ctypes.c_int * 3),
    ]


class CudnnError(RuntimeError):
    pass


_lib = None


def _declare(L):
    vp, i, u, d, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_double, ctypes.c_size_t
    P = ctypes.POINTER
    sigs = {
        "cudnnGetVersion": ([], sz),
        "cudnnGetErrorString": ([i], ctypes.c_char_p),
        "cudnnCreate": ([P(vp)], i),
        "cudnnDestroy": ([vp], i),
        "cudnnSetStream": ([vp, vp], i),
        "cudnnCreateTensorDescriptor": ([P(vp)], i),
        "cudnnDestroyTensorDescriptor": ([vp], i),
        # (desc, format, dataType, n, c, h, w)
        "cudnnSetTensor4dDescriptor": ([vp, i, i, i, i, i, i], i),
        "cudnnCreateFilterDescriptor": ([P(vp)], i),
        "cudnnDestroyFilterDescriptor": ([vp], i),
        # (desc, dataType, format, k, c, h, w): note dataType before format, unlike tensors
        "cudnnSetFilter4dDescriptor": ([vp, i, i, i, i, i, i], i),
        "cudnnCreateConvolutionDescriptor": ([P(vp)], i),
        "cudnnDestroyConvolutionDescriptor": ([vp], i),
        # (desc, pad_h, pad_w, u, v, dilation_h, dilation_w, mode, computeType)
        "cudnnSetConvolution2dDescriptor": ([vp, i, i, i, i, i, i, i, i], i),
        "cudnnSetConvolutionGroupCount": ([vp, i], i),
        "cudnnSetConvolutionMathType": ([vp, i], i),
        # (handle, xDesc, wDesc, convDesc, yDesc, requested, *returned, *perf)
        "cudnnGetConvolutionForwardAlgorithm_v7": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        "cudnnFindConvolutionForwardAlgorithm": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        # (handle, wDesc, dyDesc, convDesc, dxDesc, requested, *returned, *perf)
        "cudnnGetConvolutionBackwardDataAlgorithm_v7": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        "cudnnFindConvolutionBackwardDataAlgorithm": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        # (handle, xDesc, dyDesc, convDesc, dwDesc, requested, *returned, *perf)
        "cudnnGetConvolutionBackwardFilterAlgorithm_v7": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        "cudnnFindConvolutionBackwardFilterAlgorithm": ([vp, vp, vp, vp, vp, i, P(i), vp], i),
        # workspace sizes: (handle, desc, desc, convDesc, desc, algo, *size)
        "cudnnGetConvolutionForwardWorkspaceSize": ([vp, vp, vp, vp, vp, i, P(sz)], i),
        "cudnnGetConvolutionBackwardDataWorkspaceSize": ([vp, vp, vp, vp, vp, i, P(sz)], i),
        "cudnnGetConvolutionBackwardFilterWorkspaceSize": ([vp, vp, vp, vp, vp, i, P(sz)], i),
        # (handle, *alpha, xDesc, x, wDesc, w, convDesc, algo, ws, wsSize, *beta, yDesc, y)
        "cudnnConvolutionForward": ([vp, vp, vp, vp, vp, vp, vp, i, vp, sz, vp, vp, vp], i),
        # (handle, *alpha, wDesc, w, dyDesc, dy, convDesc, algo, ws, wsSize, *beta, dxDesc, dx)
        "cudnnConvolutionBackwardData": ([vp, vp, vp, vp, vp, vp, vp, i, vp, sz, vp, vp, vp], i),
        # (handle, *alpha, xDesc, x, dyDesc, dy, convDesc, algo, ws, wsSize, *beta, dwDesc, dw)
        "cudnnConvolutionBackwardFilter": ([vp, vp, vp, vp, vp, vp, vp, i, vp, sz, vp, vp, vp], i),
        "cudnnCreateLRNDescriptor": ([P(vp)], i),
        "cudnnDestroyLRNDescriptor": ([vp], i),
        # (desc, unsigned lrnN, double alpha, double beta, double k)
        "cudnnSetLRNDescriptor": ([vp, u, d, d, d], i),
        # (handle, lrnDesc, mode, *alpha, xDesc, x, *beta, yDesc, y)
        "cudnnLRNCrossChannelForward": ([vp, vp, i, vp, vp, vp, vp, vp, vp], i),
        # (handle, lrnDesc, mode, *alpha, yDesc, y, dyDesc, dy, xDesc, x, *beta, dxDesc, dx)
        "cudnnLRNCrossChannelBackward": ([vp, vp, i, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp], i),
    }
    for name, (argtypes, restype) in sigs.items():
        f = getattr(L, name)
        f.argtypes = argtypes
        f.restype = restype


def lib():
    """libcudnn with argument types declared (loaded on first use, never at import)."""
    global _lib
    if _lib is None:
        L = libs.load_cudnn()
        _declare(L)
        _lib = L
    return _lib


def check(status, call):
    if status != CUDNN_STATUS_SUCCESS:
        message = lib().cudnnGetErrorString(status)
        raise CudnnError(f"{call} failed with {message.decode() if message else status}")


def call(name, *args):
    """lib().name(*args), raising CudnnError on a non-success status."""
    check(getattr(lib(), name)(*args), name)


def data_type(dtype):
    """cuDNN data type of a NumPy dtype (float32 / float64 only: the backend's dtypes)."""
    if dtype.char == "f":
        return CUDNN_DATA_FLOAT
    if dtype.char == "d":
        return CUDNN_DATA_DOUBLE
    raise TypeError(f"cuDNN ops take float32 or float64 arrays, got {dtype}")


def conv_math_type(tf32):
    """FMA math keeps float32 convolutions in true float32 (the default math type lets
    cuDNN pick TF32 tensor-core kernels on Ampere and newer)."""
    return CUDNN_TENSOR_OP_MATH if tf32 else CUDNN_FMA_MATH


_SCALARS = {}   # dtype char -> (one, zero): made once, read by cuDNN on every call


def scalars(dtype):
    """(alpha=1, beta=0) as pointers of the type cuDNN reads for this data type: double
    for double tensors, float otherwise."""
    pair = _SCALARS.get(dtype.char)
    if pair is None:
        scalar = ctypes.c_double if dtype.char == "d" else ctypes.c_float
        one, zero = scalar(1.0), scalar(0.0)
        # the ctypes objects stay referenced here, so their addresses stay valid
        pair = _SCALARS[dtype.char] = (one, zero, ptr(one), ptr(zero))
    return pair[2], pair[3]


def ptr(c_value):
    """Address of a ctypes scalar as a void pointer (for the alpha / beta arguments)."""
    return ctypes.c_void_p(ctypes.addressof(c_value))


class Handle:
    """A cuDNN handle bound to one stream (create it with the CUDA context current)."""

    def __init__(self, stream_handle):
        self.ptr = ctypes.c_void_p()
        call("cudnnCreate", ctypes.byref(self.ptr))
        call("cudnnSetStream", self.ptr, ctypes.c_void_p(stream_handle))

    def destroy(self):
        if self.ptr:
            lib().cudnnDestroy(self.ptr)
            self.ptr = ctypes.c_void_p()


class _Descriptor:
    _create = _destroy = None

    def __init__(self):
        self.ptr = ctypes.c_void_p()
        call(self._create, ctypes.byref(self.ptr))

    def __del__(self):
        if self.ptr and _lib is not None:
            getattr(_lib, self._destroy)(self.ptr)
            self.ptr = None


class TensorDesc(_Descriptor):
    _create, _destroy = "cudnnCreateTensorDescriptor", "cudnnDestroyTensorDescriptor"

    def __init__(self, shape, dtype):
        super().__init__()
        n, c, h, w = shape4(shape)
        call("cudnnSetTensor4dDescriptor", self.ptr, CUDNN_TENSOR_NCHW, data_type(dtype), n, c, h, w)


class FilterDesc(_Descriptor):
    _create, _destroy = "cudnnCreateFilterDescriptor", "cudnnDestroyFilterDescriptor"

    def __init__(self, shape, dtype):
        super().__init__()
        k, c, r, s = shape
        call("cudnnSetFilter4dDescriptor", self.ptr, data_type(dtype), CUDNN_TENSOR_NCHW, k, c, r, s)


class ConvDesc(_Descriptor):
    _create, _destroy = "cudnnCreateConvolutionDescriptor", "cudnnDestroyConvolutionDescriptor"

    def __init__(self, stride, pad, groups, dtype, math_type):
        super().__init__()
        call("cudnnSetConvolution2dDescriptor", self.ptr, pad, pad, stride, stride, 1, 1,
             CUDNN_CROSS_CORRELATION, data_type(dtype))
        call("cudnnSetConvolutionGroupCount", self.ptr, groups)
        self.set_math_type(math_type)

    def set_math_type(self, math_type):
        call("cudnnSetConvolutionMathType", self.ptr, math_type)


class LRNDesc(_Descriptor):
    _create, _destroy = "cudnnCreateLRNDescriptor", "cudnnDestroyLRNDescriptor"

    def __init__(self, size, alpha, beta, k):
        super().__init__()
        # cuDNN divides alpha by the window size itself, like Caffe (whose cuDNN LRN layer
        # passes its alpha unchanged and is tested against its own alpha/size formula)
        call("cudnnSetLRNDescriptor", self.ptr, size, float(alpha), float(beta), float(k))


def shape4(shape):
    """A shape as the (n, c, h, w) of a 4-d descriptor: (N, F) dense activations become
    (N, F, 1, 1) and a (K,) bias becomes (1, K, 1, 1), which cuDNN broadcasts."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        return shape
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1)
    if len(shape) == 1:
        return (1, shape[0], 1, 1)
    raise ValueError(f"cuDNN descriptors here are 4-d; cannot describe shape {shape}")


def conv_output_shape(x_shape, w_shape, stride, pad):
    """y shape of a convolution: (N, K, P, Q), P = (H + 2 pad - R) // stride + 1."""
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    return (n, k, (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1)


def pool_output_shape(x_shape, size, stride):
    """y shape of max pooling without padding (floor division, as cuDNN and the reference)."""
    n, c, h, w = x_shape
    return (n, c, (h - size) // stride + 1, (w - size) // stride + 1)


def choose_algo(perfs, count, tf32, workspace_limit, deterministic=False):
    """The algorithm to use from a cudnnFind*/Get*_v7 result list (already sorted fastest
    first by cuDNN): the first that succeeded, fits the workspace limit, never converts its
    inputs to half precision, (unless TF32 is allowed) does not use tensor-op math, and
    (when asked) is deterministic. Returns (algo, workspace bytes, math type).
    """
    failed, too_big, converting, tensor_op, varying = [], 0, 0, 0, 0
    for p in perfs[:count]:
        if p.status != CUDNN_STATUS_SUCCESS:
            failed.append(p.status)
        elif p.memory > workspace_limit:
            too_big += 1
        elif p.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION:
            # FP16/BF16 inputs: below TF32's precision, so never (the graph API's engines
            # that down-convert are passed over alike)
            converting += 1
        elif not tf32 and p.mathType == CUDNN_TENSOR_OP_MATH:
            tensor_op += 1
        elif deterministic and p.determinism != CUDNN_DETERMINISTIC:
            varying += 1
        else:
            return p.algo, int(p.memory), p.mathType
    # say why each candidate was passed over: only a workspace miss is fixed by a larger workspace
    reasons = []
    if too_big:
        reasons.append(f"{too_big} need more than the {workspace_limit >> 20} MiB workspace "
                       f"(raise MPICONVNET_CUDNN_WORKSPACE_MB)")
    if converting:
        reasons.append(f"{converting} convert their inputs to half precision, which is never used")
    if tensor_op:
        reasons.append(f"{tensor_op} use tensor-op math, which TF32 off forbids (MPICONVNET_TF32=1 allows it)")
    if varying:
        reasons.append(f"{varying} are not deterministic, which MPICONVNET_DETERMINISTIC=1 forbids")
    if failed:
        codes = ", ".join(str(s) for s in sorted(set(failed)))
        reasons.append(f"{len(failed)} failed with cuDNN status {codes}")
    raise CudnnError(f"no usable cuDNN convolution algorithm among the {count} returned"
                     + (": " + "; ".join(reasons) if reasons else "; cuDNN returned none for this shape"))
