#!/usr/bin/env bash
# The whole job on a small built-in data set: generate -> pack -> train on 2 MPI ranks ->
# evaluate -> plot. Run by `make demo` after the venv is installed; about a minute on 2 cores.
# DEMO_OUT (default demo-out) is where everything goes; it is rebuilt from scratch.
# DEMO_BACKEND=cuda trains and evaluates on GPUs (the 2 ranks may share one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
OUT=${DEMO_OUT:-demo-out}
# two ranks on two cores: one BLAS thread each, or they fight over the cores
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
BACKEND=${DEMO_BACKEND:-numpy}
[ "$BACKEND" = cuda ] && export MPICONVNET_ALLOW_GPU_SHARING=1

rm -rf "$OUT"
echo "== 1/5 a synthetic ImageNet-layout set (train tar of class tars, val tar, devkit)"
"$PY" -m preprocess synth --out "$OUT/raw" --classes 10 --per-class 100 --layout imagenet --size 160x120
echo "== 2/5 pack it into HDF5 shards (2 workers), then verify them"
"$PY" -m preprocess imagenet --train "$OUT/raw/ILSVRC2012_img_train.tar" --val "$OUT/raw/ILSVRC2012_img_val.tar" \
    --devkit "$OUT/raw/ILSVRC2012_devkit_t12.tar.gz" --out "$OUT/shards" --image-size 64 --workers 2 --no-progress
"$PY" -m preprocess verify "$OUT/shards"
echo "== 3/5 train alexnet-mini on 2 MPI ranks"
"$MPIEXEC" -n 2 "$PY" -m mpiconvnet.train --config configs/demo.toml --data "$OUT/shards" --out "$OUT/run" \
    --backend "$BACKEND"
echo "== 4/5 evaluate the last checkpoint with 10 crops"
"$PY" -m mpiconvnet.evaluate --data "$OUT/shards" --checkpoint "$OUT/run" --crops 10 --backend "$BACKEND" | tee "$OUT/evaluation.txt"
echo "== 5/5 plot"
"$PY" -m mpiconvnet.plot "$OUT/run"
echo
echo "results: $OUT/run/metrics.jsonl (every step and evaluation), $OUT/run/training.png (plot),"
echo "         $OUT/run/checkpoints/ (HDF5), $OUT/evaluation.txt (top-1/top-5, chance is 0.10 / 0.50)"
