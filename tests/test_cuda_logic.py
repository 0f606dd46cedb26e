"""The CUDA backend's pure-Python logic, tested without a GPU, pycuda or CUDA libraries:
device choice, CUDA_VISIBLE_DEVICES, CUDA-aware MPI detection, library discovery, the
row-major -> column-major GEMM mapping, cuDNN helper arithmetic, kernel table vs .cu
sources, the dropout hash's host half.

Run: pytest tests/test_cuda_logic.py
"""
import ctypes
import gc
import os
import re
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from mpiconvnet.backends.cuda import context, cublas, cudnn, device, layers, libs, memory, mpi_cuda
from mpiconvnet.backends.cuda import cudnn_graph as graph

# --- device choice ------------------------------------------------------------------------


def test_one_rank_per_gpu():
    assert [device.choose_device(r, 4, 4, environ={}) for r in range(4)] == [0, 1, 2, 3]
    assert device.choose_device(1, 2, 8, environ={}) == 1     # fewer ranks than GPUs: the first ones
    assert device.choose_device(3, None, 4, environ={}) == 3  # the node's rank count not known yet


def test_more_ranks_than_visible_gpus_go_round_robin():
    # sharing, or each rank seeing only its own GPU(s) (srun --gpu-bind, --ntasks-per-gpu, a
    # site's CUDA_VISIBLE_DEVICES per task): the GPUs' UUIDs tell which (shared_gpu_problem)
    assert [device.choose_device(r, 6, 4, environ={}) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [device.choose_device(r, 4, 1, environ={}) for r in range(4)] == [0] * 4


def test_gpus_bound_per_task_by_srun():
    # srun --gpus-per-task=G: each rank sees its own G GPUs and takes the first
    for value in ("1", "a100:1"):
        assert [device.choose_device(r, 4, 1, environ={"SLURM_GPUS_PER_TASK": value}) for r in range(4)] == [0] * 4
    assert device.choose_device(3, 4, 2, environ={"SLURM_GPUS_PER_TASK": "h100:2"}) == 0
    assert device.gpus_bound_per_task({"SLURM_GPUS_PER_TASK": "h100:2"}) == 2
    assert device.gpus_bound_per_task({}) is None and device.gpus_bound_per_task({"SLURM_GPUS_PER_TASK": "x"}) is None
    # --gpu-bind=none: every rank sees the node's GPUs and takes its own by local rank
    assert device.choose_device(2, 4, 4, environ={"SLURM_GPUS_PER_TASK": "1"}) == 2
    # mpirun -np 4 inside an allocation of one task with --gpus-per-task=4: every rank
    # inherits the variable and sees the 4 GPUs, which are the node's, not each rank's own
    assert [device.choose_device(r, 4, 4, environ={"SLURM_GPUS_PER_TASK": "4"}) for r in range(4)] == [0, 1, 2, 3]
    assert device.choose_device(0, None, 2, environ={"SLURM_GPUS_PER_TASK": "2"}) == 0


def test_ranks_sharing_a_gpu_is_a_one_line_error_naming_them():
    own = [(0, "GPU-a"), (1, "GPU-b"), (2, "GPU-c"), (3, "GPU-d")]
    assert device.shared_gpu_problem(own) is None
    assert device.shared_gpu_problem([(0, None), (1, None)]) is None   # a driver that cannot say
    assert "UUID of rank(s) 1, so" in device.unchecked_gpus_note([(0, "GPU-a"), (1, None)])   # ... is said so
    assert device.unchecked_gpus_note([(0, None)]) is None and device.unchecked_gpus_note(own) is None
    message = device.shared_gpu_problem([(4, "GPU-a"), (5, "GPU-b"), (6, "GPU-a"), (7, "GPU-b")])
    assert "\n" not in message
    assert message.startswith("ranks 4, 6 all compute on GPU GPU-a: 4 ranks on this node, 2 GPU(s) among them")
    assert "--ntasks-per-node=2 --gpus-per-task=1" in message and "MPICONVNET_ALLOW_GPU_SHARING=1" in message
    assert device.sharing_allowed(True, {}) and device.sharing_allowed(False, {"MPICONVNET_ALLOW_GPU_SHARING": "1"})
    assert not device.sharing_allowed(False, {})


def test_no_gpu_and_bad_rank():
    with pytest.raises(device.DeviceChoiceError, match="no CUDA device visible"):
        device.choose_device(0, 1, 0)
    with pytest.raises(ValueError, match="outside"):
        device.choose_device(2, 2, 4)


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("0,1", ["0", "1"]),
    (" 2, 3 ", ["2", "3"]),
    ("0,1,-1,2", ["0", "1"]),       # CUDA stops at the first invalid entry
    ("", []),
    ("-1", []),
    ("GPU-8a1b,1", ["GPU-8a1b", "1"]),
    ("MIG-4f2e", ["MIG-4f2e"]),
    ("1,bogus,2", ["1"]),
    ("01", ["1"]),
])
def test_parse_visible_devices(value, expected):
    assert device.parse_visible_devices(value) == expected


def test_duplicate_visible_device_is_an_error():
    with pytest.raises(device.DeviceChoiceError, match="twice"):
        device.parse_visible_devices("1,1")


def test_visible_device_count():
    assert device.visible_device_count(4, environ={}) == 4
    assert device.visible_device_count(4, environ={"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert device.visible_device_count(4, environ={"CUDA_VISIBLE_DEVICES": "0,7,1"}) == 1  # 7 does not exist
    assert device.visible_device_count(4, environ={"CUDA_VISIBLE_DEVICES": ""}) == 0


# --- CUDA-aware MPI -------------------------------------------------------------------------


def test_env_override_wins():
    never = [types.SimpleNamespace()]  # would answer None if it were asked
    assert mpi_cuda.cuda_aware_mpi(environ={"MPICONVNET_CUDA_AWARE": "1"}, libraries=never) is True
    assert mpi_cuda.cuda_aware_mpi(environ={"MPICONVNET_CUDA_AWARE": "0"}, libraries=never) is False
    with pytest.raises(ValueError, match="MPICONVNET_CUDA_AWARE"):
        mpi_cuda.cuda_aware_mpi(environ={"MPICONVNET_CUDA_AWARE": "yes"}, libraries=never)


def test_symbols_absent_means_staging():
    assert mpi_cuda.query_library(types.SimpleNamespace()) is None
    assert mpi_cuda.cuda_aware_mpi(environ={}, libraries=[types.SimpleNamespace()]) is False
    assert mpi_cuda.cuda_aware_mpi(environ={}, libraries=[]) is False
    libc = ctypes.CDLL(None)  # a real library without the MPIX symbols
    assert mpi_cuda.query_library(libc) is None


def _fn(result, out_value=None):
    def call(*args):
        if out_value is not None:
            args[1]._obj.value = out_value  # the int* of MPIX_GPU_query_support
        return result
    return call


def test_open_mpi_query():
    yes = types.SimpleNamespace(MPIX_Query_cuda_support=_fn(1))
    no = types.SimpleNamespace(MPIX_Query_cuda_support=_fn(0))
    assert mpi_cuda.cuda_aware_mpi(environ={}, libraries=[yes]) is True
    assert mpi_cuda.cuda_aware_mpi(environ={}, libraries=[no]) is False
    # the first library that answers decides
    assert mpi_cuda.cuda_aware_mpi(environ={}, libraries=[types.SimpleNamespace(), yes]) is True


def test_mpich_query():
    yes = types.SimpleNamespace(MPIX_GPU_query_support=_fn(0, out_value=1))
    no = types.SimpleNamespace(MPIX_GPU_query_support=_fn(0, out_value=0))
    failed = types.SimpleNamespace(MPIX_GPU_query_support=_fn(1, out_value=1))
    assert mpi_cuda.query_library(yes) is True
    assert mpi_cuda.query_library(no) is False
    assert mpi_cuda.query_library(failed) is False


def test_the_installed_mpi_is_found_and_answers():
    # mpi4py's MPI (MPICH >= 4 or Open MPI here) exports a query function: the lookup
    # through mpi4py's module must reach it
    MPI = pytest.importorskip("mpi4py.MPI")
    answers = [mpi_cuda.query_library(ctypes.CDLL(MPI.__file__))]
    answers += [mpi_cuda.query_library(ctypes.CDLL(p)) for p in mpi_cuda.mapped_mpi_libraries()]
    if not any(a is not None for a in answers):
        pytest.skip(f"{MPI.Get_library_version().splitlines()[0]} has no CUDA query function")
    assert all(a in (True, False, None) for a in answers) and any(isinstance(a, bool) for a in answers)


def test_mapped_libraries_parsing(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f01-7f02 r-xp 00000000 08:01 2 /opt/ompi/lib/libmpi.so.40.30.0\n"
        "7f02-7f03 r--p 00000000 08:01 2 /opt/ompi/lib/libmpi.so.40.30.0\n"
        "7f03-7f04 r-xp 00000000 08:01 3 /opt/mpich/lib/libmpich.so.12\n"
        "7f04-7f05 rw-p 00000000 00:00 0 [heap]\n")
    assert mpi_cuda.mapped_mpi_libraries(str(maps)) == ["/opt/ompi/lib/libmpi.so.40.30.0", "/opt/mpich/lib/libmpich.so.12"]
    assert mpi_cuda.mapped_mpi_libraries(str(tmp_path / "absent")) == []


# --- library discovery -----------------------------------------------------------------------


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_candidate_dirs_order(tmp_path):
    site = tmp_path / "site"
    (site / "nvidia" / "cublas" / "lib").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "x" / "lib").mkdir(parents=True)
    (site / "torch" / "lib").mkdir(parents=True)
    env = {"MPICONVNET_CUDA_LIBS": "/explicit/a:/explicit/b", "CUDA_HOME": "/opt/cuda", "LD_LIBRARY_PATH": "/ld1:/ld2"}
    dirs = libs.candidate_dirs(environ=env, path_entries=[str(site), str(tmp_path / "missing")])
    assert dirs[:2] == ["/explicit/a", "/explicit/b"]
    assert dirs[2] == str(site / "nvidia" / "cublas" / "lib")
    assert dirs[3] == str(site / "nvidia" / "cu13" / "x" / "lib")
    assert dirs[4] == str(site / "torch" / "lib")
    assert dirs.index("/opt/cuda/lib64") < dirs.index("/usr/local/cuda/lib64") < dirs.index("/ld1")
    assert len(dirs) == len(set(dirs))


def test_find_library_file_prefers_earlier_dirs(tmp_path):
    first = _touch(tmp_path / "a" / "libcublas.so.12")
    _touch(tmp_path / "b" / "libcublas.so.13")
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert libs.find_library_file(libs.CUBLAS_SONAMES, dirs) == first
    assert libs.find_library_file(libs.CUDNN_SONAMES, dirs) is None


def test_missing_library_message_is_one_line_and_says_the_fix(tmp_path):
    with pytest.raises(libs.LibraryNotFound) as e:
        libs._dlopen_first(("libmpiconvnet_absent.so.99",), [str(tmp_path)], "cuDNN", "pip install nvidia-cudnn-cu12")
    message = str(e.value)
    assert "\n" not in message
    assert "cuDNN not found" in message and str(tmp_path) in message
    assert "pip install nvidia-cudnn-cu12" in message and "MPICONVNET_CUDA_LIBS" in message


def test_a_library_found_but_not_loadable_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "libcublas.so.13"
    broken.write_bytes(b"not an ELF file")
    with pytest.raises(libs.LibraryNotFound) as e:
        libs._dlopen_first(libs.CUBLAS_SONAMES, [str(tmp_path)], "cuBLAS", "pip install nvidia-cublas-cu12")
    message = str(e.value)
    assert "\n" not in message and f"cuBLAS at {broken} did not load" in message
    assert "MPICONVNET_CUDA_LIBS" in message


def test_backend_import_touches_no_gpu():
    # the trainer imports the backend before choosing the device: no pycuda, no libraries
    code = ("import sys, mpiconvnet.backends.cuda as c; "
            "assert 'pycuda' not in sys.modules and not c.is_initialized(); "
            "from mpiconvnet.backends.cuda import libs; assert libs._loaded == {}")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- cuBLAS: row-major products as column-major GEMMs ----------------------------------------


def _col_major(buffer, rows, cols, ld):
    """The rows x cols column-major matrix with leading dimension ld stored in buffer."""
    return buffer[:ld * cols].reshape(cols, ld).T[:rows, :]


def _replay_gemm(args, buffers):
    """C = op(A) op(B) with cuBLAS's column-major semantics, returned as C's memory."""
    m, n, k = args["m"], args["n"], args["k"]
    A = buffers[args["A"]].ravel()
    B = buffers[args["B"]].ravel()
    opA = _col_major(A, m, k, args["lda"]) if args["transa"] == cublas.CUBLAS_OP_N else _col_major(A, k, m, args["lda"]).T
    opB = _col_major(B, k, n, args["ldb"]) if args["transb"] == cublas.CUBLAS_OP_N else _col_major(B, n, k, args["ldb"]).T
    C = opA @ opB
    out = np.zeros(args["ldc"] * n)
    out.reshape(n, args["ldc"]).T[:m, :] = C
    return out


def test_gemm_args_reproduce_the_row_major_products():
    rng = np.random.default_rng(0)
    n, f, o = 5, 7, 3
    x, w, dy = rng.standard_normal((n, f)), rng.standard_normal((o, f)), rng.standard_normal((n, o))
    buffers = {"x": x, "w": w, "dy": dy}
    y = _replay_gemm(cublas.gemm_args("forward", n, f, o), buffers)
    np.testing.assert_allclose(y.reshape(n, o), x @ w.T, rtol=1e-12)
    dx = _replay_gemm(cublas.gemm_args("data", n, f, o), buffers)
    np.testing.assert_allclose(dx.reshape(n, f), dy @ w, rtol=1e-12)
    dw = _replay_gemm(cublas.gemm_args("filter", n, f, o), buffers)
    np.testing.assert_allclose(dw.reshape(o, f), dy.T @ x, rtol=1e-12)
    with pytest.raises(ValueError):
        cublas.gemm_args("sideways", n, f, o)


def test_cublas_math_modes():
    assert cublas.math_mode(False) == cublas.CUBLAS_PEDANTIC_MATH == 2
    assert cublas.math_mode(True) == cublas.CUBLAS_TF32_TENSOR_OP_MATH == 3


# --- cuDNN helpers ---------------------------------------------------------------------------


def test_algo_perf_layout():
    # cudnnConvolution*AlgoPerf_t: int, int, float, size_t, int, int, int[3]
    assert ctypes.sizeof(cudnn.AlgoPerf) == 48
    assert cudnn.AlgoPerf.memory.offset == 16 and cudnn.AlgoPerf.mathType.offset == 28


def _perfs(*rows):
    """AlgoPerf rows (algo, status, workspace, math type[, determinism: 0 by default, as
    cuDNN's CUDNN_NON_DETERMINISTIC])."""
    arr = (cudnn.AlgoPerf * len(rows))()
    for p, (algo, status, nbytes, math, *determinism) in zip(arr, rows):
        p.algo, p.status, p.memory, p.mathType = algo, status, nbytes, math
        p.determinism = determinism[0] if determinism else 0
    return arr


def test_choose_algo():
    perfs = _perfs((6, 3000, 0, cudnn.CUDNN_FMA_MATH),             # failed
                   (1, 0, 1 << 20, cudnn.CUDNN_TENSOR_OP_MATH),     # tensor cores
                   (7, 0, 8 << 30, cudnn.CUDNN_FMA_MATH),           # too much workspace
                   (0, 0, 4096, cudnn.CUDNN_FMA_MATH))
    assert cudnn.choose_algo(perfs, 4, tf32=False, workspace_limit=1 << 30) == (0, 4096, cudnn.CUDNN_FMA_MATH)
    assert cudnn.choose_algo(perfs, 4, tf32=True, workspace_limit=1 << 30) == (1, 1 << 20, cudnn.CUDNN_TENSOR_OP_MATH)
    with pytest.raises(cudnn.CudnnError, match="MPICONVNET_CUDNN_WORKSPACE_MB"):
        cudnn.choose_algo(perfs, 3, tf32=False, workspace_limit=1 << 30)
    # the message names the real reason: a failure or tensor-op math is no workspace problem
    with pytest.raises(cudnn.CudnnError) as e:
        cudnn.choose_algo(perfs, 2, tf32=False, workspace_limit=1 << 30)
    message = str(e.value)
    assert "WORKSPACE" not in message and "status 3000" in message and "MPICONVNET_TF32=1" in message
    assert "\n" not in message
    with pytest.raises(cudnn.CudnnError, match="returned none"):
        cudnn.choose_algo(perfs, 0, tf32=False, workspace_limit=1 << 30)
    # down-converting to half precision is passed over even with TF32 allowed
    halves = _perfs((2, 0, 0, cudnn.CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION), (1, 0, 1 << 20, cudnn.CUDNN_TENSOR_OP_MATH))
    assert cudnn.choose_algo(halves, 2, tf32=True, workspace_limit=1 << 30)[0] == 1
    with pytest.raises(cudnn.CudnnError, match="1 convert their inputs to half precision, which is never used"):
        cudnn.choose_algo(halves, 1, tf32=True, workspace_limit=1 << 30)


def test_choose_algo_deterministic_passes_over_algorithms_that_may_vary():
    perfs = _perfs((1, 0, 0, cudnn.CUDNN_FMA_MATH, 0),                          # fastest, may vary
                   (3, 0, 2048, cudnn.CUDNN_FMA_MATH, cudnn.CUDNN_DETERMINISTIC))
    assert cudnn.choose_algo(perfs, 2, tf32=False, workspace_limit=1 << 30)[0] == 1
    assert cudnn.choose_algo(perfs, 2, tf32=False, workspace_limit=1 << 30, deterministic=True)[0] == 3
    with pytest.raises(cudnn.CudnnError, match="1 are not deterministic, which MPICONVNET_DETERMINISTIC=1 forbids"):
        cudnn.choose_algo(perfs, 1, tf32=False, workspace_limit=1 << 30, deterministic=True)
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert graph.allowed({graph.NOTE_NONDETERMINISTIC}, f32, tf32=False)
    assert not graph.allowed({graph.NOTE_NONDETERMINISTIC}, f32, tf32=False, deterministic=True)
    assert graph.allowed({graph.NOTE_TENSOR_CORE}, f64, tf32=False, deterministic=True)
    assert not graph.allowed({graph.NOTE_DOWN_CONVERT_INPUTS}, f64, tf32=True)
    assert context.deterministic_from_env({}) is False
    assert context.deterministic_from_env({"MPICONVNET_DETERMINISTIC": "1"}) is True
    with pytest.raises(ValueError, match="MPICONVNET_DETERMINISTIC='on': use 0"):
        context.deterministic_from_env({"MPICONVNET_DETERMINISTIC": "on"})


def test_cudnn_shape_helpers():
    assert cudnn.shape4((2, 3, 4, 5)) == (2, 3, 4, 5)
    assert cudnn.shape4((8, 10)) == (8, 10, 1, 1)
    assert cudnn.shape4((96,)) == (1, 96, 1, 1)
    with pytest.raises(ValueError):
        cudnn.shape4((1, 2, 3))
    # AlexNet conv1 and pool1: 227 -> 55 -> 27
    assert cudnn.conv_output_shape((8, 3, 227, 227), (96, 3, 11, 11), 4, 0) == (8, 96, 55, 55)
    assert cudnn.conv_output_shape((8, 48, 27, 27), (256, 48, 5, 5), 1, 2) == (8, 256, 27, 27)
    assert cudnn.pool_output_shape((8, 96, 55, 55), 3, 2) == (8, 96, 27, 27)
    assert cudnn.pool_output_shape((1, 1, 6, 6), 3, 2) == (1, 1, 2, 2)  # floor
    assert cudnn.conv_math_type(False) == cudnn.CUDNN_FMA_MATH
    assert cudnn.data_type(np.dtype(np.float64)) == cudnn.CUDNN_DATA_DOUBLE
    with pytest.raises(TypeError):
        cudnn.data_type(np.dtype(np.float16))


def test_lrn_path_choice():
    assert layers.lrn_uses_cudnn(5) and layers.lrn_uses_cudnn(3)
    assert not layers.lrn_uses_cudnn(4)     # even: our kernel
    assert not layers.lrn_uses_cudnn(17)    # past cuDNN's maximum window
    # cudnn_ops.h: window c - lookBehind .. c + lookAhead, lookBehind = (n-1)//2,
    # lookAhead = n-1-lookBehind; the interface: c - n//2 .. c + (n-1)//2. Equal exactly
    # for the odd sizes sent to cuDNN.
    for n in range(cudnn.LRN_MIN_N, cudnn.LRN_MAX_N + 1):
        behind = (n - 1) // 2
        same = (behind, n - 1 - behind) == (n // 2, (n - 1) // 2)
        assert layers.lrn_uses_cudnn(n) == same, n


# --- kernels table vs the .cu sources -------------------------------------------------------


def _extern_kernels():
    found = {}
    for name in os.listdir(context.KERNEL_DIR):
        if name.endswith(".cu"):
            text = open(os.path.join(context.KERNEL_DIR, name)).read()
            for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', text):
                found[m.group(1)] = (name, [p for p in m.group(2).split(",") if p.strip()])
    return found


def test_kernel_table_matches_sources():
    found = _extern_kernels()
    from mpiconvnet.backends.cuda import update
    # a struct by value is packed on the host to its size in bytes (update.TABLE for sgd.cu's)
    char = {"float*": "P", "double*": "P", "int*": "P", "long": "q", "int": "i", "uint32_t": "I",
            "float": "F", "double": "F", "unsigned": "P", "SgdTable": f"{update.TABLE.size}s"}
    assert update.TABLE.size == 64 * 48 + 16
    for name, (filename, signature) in context.KERNELS.items():
        variants = ["_f32"] if name in context.FLOAT32_ONLY else ["_f32", "_f64"]
        for suffix in variants:
            assert name + suffix in found, f"{name}{suffix} missing from kernels/"
            source_file, params = found[name + suffix]
            assert source_file == filename
            kinds = []
            for p in params:
                words = p.replace("const", "").split()
                kinds.append("P" if "*" in p else char[words[0]])
            assert "".join(kinds) == signature, f"{name}{suffix}: source {''.join(kinds)} vs table {signature}"


def test_launch_config_and_env():
    assert context.launch_config(1) == ((1, 1), (256, 1, 1))
    assert context.launch_config(257) == ((2, 1), (256, 1, 1))
    assert context.launch_config(10 ** 12)[0] == (context.MAX_BLOCKS, 1)
    assert context.tf32_from_env({}) is False
    assert context.tf32_from_env({"MPICONVNET_TF32": "1"}) is True
    with pytest.raises(ValueError, match="MPICONVNET_TF32"):
        context.tf32_from_env({"MPICONVNET_TF32": "on"})
    assert context.workspace_limit_from_env({"MPICONVNET_CUDNN_WORKSPACE_MB": "64"}) == 64 << 20


# --- dropout: the host half of the hash -------------------------------------------------------


def _mix32_spec(x):
    x = np.uint32(x)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x = np.uint32(x * np.uint32(0x7FEB352D))
        x ^= x >> np.uint32(15)
        x = np.uint32(x * np.uint32(0x846CA68B))
        x ^= x >> np.uint32(16)
    return int(x)


def test_dropout_base_and_threshold():
    for seed, counter in [(0, 0), (1, 2), (2 ** 32 + 5, 7), (123456789, 2 ** 31)]:
        expected = _mix32_spec(_mix32_spec(seed % 2 ** 32) ^ (counter % 2 ** 32))
        assert layers.dropout_base(seed, counter) == expected
    assert layers.dropout_threshold(0.0) == 0
    assert layers.dropout_threshold(0.5) == 2 ** 31
    assert layers.dropout_threshold(1 - 2.0 ** -33) == 2 ** 32 - 1
    assert layers.dropout_threshold(0.25) == 2 ** 30
    with pytest.raises(ValueError):
        layers.dropout_threshold(1.0)


def test_dropout_matches_numpy_reference_hash():
    nb = pytest.importorskip("mpiconvnet.backends.numpy_backend")
    if not hasattr(nb, "dropout_keep"):
        pytest.skip("numpy_backend.dropout_keep not written yet")
    seed, counter, n, p, offset = 42, 3, 1000, 0.3, 77
    base = layers.dropout_base(seed, counter)
    threshold = layers.dropout_threshold(p)
    ours = np.array([_mix32_spec(base ^ ((offset + i) % 2 ** 32)) >= threshold for i in range(n)])
    reference = np.asarray(nb.dropout_keep(seed, counter, n, p, offset)).astype(bool)
    np.testing.assert_array_equal(ours, reference)


# --- MPI buffer wrapper -----------------------------------------------------------------------


def test_device_buffer_interface():
    fake = types.SimpleNamespace(size=12, dtype=np.dtype(np.float32), ptr=0xDEAD000)
    iface = memory.mpi_buffer(fake).__cuda_array_interface__
    assert iface == {"shape": (12,), "typestr": "<f4", "data": (0xDEAD000, False), "strides": None,
                     "stream": None, "version": 3}
    assert memory.HOST_MEMORY is False


def _array(shape, dtype=np.float32, ptr=0x10000):
    from mpiconvnet.backends.cuda.array import DeviceArray
    memory = object()   # stands for the pool block every view must keep alive
    return DeviceArray(tuple(shape), np.dtype(dtype), memory, ptr), memory


def test_device_array_views_share_the_block_and_offset_the_address():
    a, memory = _array((24,), np.float64)
    assert (a.shape, a.size, a.nbytes, a.ndim, len(a)) == ((24,), 24, 192, 1, 24)
    part = a[4:10]
    assert (part.shape, part.ptr, part.memory) == ((6,), 0x10000 + 4 * 8, memory)
    assert a[20:].shape == (4,) and a[-2:].ptr == 0x10000 + 22 * 8
    assert a[5:5].shape == (0,) and a[5:5].ptr == 0      # an empty view points nowhere, as empty()
    grid = part.reshape(2, 3)
    assert (grid.shape, grid.ptr, grid.memory) == ((2, 3), part.ptr, memory)
    assert a.reshape((2, -1, 3)).shape == (2, 4, 3) and a.reshape([24]).shape == (24,)
    assert a.reshape(4, 6).reshape(4, -1).shape == (4, 6)
    iface = grid.__cuda_array_interface__
    assert iface["shape"] == (2, 3) and iface["data"] == (part.ptr, False) and iface["typestr"] == "<f8"


@pytest.mark.parametrize("shape", [(5, 5), (-1, -1), (7, -1), (0, -1), (25, -1, 0)])
def test_device_array_reshape_to_another_size_is_an_error(shape):
    a, _ = _array((24,))
    with pytest.raises(ValueError, match="reshape"):
        a.reshape(shape)


def test_device_array_indexes_only_1d_slices():
    a, _ = _array((4, 6))
    for index in (slice(0, 2), 3):
        with pytest.raises(TypeError, match=r"x\[a:b\] views of 1-D arrays only"):
            a[index]
    b, _ = _array((6,))
    with pytest.raises(TypeError, match="1-D arrays only"):
        b[::2]


def test_device_identity_is_the_gpu_uuid_as_nvidia_smi_prints_it(fake_backend, monkeypatch):
    cb, _ = fake_backend
    cb.initialize(0, 1)
    assert cb.device_identity() == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    driver = libs.load_driver()
    monkeypatch.setattr(type(driver), "cuDeviceGetUuid_v2", lambda self, uuid, device: 101)   # an error
    assert cb.device_identity() is None


def test_a_handle_that_fails_to_create_leaves_no_context_on_the_stack(fake_backend, monkeypatch):
    # PyCUDA aborts the process at exit when a context is still pushed: the set-up's one-line
    # error (exit 2) would become a SIGABRT and a banner
    cb, _ = fake_backend

    def refuse(*args):
        raise cudnn.CudnnError("cudnnCreate failed: CUDNN_STATUS_NOT_INITIALIZED")
    monkeypatch.setattr(cudnn, "Handle", refuse)
    with pytest.raises(cudnn.CudnnError):
        cb.initialize(0, 1)
    assert context._state is None
    assert all(depth == 0 for depth in _FakeContext.depth.values())


def test_a_bad_cuda_aware_setting_is_refused_at_set_up_even_on_one_rank(fake_backend, monkeypatch):
    cb, _ = fake_backend
    monkeypatch.setenv("MPICONVNET_CUDA_AWARE", "yes")
    with pytest.raises(ValueError, match="MPICONVNET_CUDA_AWARE='yes': use 1"):
        cb.initialize(0, 1)
    assert all(depth == 0 for depth in _FakeContext.depth.values())


def test_an_abort_pops_the_context_first(fake_backend):
    # MPI_Abort exits through C's exit(), where PyCUDA aborts (SIGABRT) on a pushed context
    cb, _ = fake_backend
    cb.initialize(0, 1)
    assert sum(_FakeContext.depth.values()) == 1
    context.release_before_abort()
    assert sum(_FakeContext.depth.values()) == 0


def test_kernels_compile_with_stop_signals_held(fake_backend, monkeypatch):
    # nvcc inherits the mask: a TERM to the job step must not kill it mid-compile
    import signal
    cb, _ = fake_backend
    cb.initialize(0, 1)
    masks = []
    compiler = sys.modules["pycuda.compiler"]
    build = compiler.SourceModule
    monkeypatch.setattr(compiler, "SourceModule",
                        lambda *a, **k: (masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, set())), build(*a, **k))[1])
    monkeypatch.setattr("mpiconvnet.backends.cuda.prebuild.nvcc_path", lambda: "/usr/bin/nvcc")
    context.load_module("relu.cu")
    assert masks and {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= masks[0]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())   # released again


def test_empty_arrays_hold_their_pool_block_until_the_last_view_is_gone(fake_backend):
    cb, _ = fake_backend
    cb.initialize(0, 1)
    pool = context.get().pool.fake
    a = cb.empty((3, 4), np.float32)
    assert (type(a).__name__, a.shape, a.dtype, a.nbytes) == ("DeviceArray", (3, 4), np.float32, 48)
    view = a.reshape(-1)[4:8]
    address = a.ptr
    del a
    assert pool.is_live(address) and pool.is_live(view.ptr)
    del view
    assert not pool.is_live(address)
    # the high water counts the blocks the pool holds for reuse as well as those in use
    held = cb.memory_high_water()
    assert held >= 48
    again = cb.empty((3, 4), np.float32)                 # the freed block, reused
    assert cb.memory_high_water() == held and again.nbytes == 48
    bigger = cb.empty((1000,), np.float64)
    assert cb.memory_high_water() == held + bigger.nbytes
    pool.managed_bytes = 0   # what PyCUDA's pool does when an allocation ran out of memory
    assert cb.memory_high_water() == held + bigger.nbytes, "a high water does not fall"
    nothing = cb.zeros((0, 9216), np.float32)            # a rank with no evaluation images left
    assert (nothing.shape, nothing.ptr, nothing.memory) == ((0, 9216), 0, None)
    assert cb.empty(7, np.float64).shape == (7,) and cb.empty(np.int64(2), "f").shape == (2,)


def test_float64_input_is_cast_on_the_host(fake_backend):
    cb, _ = fake_backend
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    cast = cb.to_device(x).astype(np.float64)
    assert cast.dtype == np.float64 and cast.shape == (2, 3)
    np.testing.assert_array_equal(cb.to_host(cast), x.astype(np.float64))
    np.testing.assert_array_equal(cast.get(), x.astype(np.float64))


class _FunctionWithoutLaunchKernel:
    """A PyCUDA Function as an older PyCUDA might have it: prepare and prepared_async_call only."""

    def __init__(self):
        self.calls = []

    def prepare(self, signature):
        self.arg_format = signature

    def prepared_async_call(self, grid, block, stream, *args):
        self.calls.append((grid, block, stream, args))


def test_kernel_packs_as_pycuda_does_and_falls_back_to_prepared_async_call(fake_backend):
    cb, launches = fake_backend
    cb.initialize(0, 1)
    st = context.get()
    kernel = st.kernel("scale", np.dtype(np.float32))
    assert st.kernel("scale", np.dtype(np.float32)) is kernel and st.kernel("scale", np.float32).name == "scale_f32"
    buffer = cb.empty((5,), np.float32)
    kernel((1, 1), context.BLOCK, st.stream, buffer.ptr, 5, 0.5)
    assert launches[-1] == "scale_f32"
    import struct
    with pytest.raises(struct.error):   # the signature says 3 arguments
        kernel((1, 1), context.BLOCK, st.stream, buffer.ptr, 5)
    old = _FunctionWithoutLaunchKernel()
    fallback = context.Kernel("scale_f32", old, "PqF".replace("F", "f"))
    fallback((2, 1), context.BLOCK, "stream", 1, 2, 3.0)
    assert old.arg_format == "Pqf" and old.calls == [((2, 1), context.BLOCK, "stream", (1, 2, 3.0))]


# --- the ctypes plumbing against stand-in libraries --------------------------------------------
# A C compiler builds a fake libcublas / libcudnn with the real prototypes and struct
# layouts (copied from cublas_api.h / cudnn_cnn.h) over host memory: the bindings' argument
# types, the AlgoPerf layout as a C compiler lays it out, the alpha/beta pointers and the
# column-major GEMMs are then checked end to end without a GPU.

FAKE_CUBLAS = r"""
#include <stddef.h>
static int last_math = -1;
int fake_last_math(void) { return last_math; }
int cublasCreate_v2(void **h) { *h = (void *)0x1; return 0; }
int cublasDestroy_v2(void *h) { return 0; }
int cublasSetStream_v2(void *h, void *s) { return 0; }
int cublasSetMathMode(void *h, int mode) { last_math = mode; return 0; }
#define GEMM(NAME, T)                                                                        \
int NAME(void *h, int ta, int tb, int m, int n, int k, const T *alpha, const T *A, int lda,  \
         const T *B, int ldb, const T *beta, T *C, int ldc) {                              \
    for (int j = 0; j < n; ++j) for (int i = 0; i < m; ++i) {                                \
        T acc = 0;                                                                           \
        for (int p = 0; p < k; ++p) {                                                        \
            T a = ta ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda];                      \
            T b = tb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb];                      \
            acc += a * b;                                                                    \
        }                                                                                    \
        C[i + (size_t)j * ldc] = *alpha * acc + (*beta == 0 ? 0 : *beta * C[i + (size_t)j * ldc]); \
    }                                                                                        \
    return 0;                                                                                \
}
GEMM(cublasSgemm_v2, float)
GEMM(cublasDgemm_v2, double)
"""

FAKE_CUDNN_CUSTOM = r"""
#include <stddef.h>
#include <stdlib.h>
typedef struct {
    int algo; int status; float time; size_t memory; int determinism; int mathType; int reserved[3];
} cudnnConvolutionFwdAlgoPerf_t;
/* a convolution descriptor that remembers its math type, so the runs can be checked */
typedef struct { int math; } fake_conv_t;
static int last_requested = -1, last_conv_math = -1;
/* per kind (0 forward, 1 data, 2 filter): the math type of the descriptor at the
   workspace-size query and at the last run */
static int size_math[3] = {-1, -1, -1}, run_math[3] = {-1, -1, -1};
int fake_last_requested(void) { return last_requested; }
int fake_last_conv_math(void) { return last_conv_math; }
int fake_size_math(int kind) { return size_math[kind]; }
int fake_run_math(int kind) { return run_math[kind]; }
size_t cudnnGetVersion(void) { return 90600; }
const char *cudnnGetErrorString(int status) { return status ? "CUDNN_STATUS_BAD_PARAM" : "CUDNN_STATUS_SUCCESS"; }
int cudnnCreateConvolutionDescriptor(fake_conv_t **d) { *d = calloc(1, sizeof **d); return 0; }
int cudnnDestroyConvolutionDescriptor(fake_conv_t *d) { free(d); return 0; }
int cudnnSetConvolutionMathType(fake_conv_t *d, int m) { d->math = m; last_conv_math = m; return 0; }
/* the fastest result uses math type MATH0 (a different one per kind), then a failure,
   then algorithm 0 with FMA math */
#define FIND(NAME, SIZE_NAME, KIND, MATH0)                                                      \
int NAME(void *h, void *a, void *b, fake_conv_t *c, void *d, int requested, int *returned,      \
         cudnnConvolutionFwdAlgoPerf_t *perf) {                                                 \
    last_requested = requested;                                                                 \
    perf[0].algo = 1; perf[0].status = 0; perf[0].memory = 1 << 20; perf[0].mathType = MATH0; \
    perf[1].algo = 7; perf[1].status = 3000; perf[1].memory = 0; perf[1].mathType = 3;         \
    perf[2].algo = 0; perf[2].status = 0; perf[2].memory = 4096; perf[2].mathType = 3;         \
    *returned = 3;                                                                              \
    return 0;                                                                                   \
}                                                                                               \
int SIZE_NAME(void *h, void *a, void *b, fake_conv_t *c, void *d, int algo, size_t *size) {     \
    size_math[KIND] = c->math;                                                                  \
    *size = algo == 0 ? 4096 : 1 << 20;                                                         \
    return 0;                                                                                   \
}
FIND(cudnnFindConvolutionForwardAlgorithm, cudnnGetConvolutionForwardWorkspaceSize, 0, 1)
FIND(cudnnFindConvolutionBackwardDataAlgorithm, cudnnGetConvolutionBackwardDataWorkspaceSize, 1, 3)
FIND(cudnnFindConvolutionBackwardFilterAlgorithm, cudnnGetConvolutionBackwardFilterWorkspaceSize, 2, 2)
/* (handle, *alpha, desc, ptr, desc, ptr, convDesc, algo, ws, wsSize, *beta, desc, ptr) */
#define RUN(NAME, KIND)                                                                         \
int NAME(void *h, const void *alpha, void *ad, const void *a, void *bd, const void *b, fake_conv_t *c, \
         int algo, void *ws, size_t ws_size, const void *beta, void *od, void *o) {             \
    run_math[KIND] = c->math;                                                                   \
    return 0;                                                                                   \
}
RUN(cudnnConvolutionForward, 0)
RUN(cudnnConvolutionBackwardData, 1)
RUN(cudnnConvolutionBackwardFilter, 2)
int cudnnSetStream(void *h, void *s) { return s == (void *)0x1234 ? 0 : 2000; }
"""


@pytest.fixture
def fake_libs(tmp_path, monkeypatch):
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libraries")
    names = set(re.findall(r'"(cudnn\w+)": \(', open(cudnn.__file__).read()))
    custom = set(re.findall(r"\b(cudnn\w+)\b", FAKE_CUDNN_CUSTOM))
    stubs = "".join(f"int {name}(void) {{ return 0; }}\n" for name in sorted(names - custom))
    for soname, source in (("libcublas.so.12", FAKE_CUBLAS), ("libcudnn.so.9", FAKE_CUDNN_CUSTOM + stubs)):
        src = tmp_path / (soname + ".c")
        src.write_text(source)
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(tmp_path / soname), str(src)], check=True)
    monkeypatch.setenv("MPICONVNET_CUDA_LIBS", str(tmp_path))
    monkeypatch.setattr(libs, "_loaded", {})
    monkeypatch.setattr(cublas, "_lib", None)
    monkeypatch.setattr(cudnn, "_lib", None)
    return tmp_path


def test_cublas_bindings_run_row_major_products(fake_libs):
    handle = cublas.Handle(0, tf32=False)
    assert cublas.lib().fake_last_math() == cublas.CUBLAS_PEDANTIC_MATH
    handle.set_tf32(True)
    assert cublas.lib().fake_last_math() == cublas.CUBLAS_TF32_TENSOR_OP_MATH
    rng = np.random.default_rng(1)
    n, f, o = 4, 6, 3
    for dtype in (np.float32, np.float64):
        x, w, dy = (rng.standard_normal(s).astype(dtype) for s in ((n, f), (o, f), (n, o)))
        ptrs = {"x": x.ctypes.data, "w": w.ctypes.data, "dy": dy.ctypes.data}
        for kind, expected in (("forward", x @ w.T), ("data", dy @ w), ("filter", dy.T @ x)):
            out = np.full(expected.shape, np.nan, dtype)
            cublas.gemm(handle, np.dtype(dtype).char, cublas.gemm_args(kind, n, f, o), ptrs, out.ctypes.data)
            np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_cudnn_bindings_read_perf_results_and_scalars(fake_libs):
    st = types.SimpleNamespace(dnn=types.SimpleNamespace(ptr=ctypes.c_void_p(1)), find_algorithms=True,
                               workspace_limit=1 << 30, tf32=False, deterministic=False)
    from mpiconvnet.backends.cuda.conv import ConvPlan
    plan = ConvPlan(st, (2, 4, 9, 9), (6, 2, 3, 3), 1, 1, 2, np.dtype(np.float32))
    assert cudnn.lib().fake_last_conv_math() == cudnn.CUDNN_FMA_MATH
    # tensor-op and failed results are passed over; the FMA algorithm and its workspace win
    assert plan.algorithm(st, "forward") == (0, 4096)
    assert cudnn.lib().fake_last_requested() == cudnn.FWD_ALGO_COUNT
    # alpha / beta: pointers to the scalar type cuDNN reads for the data type
    for dtype, scalar in ((np.float32, ctypes.c_float), (np.float64, ctypes.c_double)):
        one, zero = cudnn.scalars(np.dtype(dtype))
        assert [ctypes.cast(v, ctypes.POINTER(scalar)).contents.value for v in (one, zero)] == [1.0, 0.0]
    with pytest.raises(cudnn.CudnnError, match="cudnnSetStream failed with CUDNN_STATUS_BAD_PARAM"):
        cudnn.Handle(0x999)
    assert cudnn.Handle(0x1234).ptr is not None


def test_prebuild_gencode_flags():
    from mpiconvnet.backends.cuda import prebuild
    assert prebuild.gencode_flags(["90", "80"]) == ["-gencode", "arch=compute_80,code=sm_80",
                                                   "-gencode", "arch=compute_90,code=sm_90",
                                                   "-gencode", "arch=compute_90,code=compute_90"]


def test_no_nvcc_and_no_prebuilt_is_a_one_line_error(monkeypatch, tmp_path):
    from mpiconvnet.backends.cuda import prebuild
    monkeypatch.setattr(prebuild, "nvcc_path", lambda: None)
    monkeypatch.setattr(context, "PREBUILT_DIR", str(tmp_path))
    with pytest.raises(RuntimeError) as e:
        context.load_module("sgd.cu")
    assert "\n" not in str(e.value) and "prebuild" in str(e.value) and "nvcc not found" in str(e.value)


# --- every interface function through a stand-in pycuda -----------------------------------------
# "Device" memory is host memory here (so the stand-in cuBLAS really multiplies and copies
# really copy); kernel launches are checked against their prepared signature but not run.
# This walks every op's Python path: shapes, pointers, argument lists, descriptor caching.
# Like PyCUDA's DeviceMemoryPool, the stand-in pool hands a freed block to the next
# allocation of its size; a launch whose pointer arguments are not all in live blocks (memory
# freed before the kernel that reads it was even queued) fails.

class _FakePool:
    def __init__(self):
        self.free = {}   # nbytes -> [host buffers handed back]
        self.live = {}   # address -> nbytes of the blocks in use
        self.managed_bytes = 0   # of every block made, in use or held for reuse

    @property
    def fake(self):   # the tests' way to the stand-in behind context.get().pool
        return self

    def allocate(self, nbytes):
        return _FakeAllocation(self, nbytes)

    def stop_holding(self):
        pass

    def free_held(self):   # the held blocks go back to the driver
        for nbytes, buffers in self.free.items():
            self.managed_bytes -= nbytes * len(buffers)
        self.free.clear()

    def is_live(self, address):
        return self.block_of(address) is not None

    def block_of(self, address):
        """The start of the live block holding address, or None."""
        return next((start for start, n in self.live.items() if start <= address < start + n), None)


class _FakeAllocation:
    def __init__(self, pool, nbytes):
        self.pool, self.nbytes = pool, max(int(nbytes), 1)
        recycled = pool.free.get(self.nbytes)
        if recycled:
            self.buffer = recycled.pop()
        else:
            self.buffer = np.zeros(self.nbytes + 64, np.uint8)
            pool.managed_bytes += self.nbytes
        self.address = self.buffer.ctypes.data
        pool.live[self.address] = self.nbytes

    def __int__(self):
        return self.address

    __index__ = __int__

    def __del__(self):
        self.pool.live.pop(self.address, None)
        self.pool.free.setdefault(self.nbytes, []).append(self.buffer)


class _FakeContext:
    """A primary context; PyCUDA keeps one context stack per thread."""
    depth = {}   # thread ident -> how many times this context is on that thread's stack

    def push(self):
        ident = threading.get_ident()
        _FakeContext.depth[ident] = _FakeContext.depth.get(ident, 0) + 1

    @staticmethod
    def pop():
        ident = threading.get_ident()
        assert _FakeContext.depth.get(ident, 0) > 0, "pop from an empty context stack"
        _FakeContext.depth[ident] -= 1

    def detach(self):
        pass


class _StreamOrder:
    """What the device may run in which order: each stream runs its work in order, and
    wait_for_event orders a stream after the work an event was recorded behind (vector
    clocks: clock[s] = how much of stream s's work is known to be done first). Every
    access of device memory by a kernel or copy is logged with the clock it was issued
    at; two accesses of the same pool block from different streams that neither orders
    are a race, as on a GPU whose copy engine and compute run at once."""

    def __init__(self, pool):
        self.pool, self.accesses = pool, []   # (stream id, position, clock, block, what)

    def access(self, stream, pointers, what):
        stream.position += 1
        stream.clock[stream.id] = stream.position
        for pointer in pointers:
            block = self.pool.block_of(int(pointer))
            if block is not None:
                self.accesses.append((stream.id, stream.position, dict(stream.clock), block, what))

    def races(self):
        """Pairs of accesses of one block, on two streams, in no guaranteed order."""
        found = []
        for i, (s1, p1, _, block1, what1) in enumerate(self.accesses):
            for s2, p2, clock2, block2, what2 in self.accesses[i + 1:]:
                if block1 == block2 and s1 != s2 and clock2.get(s1, 0) < p1:
                    found.append((what1, what2))
        return found


def _fake_pycuda(launches):
    import itertools
    import struct

    pool = _FakePool()
    order = _StreamOrder(pool)
    stream_ids = itertools.count()

    class Function:
        def __init__(self, name):
            self.name = name

        def prepare(self, fmt):
            self.arg_format = fmt

        def _launch_kernel(self, grid, block, arg_buffer, shared_size, stream):
            # what the backend's Kernel hands PyCUDA's cuLaunchKernel wrapper
            assert len(grid) == 2 and len(block) == 3 and shared_size == 0 and isinstance(stream, Stream)
            args = struct.unpack(self.arg_format, arg_buffer)   # a buffer of the wrong size raises
            pointers = [arg for kind, arg in zip(self.arg_format, args) if kind == "P"]
            for arg in pointers:
                assert pool.is_live(int(arg)), \
                    f"{self.name}: a pointer argument points into memory already handed back to the pool"
            order.access(stream, pointers, self.name)
            launches.append(self.name)

    class Module:
        def get_function(self, name):
            return Function(name)

    class Stream:
        handle = 0x1234  # what the stand-in cudnnSetStream accepts

        def __init__(self, flags=0):
            self.id, self.position = next(stream_ids), 0
            self.clock = {self.id: 0}

        def synchronize(self):
            pass

        def wait_for_event(self, event):
            assert event.clock is not None, "a stream waited for an event that was never recorded"
            for stream, position in event.clock.items():
                self.clock[stream] = max(self.clock.get(stream, 0), position)

    class Device:
        def __init__(self, ordinal):
            self.ordinal = ordinal

        @staticmethod
        def count():
            return 1

        def retain_primary_context(self):
            return _FakeContext()

    class Event:
        def __init__(self, flags=0):
            self.flags, self.clock = flags, None

        def record(self, stream=None):
            assert isinstance(stream, Stream)
            self.clock = dict(stream.clock)
            return self

        def synchronize(self):
            assert self.clock is not None, "waited for an event that was never recorded"

    def copy(what, dst, src, n, stream):
        order.access(stream, [dst, src], what)
        ctypes.memmove(dst, src, n)

    drv = types.ModuleType("pycuda.driver")
    drv.init = lambda: None
    drv.Device, drv.Stream, drv.Event = Device, Stream, Event
    drv.Error = type("Error", (Exception,), {})   # PyCUDA's: not a RuntimeError
    drv.event_flags = types.SimpleNamespace(DISABLE_TIMING=2)
    drv.memcpy_htod_async = lambda dst, src, stream: copy("htod", int(dst), src.ctypes.data, src.nbytes, stream)
    drv.memcpy_dtoh_async = lambda dst, src, stream: copy("dtoh", dst.ctypes.data, int(src), dst.nbytes, stream)
    drv.memcpy_dtod_async = lambda dst, src, n, stream: copy("dtod", int(dst), int(src), n, stream)
    drv.memset_d8_async = lambda dst, value, n, stream: (order.access(stream, [dst], "memset"),
                                                         ctypes.memset(int(dst), value, n))
    drv.fake_order = order
    drv.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    drv.register_host_memory = lambda array, flags=0: array[...]   # PyCUDA: a view that holds the pinning
    drv.module_from_file = lambda path: Module()
    pvt_struct = types.ModuleType("pycuda._pvt_struct")
    pvt_struct.pack = struct.pack   # a wrong argument count or type raises struct.error
    tools = types.ModuleType("pycuda.tools")
    tools.DeviceMemoryPool = lambda: pool
    compiler = types.ModuleType("pycuda.compiler")
    compiler.DEFAULT_NVCC_FLAGS = []
    compiler.SourceModule = lambda source, **kwargs: Module()
    package = types.ModuleType("pycuda")
    package.driver, package._pvt_struct, package.tools, package.compiler = drv, pvt_struct, tools, compiler
    return {"pycuda": package, "pycuda.driver": drv, "pycuda._pvt_struct": pvt_struct, "pycuda.tools": tools,
            "pycuda.compiler": compiler}


class _FakeDriver:
    """The few CUDA driver calls made through ctypes (libs.load_driver): page-locking."""

    def __init__(self):
        self.registered = {}   # address -> bytes
        self.refuse = False

    def cuMemHostRegister_v2(self, ptr, nbytes, flags):
        if self.refuse:
            return 2   # CUDA_ERROR_OUT_OF_MEMORY
        self.registered[ptr.value] = nbytes.value
        return 0

    def cuMemHostUnregister(self, ptr):
        assert self.registered.pop(ptr.value, None) is not None, "unregistered memory that was not registered"
        return 0

    def cuGetErrorString(self, status, text):
        text._obj.value = b"out of memory"
        return 0

    def cuDeviceGet(self, device, ordinal):
        device._obj.value = ordinal.value
        return 0

    def cuDeviceGetUuid_v2(self, uuid, device):
        uuid[:] = list(range(16 * device.value, 16 * device.value + 16))
        return 0


@pytest.fixture
def fake_backend(fake_libs, monkeypatch):
    """The CUDA backend over the stand-in pycuda, cuBLAS and cuDNN; yields (backend, launches)."""
    launches = []
    for name, module in _fake_pycuda(launches).items():
        monkeypatch.setitem(sys.modules, name, module)
    driver = _FakeDriver()
    monkeypatch.setattr(libs, "load_driver", lambda: driver)
    monkeypatch.setattr(context, "_state", None)
    monkeypatch.setattr(mpi_cuda, "_cached", None)
    monkeypatch.setattr(_FakeContext, "depth", {})
    # the stand-in cuDNN answers the legacy calls; graph_backend adds the graph API's
    monkeypatch.setenv("MPICONVNET_CUDNN_API", "legacy")
    import mpiconvnet.backends.cuda as cb
    try:
        yield cb, launches
    finally:
        context._state = None


def test_every_op_runs_through_the_python_plumbing(fake_backend):
    cb, launches = fake_backend
    rng = np.random.default_rng(3)
    assert cb.initialize(0, 1) == 0
    # memory: real copies through the stand-in driver
    a = rng.standard_normal((3, 4)).astype(np.float32)
    d = cb.to_device(a)
    np.testing.assert_array_equal(cb.to_host(d), a)
    np.testing.assert_array_equal(cb.to_host(cb.zeros((5,), np.float64)), np.zeros(5))
    flat = cb.zeros((10,), np.float32)
    v1, v2 = cb.flat_views(flat, [(2, 2), (3, 2)])
    cb.copy_into(v2, cb.to_device(np.arange(6, dtype=np.float32).reshape(3, 2)))
    np.testing.assert_array_equal(cb.to_host(flat), np.r_[np.zeros(4), np.arange(6)].astype(np.float32))
    pinned = cb.pinned_host_empty((10,), np.float32)
    cb.copy_to_host(pinned, flat)
    pinned[...] = -1
    cb.copy_to_host_async(pinned, flat)
    event = cb.record_event()
    cb.wait_event(event)
    np.testing.assert_array_equal(pinned, cb.to_host(flat))
    with pytest.raises(ValueError, match="copy_to_host_async: host"):
        cb.copy_to_host_async(pinned[:5], flat)
    slots = np.zeros((3, 4, 8, 8, 3), np.uint8)
    pinned = cb.pin_host_memory(slots)
    driver = libs.load_driver()
    assert driver.registered == {slots.ctypes.data: slots.nbytes}
    pinned.close()
    pinned.close()                      # once only
    assert driver.registered == {}
    cb.pin_host_memory(slots)           # dropped: unregistered when garbage-collected
    assert driver.registered == {}
    with pytest.raises(ValueError, match="C-contiguous"):
        cb.pin_host_memory(slots[:, :, ::2])
    driver.refuse = True
    with pytest.raises(RuntimeError, match=r"cuMemHostRegister of 1536 bytes failed: out of memory \(CUresult 2\)"):
        cb.pin_host_memory(slots[:2])
    cb.copy_from_host(v1, np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(cb.to_host(flat)[:4], np.ones(4))
    assert cb.mpi_buffer(flat).__cuda_array_interface__["data"][0] == flat.ptr
    cb.synchronize()
    # dense: the stand-in GEMM computes for real; the bias kernel is not run
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3)
    dy = rng.standard_normal((4, 3))
    xd, wd, dyd = cb.to_device(x), cb.to_device(w), cb.to_device(dy)
    np.testing.assert_allclose(cb.to_host(cb.linear_forward(xd, wd, cb.to_device(b))), x @ w.T)
    np.testing.assert_allclose(cb.to_host(cb.linear_backward_data(dyd, wd)), dy @ w)
    np.testing.assert_allclose(cb.to_host(cb.linear_backward_filter(xd, dyd)), dy.T @ x)
    assert cb.linear_backward_bias(dyd).shape == (3,)
    # convolution and the rest: shapes and argument lists
    for dtype in (np.float32, np.float64):
        x = cb.to_device(rng.standard_normal((2, 4, 9, 9)).astype(dtype))
        w = cb.to_device(rng.standard_normal((6, 2, 3, 3)).astype(dtype))
        y = cb.conv_forward(x, w, cb.zeros((6,), dtype), 2, 1, 2)
        assert y.shape == (2, 6, 5, 5) and y.dtype == dtype
        assert cb.conv_backward_data(y, w, x.shape, 2, 1, 2).shape == x.shape
        assert cb.conv_backward_filter(x, y, w.shape, 2, 1, 2).shape == w.shape
        assert cb.conv_backward_bias(y).shape == (6,)
        assert cb.relu_backward(cb.relu_forward(x), x).shape == x.shape
        for size in (5, 4):
            out = cb.lrn_forward(x, size, 1e-4, 0.75, 2.0)
            assert cb.lrn_backward(x, out, out, size, 1e-4, 0.75, 2.0).shape == x.shape
        pooled = cb.maxpool_forward(x, 3, 2)
        assert pooled.shape == (2, 4, 4, 4)
        assert cb.maxpool_backward(x, pooled, pooled, 3, 2).shape == x.shape
        # a y that did not come from maxpool_forward: the first maxima are found again
        assert cb.maxpool_backward(x, pooled.reshape(pooled.shape), pooled, 3, 2).shape == x.shape
        out, mask = cb.dropout_forward(x, 0.5, 1, 2, 3)
        assert out.shape == mask.shape == x.shape and mask.dtype == dtype
        assert cb.dropout_backward(out, mask, 0.5).shape == x.shape
        logits = cb.to_device(rng.standard_normal((5, 10)).astype(dtype))
        loss, dlogits = cb.softmax_cross_entropy(logits, np.arange(5))
        assert isinstance(loss, float) and dlogits.shape == (5, 10)
        assert len(cb.topk_correct(logits, np.arange(5), (1, 5))) == 2
        cb.sgd_momentum_update(w, w, w, 0.01, 0.9, 5e-4)
        before = len(launches)
        cb.sgd_momentum_update_many([w] * 70, [w] * 70, [w] * 70, [0.01] * 70, 0.9, [5e-4] * 70)
        assert launches[before:] == ["sgd_momentum_many" + ("_f32" if dtype == np.float32 else "_f64")] * 2
        cb.scale_(w, 0.5)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    from mpiconvnet.data import augment
    plan = augment.CropPlan(np.array([0, 1, 1]), np.array([[0, 1], [1, 0], [2, 2]]), np.array([True, False, True]),
                            None)
    assert cb.crop_flip_normalize(images, plan, 6, augment.mean_as_chw([1, 2, 3]), [4, 5, 6]).shape == (3, 3, 6, 6)
    cb.set_tf32(True)
    cb.set_tf32(False)
    import threading
    worker = threading.Thread(target=cb.use_in_this_thread)
    worker.start()
    worker.join()
    expected = {"bias_add_rows_f64", "bias_add_channels_f32", "sum_rows_f64", "sum_cols_f64", "relu_forward_f64",
                "relu_backward_f32", "lrn_forward_f32", "lrn_backward_f64",
                "maxpool_forward_f32", "maxpool_first_max_f64", "maxpool_backward_f64",
                "dropout_forward_f32", "dropout_apply_f64", "softmax_xent_f64", "label_rank_f32", "sgd_momentum_f64",
                "scale_f32", "crop_flip_normalize_f32"}
    assert expected <= set(launches)
    assert cb.cuda_aware_mpi(libraries=[]) is False


def _staging_plan(n, m):
    from mpiconvnet.data import augment
    return augment.CropPlan(np.arange(m) % n, np.tile([[1, 2]], (m, 1)), np.arange(m) % 2 == 1, None)


def test_staged_batches_order_the_copy_stream_and_the_compute_stream(fake_backend):
    # device_batches' pattern: the next batch staged on the copy stream before this one
    # is cropped and computed on; batch sizes grow, so staging memory is taken anew from the
    # pool, which hands out blocks the compute stream has just used (a 3-crop output of
    # 8 x 8 -> 4 x 4 is as many bytes as 3 images: 576)
    cb, launches = fake_backend
    cb.initialize(0, 1)
    order = sys.modules["pycuda.driver"].fake_order
    mean = np.zeros((3, 1, 1), np.float32)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), _staging_plan(n, m))
               for n, m in [(2, 3), (2, 2), (3, 3), (3, 3), (1, 2), (4, 4)]]
    staged = [cb.stage_batch(*batches[0], 4, mean)]
    for k in range(len(batches)):
        if k + 1 < len(batches):
            staged.append(cb.stage_batch(*batches[k + 1], 4, mean))
        if k == 1:
            cb.set_tf32(False)       # clears the descriptor cache; the staging areas stay
        x = cb.crop_staged(staged[k])
        assert x.shape == (len(batches[k][1]), 3, 4, 4)
        cb.scale_(x, 0.5)            # the step's work on x, on the compute stream
        del x                        # back to the pool
    copy_stream, stream = context.get().copy_stream, context.get().stream
    assert copy_stream is not stream and launches.count("crop_flip_normalize_f32") == len(batches)
    copies = [a[0] for a in order.accesses if a[4] == "htod"]
    # each batch's plan and pixels on the copy stream; the mean image on the compute stream,
    # once and again after set_tf32 cleared the cache that holds it
    assert copies.count(copy_stream.id) == 2 * len(batches) and copies.count(stream.id) == 2
    assert order.races() == []


def test_each_new_loader_s_equal_mean_reuses_the_one_device_copy(fake_backend):
    # every loader (each epoch, each evaluation) makes its own mean array: an equal one must
    # not leave another copy on the device each time (0.8 MB at 256 px, ~180 in a long run)
    cb, _ = fake_backend
    cb.initialize(0, 1)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    st = context.get()

    def staged_mean(mean):
        staged = cb.stage_batch(images, _staging_plan(2, 2), 4, mean)
        cb.crop_staged(staged)
        return staged.mean

    first = staged_mean(np.full((3, 1, 1), 5.0, np.float32))
    staged_mean(np.full((3, 1, 1), 5.0, np.float32))   # the second staging area's first use
    held = cb.memory_high_water()
    for epoch in range(5):
        assert staged_mean(np.full((3, 1, 1), 5.0, np.float32)) is first
    assert cb.memory_high_water() == held
    other = staged_mean(np.arange(3, dtype=np.float32).reshape(3, 1, 1) + np.zeros((3, 8, 8), np.float32))
    assert other is not first
    np.testing.assert_array_equal(cb.to_host(other)[2, 3], [0, 1, 2])   # (S, S, 3) on the device
    assert [key for key in st.descriptors if key[0] == "mean_image"] == [("mean_image", 8)]


def test_a_staged_batch_cropped_after_its_area_was_reused_is_an_error(fake_backend):
    cb, _ = fake_backend
    cb.initialize(0, 1)
    images, mean = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 1, 1), np.float32)
    first = cb.stage_batch(images, _staging_plan(2, 2), 4, mean)
    cb.stage_batch(images, _staging_plan(2, 2), 4, mean)
    cb.stage_batch(images, _staging_plan(2, 2), 4, mean)
    with pytest.raises(RuntimeError, match="crop_staged: this batch's staging area was reused"):
        cb.crop_staged(first)
    with pytest.raises(ValueError, match=r"images must be \(N, S, S, 3\) uint8"):
        cb.stage_batch(images[..., :2], _staging_plan(2, 2), 4, mean)


def test_use_in_this_thread_pushes_once_and_pops_when_the_thread_ends(fake_backend):
    # PyCUDA aborts the process when a thread ends with a context on its stack, and the
    # gradient-reduction thread of a CUDA-aware run calls use_in_this_thread() then ends
    cb, _ = fake_backend
    cb.initialize(0, 1)
    main = threading.get_ident()
    assert _FakeContext.depth[main] == 1
    cb.use_in_this_thread()               # the initialising thread: already current
    assert _FakeContext.depth[main] == 1
    inside = {}

    def communication_thread():
        cb.use_in_this_thread()
        cb.use_in_this_thread()           # idempotent
        inside["ident"], inside["depth"] = threading.get_ident(), _FakeContext.depth[threading.get_ident()]

    worker = threading.Thread(target=communication_thread)
    worker.start()
    worker.join()
    assert inside["depth"] == 1
    assert _FakeContext.depth[inside["ident"]] == 0, "the context is still pushed on a thread that ended"


def test_tf32_each_convolution_kind_runs_with_the_math_type_its_search_chose(fake_backend):
    # the stand-in cuDNN's fastest result has tensor-op math (1) for forward, FMA (3) for
    # backward data and tensor-op-with-conversion (2) for backward filter, which is passed
    # over for the FMA algorithm (3) after it; with TF32 allowed each kind must run, step
    # after step, with the math type its workspace was sized for
    cb, _ = fake_backend
    cb.initialize(0, 1)
    cb.set_tf32(True)
    lib = cudnn.lib()
    x = cb.to_device(np.ones((2, 4, 9, 9), np.float32))
    w = cb.to_device(np.ones((6, 2, 3, 3), np.float32))
    expected = {0: 1, 1: 3, 2: 3}
    for _ in range(2):   # the second step reuses the plan: the first step's searches are done
        y = cb.conv_forward(x, w, cb.zeros((6,), np.float32), 1, 1, 2)
        assert lib.fake_run_math(0) == lib.fake_size_math(0) == expected[0]
        cb.conv_backward_data(y, w, x.shape, 1, 1, 2)
        assert lib.fake_run_math(1) == lib.fake_size_math(1) == expected[1]
        cb.conv_backward_filter(x, y, w.shape, 1, 1, 2)
        assert lib.fake_run_math(2) == lib.fake_size_math(2) == expected[2]
    cb.set_tf32(False)
    cb.conv_forward(x, w, cb.zeros((6,), np.float32), 1, 1, 2)
    assert lib.fake_run_math(0) == cudnn.CUDNN_FMA_MATH   # TF32 off: FMA, the plan rebuilt


def test_missing_pycuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda raises ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(RuntimeError) as e:
        context.import_driver()
    assert "\n" not in str(e.value) and "pip install pycuda" in str(e.value) and "--backend numpy" in str(e.value)


def test_exit_closes_the_state_current_at_exit_only(monkeypatch):
    # a state swapped in and out again (the stand-in backend above) must not be closed at
    # exit: its handles would reach the real cuBLAS, which crashed pytest on a GPU node
    closed = []
    monkeypatch.setattr(context, "_state", types.SimpleNamespace(close=lambda: closed.append("current")))
    context._close_at_exit()
    assert closed == ["current"]
    monkeypatch.setattr(context, "_state", None)
    context._close_at_exit()
    assert closed == ["current"]


# --- convolutions through cuDNN's graph API (MPICONVNET_CUDNN_API=graph) ----------------------
# A stand-in for the cudnnBackend* functions: descriptors are records of their attributes,
# each attribute set with the type cudnn_graph.h gives it, finalize checks the required
# ones, and the heuristics offer the engines below. Time passes only in execute, by the
# engine's cost, and the stand-in events read that clock: the search can be checked.


_ATTRIBUTE_TYPES = {   # name -> type, from the descriptor docs in cudnn_graph.h
    **{n: graph.TYPE_INT64 for n in (900, 902, 903, 906, 102, 103, 104, 105, 106, 402, 1000)},
    901: graph.TYPE_DATA_TYPE, 100: graph.TYPE_DATA_TYPE, 101: graph.TYPE_CONVOLUTION_MODE,
    **{n: graph.TYPE_BACKEND_DESCRIPTOR for n in (702, 703, 704, 705, 708, 709, 710, 711, 714, 715, 716, 717,
                                                   801, 201, 202, 300, 401)},
    800: graph.TYPE_HANDLE, 400: graph.TYPE_HANDLE, 200: graph.TYPE_HEUR_MODE,
    1303: graph.TYPE_NUMERICAL_NOTE, 1305: graph.TYPE_BEHAVIOR_NOTE, 1001: graph.TYPE_VOID_PTR,
    1003: graph.TYPE_VOID_PTR,
}
_REQUIRED = {
    graph.TENSOR: {900, 901, 902, 903, 906}, graph.CONVOLUTION: {100, 101, 102, 103, 104, 105, 106},
    **{graph.OPERATION[kind]: set(attrs.values()) for kind, attrs in graph.OPERATION_ATTRS.items()},
    graph.OPERATIONGRAPH: {800, 801}, graph.ENGINEHEUR: {200, 201}, graph.EXECUTION_PLAN: {400, 401},
    graph.VARIANT_PACK: {1000, 1001, 1003},
}
# (numerical notes, workspace bytes or None when its plan fails to build, ms per run or None
# when its execute fails[, behaviour notes[, the heuristics mode offering it: A unless said]])
_ENGINES = [({graph.NOTE_TENSOR_CORE}, 0, 0.5), ({graph.NOTE_DOWN_CONVERT_INPUTS}, 0, 0.4), (set(), 1 << 40, 0.3),
            (set(), None, 0.2), (set(), 4096, 2.0), (set(), 0, 1.5)]


def _engine_field(engine, field):
    """Field 3 (behaviour notes) or 4 (heuristics mode) of an _ENGINES entry, defaults filled."""
    entry = _ENGINES[engine]
    return entry[field] if len(entry) > field else (set() if field == 3 else graph.HEUR_MODE_A)


class _FakeBackendApi:
    def __init__(self):
        self.descriptors, self.clock, self.executed, self.created = {}, 0.0, [], {}
        self.destroyed = []   # the pointers given to cudnnBackendDestroyDescriptor, in order
        self.workspaces = []  # the workspace address of each execute, beside executed
        self.failing_heuristics = set()   # heuristics modes whose query fails

    def _record(self, pointer):
        return self.descriptors[pointer.value if isinstance(pointer, ctypes.c_void_p) else pointer]

    def cudnnBackendCreateDescriptor(self, kind, out):
        record = {"kind": kind, "attrs": {}, "final": False}
        key = id(record)
        self.descriptors[key] = record
        self.created[kind] = self.created.get(kind, 0) + 1
        out._obj.value = key
        return 0

    def cudnnBackendDestroyDescriptor(self, pointer):
        self.destroyed.append(pointer.value if isinstance(pointer, ctypes.c_void_p) else pointer)
        return 0

    def cudnnBackendSetAttribute(self, pointer, name, attr_type, count, array):
        record = self._record(pointer)
        assert not record["final"], "an attribute set after finalize"
        expected = _ATTRIBUTE_TYPES.get(name)
        if expected is None:   # alpha and beta: float or double, by the data type
            assert attr_type in (graph.TYPE_FLOAT, graph.TYPE_DOUBLE), f"attribute {name} set as type {attr_type}"
        else:
            assert attr_type == expected, f"attribute {name} set as type {attr_type}, cuDNN reads {expected}"
        element = graph._ELEMENT[attr_type]
        values = ctypes.cast(array, ctypes.POINTER(element))[:count] if count else []
        if attr_type == graph.TYPE_BACKEND_DESCRIPTOR:
            values = [self._record(v) for v in values]
        record["attrs"][name] = values
        return 0

    def cudnnBackendFinalize(self, pointer):
        record = self._record(pointer)
        missing = _REQUIRED.get(record["kind"], set()) - set(record["attrs"])
        assert not missing, f"descriptor kind {record['kind']} finalized without attributes {missing}"
        if record["kind"] == graph.EXECUTION_PLAN:
            engine = record["attrs"][401][0]["engine"]
            if _ENGINES[engine][1] is None:
                return 3000   # CUDNN_STATUS_NOT_SUPPORTED
        if record["kind"] == graph.ENGINEHEUR and record["attrs"][200][0] in self.failing_heuristics:
            return 3001   # CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN
        record["final"] = True
        return 0

    def cudnnBackendGetAttribute(self, pointer, name, attr_type, requested, count, array):
        record = self._record(pointer)
        assert record["final"], "an attribute read before finalize"
        if name == graph.ENGINEHEUR_RESULTS:
            offered = [e for e in range(len(_ENGINES)) if _engine_field(e, 4) == record["attrs"][200][0]]
            # as cuDNN: asked for none, it says how many there are
            if requested == 0:
                count._obj.value = len(offered)
                return 0
            values = offered[:requested]
            for index, engine in enumerate(values):
                self._record(ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p))[index]).update(
                    engine=engine, final=True)
        elif name == graph.ENGINECFG_ENGINE:
            values = [record["engine"]]
            self._record(ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p))[0]).update(engine=record["engine"],
                                                                                     final=True)
        elif name in (graph.ENGINE_NUMERICAL_NOTE, graph.ENGINE_BEHAVIOR_NOTE):
            engine = record["engine"]
            values = sorted(_ENGINES[engine][0] if name == graph.ENGINE_NUMERICAL_NOTE else _engine_field(engine, 3))
            values = values[:requested]
            for index, note in enumerate(values):
                ctypes.cast(array, ctypes.POINTER(ctypes.c_int))[index] = note
        elif name == graph.EXECUTION_PLAN_WORKSPACE_SIZE:
            values = [_ENGINES[record["attrs"][401][0]["engine"]][1]]
            ctypes.cast(array, ctypes.POINTER(ctypes.c_int64))[0] = values[0]
        else:
            raise AssertionError(f"attribute {name} read")
        count._obj.value = len(values)
        return 0

    def cudnnBackendExecute(self, handle, plan, pack):
        plan, pack = self._record(plan), self._record(pack)
        assert plan["final"] and pack["final"]
        engine = plan["attrs"][401][0]["engine"]
        if _ENGINES[engine][2] is None:
            return 5000   # CUDNN_STATUS_EXECUTION_FAILED
        self.clock += _ENGINES[engine][2]
        self.executed.append((engine, dict(zip(pack["attrs"][1000], pack["attrs"][1001]))))
        self.workspaces.append(pack["attrs"][1003][0])
        return 0


@pytest.fixture
def graph_backend(fake_backend, monkeypatch):
    cb, _ = fake_backend
    api = _FakeBackendApi()
    monkeypatch.setattr(graph, "lib", lambda: api)
    monkeypatch.setattr(graph, "_declared", api)
    monkeypatch.setenv("MPICONVNET_CUDNN_API", "graph")
    cb.initialize(0, 1)
    st = context.get()

    class TimedEvent:   # reads the stand-in's clock, which only execute advances
        def record(self, stream):
            self.at = api.clock

        def synchronize(self):
            pass

        def time_since(self, start):
            return self.at - start.at

    monkeypatch.setattr(st.drv, "Event", lambda flags=0: TimedEvent())
    return cb, api, st


def test_graph_api_convolutions_search_once_and_run_with_each_kinds_operands(graph_backend):
    cb, api, st = graph_backend
    assert st.cudnn_api == "graph"
    x = cb.to_device(np.ones((2, 4, 9, 9), np.float32))
    w = cb.to_device(np.ones((6, 2, 3, 3), np.float32))
    for step in range(2):
        api.executed.clear()
        y = cb.conv_forward(x, w, cb.zeros((6,), np.float32), 2, 1, 2)
        dx = cb.conv_backward_data(y, w, x.shape, 2, 1, 2)
        dw = cb.conv_backward_filter(x, y, w.shape, 2, 1, 2)
        assert y.shape == (2, 6, 5, 5) and dx.shape == x.shape and dw.shape == w.shape
        runs = [run for run in api.executed]
        if step == 0:
            # TF32 off: the tensor-core engine (0) and the down-converting one (1) are passed
            # over, 2 needs too much workspace, 3 fails to build; 4 and 5 are timed (one
            # untimed and three timed runs each) and 5, the faster, runs
            assert [engine for engine, _ in runs] == ([4] * 4 + [5] * 4 + [5]) * 3
            packs = api.created[graph.VARIANT_PACK]
        else:
            assert [engine for engine, _ in runs] == [5, 5, 5]
            assert api.created[graph.VARIANT_PACK] == packs, "the second step's pointers repeat: packs are reused"
        ids = graph.UIDS
        forward, data, filter_ = [pointers for _, pointers in (runs[8::9] if step == 0 else runs)]
        assert forward == {ids["x"]: x.ptr, ids["w"]: w.ptr, ids["y"]: y.ptr}
        assert data == {ids["x"]: dx.ptr, ids["w"]: w.ptr, ids["y"]: y.ptr}
        assert filter_ == {ids["x"]: x.ptr, ids["w"]: dw.ptr, ids["y"]: y.ptr}
        del y, dx, dw        # as a step's arrays are freed before the next step makes its own
    assert api.created[graph.OPERATIONGRAPH] == 3          # one search per kind, in the first step
    cb.set_tf32(True)                                      # tensor cores allowed: engine 0 is fastest
    api.executed.clear()
    cb.conv_forward(x, w, cb.zeros((6,), np.float32), 2, 1, 2)
    assert api.executed[-1][0] == 0


def test_graph_api_without_a_usable_engine_says_why(graph_backend, monkeypatch):
    cb, api, st = graph_backend
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [({graph.NOTE_TENSOR_CORE}, 0, 1.0), (set(), 1 << 40, 1.0),
                                                            (set(), None, 1.0)])
    x = cb.to_device(np.ones((2, 4, 9, 9), np.float32))
    w = cb.to_device(np.ones((6, 2, 3, 3), np.float32))
    with pytest.raises(cudnn.CudnnError) as e:
        cb.conv_forward(x, w, cb.zeros((6,), np.float32), 1, 1, 2)
    message = str(e.value)
    assert "no usable engine for the convolution forward of x (2, 4, 9, 9) with w (6, 2, 3, 3)" in message
    assert "1 down-convert their inputs, or use tensor cores with TF32 off" in message and "MiB workspace" in message and "1 plans failed to build" in message


def test_graph_api_search_times_every_candidate_in_one_scratch_workspace_given_back_after(graph_backend,
                                                                                         monkeypatch):
    # grown candidate by candidate through the state's workspace, the pool kept a block of
    # every size passed: 3.97 GB held against 2.07 on an H200
    cb, api, st = graph_backend
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 1000, 0.3), (set(), 3000, 0.5),
                                                            (set(), 2000, 0.4)])
    pool = st.pool.fake
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [0] * 4 + [1] * 4 + [2] * 4 + [0]
    assert len(set(api.workspaces[:12])) == 1, "the candidates were timed in more than one workspace"
    assert st.workspace.size == 1000   # the chosen engine's, as cudnnFind* leaves it
    assert 3000 not in pool.free and all(n != 3000 for n in pool.live.values()), "the scratch is still held"


def test_graph_api_search_times_the_first_32_usable_engines(graph_backend, monkeypatch):
    # on an H200 the fastest of conv2's engines were the heuristics' 7th, 11th and 28th
    cb, api, st = graph_backend
    engines = [(set(), 0, 1.0 - 0.01 * k) for k in range(33)]   # each faster than the one before
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", engines)
    _graph_conv_forward(cb)
    assert api.executed[-1][0] == graph.FIND_CANDIDATES - 1 == 31


def test_graph_api_tries_engines_needing_runtime_compilation_when_every_precompiled_one_fails_to_run(
        graph_backend, monkeypatch):
    cb, api, st = graph_backend
    nvrtc = {graph.NOTE_RUNTIME_COMPILATION}
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, None), (set(), 0, 0.4, nvrtc),
                                                            (set(), 0, None)])
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [1]


def test_graph_api_descriptors_held_past_the_state_are_destroyed_before_its_cudnn_handle(graph_backend):
    # a test's traceback kept plans alive past State.close; the garbage collector then
    # destroyed them after the handle and its CUDA context: a segfault on an H200
    cb, api, st = graph_backend
    _graph_conv_forward(cb)
    held = list(st.descriptors.values())[0].plans["forward"][0]   # an execution plan
    pointer = held.ptr.value
    order = []
    destroy_handle = st.dnn.destroy
    st.dnn.destroy = lambda: (order.append(("handle", len(api.destroyed))), destroy_handle())
    st.close()
    assert pointer in api.destroyed[:order[0][1]], "the plan was not destroyed before the handle"
    assert held.ptr is None
    count = len(api.destroyed)
    del held
    gc.collect()
    assert len(api.destroyed) == count, "a descriptor destroyed twice"


def test_auto_api_runs_convolutions_through_the_graph_api_with_tf32_and_the_legacy_api_without(graph_backend,
                                                                                             monkeypatch):
    # the legacy API's Winograd and FFT algorithms won in true float32 on an H200, the graph API's engines in TF32
    cb, api, st = graph_backend
    monkeypatch.setattr(st, "cudnn_api", "auto")
    kinds = {}
    for tf32 in (True, False):
        cb.set_tf32(tf32)
        assert st.conv_api() == ("graph" if tf32 else "legacy")
        assert st.conv_api(np.float64) == "legacy"   # TF32 is a float32 mode
        _graph_conv_forward(cb)
        kinds[tf32] = {type(plan).__name__ for plan in st.descriptors.values() if "Conv" in type(plan).__name__}
    assert kinds == {True: {"GraphConvPlan"}, False: {"ConvPlan"}}
    monkeypatch.setattr(st, "cudnn_api", "graph")
    assert st.conv_api() == "graph"


def _graph_conv_forward(cb):
    x = cb.to_device(np.ones((2, 4, 9, 9), np.float32))
    w = cb.to_device(np.ones((6, 2, 3, 3), np.float32))
    return cb.conv_forward(x, w, cb.zeros((6,), np.float32), 1, 1, 2)


def test_graph_api_takes_the_fallback_heuristics_when_mode_a_fails_or_offers_nothing(graph_backend, monkeypatch):
    cb, api, st = graph_backend
    fallback = graph.HEUR_MODE_FALLBACK
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [({graph.NOTE_TENSOR_CORE}, 0, 0.1),
                                                            (set(), 0, 1.0, set(), fallback),
                                                            (set(), 0, 0.5, set(), fallback)])
    _graph_conv_forward(cb)            # mode A offers only a tensor-core engine, TF32 is off
    assert api.executed[-1][0] == 2    # the faster of the two fallback engines
    cb.set_tf32(False)                 # a new search
    api.failing_heuristics = {graph.HEUR_MODE_A}
    api.executed.clear()
    _graph_conv_forward(cb)
    assert api.executed[-1][0] == 2
    api.failing_heuristics = {graph.HEUR_MODE_A, fallback}
    cb.set_tf32(False)
    with pytest.raises(cudnn.CudnnError) as e:
        _graph_conv_forward(cb)
    assert "among 0 configurations: the mode A heuristics failed (CUDNN_STATUS_BAD_PARAM); the fallback " \
           "heuristics failed" in str(e.value)


def test_graph_api_tries_engines_needing_runtime_compilation_only_when_no_other_serves(graph_backend,
                                                                                      monkeypatch):
    cb, api, st = graph_backend
    nvrtc = {graph.NOTE_RUNTIME_COMPILATION}
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, 0.1, nvrtc), (set(), 0, 1.0),
                                                            (set(), 0, 0.5, nvrtc), (set(), 0, 0.7)])
    monkeypatch.setattr(st, "find_algorithms", False)   # the first usable one, untimed
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [1]
    # timed: the precompiled ones only, though an NVRTC one would be faster (each builds for seconds)
    monkeypatch.setattr(st, "find_algorithms", True)
    cb.set_tf32(False)
    api.executed.clear()
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [1] * 4 + [3] * 4 + [3]
    # no precompiled engine builds its plan: the NVRTC ones are timed
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, 0.1, nvrtc), (set(), None, 1.0),
                                                            (set(), 0, 0.5, nvrtc)])
    cb.set_tf32(True)
    api.executed.clear()
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [0] * 4 + [2] * 4 + [0]


def test_graph_api_without_behaviour_notes_keeps_the_heuristics_order(graph_backend, monkeypatch):
    # an older cuDNN that cannot say which engines need NVRTC: the ordering is lost, not the convolution
    cb, api, st = graph_backend
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, 0.1, {graph.NOTE_RUNTIME_COMPILATION}),
                                                            (set(), 0, 1.0)])
    answer = api.cudnnBackendGetAttribute

    def no_behaviour_notes(pointer, name, *args):
        return 3000 if name == graph.ENGINE_BEHAVIOR_NOTE else answer(pointer, name, *args)
    monkeypatch.setattr(api, "cudnnBackendGetAttribute", no_behaviour_notes)
    monkeypatch.setattr(st, "find_algorithms", False)
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [0]


def test_graph_api_drops_an_engine_whose_run_fails_in_the_search(graph_backend, monkeypatch):
    cb, api, st = graph_backend
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, None), (set(), 0, 1.0)])
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [1] * 5
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, None), (set(), 0, None)])
    cb.set_tf32(False)
    with pytest.raises(cudnn.CudnnError, match=r"2 plans failed to build or to run \(CUDNN_STATUS_BAD_PARAM\)"):
        _graph_conv_forward(cb)


def test_graph_api_passes_over_an_engine_that_cannot_tell_its_numerical_notes(graph_backend, monkeypatch):
    cb, api, st = graph_backend
    monkeypatch.setattr(sys.modules[__name__], "_ENGINES", [(set(), 0, 0.1), (set(), 0, 1.0)])
    answer, asked = api.cudnnBackendGetAttribute, []

    def first_engine_has_no_notes(pointer, name, *args):
        if name == graph.ENGINE_NUMERICAL_NOTE:
            asked.append(pointer)
            if len(asked) == 1:
                return 3000   # CUDNN_STATUS_NOT_SUPPORTED
        return answer(pointer, name, *args)
    monkeypatch.setattr(api, "cudnnBackendGetAttribute", first_engine_has_no_notes)
    _graph_conv_forward(cb)
    assert [engine for engine, _ in api.executed] == [1]   # the only candidate left: run untimed


def test_cudnn_api_setting_is_checked():
    assert context.cudnn_api_from_env({}) == "auto"
    assert context.cudnn_api_from_env({"MPICONVNET_CUDNN_API": " "}) == "auto"
    assert context.cudnn_api_from_env({"MPICONVNET_CUDNN_API": "legacy"}) == "legacy"
    assert context.cudnn_api_from_env({"MPICONVNET_CUDNN_API": "graph"}) == "graph"
    with pytest.raises(ValueError, match="MPICONVNET_CUDNN_API='v8': use auto"):
        context.cudnn_api_from_env({"MPICONVNET_CUDNN_API": "v8"})


def _real_cudnn():
    """The real libcudnn (9 or later) when one loads and builds backend descriptors here."""
    try:
        lib = libs.load_cudnn()
        if lib.cudnnGetVersion() < 90000:
            return None
        cudnn._declare(lib)
    except Exception:
        return None
    return lib


def test_graph_api_descriptors_are_accepted_by_the_real_cudnn(monkeypatch):
    # needs no GPU: tensor, convolution and operation descriptors finalize on the host, where
    # cuDNN checks their attribute types and that the shapes make the convolution (groups
    # included); the operation graph needs a handle, so a GPU
    monkeypatch.setattr(cudnn, "_lib", None)
    real = _real_cudnn()
    if real is None:
        pytest.skip("no cuDNN 9 library loads here (CI has none; a GPU node has one: run scripts/gpu-check.sh)")
    monkeypatch.setattr(cudnn, "_lib", real)
    monkeypatch.setattr(graph, "_declared", None)
    for x_shape, w_shape, stride, pad in [((8, 3, 224, 224), (64, 3, 11, 11), 4, 2), ((8, 96, 27, 27), (256, 48, 5, 5), 1, 2)]:
        y_shape = cudnn.conv_output_shape(x_shape, w_shape, stride, pad)
        for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
            try:
                tensors = {"x": graph.tensor("x", x_shape, dtype), "w": graph.tensor("w", w_shape, dtype),
                           "y": graph.tensor("y", y_shape, dtype)}
            except cudnn.CudnnError as e:
                if "SUBLIBRARY_LOADING_FAILED" in str(e):
                    pytest.skip(f"cuDNN's sublibraries do not load here ({e}): they need libcuda")
                raise
            conv = graph.convolution(stride, pad, dtype)
            for kind in ("forward", "data", "filter"):
                graph.operation(kind, conv, tensors, dtype)
    f32 = np.dtype(np.float32)
    wrong = {"x": graph.tensor("x", (2, 4, 9, 9), f32), "w": graph.tensor("w", (6, 2, 3, 3), f32),
             "y": graph.tensor("y", (2, 6, 4, 4), f32)}
    with pytest.raises(cudnn.CudnnError, match="cudnnBackendFinalize failed"):
        graph.operation("forward", graph.convolution(2, 1, f32), wrong, f32)
    assert graph.variant_pack({1: 1 << 40, 2: 2 << 40, 3: 3 << 40}, 0).ptr


def test_a_bad_setting_is_a_one_line_setup_error_before_any_context_is_pushed(fake_backend, monkeypatch):
    # PyCUDA aborts at exit with "context stack was not empty" if a context stays pushed
    from mpiconvnet import distributed
    for name, value in (("MPICONVNET_CUDNN_API", "v8"), ("MPICONVNET_TF32", "yes"),
                        ("MPICONVNET_CUDNN_WORKSPACE_MB", "lots")):
        with monkeypatch.context() as setting:
            setting.setenv(name, value)
            message = distributed._initialize_gpu(0, 1)   # the reason this rank cannot start
        assert name in message and "\n" not in message
        assert _FakeContext.depth.get(threading.get_ident(), 0) == 0 and not context.is_initialized()


def test_a_gpu_taken_in_exclusive_process_mode_is_a_one_line_reason(fake_backend, monkeypatch):
    # PyCUDA's errors are no RuntimeErrors: without the conversion each rank printed a traceback
    from mpiconvnet import distributed
    drv = sys.modules["pycuda.driver"]

    def busy(self):
        raise drv.Error("cuDevicePrimaryCtxRetain failed: CUDA-capable device(s) is/are busy or unavailable")
    monkeypatch.setattr(drv.Device, "retain_primary_context", busy)
    message = distributed._initialize_gpu(0, 2)
    assert message.startswith("CUDA device 0 (local rank 0) cannot be used: cuDevicePrimaryCtxRetain failed")
    assert "exclusive-process" in message and "MPS" in message and "\n" not in message
    assert not context.is_initialized()
