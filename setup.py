"""mpiconvnet: AlexNet-class convnets on ImageNet across many GPUs and nodes with MPI.

Install (CPU, with a pip-only MPI):   pip install -e .[test]
Install on a GPU node:                pip install -e .[cuda]
"""
from setuptools import find_packages, setup

setup(
    name="mpiconvnet",
    version="0.1.0",
    description="Data-parallel AlexNet training with MPI, a NumPy reference backend and a CUDA backend",
    packages=find_packages(include=["mpiconvnet", "mpiconvnet.*", "preprocess", "preprocess.*"]),
    package_data={"mpiconvnet.backends.cuda": ["kernels/*.cu", "kernels/*.cuh", "kernels/prebuilt/*.fatbin"]},
    python_requires=">=3.11",
    install_requires=[
        "numpy>=1.24",
        "h5py>=3.8",
        "pillow>=10",
        "simplejpeg>=1.7",   # DCT-domain downscaling: the cheapest correct JPEG decode
        "scipy>=1.10",       # reads and writes the devkit's meta.mat
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "mpi4py>=3.1",
        # a pip-installable MPI so `mpiexec` exists in the venv with no root or compiler;
        # on clusters build mpi4py against the site MPI instead (see README).
        "mpich>=4.1; sys_platform == 'linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2"],
        # the GPU stack: PyCUDA for memory, streams and our kernels; cuBLAS and cuDNN are
        # reached through ctypes (see README: why not scikit-cuda).
        "cuda": ["pycuda>=2024.1"],
    },
)
