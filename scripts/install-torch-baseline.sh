#!/usr/bin/env bash
# PyTorch is not a dependency: it is the baseline the benchmarks compare against and the
# reference some tests pin conventions to (those skip, saying so, without it). Install it
# only where it costs no download of a multi-GB CUDA build: this machine kind keeps a
# CPU wheel on disk, which `pip install torch==2.13.0` picks up.
PY=${1:-.venv/bin/python}
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0 || echo "install-torch-baseline: torch did not install; PyTorch comparisons will be skipped"
else
    echo "install-torch-baseline: no local CPU torch wheel; PyTorch comparisons will be skipped (pip install torch to enable)"
fi
