"""mpiconvnet: data-parallel AlexNet training with MPI."""
__version__ = "0.1.0"
