"""Every CUDA kernel file compiles with nvcc for sm_90, and opens the way STYLE.md asks.

Needs nvcc (CI has it), not a GPU. Run: pytest tests/test_cuda_compile.py
"""
import os
import shutil
import subprocess

import pytest

from mpiconvnet.backends.cuda.context import KERNEL_DIR, NVCC_OPTIONS

KERNEL_FILES = sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_kernel_files_exist():
    assert {"bias.cu", "dropout.cu", "sgd.cu", "loss.cu", "pool.cu", "lrn.cu", "augment.cu"} <= set(KERNEL_FILES)
    assert os.path.exists(os.path.join(KERNEL_DIR, "common.cuh"))


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_file_opens_with_its_description(name):
    text = open(os.path.join(KERNEL_DIR, name)).read()
    assert text.startswith("// " + name + ":"), f"{name} must open with '// {name}: what it computes'"
    assert "Checked" in text.split("#include")[0], f"{name}'s opening comment must say how it is checked"
    assert '#include "common.cuh"' in text


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit; CI has it)")
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_compiles_for_sm90(name, tmp_path):
    out = tmp_path / (name + ".cubin")
    result = subprocess.run([NVCC, "-arch=sm_90", "-cubin", *NVCC_OPTIONS, "-I", KERNEL_DIR, "-o", str(out),
                             os.path.join(KERNEL_DIR, name)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stderr}"
    assert out.stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit; CI has it)")
def test_prebuild_writes_one_fatbin_per_kernel_file(tmp_path):
    from mpiconvnet.backends.cuda import prebuild
    built = prebuild.build(["90"], str(tmp_path), nvcc=NVCC)
    assert sorted(os.path.basename(p) for p in built) == sorted(f[:-3] + ".fatbin" for f in KERNEL_FILES)
    assert all(os.path.getsize(p) > 0 for p in built)


def _cuda_include_dir():
    """The toolkit's include directory (cuda.h), next to nvcc or in the usual places."""
    candidates = [os.path.join(os.path.dirname(os.path.realpath(NVCC)), "..", "include")] if NVCC else []
    candidates += [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"), "/usr/local/cuda/include"]
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda.h"))), None)


def test_the_host_time_fake_libraries_compile(tmp_path):
    # scripts/host-time.sh builds them on a machine without a GPU; a prototype that no
    # longer matches cuda.h would fail there, after a 5-minute PyCUDA build
    include, cc = _cuda_include_dir(), shutil.which("cc") or shutil.which("gcc")
    if include is None or cc is None:
        pytest.skip("needs cuda.h (the CUDA toolkit) and a C compiler")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "host_time")
    for name, flags in (("fake_cuda.c", ["-c", "-I", include]), ("fake_dnn_blas.c", ["-shared", "-DLIBRARY=\"cuDNN\""])):
        result = subprocess.run([cc, "-O1", "-fPIC", "-Wall", "-Werror", *flags, "-o", str(tmp_path / (name + ".o")),
                                 os.path.join(source, name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}:\n{result.stderr}"


# --- the kernels' arithmetic, run on the host -------------------------------------------------
# The elementwise kernel files compile as plain C++ with a shim that makes a kernel launch a
# loop (one block of one thread: GRID_STRIDE_LOOP then visits every element in order) and
# -ffp-contract=off (the --fmad=false of the GPU build). Their results are compared with the
# NumPy reference here, without a GPU; the same kernels on the GPU are compared again in
# test_cuda_ops.py. loss.cu's one-warp-per-row kernels run with WARP_SIZE 1: one lane per
# row, which exercises the arithmetic but not the shuffles (those only run on the GPU).
import ctypes  # noqa: E402

import numpy as np  # noqa: E402

from tests.tolerances import ELEMENTWISE_F32, FLOAT64, REDUCTION_F32  # noqa: E402

HOST_SHIM = r"""
#include <math.h>
#include <stdint.h>
#include <algorithm>
#include <cmath>
struct HostDim3 { unsigned x, y, z; };
static HostDim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __shfl_xor_sync(mask, value, offset) (value)
#define WARP_SIZE 1
using std::fmax;
using std::max;
using std::min;
// for kernels that are not grid-stride loops: the test sets the launch coordinates
extern "C" void host_set_thread(unsigned block, unsigned thread, unsigned block_dim, unsigned grid_dim) {
    blockIdx.x = block; threadIdx.x = thread; blockDim.x = block_dim; gridDim.x = grid_dim;
}
// for kernels with a second grid dimension (sgd_momentum_many: one block row per tensor)
extern "C" void host_set_y(unsigned block_y) { blockIdx.y = block_y; }
"""
HOST_RUN = ["dropout.cu", "sgd.cu", "bias.cu", "relu.cu", "pool.cu", "lrn.cu", "augment.cu", "loss.cu"]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler to run the kernels on the host")
    out = tmp_path_factory.mktemp("host_kernels")
    shim = out / "shim.h"
    shim.write_text(HOST_SHIM)
    libs = {}
    for name in HOST_RUN:
        so = out / (name + ".so")
        subprocess.run([CXX, "-x", "c++", "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                        "-include", str(shim), "-I", KERNEL_DIR, "-o", str(so), os.path.join(KERNEL_DIR, name)],
                       check=True)
        libs[name] = ctypes.CDLL(str(so))
    return libs


def _p(a):
    return ctypes.c_void_p(a.ctypes.data)


def _scalar(dtype, value):
    return (ctypes.c_float if np.dtype(dtype) == np.float32 else ctypes.c_double)(value)


def _suffix(dtype):
    return "_f32" if np.dtype(dtype) == np.float32 else "_f64"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p, seed, counter, offset", [(0.5, 1, 0, 0), (0.3, 2 ** 40 + 3, 17, 12345), (0.9, 7, 5, 2 ** 32 - 10)])
def test_dropout_kernel_bit_for_bit(host_kernels, dtype, p, seed, counter, offset):
    from mpiconvnet.backends import numpy_backend as nb
    x = np.random.default_rng(0).standard_normal((7, 50)).astype(dtype)
    y, mask = np.full_like(x, np.nan), np.full_like(x, np.nan)
    scale = float(np.dtype(dtype).type(1.0 / (1.0 - p)))
    # the plain case: one row of n elements (cols = n, row_stride = 0), index = offset + i
    _host_dropout_forward(host_kernels, y, mask, x, x.size, 0, seed, counter, offset, p)
    y_ref, mask_ref = nb.dropout_forward(x, p, seed, counter, offset)
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    dx = np.full_like(x, np.nan)
    getattr(host_kernels["dropout.cu"], "dropout_apply" + _suffix(dtype))(
        _p(dx), _p(x), _p(mask), ctypes.c_longlong(x.size), _scalar(dtype, scale))
    np.testing.assert_array_equal(dx, nb.dropout_backward(x, mask_ref, p))


def _host_dropout_forward(host_kernels, y, mask, x, cols, row_stride, seed, counter, offset, p):
    from mpiconvnet.backends.cuda.layers import dropout_base, dropout_threshold
    scale = float(x.dtype.type(1.0 / (1.0 - p)))
    getattr(host_kernels["dropout.cu"], "dropout_forward" + _suffix(x.dtype))(
        _p(y), _p(mask), _p(x), ctypes.c_longlong(x.size), ctypes.c_longlong(cols), ctypes.c_uint32(row_stride),
        ctypes.c_uint32(dropout_base(seed, counter)), ctypes.c_uint32(offset & 0xFFFFFFFF),
        ctypes.c_uint32(dropout_threshold(p)), _scalar(x.dtype, scale))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p, seed, counter, offset", [(0.5, 1, 0, 0), (0.3, 2 ** 40 + 3, 17, 12345), (0.9, 7, 5, 2 ** 32 - 10)])
def test_dropout_kernel_row_stride_bit_for_bit(host_kernels, dtype, p, seed, counter, offset):
    # columns 13 to 40 of a (7, 50) matrix: the kernel draws the reference's mask for that
    # slice, which is the whole matrix's mask in those columns
    from mpiconvnet.backends import numpy_backend as nb
    whole = np.random.default_rng(1).standard_normal((7, 50)).astype(dtype)
    start, stop = 13, 41
    x = np.ascontiguousarray(whole[:, start:stop])
    y, mask = np.full_like(x, np.nan), np.full_like(x, np.nan)
    _host_dropout_forward(host_kernels, y, mask, x, x.shape[1], whole.shape[1], seed, counter, offset + start, p)
    y_ref, mask_ref = nb.dropout_forward(x, p, seed, counter, offset + start, row_stride=whole.shape[1])
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mask, nb.dropout_forward(whole, p, seed, counter, offset)[1][:, start:stop])


class _HostArray(np.ndarray):
    """A host array with the .ptr the CUDA backend's wrappers pass to kernels."""

    @property
    def ptr(self):
        return self.ctypes.data


class _HostState:
    """Stands in for the CUDA backend's state: launch() calls the host-compiled kernel with
    the argument types context.KERNELS declares, so the wrapper's arguments are checked too."""

    def __init__(self, libs):
        self.libs = libs

    def launch(self, name, dtype, n, *args):
        from mpiconvnet.backends.cuda.context import KERNELS
        filename, signature = KERNELS[name]
        kernel = getattr(self.libs[filename], name + _suffix(dtype))
        floating = ctypes.c_float if np.dtype(dtype) == np.float32 else ctypes.c_double
        types = {"P": ctypes.c_void_p, "q": ctypes.c_longlong, "i": ctypes.c_int, "I": ctypes.c_uint32, "F": floating}
        kernel.argtypes = [types[kind] for kind in signature]
        kernel(*args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_dropout_wrapper_matches_reference_on_the_host(host_kernels, monkeypatch, dtype):
    # cuda.layers.dropout_forward with its kernel run on the host: the plain and the
    # row_stride cases against the reference, outputs poisoned with NaN
    from mpiconvnet.backends import numpy_backend as nb
    from mpiconvnet.backends.cuda import layers
    monkeypatch.setattr(layers.context, "get", lambda: _HostState(host_kernels))
    monkeypatch.setattr(layers, "empty", lambda shape, dt: np.full(shape, np.nan, dt).view(_HostArray))
    whole = np.random.default_rng(2).standard_normal((5, 3, 40)).astype(dtype).view(_HostArray)
    p, seed, counter, offset = 0.4, 2 ** 35 + 9, 21, 2 ** 32 - 30
    y, mask = layers.dropout_forward(whole, p, seed, counter, offset)
    y_ref, mask_ref = nb.dropout_forward(np.asarray(whole), p, seed, counter, offset)
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    matrix = np.asarray(whole).reshape(5, 120)
    start, stop = 70, 110
    x = np.ascontiguousarray(matrix[:, start:stop]).view(_HostArray)
    y, mask = layers.dropout_forward(x, p, seed, counter, offset + start, row_stride=120)
    y_ref, mask_ref = nb.dropout_forward(np.asarray(x), p, seed, counter, offset + start, row_stride=120)
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mask, nb.dropout_forward(matrix, p, seed, counter, offset)[1][:, start:stop])
    with pytest.raises(ValueError, match="row_stride=120 needs a 2-D x"):
        layers.dropout_forward(whole, p, seed, counter, row_stride=120)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_kernel_matches_reference_exactly(host_kernels, dtype):
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(1)
    param, grad, velocity = (rng.standard_normal(301).astype(dtype) for _ in range(3))
    p2, v2 = param.copy(), velocity.copy()
    for _ in range(3):
        nb.sgd_momentum_update(param, grad, velocity, 0.01, 0.9, 5e-4)
        getattr(host_kernels["sgd.cu"], "sgd_momentum" + _suffix(dtype))(
            _p(p2), _p(grad), _p(v2), ctypes.c_longlong(p2.size), _scalar(dtype, 0.01), _scalar(dtype, 0.9),
            _scalar(dtype, 5e-4))
    np.testing.assert_array_equal(p2, param)
    np.testing.assert_array_equal(v2, velocity)
    getattr(host_kernels["sgd.cu"], "scale" + _suffix(dtype))(_p(p2), ctypes.c_longlong(p2.size), _scalar(dtype, 0.25))
    nb.scale_(param, 0.25)
    np.testing.assert_array_equal(p2, param)


def test_bias_kernels(host_kernels):
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(2)
    y, b = rng.standard_normal((5, 7)), rng.standard_normal(7)
    expected = y + b
    host_kernels["bias.cu"].bias_add_rows_f64(_p(y), _p(b), ctypes.c_longlong(5), ctypes.c_int(7))
    np.testing.assert_allclose(y, expected, rtol=0, atol=0)
    db = np.full(7, np.nan)
    lib = host_kernels["bias.cu"]
    for col in range(8):   # one thread per column, plus one past the end that must do nothing
        lib.host_set_thread(col, 0, 1, 8)
        lib.sum_rows_f64(_p(db), _p(y), ctypes.c_int(5), ctypes.c_int(7))
    lib.host_set_thread(0, 0, 1, 1)
    np.testing.assert_allclose(db, nb.linear_backward_bias(y), **FLOAT64)
    # the convolution bias gradient: sum_rows over the batch, then sum_cols over each
    # channel's pixels (one warp per channel; on the host a warp is one lane)
    dy = rng.standard_normal((3, 4, 5, 6))
    over_batch, conv_db = np.full(4 * 30, np.nan), np.full(4, np.nan)
    for col in range(4 * 30):
        lib.host_set_thread(col, 0, 1, 4 * 30)
        lib.sum_rows_f64(_p(over_batch), _p(dy), ctypes.c_int(3), ctypes.c_int(4 * 30))
    for row in range(5):   # one past the end must do nothing
        lib.host_set_thread(row, 0, 1, 5)
        lib.sum_cols_f64(_p(conv_db), _p(over_batch), ctypes.c_int(4), ctypes.c_int(30))
    lib.host_set_thread(0, 0, 1, 1)
    np.testing.assert_allclose(conv_db, nb.conv_backward_bias(dy), **FLOAT64)
    # the convolution bias add: y[n, k, p, q] += b[k]
    conv_y, conv_b = rng.standard_normal((3, 4, 5, 6)), rng.standard_normal(4)
    expected = conv_y + conv_b[:, None, None]
    lib.bias_add_channels_f64(_p(conv_y), _p(conv_b), ctypes.c_longlong(3 * 4), ctypes.c_int(4), ctypes.c_int(30))
    np.testing.assert_array_equal(conv_y, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_kernels(host_kernels, dtype):
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
    x.flat[:4] = [np.nan, -0.0, 0.0, -np.inf]          # what np.maximum(x, 0) keeps or zeroes
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy.flat[4:6] = [np.nan, np.inf]                       # where x < 0: dy * 0 is still NaN
    x.flat[4:6] = -1.0
    lib = host_kernels["relu.cu"]
    y, dx = np.full_like(x, 7.0), np.full_like(x, 7.0)
    getattr(lib, "relu_forward" + _suffix(dtype))(_p(y), _p(x), ctypes.c_longlong(x.size))
    getattr(lib, "relu_backward" + _suffix(dtype))(_p(dx), _p(y), _p(dy), ctypes.c_longlong(x.size))
    y_ref = nb.relu_forward(x)
    np.testing.assert_array_equal(y.view(np.uint8), y_ref.view(np.uint8))   # bit for bit, -0 and NaN included
    with np.errstate(invalid="ignore"):                   # inf * 0 in the reference, on purpose
        dx_ref = nb.relu_backward(y_ref, dy)
    np.testing.assert_array_equal(dx.view(np.uint8), dx_ref.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_many_kernel_matches_the_one_tensor_update_exactly(host_kernels, dtype):
    # the table packed as backends/cuda/update.py packs it, passed by value as the GPU gets
    # it: a layout that differed from sgd.cu's SgdTable would update the wrong memory
    from mpiconvnet.backends import numpy_backend as nb
    from mpiconvnet.backends.cuda import update
    rng = np.random.default_rng(8)
    shapes = [(37, 11), (5,), (300,)]
    lrs, decays = [0.01, 0.02, 0.013], [5e-4, 0.0, 1e-3]
    tensors = [[rng.standard_normal(shape).astype(dtype) for _ in range(3)] for shape in shapes]
    expected = [[a.copy() for a in t] for t in tensors]
    for _ in range(2):
        nb.sgd_momentum_update_many(*zip(*expected), lrs, 0.9, decays)
        values = []
        for (p, g, v), lr, wd in zip(tensors, lrs, decays):
            values += (p.ctypes.data, g.ctypes.data, v.ctypes.data, p.size, lr, wd)
        values += (0, 0, 0, 0, 0.0, 0.0) * (update.MAX_SEGMENTS - len(shapes))

        class Table(ctypes.Structure):
            _fields_ = [("words", ctypes.c_uint64 * (update.TABLE.size // 8))]

        table = Table.from_buffer_copy(update.TABLE.pack(*values, 0.9, len(shapes)))
        lib = host_kernels["sgd.cu"]
        for segment in range(len(shapes) + 1):    # one block row past the table's count: does nothing
            lib.host_set_y(segment)
            getattr(lib, "sgd_momentum_many" + _suffix(dtype))(table)
        lib.host_set_y(0)
    for got, want in zip(tensors, expected):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, size, stride", [((2, 3, 13, 13), 3, 2), ((1, 2, 8, 9), 2, 2), ((1, 4, 7, 7), 3, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_kernels(host_kernels, dtype, shape, size, stride, ties):
    # forward: y bit for bit (NaNs too); backward through the forward's record of the first
    # maxima, and through maxpool_first_max, against the reference
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(dtype)
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = np.nan   # np.maximum's rule: NaN wins
    with np.errstate(invalid="ignore"):
        y_ref = nb.maxpool_forward(x, size, stride)
    y = np.full_like(y_ref, 7.0)
    recorded = np.full(y.size, -1, np.int32)
    found = np.full(y.size, -2, np.int32)
    n, c, h, w = shape
    sizes = [ctypes.c_longlong(n * c)] + [ctypes.c_int(v) for v in (h, w, y.shape[2], y.shape[3], size, stride)]
    lib = host_kernels["pool.cu"]
    getattr(lib, "maxpool_forward" + _suffix(dtype))(_p(y), _p(recorded), _p(x), *sizes)
    getattr(lib, "maxpool_first_max" + _suffix(dtype))(_p(found), _p(x), *sizes)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(recorded, found)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = np.full_like(x, np.nan)
    getattr(lib, "maxpool_backward" + _suffix(dtype))(_p(dx), _p(recorded), _p(dy), *sizes)
    tolerance = FLOAT64 if dtype == np.float64 else ELEMENTWISE_F32
    with np.errstate(invalid="ignore"):   # a window holding a NaN gives no input its gradient
        np.testing.assert_allclose(dx, nb.maxpool_backward(x, y_ref, dy, size, stride), **tolerance)
    x = np.nan_to_num(x, nan=-5.0)   # the gradient's tie rule, on finite inputs
    y_ref = nb.maxpool_forward(x, size, stride)
    getattr(lib, "maxpool_forward" + _suffix(dtype))(_p(y), _p(recorded), _p(x), *sizes)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = np.full_like(x, np.nan)
    getattr(lib, "maxpool_backward" + _suffix(dtype))(_p(dx), _p(recorded), _p(dy), *sizes)
    np.testing.assert_allclose(dx, nb.maxpool_backward(x, y_ref, dy, size, stride), **tolerance)


@pytest.mark.parametrize("size", [4, 2, 5, 1])
def test_lrn_kernels(host_kernels, size):
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(4)
    alpha, beta, k = 1e-2, 0.75, 2.0
    x = 4 * rng.standard_normal((2, 9, 3, 4))
    dy = rng.standard_normal(x.shape)
    n, c, h, w = x.shape
    dims = (ctypes.c_longlong(n), ctypes.c_int(c), ctypes.c_longlong(h * w), ctypes.c_int(size))
    consts = tuple(ctypes.c_double(v) for v in (alpha, beta, k))
    y = np.full_like(x, np.nan)
    host_kernels["lrn.cu"].lrn_forward_f64(_p(y), _p(x), *dims, *consts)
    y_ref = nb.lrn_forward(x, size, alpha, beta, k)
    np.testing.assert_allclose(y, y_ref, **FLOAT64)
    dx = np.full_like(x, np.nan)
    host_kernels["lrn.cu"].lrn_backward_f64(_p(dx), _p(x), _p(y_ref), _p(dy), *dims, *consts)
    np.testing.assert_allclose(dx, nb.lrn_backward(x, y_ref, dy, size, alpha, beta, k), **FLOAT64)


@pytest.mark.parametrize("lit", [False, True])
def test_crop_flip_normalize_kernel(host_kernels, lit):
    """The kernel against data/augment.py's crop_batch: bit for bit without lighting,
    within float32 rounding with it (the kernel adds the shift after the mean)."""
    from mpiconvnet.data import augment
    rng = np.random.default_rng(5)
    n, side, size = 3, 10, 7
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    plan = augment.CropPlan(np.array([2, 0, 0, 1, 2]), rng.integers(0, side - size + 1, (5, 2)),
                            np.array([True, False, True, True, False]),
                            rng.normal(0, 5, (5, 3)).astype(np.float32) if lit else None)
    mean_chw = augment.mean_as_chw(rng.uniform(0, 255, (side, side, 3)))
    std = np.array([58.4, 57.1, 57.4], np.float32)
    out = np.full((len(plan), 3, size, size), np.nan, np.float32)
    # the kernel's arguments, each held in a name (_p keeps no reference to its array)
    arguments = [out, images, plan.sources.astype(np.int32), np.ascontiguousarray(plan.offsets[:, 0], np.int32),
                 np.ascontiguousarray(plan.offsets[:, 1], np.int32), plan.flips.astype(np.uint8),
                 np.ascontiguousarray(mean_chw.transpose(1, 2, 0)),
                 np.ascontiguousarray(plan.lighting if lit else np.zeros((len(plan), 3), np.float32)),
                 (1.0 / std).astype(np.float32)]
    host_kernels["augment.cu"].crop_flip_normalize_f32(*[_p(a) for a in arguments], ctypes.c_longlong(len(plan)),
                                                       ctypes.c_int(side), ctypes.c_int(size))
    expected = augment.crop_batch(images, plan, size, mean_chw, std)
    if lit:
        np.testing.assert_allclose(out, expected, **ELEMENTWISE_F32)
    else:
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_kernels(host_kernels, dtype):
    from mpiconvnet.backends import numpy_backend as nb
    rng = np.random.default_rng(6)
    n, classes = 6, 40
    logits = (8 * rng.standard_normal((n, classes))).astype(dtype)
    logits[1, :5] = logits[1, 7]          # ties with the true class count in its favour
    labels = rng.integers(0, classes, n).astype(np.int64)
    labels[1] = 7
    loss_rows, dlogits, ranks = np.full(n, np.nan, dtype), np.full_like(logits, np.nan), np.full(n, -1, np.int32)
    lib = host_kernels["loss.cu"]
    for row in range(n):
        lib.host_set_thread(row, 0, 1, n)
        getattr(lib, "softmax_xent" + _suffix(dtype))(_p(loss_rows), _p(dlogits), _p(logits), _p(labels), ctypes.c_int(n),
                                                      ctypes.c_int(classes), _scalar(dtype, 1.0 / n))
        getattr(lib, "label_rank" + _suffix(dtype))(_p(ranks), _p(logits), _p(labels), ctypes.c_int(n), ctypes.c_int(classes))
    lib.host_set_thread(0, 0, 1, 1)
    loss_ref, dlogits_ref = nb.softmax_cross_entropy(logits, labels)
    tol = REDUCTION_F32 if dtype == np.float32 else FLOAT64   # exp/log and row sums: a reduction
    np.testing.assert_allclose(loss_rows.astype(np.float64).sum() / n, loss_ref, **tol)
    np.testing.assert_allclose(dlogits, dlogits_ref, **tol)
    for k in (1, 3, 5):
        assert int((ranks < k).sum()) == nb.topk_correct(logits, labels, (k,))[0]
