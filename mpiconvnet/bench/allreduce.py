"""Bucketed gradient allreduce of a whole model, against one raw Allreduce of the same
bytes, and how much of it hides behind backward.

    mpirun -np 2 python -m mpiconvnet.bench allreduce [--model alexnet] [--bucket-mb 25]
    python -m mpiconvnet.bench allreduce            # starts mpiexec -n 2 itself

Medians of --repeats, after one untimed run of each, on the same ranks in the same run:
  raw       one MPI Allreduce of a flat buffer as large as all gradients (244 MB for AlexNet)
  bucketed  our GradientReducer over the model's buckets, no backward running
  overlap   a backward with the buckets reduced from the communication thread as they
            complete, against the same backward alone, twice:
            - GPU-like: each layer's backward is a sleep as long as its share of the FLOPs
              of a backward lasting --backward-ms (default 2x bucketed), so the CPU is idle
              while "the GPU" computes, as on a GPU node: this measures the pipeline;
            - NumPy: the real CPU backward at --batch images per rank. When ranks fill every
              core (2 ranks on 2 cores) the reduction's copies compete with the compute for
              the same cores, so little can hide there; the figure says how much.
ratios: bucketed / raw (target <= 1.05) and hidden = 1 - (overlap - backward) / bucketed
(the share of communication that backward hid; target >= 0.8).
"""
import sys
import time

import numpy as np

from mpiconvnet.bench._args import at_least, model_names
from mpiconvnet.bench._launch import relaunch_under_mpiexec
from mpiconvnet.cli import Parser

RUNS_AS_MPI_RANKS = True


def median_time(fn, repeats, world):
    # untimed first: the first calls set up MPI's connections and buffers, fault in pages
    world.barrier()
    fn()
    times = []
    for _ in range(repeats):
        world.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    # the slowest rank decides a synchronous step
    return float(world.comm.allreduce(float(np.median(times)), op=__import__("mpi4py").MPI.MAX))


def hidden_share(alone, overlapped, reduction):
    """The share of the reduction's own time that the overlapped backward did not add.
    More added than the whole reduction costs alone (contention, or noise when the
    reduction is tiny) hides nothing: 0, not a negative share; main() adds a note."""
    return min(max(1.0 - (overlapped - alone) / reduction, 0.0), 1.0)


def launcher_problem_of(size, ranks):
    """Why these ranks cannot measure what was asked, or None: one rank has nothing to
    reduce with, and a --ranks the launcher did not start would be silently ignored."""
    if size == 1:
        return ("1 rank has no one to reduce with, and its ratio and hidden share would read as targets met: "
                "run it under mpiexec -n 2 or more, or as one process, which starts mpiexec -n --ranks itself")
    if ranks is not None and ranks != size:
        return f"--ranks {ranks}, but the launcher started {size} ranks: drop --ranks or start {ranks}"
    return None


def mebibytes(nbytes):
    """A bucket's size in MiB, to two significant figures below 1 (a lone bias is 0.016 MiB)."""
    mib = nbytes / 2**20
    return f"{mib:.1f}" if mib >= 1 else f"{mib:.2g}"


def main(argv):
    p = Parser(prog="python -m mpiconvnet.bench allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=model_names(), default="alexnet")
    p.add_argument("--bucket-mb", type=at_least(0.001, float), default=25.0)
    p.add_argument("--batch", type=at_least(1), default=8, help="images per rank in the NumPy backward")
    p.add_argument("--backward-ms", type=at_least(0, float), default=0.0, help="length of the GPU-like backward (default 2x bucketed)")
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--ranks", type=at_least(2), help="ranks when it starts mpiexec itself (default 2); under an "
                                                    "mpiexec, the number it started, if given")
    args = p.parse_args(argv)
    code = relaunch_under_mpiexec("mpiconvnet.bench", ["allreduce"] + list(argv), args.ranks or 2)
    if code is not None:
        return code

    from mpi4py import MPI
    from mpiconvnet import distributed
    from mpiconvnet.bench.step import layer_flops
    from mpiconvnet.buckets import GradientBuckets, GradientReducer
    from mpiconvnet.models import build_model

    world = distributed.init("numpy", threads=1)
    launcher_problem = launcher_problem_of(world.size, args.ranks)
    if launcher_problem:
        if world.is_root:
            p.error(launcher_problem)
        return 2
    net = build_model(args.model, num_classes=1000, seed=0)
    buckets = GradientBuckets(net.ops, net.param_shapes, np.float32, int(args.bucket_mb * 2**20))
    net.use_gradient_arrays(buckets.views)
    total = sum(buckets.sizes)
    flat = np.ones(total, np.float32)

    raw = median_time(lambda: world.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM), args.repeats, world)

    # as the trainer runs it: a plain sum (the loss gradient carries the 1/size)
    reducer = GradientReducer(world, buckets, overlap=True, average=False)
    names = list(reversed(list(net.param_shapes)))

    def bucketed_only():
        reducer.begin()
        reducer.grads_ready(names)
        reducer.finish()

    bucketed = median_time(bucketed_only, args.repeats, world)

    # GPU-like backward: layers in reverse order, each a sleep of its FLOP share
    flops = layer_flops(net, 1)
    backward_s = (args.backward_ms / 1e3) if args.backward_ms else 2 * bucketed
    sleeps = [backward_s * f / sum(flops) for f in flops]

    def gpu_like_backward(on_grads_ready):
        for layer, seconds in zip(reversed(net.layers), reversed(sleeps)):
            time.sleep(seconds)
            if layer.params and on_grads_ready is not None:
                on_grads_ready(layer.params)

    rng = np.random.default_rng(world.rank)
    x = rng.normal(0, 1, size=(args.batch, 3, net.input_size, net.input_size)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch)
    rows = []
    for label, backward in (("GPU-like backward (sleeps, CPU idle)", gpu_like_backward),
                            (f"NumPy forward+backward, batch {args.batch}/rank",
                             lambda ready: net.loss_and_grads(x, labels, on_grads_ready=ready))):
        alone = median_time(lambda: backward(None), args.repeats, world)

        def with_overlap():
            reducer.begin()
            backward(reducer.grads_ready)
            reducer.finish()

        overlapped = median_time(with_overlap, args.repeats, world)
        rows.append((label, alone, overlapped, hidden_share(alone, overlapped, bucketed)))
    reducer.close()

    if world.is_root:
        mb = total * 4 / 1e6
        count = sum(int(np.prod(shape)) for shape in net.param_shapes.values())
        print(f"{args.model}: {count:,} gradients, {total:,} with the buckets' alignment padding ({mb:.0f} MB "
              f"float32), {world.size} ranks, median of {args.repeats}")
        sizes = ", ".join(mebibytes(4 * size) for size in buckets.sizes)
        print(f"{len(buckets.sizes)} bucket{'s' if len(buckets.sizes) > 1 else ''}: {sizes} MiB "
              f"(cap {args.bucket_mb:g} MiB; a larger tensor gets a bucket of its own)")
        print(f"{'raw Allreduce of one flat buffer':<44}{raw * 1e3:>10.1f} ms  ({mb / raw / 1e3:.2f} GB/s)")
        print(f"{'bucketed GradientReducer, no backward':<44}{bucketed * 1e3:>10.1f} ms")
        print(f"ratio bucketed / raw: {bucketed / raw:.3f}   (target <= 1.05)")
        print(f"{'backward':<44}{'alone':>10}{'+ reduction':>14}{'hidden':>9}   (target >= 80%)")
        for label, alone, overlapped, hidden in rows:
            print(f"{label:<44}{alone * 1e3:>7.1f} ms{overlapped * 1e3:>11.1f} ms{hidden:>9.0%}")
        if any(overlapped - alone > bucketed for _, alone, overlapped, _ in rows):
            print(f"note: a backward took longer with the reduction than the reduction takes alone "
                  f"({bucketed * 1e3:.1f} ms): contention for the cores, or timing noise on a reduction this small")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
