"""HDF5 checkpoints: atomic, self-describing, no pickle, exact resume.

A checkpoint holds the parameters and momentum buffers (PyTorch names), the step, the
epoch and the position inside it, the learning-rate schedule's state and the resolved
config. Every random draw of the trainer (sampling order, crops, flips, lighting,
dropout masks) is a pure function of (seed, epoch, step, rank), so the seed is all the
RNG state a resumed run needs to redraw exactly what the uninterrupted run would have.

Rank 0 writes `ckpt-00001234.h5.tmp`, fsyncs it, renames it and fsyncs the directory:
a run killed at any moment leaves either the old set of checkpoints or the new one.
"""
import json
import os
import re

import h5py
import numpy as np

FORMAT_VERSION = 1
NAME = re.compile(r"^ckpt-(\d{8})\.h5$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; one line with the fix."""


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir):
    """Complete checkpoints in run_dir, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    found = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := NAME.match(f)))
    return [os.path.join(folder, f) for _, f in found]


def save(run_dir, step, params, velocity, meta, keep):
    """Write checkpoint for `step` atomically; keep the newest `keep`. Returns the path."""
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"ckpt-{step:08d}.h5")
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)
        for group, arrays in (("params", params), ("velocity", velocity)):
            g = f.create_group(group)
            for name, value in arrays.items():
                g.create_dataset(name, data=np.asarray(value))
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path):
    """(params, velocity, meta) from a checkpoint file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {path} has format version {version}, this mpiconvnet reads "
                                      f"{FORMAT_VERSION}")
            meta = json.loads(f.attrs["meta"])
            params = {name: f["params"][name][()] for name in f["params"]}
            velocity = {name: f["velocity"][name][()] for name in f["velocity"]}
    except (OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); resume from an older one") from None
    return params, velocity, meta


def resolve_resume(resume, run_dir):
    """The checkpoint to start from: None for a fresh run."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    return resume
