#!/usr/bin/env bash
# gpu-check.sh: everything the CUDA backend needs checked, in one command, on any GPU node.
#
#   scripts/gpu-check.sh [OUTDIR]        (default: gpu-check-<host>-<date>/)
#
# 1. records the machine (nvidia-smi, nvcc, python, CUDA_VISIBLE_DEVICES);
# 2. creates / reuses a venv (VENV, default .venv-gpu; --system-site-packages, so a site
#    or module-provided PyTorch / CUDA libraries stay visible) and installs what is missing:
#    the project, pycuda (a wheel for this Python from vendor/, else built from the sdist), and
#    cuBLAS / cuDNN wheels only when no usable copy is found (see docs/gpu.md);
# 3. runs the CUDA tests (logic, nvcc compile, every op against the NumPy reference), and
#    the convolution tests again through each cuDNN API alone (graph, legacy);
# 4. trains alexnet-mini for 2 epochs on synthetic shards with --backend cuda (FP32, then
#    TF32), then on 2 ranks with mpiexec: on 2 GPUs --parallel data, hybrid and model; on
#    1 GPU, ranks sharing it, the same three and --sync async on 3 ranks;
# 5. runs the step benchmark against PyTorch on the same GPU (alexnet and alexnet-owt,
#    float32, then TF32, at batch 128; alexnet-owt in TF32 at batch 8, where the host bounds it),
#    alexnet-owt in TF32 again with the convolutions through cuDNN's legacy API,
#    and the input benchmark (the step fed by the loader against the step on a resident batch);
# and writes OUTDIR/report.md with every step's status, time and log. The exit status is
# non-zero when any step failed. Steps keep going after a failure so one run shows all.
#
# Environment:
#   PYTHON=python3.11     interpreter the venv is made from (default python3)
#   VENV=.venv-gpu        the venv (an existing one is reused)
#   OFFLINE=1             never use a package index, only vendor/ (auto when pip's index,
#                         PIP_INDEX_URL / pip.conf or else pypi.org, does not answer)
#   CUDA_WHEELS=cu12|cu13 which nvidia-* wheels to install if the libraries are missing
#                         (default: the driver's CUDA major version, cu13 from CUDA 13 on)
#   SKIP_BENCH=1          skip the benchmark
#   ONLY=cuda-tests,bench-input-*   run only these steps (comma-separated names or shell
#                         patterns; the set-up steps always run): for a GPU lent by the
#                         10-minute call, one part of the check per call
#   PROFILE=1             also profile alexnet-owt TF32, the case short of PyTorch
#                         (docs/benchmarks.md): host time at batch 8 (--host-profile, cProfile)
#                         and GPU kernels at batch 128 (--profile, torch.profiler)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-gpu-check-$(hostname -s 2>/dev/null || echo host)-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
FAILED=0

echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)" > "$REPORT"
echo "" >> "$REPORT"
echo "| step | status | seconds | log |" >> "$REPORT"
echo "|---|---|---|---|" >> "$REPORT"

# step NAME COMMAND...: run it, log to OUTDIR/NAME.log, add a row to the report
SETUP_STEPS="machine venv install-project install-pycuda cuda-libraries shards"

# selected NAME: whether ONLY (unset: every step) asks for step NAME
selected() {
    local pattern patterns
    [ -z "${ONLY:-}" ] && return 0
    case " $SETUP_STEPS " in *" $1 "*) return 0 ;; esac
    IFS=, read -r -a patterns <<< "$ONLY"
    for pattern in "${patterns[@]}"; do
        # shellcheck disable=SC2254
        case "$1" in $pattern) return 0 ;; esac
    done
    return 1
}

step() {
    local name=$1; shift
    local log="$OUT/$name.log" start end status
    if ! selected "$name"; then
        echo "| $name | skipped (ONLY=$ONLY) | 0 | |" >> "$REPORT"
        return 0
    fi
    echo "== $name: $*"
    start=$(date +%s)
    ( "$@" ) > "$log" 2>&1
    status=$?
    end=$(date +%s)
    if [ $status -eq 0 ]; then
        echo "| $name | PASS | $((end - start)) | $name.log |" >> "$REPORT"
    else
        FAILED=1
        echo "| $name | **FAIL ($status)** | $((end - start)) | $name.log |" >> "$REPORT"
        echo "   FAILED ($status); last lines of $log:"; tail -n 15 "$log" | sed 's/^/   | /'
    fi
    return $status
}

# --- 1. the machine ---------------------------------------------------------------------------
machine() {
    echo "## nvidia-smi"; nvidia-smi || echo "nvidia-smi: absent"
    echo "## nvcc"; (command -v nvcc && nvcc --version) || echo "nvcc: not on PATH (prebuilt kernels needed: docs/gpu.md)"
    echo "## python"; command -v "$PYTHON"; "$PYTHON" --version
    echo "## CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
    echo "## LD_LIBRARY_PATH=${LD_LIBRARY_PATH-<unset>}"
}
step machine machine

# a node without a working driver and GPU can show nothing here: say so before installing
# gigabytes of CUDA libraries and failing every step
if ! "$PYTHON" - >> "$OUT/machine.log" 2>&1 <<'EOF'
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    sys.exit(f"no CUDA driver (libcuda.so.1 does not load: {e})")
count = ctypes.c_int(0)
status = cuda.cuInit(0)
if status != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
    sys.exit(f"the CUDA driver sees no usable GPU (cuInit returned {status}, {count.value} device(s); "
             f"CUDA_VISIBLE_DEVICES and nvidia-smi say more)")
print(f"CUDA driver: {count.value} GPU(s)")
EOF
then
    echo "gpu-check: $(tail -n 1 "$OUT/machine.log"); run it on a GPU node (the CPU backend's tests are make test)" >&2
    echo "| gpu | **FAIL**: $(tail -n 1 "$OUT/machine.log") | 0 | machine.log |" >> "$REPORT"
    exit 1
fi

# --- 2. environment ---------------------------------------------------------------------------
if [ -z "${OFFLINE:-}" ]; then
    # ask the index pip would use (a site mirror from PIP_INDEX_URL or pip.conf), not only
    # pypi.org: a node that reaches only its mirror is not offline; `timeout` also bounds a
    # DNS lookup that never answers, which urlopen's own timeout does not cover
    INDEX_URL=${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
    INDEX_URL=${INDEX_URL:-https://pypi.org/simple}
    if timeout 20 "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
            "${INDEX_URL%/}/pip/" >/dev/null 2>&1; then
        OFFLINE=0
    else
        OFFLINE=1
    fi
fi
PIP_SOURCES=(--find-links "$ROOT/vendor")
[ "$OFFLINE" = 1 ] && PIP_SOURCES+=(--no-index)
echo "package index: $([ "$OFFLINE" = 1 ] && echo "none (vendor/ only)" || echo "reachable (vendor/ is one more source; pip takes the newest version from either)")" | tee -a "$OUT/machine.log"

make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV" || return 1
        # --system-site-packages shows the *base* interpreter's packages. When PYTHON is
        # itself a venv (an image's or a module's PyTorch venv), its packages, PyTorch and the
        # CUDA library wheels among them, would be invisible: list them in a .pth file, which
        # puts them after the new venv's own packages and before the base interpreter's.
        "$PYTHON" - "$VENV/bin/python" <<'EOF'
import pathlib, site, subprocess, sys
if sys.prefix != sys.base_prefix:
    target = subprocess.check_output(
        [sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    pathlib.Path(target, "_parent_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    print("the packages of", sys.prefix, "are visible through", target + "/_parent_venv.pth")
EOF
    fi
    "$VENV/bin/python" -m pip --version
}
step venv make_venv || { echo "cannot create the venv $VENV; see $OUT/venv.log"; exit 1; }
PY="$ROOT/$VENV/bin/python"
[ -x "$PY" ] || PY="$VENV/bin/python"

install_project() {
    # offline nodes build from what is installed, so the build tools must be there first
    "$PY" -c "import setuptools, wheel" 2>/dev/null || "$PY" -m pip install "${PIP_SOURCES[@]}" setuptools wheel
    # the project and its test extra; --no-build-isolation lets offline nodes build from
    # what is installed (setuptools, wheel) instead of fetching build requirements
    "$PY" -m pip install "${PIP_SOURCES[@]}" --no-build-isolation -e ".[test]"
}
step install-project install_project

install_pycuda() {
    if "$PY" -c "import pycuda.driver" 2>/dev/null; then
        "$PY" -c "import pycuda; print('pycuda', pycuda.VERSION_TEXT, 'already installed')"
        return 0
    fi
    # a wheel built for this Python (vendor/, docs/gpu.md) needs no toolkit; PyPI has none
    if ! "$PY" -m pip install "${PIP_SOURCES[@]}" --only-binary pycuda pycuda; then
        # else build the sdist against the CUDA toolkit. PyCUDA's setup reads the toolkit from
        # its siteconf.py (configure.py writes it), else from where nvcc is; nvcc may be a
        # symlink or a wrapper script elsewhere, so ask nvcc where its toolkit is (TOP=...)
        if [ -z "${CUDA_ROOT:-}" ] && command -v nvcc >/dev/null; then
            top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
            CUDA_ROOT=$(readlink -f "${top:-$(dirname "$(readlink -f "$(command -v nvcc)")")/..}")
        fi
        if [ ! -f "${CUDA_ROOT:-}/include/cuda.h" ]; then
            echo "no cuda.h under CUDA_ROOT=${CUDA_ROOT:-<unset>}/include: set CUDA_ROOT to the CUDA toolkit, or put a pycuda wheel for this Python in vendor/"
            return 1
        fi
        local src="$OUT/pycuda-src" sdist
        sdist=$(ls "$ROOT"/vendor/pycuda-*.tar.gz 2>/dev/null | tail -n 1)
        if [ -z "$sdist" ]; then
            "$PY" -m pip download "${PIP_SOURCES[@]}" --no-deps --no-binary pycuda -d "$OUT/pycuda-sdist" pycuda || return 1
            sdist=$(ls "$OUT"/pycuda-sdist/pycuda-*.tar.gz | tail -n 1)
        fi
        echo "building pycuda from $sdist against CUDA_ROOT=$CUDA_ROOT"
        rm -rf "$src" && mkdir -p "$src" && tar xzf "$sdist" -C "$src" --strip-components=1 || return 1
        (cd "$src" && "$PY" configure.py --cuda-root="$CUDA_ROOT" \
            && "$PY" -m pip install "${PIP_SOURCES[@]}" --no-build-isolation .) || return 1
    fi
    "$PY" -c "import pycuda.driver as d; d.init(); print('pycuda OK,', d.Device.count(), 'device(s)')"
}
step install-pycuda install_pycuda

find_libraries() {
    "$PY" - <<'EOF'
from mpiconvnet.backends.cuda import libs, mpi_cuda
for name, load in (("cuBLAS", libs.load_cublas), ("cuDNN", libs.load_cudnn)):
    lib = load()
    print(f"{name}: {lib._name}")
import ctypes
from mpiconvnet.backends.cuda import cudnn
print("cuDNN version:", cudnn.lib().cudnnGetVersion())
EOF
}
install_cuda_libraries() {
    if find_libraries; then return 0; fi
    if [ -z "${CUDA_WHEELS:-}" ]; then   # the wheels for the CUDA major version the driver runs
        CUDA_WHEELS=cu$("$PY" -c "import ctypes; v = ctypes.c_int(); ctypes.CDLL('libcuda.so.1').cuDriverGetVersion(ctypes.byref(v)); print(min(max(v.value // 1000, 12), 13))")
    fi
    echo "cuBLAS / cuDNN not found where docs/gpu.md says we look; installing the $CUDA_WHEELS wheels"
    "$PY" -m pip install "${PIP_SOURCES[@]}" "nvidia-cublas-$CUDA_WHEELS" "nvidia-cudnn-$CUDA_WHEELS"
    find_libraries
}
step cuda-libraries install_cuda_libraries

# --- 3. tests ---------------------------------------------------------------------------------
cuda_tests() {
    local status=0
    # -X faulthandler: a crash, even at interpreter exit, prints the Python stacks
    "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" \
        tests/test_cuda_logic.py tests/test_cuda_compile.py tests/test_cuda_ops.py || status=1
    # every cuda-marked test elsewhere in the suite (models, trainer) too, even after a failure above
    "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider -m cuda tests || [ $? -eq 5 ] || status=1
    [ $status -eq 0 ] || return 1
    gpu_op_tests_ran "$OUT/cuda-tests.xml"
}
# gpu_op_tests_ran JUNIT_XML: a run where the GPU op tests skipped proves nothing
gpu_op_tests_ran() {
    "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
ran = int(suite.get("tests")) - int(suite.get("skipped"))
ops = [c for c in suite.iter("testcase") if "test_cuda_ops" in c.get("classname", "")]
skipped_ops = [c for c in ops if c.find("skipped") is not None]
print(f"{ran} tests ran; {len(ops) - len(skipped_ops)} of {len(ops)} GPU op tests ran")
sys.exit(1 if not ops or skipped_ops else 0)
EOF
}
step cuda-tests cuda_tests
# the convolutions once more through each cuDNN API alone (MPICONVNET_CUDNN_API; the default,
# auto, takes the graph API with TF32 and the legacy one without: docs/gpu.md item 17)
cuda_tests_api() {
    MPICONVNET_CUDNN_API=$1 "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider \
        --junitxml="$OUT/cuda-tests-$1.xml" tests/test_cuda_ops.py -k "conv or alexnet" || return 1
    gpu_op_tests_ran "$OUT/cuda-tests-$1.xml"
}
step cuda-tests-graph cuda_tests_api graph
step cuda-tests-legacy cuda_tests_api legacy

# --- 4. training on synthetic shards ----------------------------------------------------------
DATA="$OUT/data"
make_shards() {
    rm -rf "$DATA"
    "$PY" -m preprocess synth --out "$DATA/raw" --classes 10 --per-class 40 --layout folder &&
    "$PY" -m preprocess folder --train "$DATA/raw/train" --val "$DATA/raw/val" --out "$DATA/shards" --image-size 64
}
step shards make_shards
train_one_gpu() {
    "$PY" -m mpiconvnet.train --data "$DATA/shards" --out "$DATA/run-1gpu" --model alexnet-mini --backend cuda \
        --epochs 2 --global-batch 64
}
step train-1gpu train_one_gpu
# with TF32 the convolutions go through cuDNN's graph API (MPICONVNET_CUDNN_API=auto)
train_one_gpu_tf32() {
    MPICONVNET_TF32=1 "$PY" -m mpiconvnet.train --data "$DATA/shards" --out "$DATA/run-1gpu-tf32" \
        --model alexnet-mini --backend cuda --epochs 2 --global-batch 64
}
step train-1gpu-tf32 train_one_gpu_tf32
GPUS=$("$PY" -c "import pycuda.driver as d; d.init(); print(d.Device.count())" 2>/dev/null || echo 0)
MPIEXEC="$(dirname "$PY")/mpiexec"
command -v "$MPIEXEC" >/dev/null || MPIEXEC=$(command -v mpiexec || true)
if [ "${GPUS:-0}" -eq 1 ] && [ -n "$MPIEXEC" ]; then
    # one GPU: ranks share it, which still runs the MPI path (staging, buckets, the gathers
    # of --parallel hybrid and model, the parameter server's exchanges) end to end
    train_two_ranks_shared() {
        for parallel in data hybrid model; do
            MPICONVNET_ALLOW_GPU_SHARING=1 "$MPIEXEC" -n 2 "$PY" -m mpiconvnet.train --data "$DATA/shards" \
                --out "$DATA/run-2rank-$parallel" --model alexnet-mini --backend cuda --epochs 2 --global-batch 64 \
                --parallel $parallel || return 1
        done
        MPICONVNET_ALLOW_GPU_SHARING=1 "$MPIEXEC" -n 3 "$PY" -m mpiconvnet.train --data "$DATA/shards" \
            --out "$DATA/run-3rank-async" --model alexnet-mini --backend cuda --epochs 2 --global-batch 64 \
            --sync async
    }
    step train-2rank-1gpu train_two_ranks_shared
elif [ "${GPUS:-0}" -eq 1 ]; then
    echo "| train-2rank-1gpu | skipped (no mpiexec next to $PY or on PATH) | 0 | |" >> "$REPORT"
fi
if [ "${GPUS:-0}" -ge 2 ] && [ -n "$MPIEXEC" ]; then
    train_two_gpus() {
        "$PY" -c "from mpi4py import MPI; from mpiconvnet.backends.cuda import cuda_aware_mpi; print('CUDA-aware MPI:', cuda_aware_mpi())"
        "$MPIEXEC" -n 2 "$PY" -m mpiconvnet.train --data "$DATA/shards" --out "$DATA/run-2gpu" --model alexnet-mini \
            --backend cuda --epochs 2 --global-batch 64
    }
    step train-2gpu train_two_gpus
    train_two_gpus_split() {   # layers split across the two GPUs (--parallel hybrid, model)
        for parallel in hybrid model; do
            "$MPIEXEC" -n 2 "$PY" -m mpiconvnet.train --data "$DATA/shards" --out "$DATA/run-2gpu-$parallel" \
                --model alexnet-mini --backend cuda --epochs 2 --global-batch 64 --parallel $parallel || return 1
        done
    }
    step train-2gpu-split train_two_gpus_split
else
    echo "| train-2gpu | skipped ($GPUS GPU(s) or no mpiexec) | 0 | |" >> "$REPORT"
fi

# --- 5. benchmark -----------------------------------------------------------------------------
if [ -z "${SKIP_BENCH:-}" ]; then
    # alexnet has LRN, which PyTorch computes from generic ops; alexnet-owt (torchvision's) has none
    for model in alexnet alexnet-owt; do
        step bench-$model-fp32 "$PY" -m mpiconvnet.bench step --model $model --batch 128 --backend cuda --json
        step bench-$model-tf32 "$PY" -m mpiconvnet.bench step --model $model --batch 128 --backend cuda --tf32 --json
    done
    # the step fed by the loader (25 MB of pixels a step) against the same step on a resident
    # batch: what the next batch's copy on the copy stream hides (device_batches vs model_input)
    step bench-input-owt-tf32 "$PY" -m mpiconvnet.bench input --model alexnet-owt --batch 128 --backend cuda --tf32 \
        --workers 8 --json
    # batch 8: the GPU work is small, so the ratio is the host time per step (ours vs PyTorch's)
    step bench-alexnet-owt-tf32-b8 "$PY" -m mpiconvnet.bench step --model alexnet-owt --batch 8 --backend cuda --tf32 \
        --steps 100 --json
    # the same two cases with the convolutions through cuDNN's legacy API (cudnnFind*'s
    # algorithms, a call each), which the graph API replaced as TF32's default
    step bench-alexnet-owt-tf32-b8-legacy env MPICONVNET_CUDNN_API=legacy "$PY" -m mpiconvnet.bench step \
        --model alexnet-owt --batch 8 --backend cuda --tf32 --steps 100 --json
    step bench-alexnet-owt-tf32-legacy env MPICONVNET_CUDNN_API=legacy "$PY" -m mpiconvnet.bench step \
        --model alexnet-owt --batch 128 --backend cuda --tf32 --json
    if [ -n "${PROFILE:-}" ]; then
        step profile-host-owt-tf32 "$PY" -m mpiconvnet.bench step --model alexnet-owt --batch 8 --backend cuda --tf32 \
            --host-profile
        step profile-gpu-owt-tf32 "$PY" -m mpiconvnet.bench step --model alexnet-owt --batch 128 --backend cuda --tf32 \
            --profile
    fi
fi

{
    echo ""
    echo "## machine"; echo '```'; cat "$OUT/machine.log"; echo '```'
    echo "## libraries"; echo '```'; cat "$OUT/cuda-libraries.log" 2>/dev/null; echo '```'
    for name in cuda-tests bench-alexnet-fp32 bench-alexnet-tf32 bench-alexnet-owt-fp32 bench-alexnet-owt-tf32 \
                bench-alexnet-owt-tf32-b8 bench-alexnet-owt-tf32-b8-legacy bench-alexnet-owt-tf32-legacy \
                bench-input-owt-tf32 profile-host-owt-tf32 profile-gpu-owt-tf32; do
        [ -f "$OUT/$name.log" ] || continue
        echo "## $name (last 40 lines)"; echo '```'; tail -n 40 "$OUT/$name.log"; echo '```'
    done
} >> "$REPORT"
echo "report: $REPORT"
exit $FAILED
