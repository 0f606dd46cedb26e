"""Weak scaling of the training step: per-rank images/s at -np N ÷ at -np 1.

    python -m mpiconvnet.bench scaling [--model alexnet-mini] [--batch 64] [--ranks 2]
    python -m mpiconvnet.bench scaling --sync params --average-every 4     # local SGD

Each run is the trainer's own step (forward, backward with the bucketed allreduce
overlapped, SGD update; or, with --sync params, a local update and every K steps the
averaging of weights and momentum) on in-memory synthetic batches, one BLAS thread per
rank, the same batch per rank at every rank count; the data loader has its own benchmark
(`bench loader`). Step time is the mean over the timed steps (a median would hide the
averaging steps of --sync params), the median is printed beside it. Target: >= 0.9 at
2 ranks. Run it on an otherwise idle machine: with ranks = cores, anything else running
takes its time out of the ranks'.

Also measured, as a control: the same N ranks computing the same steps with no
communication at all. Its ratio to 1 rank is what the machine itself allows N processes
(shared memory bandwidth, caches, clocks), a bound for any synchronous method; the
target's ratio divided by it is what communication costs.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from mpiconvnet.bench._args import at_least, model_names
from mpiconvnet.bench._launch import is_mpi_rank, mpiexec_path, refuse_a_task_of_a_foreign_srun, run_child
from mpiconvnet.cli import Parser

RUNS_AS_MPI_RANKS = True   # its --worker runs do; started as one process, it starts them itself


def worker(args):
    from mpiconvnet import distributed
    from mpiconvnet.averaging import ReplicaAverager
    from mpiconvnet.backends import get_backend
    from mpiconvnet.buckets import GradientReducer
    from mpiconvnet.model_parallel import Shards
    from mpiconvnet.models import build_model
    from mpiconvnet.optim import SGD
    from mpiconvnet.trainer import attach_gradient_buckets, replicated

    world = distributed.init("numpy", threads=1)
    shards = None
    if args.parallel == "hybrid":
        shards = Shards(world.comm, world.rank, world.size, get_backend("numpy"))
    net = build_model(args.model, num_classes=1000, seed=0, shards=shards)
    buckets = attach_gradient_buckets(net, 25 * 2**20)
    opt = SGD(net.ops, net.params)
    if args.sync == "grads":
        reducer = GradientReducer(world, buckets, overlap=args.overlap == "on", average=False)
    else:
        averager = ReplicaAverager(world, net.ops, [*net.params.values(), *opt.velocity.values()])
    rng = np.random.default_rng(world.rank)
    x = rng.normal(0, 1, size=(args.batch, 3, net.input_size, net.input_size)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch)
    times = []
    for step in range(args.warmup + args.steps):
        world.barrier()
        start = time.perf_counter()
        if args.no_communication:   # the control: each rank on its own, the same work
            net.loss_and_grads(x, labels, step=step, sample_offset=world.rank * args.batch)
            opt.step(net.grads, 0.001)
        elif args.sync == "grads":
            reducer.begin()
            net.loss_and_grads(x, labels, step=step, sample_offset=world.rank * args.batch,
                               on_grads_ready=lambda names: reducer.grads_ready(replicated(net, names)),
                               grad_scale=1.0 / world.size)
            reducer.finish()
            opt.step(net.grads, 0.001)
        else:   # the trainer's --sync params step
            net.loss_and_grads(x, labels, step=step, sample_offset=world.rank * args.batch)
            opt.step(net.grads, 0.001)
            if (step + 1) % args.average_every == 0:
                averager.average()
        times.append(time.perf_counter() - start)
    if args.sync == "grads":
        reducer.close()
    timed = times[args.warmup:]
    step_time, median = float(np.mean(timed)), float(np.median(timed))
    if world.size > 1:
        from mpi4py import MPI
        step_time, median = (world.comm.allreduce(t, op=MPI.MAX) for t in (step_time, median))
    if world.is_root:
        print("RESULT " + json.dumps({"ranks": world.size, "step_s": step_time, "median_step_s": median,
                                      "per_rank_images_per_s": args.batch / step_time}))
    return 0


def run_with(ranks, args, communicate=True):
    command = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "mpiconvnet.bench", "scaling", "--worker",
               "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--overlap", args.overlap, "--sync", args.sync,
               "--average-every", str(args.average_every)]
    # the control runs whole models: a split one cannot run without its collectives
    command += ["--parallel", args.parallel] if communicate else ["--parallel", "data", "--no-communication"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code, out, err = run_child(command, env=env, capture=True)
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not results:
        # mpiexec says which rank died, and how, on stdout
        said = "\n".join(part.strip()[-2000:] for part in (out, err) if part.strip())
        raise SystemExit(f"bench scaling: {' '.join(command)} failed (exit {code}):\n{said}")
    return json.loads(results[-1][len("RESULT "):])


def main(argv):
    p = Parser(prog="python -m mpiconvnet.bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=model_names(), default="alexnet-mini")
    p.add_argument("--batch", type=at_least(1), default=64, help="images per rank per step")
    p.add_argument("--ranks", type=at_least(2), default=2, help="ranks compared with 1")
    p.add_argument("--steps", type=at_least(1), default=20)
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--overlap", choices=("on", "off"), default="on")
    p.add_argument("--sync", choices=("grads", "params"), default="grads",
                   help="grads: allreduce gradients every step; params: average weights and momentum every "
                        "--average-every steps (the trainer's --sync)")
    p.add_argument("--average-every", type=at_least(1), default=1, help="--sync params: steps between averagings")
    p.add_argument("--parallel", choices=("data", "hybrid"), default="data",
                   help="hybrid: fc layers split across the ranks (the trainer's --parallel)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-communication", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.average_every != 1 and args.sync != "params":
        p.error(f"--average-every {args.average_every} applies to --sync params only")
    if args.parallel == "hybrid" and args.sync != "grads":
        p.error("--parallel hybrid needs --sync grads")
    if args.steps % args.average_every:
        p.error(f"--steps {args.steps} is not a multiple of --average-every {args.average_every}: the mean step "
                f"time would over- or under-count averagings")
    if args.worker:
        return worker(args)
    if is_mpi_rank():
        p.error("run it as one process: it starts mpiexec itself, at 1 and at --ranks ranks")
    refuse_a_task_of_a_foreign_srun()
    one = run_with(1, args)
    many = run_with(args.ranks, args)
    alone = run_with(args.ranks, args, communicate=False)
    mode = (f"allreduce overlap {args.overlap}" if args.sync == "grads"
            else f"parameter averaging every {args.average_every} steps")
    mode += ", fc layers split across ranks" if args.parallel == "hybrid" else ""
    print(f"{args.model}, batch {args.batch} per rank, 1 thread per rank, {mode}, mean of {args.steps} steps")
    print(f"{'ranks':>6}{'s/step':>10}{'median':>10}{'images/s per rank':>20}{'images/s total':>16}")
    for r in (one, many):
        print(f"{r['ranks']:>6}{r['step_s']:>10.3f}{r['median_step_s']:>10.3f}{r['per_rank_images_per_s']:>20.1f}"
              f"{r['per_rank_images_per_s'] * r['ranks']:>16.1f}")
    r = alone
    print(f"{r['ranks']:>6}{r['step_s']:>10.3f}{r['median_step_s']:>10.3f}{r['per_rank_images_per_s']:>20.1f}"
          f"{r['per_rank_images_per_s'] * r['ranks']:>16.1f}   control: no communication")
    ratio = many["per_rank_images_per_s"] / one["per_rank_images_per_s"]
    bound = alone["per_rank_images_per_s"] / one["per_rank_images_per_s"]
    print(f"per-rank throughput at {args.ranks} ranks / 1 rank: {ratio:.2f}   (target >= 0.9)")
    print(f"the machine's own bound ({args.ranks} ranks without communication / 1 rank): {bound:.2f}; "
          f"communication keeps {ratio / bound:.2f} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
