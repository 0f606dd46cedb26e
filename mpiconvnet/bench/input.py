"""The training step fed by the loader, against the same step on a batch already on the
device, measured in the same run.

    python -m mpiconvnet.bench input --backend cuda --model alexnet-owt --batch 128 --tf32
    python -m mpiconvnet.bench input --model alexnet-mini --batch 16 --size 72 --images 640

What a training run does each step beyond `bench step`: take the loader's uint8 batch,
copy it to the device (25 MB at batch 128 of 256 px images), cut, mirror and normalise the
crops there, and read the loss. Three loops over one epoch of the same data, same net:

  resident        the step on one batch that stays on the device, reading the loss
                  (bench step's loop): the ceiling
  model_input     for batch in loader: x = loader.model_input(batch, ops); step
                  (the copy starts when its own step does, so the step waits for it;
                  on CUDA it overlaps only the previous step's SGD update, still queued)
  device_batches  for batch, x in loader.device_batches(ops): step
                  (the next batch staged one step ahead; on CUDA its copy runs on a copy
                  stream while this step computes): what train.py does

Each loop's first steps (loader start-up, page-locking the slots) are not timed; each loop
runs --rounds times in turn and the fastest round is kept. Printed: images/s, the host's
wait for the loader per step (if it is not ~0, the loader, not the device, bounds the
row: raise --workers), and each loop against resident. Target on a GPU, where the loader
keeps up: device_batches >= 0.95 of resident.

Without --data, a synthetic raw set is packed into a temporary folder with
tests/data_fixtures.py (run from the repository root), as `bench loader` does.
"""
import json
import sys
import tempfile
import time

from mpiconvnet.bench._args import (SYNTHETIC_MAX, at_least, directory, model_names, synthetic_images_problem,
                                    thread_count)
from mpiconvnet.cli import Parser


def parse_args(argv):
    p = Parser(prog="python -m mpiconvnet.bench input", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=model_names(), default="alexnet-owt")
    p.add_argument("--batch", type=at_least(1), default=128)
    p.add_argument("--backend", choices=("numpy", "cuda"), default="numpy")
    p.add_argument("--tf32", action="store_true", help="allow TF32 (cuda only)")
    p.add_argument("--threads", type=thread_count, default=2, help="CPU threads of the NumPy backend (default 2)")
    p.add_argument("--data", type=directory, help="a packed data set to read (default: a synthetic raw set in a temp dir)")
    p.add_argument("--images", type=at_least(1), help=f"synthetic training images (default 24 batches; at most "
                                                       f"{SYNTHETIC_MAX}); the epoch needs --skip + 4 batches or more")
    p.add_argument("--size", type=at_least(1), default=256, help="synthetic stored image size (default 256; at "
                                                                  "least the model's crop)")
    p.add_argument("--workers", type=at_least(0), default=4, help="loader processes (default 4)")
    p.add_argument("--skip", type=at_least(1), default=4,
                   help="untimed steps at the start of each loop (default 4; at least 1: the first waits for the "
                        "loader's start-up)")
    p.add_argument("--rounds", type=at_least(1), default=2, help="times each loop runs, in turn; the fastest is kept")
    p.add_argument("--json", action="store_true", help="also print one JSON line of the results")
    args = p.parse_args(argv)
    if args.tf32 and args.backend != "cuda":
        p.error("--tf32 is a mode of the GPU's tensor cores: use it with --backend cuda")
    if args.data is None:
        if args.images is None:
            args.images = min(24 * args.batch, SYNTHETIC_MAX)
        problem = synthetic_images_problem(args.images) or misfit(args, args.images, args.size)
        if problem:
            p.error(problem)
    return args


def misfit(args, images, image_size):
    """Why --model, --batch and --skip do not fit a training split of `images` images of
    `image_size` px (the synthetic set's, or that of --data), or None."""
    from mpiconvnet.models import MODELS
    crop = MODELS[args.model].input_size
    # the untimed steps, 3 timed ones at least, and the last, untimed (run_loop says why)
    batches, needed = images // args.batch, args.skip + 4
    if args.data is None:
        if image_size < crop:
            return f"--size {image_size}: model {args.model} crops {crop}px; raise --size to {crop} or more"
        if batches < needed:
            fix = (f"raise --images to {needed * args.batch}" if needed * args.batch <= SYNTHETIC_MAX
                   else f"lower --batch to {images // needed}" if images >= needed else f"raise --images to {needed}")
            return (f"--images {images} at --batch {args.batch} make {batches} full batches; --skip {args.skip}, "
                    f"3 timed steps and an untimed last one need {needed}: {fix}")
    else:
        if image_size < crop:
            return (f"--data {args.data} holds {image_size}px images, model {args.model} crops {crop}px; choose "
                    f"another --model or --data")
        if batches < needed:
            return (f"--data {args.data} holds {images} training images, {batches} full batches at --batch "
                    f"{args.batch}; --skip {args.skip}, 3 timed steps and an untimed last one need {needed}: "
                    f"lower --batch or --skip")
    return None


def make_step(net, optimizer):
    """One training step as train.py takes it: loss and gradients (the loss read from the
    device), then the SGD update."""
    state = {"step": 0}

    def step(x, labels):
        net.loss_and_grads(x, labels, step=state["step"])
        optimizer.step(net.grads, 0.001)
        state["step"] += 1

    return step


def run_loop(kind, root, net, step, args):
    """(timed images, seconds, seconds waiting for the loader) of one epoch of loop `kind`."""
    from mpiconvnet.data.loader import BatchLoader
    ops = net.ops
    with BatchLoader(root, batch_per_rank=args.batch, crop_size=net.input_size, epoch=0, seed=0,
                     workers=args.workers, mean="channel") as loader:
        if kind == "resident":
            batch = next(iter(loader))
            x, labels = loader.model_input(batch, ops), batch.labels.copy()
            batches = ((batch, x) for _ in range(len(loader)))
        elif kind == "model_input":
            batches = ((batch, loader.model_input(batch, ops)) for batch in loader)
        else:
            batches = loader.device_batches(ops)
        # the clock stops after the last step but one, in every loop alike: device_batches
        # asks the loader for a batch ahead, so it hands out the last one only after the
        # loader has closed, joining its workers (~20 ms with 8 on an H200 node, 0.7 ms a
        # step of a 28-step epoch): a cost of the epoch's end, not of a step
        images, stop = 0, len(loader) - 2
        for number, (batch, x) in enumerate(batches):
            if number == args.skip:
                ops.synchronize()
                started, waited = time.perf_counter(), loader.time_waiting
            step(x, labels if kind == "resident" else batch.labels)
            images += len(batch.labels) if number >= args.skip else 0
            if number == stop:
                ops.synchronize()
                return images, time.perf_counter() - started, loader.time_waiting - waited
        raise RuntimeError(f"bench input: the {kind} loop ended after {number + 1} of {stop + 2} batches")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mpiconvnet.backends import get_backend
    from mpiconvnet.distributed import SetupError, init, set_blas_threads
    from mpiconvnet.models import build_model
    from mpiconvnet.optim import SGD
    if args.backend == "cuda":
        try:
            init("cuda", args.threads, need_threads=False)
        except SetupError as e:
            print(f"bench input: {e}", file=sys.stderr)
            return 2
    if args.data is not None:
        from mpiconvnet.data.shards import ShardedDataset
        data = ShardedDataset(args.data, "train")
        data.close()
        problem = misfit(args, data.num_images, data.image_size)
        if problem:
            print(f"mpiconvnet.bench input: {problem}", file=sys.stderr)
            return 2
    set_blas_threads(args.threads)
    get_backend(args.backend).set_num_threads(args.threads)
    temporary, root = None, args.data
    if root is None:
        from mpiconvnet.bench.loader import write_synthetic
        temporary = tempfile.TemporaryDirectory(prefix="bench-input-")
        root = temporary.name
    try:
        if temporary is not None:   # in the try: a stop while the set is written removes it too
            started = time.perf_counter()
            write_synthetic(root, args.images, args.size, 1024)
            print(f"synthetic set: {args.images} raw {args.size}px images in {time.perf_counter() - started:.1f} s")
        net = build_model(args.model, num_classes=1000, backend=args.backend, dtype="float32", seed=0)
        if args.backend == "cuda":
            net.ops.set_tf32(args.tf32)
        step = make_step(net, SGD(net.ops, net.params))
        kinds = ("resident", "model_input", "device_batches")
        best = {}
        for _ in range(args.rounds):
            for kind in kinds:
                images, seconds, waiting = run_loop(kind, root, net, step, args)
                if kind not in best or images / seconds > best[kind][0]:
                    best[kind] = (images / seconds, waiting / max(images // args.batch, 1))
    finally:
        if temporary is not None:
            temporary.cleanup()
    where = "1 GPU" + (" TF32" if args.tf32 else " FP32") if args.backend == "cuda" else f"{args.threads} thread(s)"
    print(f"{args.model}, batch {args.batch}, {where}, {args.workers} loader processes; best of {args.rounds} rounds")
    print(f"{'loop':<16}{'images/s':>11}{'ms/step':>10}{'data wait ms/step':>19}{'/ resident':>12}")
    ceiling = best["resident"][0]
    for kind in kinds:
        rate, waiting = best[kind]
        print(f"{kind:<16}{rate:>11.1f}{args.batch / rate * 1e3:>10.2f}{waiting * 1e3:>19.2f}{rate / ceiling:>12.2f}")
    print(f"ratio device_batches / resident: {best['device_batches'][0] / ceiling:.2f}  (target >= 0.95 on a GPU "
          f"with the loader keeping up); device_batches / model_input: "
          f"{best['device_batches'][0] / best['model_input'][0]:.2f}")
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "backend": args.backend, "tf32": args.tf32,
                          "workers": args.workers, **{f"{kind}_images_per_s": best[kind][0] for kind in kinds},
                          **{f"{kind}_data_wait_ms": best[kind][1] * 1e3 for kind in kinds}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
