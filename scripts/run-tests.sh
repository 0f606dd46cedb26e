#!/usr/bin/env bash
# The test suite, as CI runs it (`make test` -> this script):
#  1. the collective tests inside `mpiexec -n 2`, where the rank-valued checks see 2 ranks;
#  2. every test in one process (MPI tests start their own `mpiexec -n 2/3` subprocesses);
#  3. the SLURM tests against a real local cluster when one can be started (root + Debian).
# The last summary printed is the SLURM run's where it runs, else the whole suite's.
# pytest's exit code 5 (no tests collected) fails the run like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=$(dirname "$PY")/mpiexec
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1

"$MPIEXEC" -n 2 "$PY" -m pytest -q -p no:cacheprovider tests/test_collectives.py
"$PY" -m pytest -q -m "not slurm" tests

# 3. SLURM: a real one-node cluster on localhost (needs root and Debian's packages, as CI
#    has); a cluster it started is stopped on exit, one already running (someone else's on a
#    shared machine) is used and left running: two test runs at once share it, and the one
#    that started it stops it when it ends. Elsewhere the SLURM tests are skipped.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if bash scripts/local-slurm.sh running; then
    echo "run-tests: a local SLURM cluster is already running: using it, and leaving it running"
    bash scripts/local-slurm.sh wait   # not start: a start that fails stops the cluster, someone else's here
  else
    trap 'bash scripts/local-slurm.sh stop' EXIT
    bash scripts/local-slurm.sh start
  fi
  eval "$(bash scripts/local-slurm.sh env)"
  MPICONVNET_REQUIRE_SLURM=1 "$PY" -m pytest -q -p no:cacheprovider -m slurm tests/test_slurm.py
else
  echo "run-tests: not root with apt-get: the SLURM tests (tests/test_slurm.py) are skipped here"
fi
