"""Every backend offers every function the interface in mpiconvnet/backends/__init__.py
names, with the same parameters (importing the CUDA backend needs no GPU)."""
import inspect
import re

import pytest

import mpiconvnet.backends as backends


def interface_functions():
    """{name: [parameter names]} parsed from the interface's docstring."""
    found = {}
    for name, params in re.findall(r"^    (\w+)\(([^)]*)\)", backends.__doc__, re.M):
        found[name] = [p.strip().split("=")[0] for p in params.split(",") if p.strip()]
    return found


def test_the_interface_lists_the_ops():
    names = interface_functions()
    assert {"conv_forward", "lrn_backward", "dropout_forward", "sgd_momentum_update", "mpi_buffer"} <= set(names)


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS))
def test_backend_implements_every_function_with_the_same_parameters(backend):
    module = backends.get_backend(backend)
    assert isinstance(module.HOST_MEMORY, bool)
    for name, params in interface_functions().items():
        assert hasattr(module, name), f"{backend} backend lacks {name}"
        signature = inspect.signature(getattr(module, name))
        assert list(signature.parameters)[:len(params)] == params, f"{backend}.{name}{signature} vs {params}"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of numpy, cuda"):
        backends.get_backend("tpu")
