"""Loader throughput per loader process against the memory-copy bound of the same bytes.

    python -m mpiconvnet.bench loader                       # 2048 synthetic 256px images
    python -m mpiconvnet.bench loader --data /data/imagenet --batches 200 --workers 1,2,4

Run from the repository root: without --data it packs a synthetic raw data set into a
temporary folder with tests/data_fixtures.py (same HDF5 layout as python -m preprocess:
one chunk per image). The loader moves uint8 images from the shards into shared memory;
the crops, flips and float conversion happen where the model lives
(backend.crop_flip_normalize: a kernel on CUDA). Measures, in one run:
  read       ShardedDataset.read of one random batch into a reused buffer, in one call
             and one image per call; the floor is plain h5py images[i] per image with
             the files held open
  loader w=N BatchLoader with N worker processes (0: in-process), batches in step order
  copy bound np.copyto of the batch's images, picked at random from an in-memory copy of
             the data set (up to --pool images), into the next buffer of a ring as large
             as a 1-worker loader's (--prefetch + 1 batches, a shared mapping like the
             loader's): the bytes every loader must at least read and write, from and to
             memory the CPU caches do not hold (the page cache is not in them, and a ring
             of 3 batches of 12.6 MB is larger than a 32 MB L3), with no HDF5 and no IPC;
             and the same copy into one buffer, which stays in the L3 from copy to copy
             (~1.5x faster here), the bound of the rows that fill one buffer (the reads,
             workers=0). Also printed: the copy of a cache-hot batch, which no reader of
             a data set reaches
  crop       numpy_backend.crop_flip_normalize of that batch (1 thread): what the
             trainer does per batch on the NumPy backend, against its own bound, np.copyto
             of the uint8 crops into float32
and prints images/s, images/s per loader process, and that divided by the copy bound into
the same kind of destination (target >= 0.5 for the loader's worker processes).
"""
import itertools
import os
import sys
import tempfile
import time

import numpy as np

from mpiconvnet.bench._args import SYNTHETIC_MAX, at_least, counts, directory, synthetic_images_problem
from mpiconvnet.cli import Parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        problem = synthetic_images_problem(args.images) or misfit(args, args.images, args.size)
        if problem:
            parser.error(problem)
    return args


def slots(workers, prefetch):
    """The batch slots of a BatchLoader: one private slot in-process, else max(prefetch, workers) + 1."""
    return max(prefetch, workers) + 1 if workers else 1


def misfit(args, images, image_size):
    """Why --crop, --batch, --pool, --batches and the loaders asked for do not fit a
    training split of `images` images of `image_size` px (the synthetic set's, or that of
    --data), or None. Each loader skips one batch per slot, then times at least 4 per slot
    (what was ready early then overstates its rate by at most a quarter)."""
    where = "--size" if args.data is None else f"--data {args.data}"
    if args.crop > image_size:
        return f"--crop {args.crop} is larger than the {image_size}px images of {where}; lower --crop"
    if args.batch > images:
        where = "--images" if args.data is None else f"--data {args.data}"
        return (f"--batch {args.batch} is more than the {images} images of {where}; a batch is drawn without "
                f"repeats: lower --batch")
    if args.batch > args.pool:
        return (f"--batch {args.batch} is more than the {args.pool} images of --pool, which the copy bound draws "
                f"its batches from without repeats: raise --pool or lower --batch")
    workers = max(args.workers, key=lambda w: slots(w, args.prefetch))
    skipped = slots(workers, args.prefetch)
    if args.batches < 4 * skipped:
        return (f"--batches {args.batches}: the loader with --workers {workers} has {skipped} batch slots "
                f"(max(--prefetch, workers) + 1), and times at least 4 batches per slot after one untimed per "
                f"slot: raise --batches to {4 * skipped}")
    batches = -(-images // args.batch)
    if batches < 5 * skipped:
        fix = (f"raise --images to {5 * skipped * args.batch}" if args.data is None else "lower --batch")
        return (f"{images} images make {batches} batches of --batch {args.batch}; the loader with --workers "
                f"{workers} skips {skipped} (one per batch slot) and times at least {4 * skipped}: {fix}, or lower "
                f"--prefetch or the largest --workers")
    return None


def build_parser():
    parser = Parser(prog="python -m mpiconvnet.bench loader", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=directory, help="a packed data set to read (default: a synthetic raw set in a temp dir)")
    parser.add_argument("--images", type=at_least(1), default=2048,
                        help=f"synthetic training images (default 2048, at most {SYNTHETIC_MAX})")
    parser.add_argument("--size", type=at_least(1), default=256, help="synthetic stored image size (default 256)")
    parser.add_argument("--shard-size", type=at_least(1), default=1024,
                        help="synthetic images per shard (default 1024, as python -m preprocess packs ImageNet: "
                             "a loader process then opens a shard per ~1,000 images it reads, as it does on "
                             "ImageNet; reads are one pread per image, so which shard an image is in does not "
                             "matter)")
    parser.add_argument("--crop", type=at_least(1), default=227, help="crop size (default 227, AlexNet; at most the stored size)")
    parser.add_argument("--batch", type=at_least(1), default=64, help="batch per rank (default 64)")
    parser.add_argument("--batches", type=at_least(1), default=24,
                        help="batches timed per loader, after a warm-up of one batch per slot (default 24); at least "
                             "4 per slot, and a loader has max(--prefetch, workers) + 1 slots (1 with workers=0): "
                             "--prefetch 2 --workers 2 needs 12; the epoch must hold them and the warm-up")
    parser.add_argument("--workers", type=counts(0), default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    parser.add_argument("--pool", type=at_least(1), default=2048,
                        help="images held in memory for the copy bound (default 2048: 400 MB at 256 px, "
                             "far beyond the CPU caches)")
    parser.add_argument("--prefetch", type=at_least(1), default=2,
                        help="batches each loader prepares ahead (default 2, the trainer's default); a loader "
                             "with 1 worker then fills a ring of prefetch + 1 slots, and so does the copy bound")
    parser.add_argument("--repeats", type=at_least(1), default=5, help="repeats of the read/augment/copy timings (best kept)")
    return parser


def write_synthetic(root, num_images, size, shard_size):
    try:
        from tests.data_fixtures import write_tiny_dataset
    except ImportError:
        raise SystemExit("bench loader: tests/data_fixtures.py not importable; run from the repository root "
                         "or pass --data DIR (a set packed with python -m preprocess)") from None
    return write_tiny_dataset(root, num_images, 0, 10, size, format="raw", shard_size=shard_size)


_h5py_files = {}


def read_with_h5py(dataset, indices, out):
    """Raw images by plain h5py `images[i]`, files kept open: the floor under any reader."""
    import h5py
    shard_of = np.searchsorted(dataset.shard_offsets, indices, side="right") - 1
    for k, (index, number) in enumerate(zip(indices, shard_of)):
        if number not in _h5py_files:
            _h5py_files[number] = h5py.File(dataset.shard_files[number], "r", locking=False)["images"]
        out[k] = _h5py_files[number][index - dataset.shard_offsets[number]]


def best_time(function, repeats):
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def time_loader(root, workers, args):
    """Steady-state images/s of a BatchLoader whose consumer does nothing.

    The first num_slots batches are skipped: the workers prepare them during start-up, and
    timing them would credit the loader with work done before the clock started. After
    that, at most num_slots - 1 batches are ready early, so the rate is overstated by at
    most (num_slots - 1) / timed batches.
    """
    from mpiconvnet.data.loader import BatchLoader
    with BatchLoader(root, batch_per_rank=args.batch, crop_size=args.crop, epoch=0, seed=0,
                     workers=workers, prefetch=args.prefetch, drop_last=False) as loader:
        skipped = loader.num_slots
        timed = min(args.batches, len(loader) - skipped)   # misfit() made it at least 4 * skipped
        iterator = iter(loader)
        for _ in range(skipped):
            next(iterator)
        started = time.perf_counter()
        for _ in range(timed):
            next(iterator)
        elapsed = time.perf_counter() - started
    return timed * args.batch / elapsed


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mpiconvnet.data import augment
    from mpiconvnet.data.loader import shared_array
    from mpiconvnet.data.shards import ShardedDataset

    temporary = None
    root = args.data
    if root is not None:
        dataset = ShardedDataset(root, "train")
        dataset.close()
        problem = misfit(args, dataset.num_images, dataset.image_size)
        if problem:
            print(f"mpiconvnet.bench loader: {problem}", file=sys.stderr)
            return 2
    else:
        temporary = tempfile.TemporaryDirectory(prefix="bench-loader-")
        root = temporary.name
    try:
        if temporary is not None:   # in the try: a stop while the set is written removes it too
            started = time.perf_counter()
            write_synthetic(root, args.images, args.size, args.shard_size)
            print(f"synthetic set: {args.images} raw {args.size}px images in {time.perf_counter() - started:.1f} s")
        dataset = ShardedDataset(root, "train")
        batch, crop, size = args.batch, args.crop, dataset.image_size
        rng = np.random.default_rng(0)
        pixels = np.empty((batch, size, size, 3), dtype=np.uint8)
        pixels_copy = np.empty_like(pixels)
        mean_chw = augment.mean_as_chw(dataset.mean)
        plan = augment.draw_augmentation(rng, batch, size, crop, pca_lighting=False)
        crops_u8 = rng.integers(0, 256, size=(batch, 3, crop, crop), dtype=np.uint8)
        crops_f32 = np.empty((batch, 3, crop, crop), dtype=np.float32)

        def random_batch():
            return rng.choice(dataset.num_images, size=batch, replace=False)

        rows = []   # (what, processes, images/s, destination: "one buffer" or "ring")
        for number in range(len(dataset.shard_files)):
            dataset.read(dataset.shard_offsets[number:number + 1], out=pixels)   # opened once, as in a long epoch
        read_s = best_time(lambda: dataset.read(random_batch(), out=pixels), args.repeats)
        rows.append(("read (one read() call)", 1, batch / read_s, "one buffer"))
        single_s = best_time(lambda: [dataset.read([i], out=pixels[k:k + 1]) for k, i in enumerate(random_batch())],
                             args.repeats)
        rows.append(("read (one image per call)", 1, batch / single_s, "one buffer"))
        if dataset.format == "raw":
            floor_s = best_time(lambda: read_with_h5py(dataset, random_batch(), pixels), args.repeats)
            rows.append(("h5py dataset[i]", 1, batch / floor_s, "one buffer"))
        dataset.close()    # the loaders' workers open their own handles
        for images in _h5py_files.values():
            images.file.close()
        _h5py_files.clear()
        for workers in args.workers:
            rate = time_loader(root, workers, args)
            # workers=0 fills one private slot in the consumer; workers fill a shared ring
            rows.append((f"loader workers={workers}", max(workers, 1), rate, "ring" if workers else "one buffer"))
        # bounds are the best a plain copy ever does: more repeats (each takes a millisecond)
        bound_repeats = max(20, 4 * args.repeats)
        hot_rate = batch / best_time(lambda: np.copyto(pixels_copy, pixels), bound_repeats)
        pool = dataset.read(np.arange(min(args.pool, dataset.num_images)))
        dataset.close()
        del pixels_copy
        # the same kind of memory a 1-worker loader fills: a shared mapping of prefetch + 1 slots
        ring = shared_array((args.prefetch + 1,) + pixels.shape, np.uint8)
        ring.fill(0)   # map every page now, not inside the timed copies
        turn = itertools.count()

        def copy_from_pool(destination):
            out = ring[next(turn) % len(ring)] if destination == "ring" else pixels
            for k, i in enumerate(rng.choice(len(pool), size=batch, replace=False)):
                np.copyto(out[k], pool[i])
        bounds = {destination: batch / best_time(lambda: copy_from_pool(destination), bound_repeats)
                  for destination in ("ring", "one buffer")}
        del pool, ring

        from mpiconvnet.backends import numpy_backend
        numpy_backend.set_num_threads(1)
        crop_rate = batch / best_time(lambda: numpy_backend.crop_flip_normalize(pixels, plan, crop, mean_chw),
                                      args.repeats)
        crop_bound = batch / best_time(lambda: np.copyto(crops_f32, crops_u8), args.repeats)

        megabytes = batch * size * size * 3 / 1e6
        print(f"batch {batch} x {size}px uint8 ({megabytes:.1f} MB read and written per batch), {os.cpu_count()} cpus; "
              f"each row against the copy bound into the same destination")
        print(f"{'what':<28}{'procs':>6}{'images/s':>11}{'per proc':>11}{'destination':>13}{'/ bound':>9}")
        for what, processes, rate, destination in rows:
            print(f"{what:<28}{processes:>6}{rate:>11.0f}{rate / processes:>11.0f}{destination:>13}"
                  f"{rate / processes / bounds[destination]:>9.2f}")
        ring_name = f"ring of {args.prefetch + 1}"
        print(f"{'copy bound, ' + ring_name:<28}{1:>6}{bounds['ring']:>11.0f}{bounds['ring']:>11.0f}{ring_name:>13}"
              f"{1.0:>9.2f}")
        print(f"{'copy bound, one buffer':<28}{1:>6}{bounds['one buffer']:>11.0f}{bounds['one buffer']:>11.0f}"
              f"{'one buffer':>13}{1.0:>9.2f}")
        print(f"{'copy, cache-hot batch':<28}{1:>6}{hot_rate:>11.0f}{hot_rate:>11.0f}")
        print(f"crop+flip+mean on the NumPy backend ({crop}px float32, 1 thread, in the trainer): {crop_rate:.0f} images/s, "
              f"{crop_rate / crop_bound:.2f} of its copy bound ({crop_bound:.0f} images/s uint8 -> float32)")
        loader_rows = [r for r in rows if r[0].startswith("loader workers=") and r[0] != "loader workers=0"]
        if loader_rows:
            best = max(rate / processes for _, processes, rate, _ in loader_rows)
            print(f"ratio (best loader images/s per worker process / copy bound into its {ring_name}): "
                  f"{best / bounds['ring']:.2f}  (target >= 0.5; {best / bounds['one buffer']:.2f} of the copy into one "
                  f"buffer, which the L3 helps; {best / hot_rate:.2f} of the cache-hot copy)")
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
