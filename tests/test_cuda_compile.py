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
