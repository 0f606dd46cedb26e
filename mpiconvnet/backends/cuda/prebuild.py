"""Compile the kernels ahead of time into fat binaries, for GPU nodes without nvcc.

PyCUDA compiles kernels/*.cu with nvcc on first use. An air-gapped node whose CUDA
installation has a driver but no toolkit can run prebuilt fat binaries instead: build them
on any machine with nvcc (no GPU needed) and carry kernels/prebuilt/ with the code.

    python -m mpiconvnet.backends.cuda.prebuild            # all architectures nvcc knows (>= sm_75)
    python -m mpiconvnet.backends.cuda.prebuild --arch 80 90

Each file gets SASS for every listed architecture plus PTX for the newest, which the
driver JIT-compiles for GPUs newer than the build.
"""
import os
import shutil
import subprocess
import sys

from mpiconvnet.cli import Parser

from .context import KERNEL_DIR, NVCC_OPTIONS, PREBUILT_DIR

DEFAULT_ARCHS = ("75", "80", "86", "89", "90", "100", "120")


def nvcc_path():
    """nvcc from PATH, else CUDA_HOME / CUDA_PATH, else /usr/local/cuda (None if absent)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def supported_archs(nvcc):
    """The sm_XX numbers this nvcc can build, as strings ('90', ...)."""
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    return [line.strip()[3:] for line in out.split() if line.strip().startswith("sm_")]


def gencode_flags(archs):
    """-gencode flags: SASS for each arch, PTX for the newest."""
    archs = sorted(set(archs), key=int)
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def build(archs=None, out_dir=PREBUILT_DIR, nvcc=None):
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise SystemExit("prebuild: nvcc not found; put the CUDA toolkit's bin/ on PATH or set CUDA_HOME")
    available = supported_archs(nvcc)
    archs = [a for a in (archs or DEFAULT_ARCHS) if a in available]
    if not archs:
        raise SystemExit(f"prebuild: none of the requested architectures is supported by {nvcc} ({', '.join(available)})")
    os.makedirs(out_dir, exist_ok=True)
    built = []
    for name in sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu")):
        target = os.path.join(out_dir, name[:-3] + ".fatbin")
        subprocess.run([nvcc, "-fatbin", *NVCC_OPTIONS, *gencode_flags(archs), "-I", KERNEL_DIR, "-o", target,
                        os.path.join(KERNEL_DIR, name)], check=True)
        built.append(target)
    return built


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", help="compute capabilities without the dot, e.g. 80 90")
    parser.add_argument("--out", default=PREBUILT_DIR, help="output directory (default: kernels/prebuilt)")
    args = parser.parse_args(argv)
    for path in build(args.arch, args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
