#!/usr/bin/env bash
# The host time of a CUDA training step, measured on a machine without a GPU.
#
#   scripts/host-time.sh [bench step options]     # no options: --model alexnet-owt --batch 8 --steps 300;
#                                                 # any option: bench step's defaults for the rest
#   scripts/host-time.sh --run COMMAND...         # any command over the same fake GPU, e.g.
#       scripts/host-time.sh --run .venv/bin/mpiexec -n 2 python -m mpiconvnet.train --backend cuda ...
#   (`python` is the build's venv; MPICONVNET_ALLOW_GPU_SHARING=1 lets ranks share the one
#   fake GPU): every CUDA code path of training, evaluation and the parallel modes runs
#   through the real PyCUDA and our ctypes bindings, with numbers that mean nothing.
#
# On a GPU, small or TF32 steps are bound by the host: Python, PyCUDA and ctypes queueing
# ~90 calls per step (docs/benchmarks.md). This runs `bench step --backend cuda` over a CUDA
# driver, cuDNN and cuBLAS that do no work (scripts/host_time/*.c): device memory is host
# memory, copies copy, launches and library calls return at once. The step time it prints
# is then our side of the host time alone, a lower bound of what a GPU node's host spends
# (the real driver adds a few us per call, legacy cuDNN ~73 us per call on cuDNN 9.19).
# Use it to compare host-side changes; the GPU comparison with PyTorch stays
# `bench step --backend cuda` on a GPU node.
#
# Needs nvcc and cuda.h (the CUDA toolkit, no driver) and a C++ compiler: PyCUDA is built
# once from vendor/ against the fake driver, into $BUILD (default .host-time/, ~5 minutes on
# 2 cores). PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/.host-time}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || { echo "host-time: nvcc not found: put the CUDA toolkit's bin/ on PATH" >&2; exit 2; }
if [ -z "${CUDA_ROOT:-}" ]; then
    # nvcc may be a symlink or a wrapper script: ask it where its toolkit is (as gpu-check.sh)
    top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    CUDA_ROOT=$(readlink -f "${top:-$(dirname "$(readlink -f "$NVCC")")/..}")
fi
[ -f "$CUDA_ROOT/include/cuda.h" ] || { echo "host-time: no cuda.h under $CUDA_ROOT/include: set CUDA_ROOT" >&2; exit 2; }
SRC=$ROOT/scripts/host_time
LIB=$BUILD/lib
VENV=$BUILD/venv
mkdir -p "$LIB"

# 1. the fake driver's own functions; PyCUDA links against this first version
cc -O2 -fPIC -Wall -I"$CUDA_ROOT/include" -c "$SRC/fake_cuda.c" -o "$BUILD/fake_cuda.o"
if [ ! -f "$LIB/libcuda.so.1" ]; then
    cc -shared -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so.1" "$BUILD/fake_cuda.o"
    ln -sf libcuda.so.1 "$LIB/libcuda.so"
fi

# 2. PyCUDA from vendor/, built against it, in a venv that also sees $PYTHON's packages
# (it cannot be imported before step 3 completes the driver, so look for its extension)
if ! ls "$VENV"/lib/python*/site-packages/pycuda/_driver*.so >/dev/null 2>&1; then
    "$PYTHON" -m venv "$VENV"
    "$PYTHON" -c "import site, sys; print('\n'.join(site.getsitepackages()))" \
        > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/parent-env.pth"
    "$VENV/bin/pip" install -q --no-index --find-links vendor pytools mako platformdirs siphash24 typing_extensions
    "$VENV/bin/pip" install -q setuptools wheel 2>/dev/null \
        || "$VENV/bin/pip" install -q --no-index --find-links vendor setuptools wheel
    rm -rf "$BUILD/pycuda-src" && mkdir -p "$BUILD/pycuda-src"
    tar xzf vendor/pycuda-*.tar.gz -C "$BUILD/pycuda-src" --strip-components=1
    (cd "$BUILD/pycuda-src" \
        && "$VENV/bin/python" configure.py --cuda-root="$CUDA_ROOT" --cudadrv-lib-dir="$LIB" --no-cuda-enable-curand \
        && echo "building PyCUDA against the fake driver (log: $BUILD/pycuda-build.log)" \
        && "$VENV/bin/pip" install --no-build-isolation --no-index . > "$BUILD/pycuda-build.log" 2>&1) \
        || { echo "host-time: PyCUDA did not build; see $BUILD/pycuda-build.log" >&2; exit 1; }
fi

# 3. every other driver function PyCUDA links to: a stub that says "not supported"
DRIVER_SO=$(ls "$VENV"/lib/python*/site-packages/pycuda/_driver*.so)
comm -23 <(nm -D --undefined-only "$DRIVER_SO" | awk '$2 ~ /^cu/ {print $2}' | sort -u) \
         <(nm --defined-only "$BUILD/fake_cuda.o" | awk '$3 ~ /^cu/ {print $3}' | sort -u) \
    | awk '{print "int " $1 "(void) { return 801; /* CUDA_ERROR_NOT_SUPPORTED */ }"}' > "$BUILD/stubs.c"
cc -O2 -fPIC -c "$BUILD/stubs.c" -o "$BUILD/stubs.o"
cc -shared -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so.1" "$BUILD/fake_cuda.o" "$BUILD/stubs.o"

# 4. cuDNN and cuBLAS that do nothing, under the sonames the backend looks for
cc -O2 -fPIC -shared -Wall -DLIBRARY='"cuDNN"' -Wl,-soname,libcudnn.so.9 -o "$LIB/libcudnn.so.9" "$SRC/fake_dnn_blas.c"
cc -O2 -fPIC -shared -Wall -DLIBRARY='"cuBLAS"' -Wl,-soname,libcublas.so.13 -o "$LIB/libcublas.so.13" "$SRC/fake_dnn_blas.c"

if [ "${1:-}" = --run ]; then
    shift
    [ $# -gt 0 ] || { echo "host-time: --run needs a command" >&2; exit 2; }
    # the mpich wheel's libmpi is found next to the interpreter that installed it, not ours
    PARENT_LIB=$("$PYTHON" -c "import sys; print(sys.prefix)")/lib
    export PATH=$VENV/bin:$PATH MPICONVNET_CUDA_LIBS=$LIB LD_PRELOAD=$LIB/libcuda.so.1 \
        LD_LIBRARY_PATH=$LIB:$PARENT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} MPICONVNET_ALLOW_GPU_SHARING=1
    exec "$@"
fi
[ $# -gt 0 ] || set -- --model alexnet-owt --batch 8 --steps 300
# the fake libraries print their calls per step at exit: steps = warm-up (10) + timed
steps=30
for ((i = 1; i < $#; i++)); do [ "${!i}" = --steps ] && { j=$((i + 1)); steps=${!j}; }; done
export HOST_TIME_STEPS=$((steps + 10))
# preloaded too: a PyCUDA linked "as needed" against a driver without symbols does not name it
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} MPICONVNET_CUDA_LIBS=$LIB LD_PRELOAD=$LIB/libcuda.so.1
echo "host time over the fake driver (no GPU work; a lower bound of a GPU node's host time per step):"
exec "$VENV/bin/python" -m mpiconvnet.bench step --backend cuda --no-torch --warmup 10 "$@"
