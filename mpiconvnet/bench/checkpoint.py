"""Writing a checkpoint: ours (the HDF5 file built in memory, then plain writes) against
HDF5 writing the same file itself, the way checkpoints were written before 2026-11-25.

    python -m mpiconvnet.bench checkpoint [--model alexnet] [--repeats 3] [--dir /tmp]

Ours survives a full disk as one line and exit 5, where HDF5 met it in its metadata
flushes and raised from destructors (or crashed); it pays with a copy of the file in
memory on rank 0. Both write the model's parameters and momentum in float32 and fsync;
best of --repeats, and the largest resident set each adds. Target: ours within 2x of
HDF5's own time: the price of a full disk that ends a run cleanly, paid once an epoch
by default (an AlexNet epoch lasts minutes on a GPU, hours on CPUs). Also timed: reading
our file back as a resume does (checkpoint.load, which checks every array's checksum and
looks for NaN and Inf), from the page cache.
"""
import os
import resource
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

from mpiconvnet import checkpoint
from mpiconvnet.bench._args import at_least, directory
from mpiconvnet.cli import Parser
from mpiconvnet.models import MODELS, build_model


def hdf5_writes_itself(tmp, params, velocity, meta):
    """The baseline: h5py writing to the file, as checkpoint._write did until 2026-11-25."""
    with h5py.File(tmp, "w", locking=False) as f:
        f.attrs["format_version"] = checkpoint.FORMAT_VERSION
        f.attrs["meta"] = str(meta)
        for group, arrays in (("params", params), ("velocity", velocity)):
            g = f.create_group(group)
            for name, value in arrays.items():
                g.create_dataset(name, data=value)
        f.flush()
        os.fsync(f.id.get_vfd_handle())


def best_time(write, path, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        write(path)
        best = min(best, time.perf_counter() - start)
        os.remove(path)
    return best


def best_read(path, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        checkpoint.load(path)
        best = min(best, time.perf_counter() - start)
    return best


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    p = Parser(prog="python -m mpiconvnet.bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="alexnet")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--dir", type=directory, default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args(argv)
    where = args.dir or tempfile.gettempdir()
    try:
        folder = tempfile.mkdtemp(dir=args.dir, prefix="bench-checkpoint-")
    except OSError as e:
        p.error(f"cannot make a folder in {'--dir ' if args.dir else ''}{where} ({e.strerror}): choose a writable "
                f"--dir")
    try:
        net = build_model(args.model, num_classes=1000, dtype="float32")
        params = net.state_dict()
        velocity = {name: np.zeros_like(value) for name, value in params.items()}
        meta = {"step": 1, "model": args.model, "num_classes": 1000, "steps_per_epoch": 1, "config": {},
                "schedule": {"drops": 0, "best_top1": 0.0, "bad_evals": 0}}
        path = os.path.join(folder, "ckpt.h5")
        # the baseline first: the peak it leaves is the floor ours is measured above
        base_s = best_time(lambda p: hdf5_writes_itself(p, params, velocity, meta), path, args.repeats)
        base_peak = peak_mb()
        ours_s = best_time(lambda p: checkpoint._write(p, params, velocity, meta), path, args.repeats)
        ours_peak = peak_mb()
        checkpoint._write(path, params, velocity, meta)
        read_s = best_read(path, args.repeats)
    except OSError as e:   # a full disk, or a quota, met by HDF5's own writes
        print(f"mpiconvnet.bench checkpoint: writing in {where} failed ({e}); free space there or choose another "
              f"--dir", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    size_mb = sum(v.nbytes for v in params.values()) * 2 / 2**20
    print(f"{args.model}: {size_mb:.0f} MiB of parameters and momentum, best of {args.repeats}, fsync included, "
          f"in {where}")
    print(f"  HDF5 writes itself  {base_s:6.2f} s")
    print(f"  ours (in memory)    {ours_s:6.2f} s   +{ours_peak - base_peak:.0f} MiB resident at the peak")
    print(f"  ours read back      {read_s:6.2f} s   (checkpoint.load, as a resume reads it)")
    print(f"ratio ours / HDF5: {ours_s / base_s:.2f} (target <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
