"""Packing speed: `python -m preprocess folder` against a naive Pillow pipeline, same run.

    python -m mpiconvnet.bench preprocess
    python -m mpiconvnet.bench preprocess --images 400 --image-size 256 --workers 1,2 --repeats 3

A fixed synthetic set of ~500x375 JPEGs (ImageNet's typical size, seeded) is packed into
S x S raw shards by
  naive:  for each file Image.open -> convert("RGB") -> resize shorter side to S ->
          centre crop -> np.asarray, written into one HDF5 dataset (what theano_alexnet-
          style scripts do), on one core;
  ours:   the full `python -m preprocess folder` command (planning, decoding, shard
          writing, checksums, statistics, index) with --workers N for each N asked.
Runs are interleaved (naive, ours x N, naive, ...) and the best of --repeats kept, because
the machine may be shared: the best run is the one least disturbed by other load.
Reported: images/s, images/s per core, ours/naive per core (target >= 1.5) and the speed-up
from 1 to N workers (target: near N).
"""
import argparse
import io
import os
import shutil
import tempfile
import time

import h5py
import numpy as np
from PIL import Image


def make_inputs(root, count, seed=0, classes=10):
    """count ~500x375 JPEGs in root/CLASS/ (a class-folder tree), generated once per run."""
    from preprocess.synth import draw, encode, image_size_for
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        c = i % classes
        folder = os.path.join(root, f"class{c:02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:05d}.jpg")
        with open(path, "wb") as stream:
            stream.write(encode(draw(c, rng, *image_size_for(rng, 500, 375))))
        paths.append(path)
    return paths


def naive_pipeline(paths, size, out_path):
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for k, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        images[k] = np.asarray(image.crop((left, top, left + size, top + size)))
    with h5py.File(out_path, "w") as shard:
        shard.create_dataset("images", data=images)


def our_pipeline(train_dir, out_dir, size, workers, shard_size):
    from preprocess.__main__ import main
    code = main(["folder", "--train", train_dir, "--out", out_dir, "--image-size", str(size),
                 "--shard-size", str(shard_size), "--workers", str(workers), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"python -m preprocess folder exited {code}")


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m mpiconvnet.bench preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="synthetic JPEGs to pack (default 400)")
    parser.add_argument("--image-size", type=int, default=256, help="S (default 256)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; best kept (default 3)")
    parser.add_argument("--shard-size", type=int, default=50, help="images per shard (default 50)")
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",")]
    scratch = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        train = os.path.join(scratch, "train")
        start = time.perf_counter()
        paths = make_inputs(train, args.images)
        print(f"inputs: {args.images} synthetic JPEGs around 500x375 in {time.perf_counter() - start:.1f} s; "
              f"S={args.image_size}, cpus={os.cpu_count()}, best of {args.repeats} interleaved runs")
        best = {"naive": float("inf"), **{w: float("inf") for w in worker_counts}}
        for repeat in range(args.repeats):
            out = os.path.join(scratch, "naive.h5")
            best["naive"] = min(best["naive"], timed(lambda: naive_pipeline(paths, args.image_size, out)))
            for workers in worker_counts:
                out_dir = os.path.join(scratch, f"ours-{workers}-{repeat}")
                seconds = timed(lambda: our_pipeline(train, out_dir, args.image_size, workers, args.shard_size))
                best[workers] = min(best[workers], seconds)
                shutil.rmtree(out_dir)
        naive_rate = args.images / best["naive"]
        print(f"{'pipeline':<22}{'seconds':>9}{'images/s':>10}{'per core':>10}{'vs naive/core':>15}")
        print(f"{'naive Pillow, 1 core':<22}{best['naive']:>9.2f}{naive_rate:>10.0f}{naive_rate:>10.0f}{1.0:>15.2f}")
        for workers in worker_counts:
            rate = args.images / best[workers]
            per_core = rate / workers
            print(f"{f'ours, {workers} worker(s)':<22}{best[workers]:>9.2f}{rate:>10.0f}{per_core:>10.0f}"
                  f"{per_core / naive_rate:>15.2f}")
        if 1 in worker_counts:
            for workers in worker_counts:
                if workers > 1:
                    print(f"speed-up 1 -> {workers} workers: {best[1] / best[workers]:.2f}x (ideal {workers}x)")
            print(f"target ours/naive per core >= 1.5: {'met' if args.images / best[1] / naive_rate >= 1.5 else 'NOT met'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
