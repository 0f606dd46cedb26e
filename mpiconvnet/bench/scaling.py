"""Weak scaling of the synchronous training step: per-rank images/s at -np N ÷ at -np 1.

    python -m mpiconvnet.bench scaling [--model alexnet-mini] [--batch 64] [--ranks 2]

Each run is the trainer's own step (forward, backward with the bucketed allreduce
overlapped, SGD update) on in-memory synthetic batches, one BLAS thread per rank, the
same batch per rank at every rank count; the data loader has its own benchmark
(`bench loader`). Target: >= 0.9 at 2 ranks. Run it on an otherwise idle machine: with
ranks = cores, anything else running takes its time out of the ranks'.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def worker(args):
    from mpiconvnet import distributed
    from mpiconvnet.buckets import GradientBuckets, GradientReducer
    from mpiconvnet.models import build_model
    from mpiconvnet.optim import SGD

    world = distributed.init("numpy", threads=1)
    net = build_model(args.model, num_classes=1000, seed=0)
    buckets = GradientBuckets(net.ops, net.param_shapes, np.float32, 25 * 2**20)
    net.use_gradient_arrays(buckets.views)
    reducer = GradientReducer(world, buckets, overlap=args.overlap == "on", average=False)
    opt = SGD(net.ops, net.params)
    rng = np.random.default_rng(world.rank)
    x = rng.normal(0, 1, size=(args.batch, 3, net.input_size, net.input_size)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch)
    times = []
    for step in range(args.warmup + args.steps):
        world.barrier()
        start = time.perf_counter()
        reducer.begin()
        net.loss_and_grads(x, labels, step=step, sample_offset=world.rank * args.batch,
                           on_grads_ready=reducer.grads_ready, grad_scale=1.0 / world.size)
        reducer.finish()
        opt.step(net.grads, 0.001)
        times.append(time.perf_counter() - start)
    reducer.close()
    step_time = float(np.median(times[args.warmup:]))
    slowest = world.comm.allreduce(step_time, op=__import__("mpi4py").MPI.MAX) if world.size > 1 else step_time
    if world.is_root:
        print("RESULT " + json.dumps({"ranks": world.size, "step_s": slowest, "per_rank_images_per_s": args.batch / slowest}))
    return 0


def run_with(ranks, args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpiconvnet.bench", "scaling", "--worker",
               "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--overlap", args.overlap]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv):
    p = argparse.ArgumentParser(prog="python -m mpiconvnet.bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet-mini")
    p.add_argument("--batch", type=int, default=64, help="images per rank per step")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--overlap", choices=("on", "off"), default="on")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    one = run_with(1, args)
    many = run_with(args.ranks, args)
    print(f"{args.model}, batch {args.batch} per rank, 1 thread per rank, allreduce overlap {args.overlap}, "
          f"median of {args.steps} steps")
    print(f"{'ranks':>6}{'s/step':>10}{'images/s per rank':>20}{'images/s total':>16}")
    for r in (one, many):
        print(f"{r['ranks']:>6}{r['step_s']:>10.3f}{r['per_rank_images_per_s']:>20.1f}"
              f"{r['per_rank_images_per_s'] * r['ranks']:>16.1f}")
    ratio = many["per_rank_images_per_s"] / one["per_rank_images_per_s"]
    print(f"per-rank throughput at {args.ranks} ranks / 1 rank: {ratio:.2f}   (target >= 0.9)")
    return 0
