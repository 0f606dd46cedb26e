"""HDF5 checkpoints: atomic, self-describing, no pickle, exact resume.

A checkpoint holds the parameters and momentum buffers (PyTorch names), the step, the
epoch and the position inside it, the learning-rate schedule's state and the resolved
config. Every random draw of the trainer (sampling order, crops, flips, lighting,
dropout masks) is a pure function of (seed, epoch, step, rank), so the seed is all the
RNG state a resumed run needs to redraw exactly what the uninterrupted run would have.

Rank 0 writes `ckpt-00001234.h5.tmp`, fsyncs it, renames it and fsyncs the directory:
a run killed at any moment leaves either the old set of checkpoints or the new one (and
maybe a .tmp file, which the next run's rank 0 removes as it starts).

The meta also records the training set's class list (its wnids, in label order), so that
evaluate, a resume and --init-weights can refuse a data set whose labels mean other classes
instead of scoring against them; checkpoints written before it (2026-11-25) have none and
are not checked.

Every array and the meta attribute carry the CRC-32 of their bytes, checked on every load:
a file damaged after it was written (a bad disk, a file system's fault, a stray write)
is refused with one line instead of resuming into a NaN loss. Checkpoints written before
the checksums (2026-11-25) have none and load as they are; any checkpoint holding NaN or
Inf is refused.
"""
import errno
import io
import json
import os
import re
import zlib

import h5py
import numpy as np

FORMAT_VERSION = 1
NAME = re.compile(r"^ckpt-(\d{8})\.h5$")
PARTIAL = re.compile(r"^ckpt-\d{8}\.h5\.tmp$")   # save()'s file while it writes
CHECKSUM = "crc32"   # the attribute holding zlib.crc32 of an array's (or the meta's) bytes


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; one line with the fix."""


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir):
    """Complete checkpoints in run_dir, oldest first (temporary files are ignored)."""
    return checkpoints_in(checkpoint_dir(run_dir))


def checkpoints_in(folder):
    """Complete checkpoints (ckpt-*.h5) in `folder` itself, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = sorted((step_of(f), f) for f in os.listdir(folder) if NAME.match(f))
    return [os.path.join(folder, f) for _, f in found]


class OutputError(Exception):
    """The run directory cannot take a file (full disk, quota, permissions); one line with
    the fix. Raised after the half-written file is removed: earlier checkpoints are whole."""


def cannot_write(path, error, run_dir):
    """The one line for an OSError met writing `path` under the run directory."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    kept = list_checkpoints(run_dir)
    kept = f"the last checkpoint, {os.path.basename(kept[-1])}, is kept" if kept else "no checkpoint was written yet"
    return (f"cannot write {path}: {reason}; free space or fix permissions under --out {run_dir}, then run the "
            f"same command with --resume auto ({kept})")


def output_problem(path, error, flag="--out"):
    """The one line for an OSError met writing `path`, a file the user named with `flag`
    (export's .npz, plot's image): a folder that does not exist is to be made, not freed."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    folder = os.path.dirname(path) or "."
    if error.errno == errno.ENOENT and not os.path.isdir(folder):
        return f"cannot write {path}: {reason}; create the folder {folder} first (mkdir -p), or give another {flag}"
    return f"cannot write {path}: {reason}; free space or fix permissions there, or give another {flag}"


def save(run_dir, step, params, velocity, meta, keep):
    """Write checkpoint for `step` atomically; keep the newest `keep`. Returns the path."""
    folder = checkpoint_dir(run_dir)
    path = os.path.join(folder, f"ckpt-{step:08d}.h5")
    tmp = path + ".tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        _write(tmp, params, velocity, meta)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as error:
        if os.path.lexists(tmp):
            os.remove(tmp)   # a partial file would hold the space the user must free
        raise OutputError(cannot_write(path, error, run_dir)) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def remove_partial(run_dir):
    """Remove the checkpoint files that runs killed while writing them left in run_dir's
    checkpoints/ (ckpt-*.h5.tmp, as large as a checkpoint: 474 MB for AlexNet); returns
    their names. Rank 0 calls it as a run starts, holding the run directory's lock
    (run_lock.py), so no live run of that directory is writing one."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if PARTIAL.match(name):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:   # renamed or removed meanwhile
                continue
            removed.append(name)
    return removed


def step_of(path):
    """The step in a checkpoint's file name (ckpt-00001234.h5), or None for another name."""
    match = NAME.match(os.path.basename(path))
    return int(match.group(1)) if match else None


def set_aside_newer(run_dir, resumed_from, step):
    """Move the run's checkpoints of steps after `step` (and one of that step that is not
    `resumed_from`) into checkpoints/superseded/N/ (N counts such moves, so none overwrites
    another): a run resumed from an older checkpoint (say with a lower lr after a NaN) must
    neither have its own checkpoints pruned in their favour nor be resumed from them by
    --resume auto. Returns (the folder, [the names moved])."""
    newer = [p for p in list_checkpoints(run_dir)
             if step_of(p) > step or step_of(p) == step and not os.path.samefile(p, resumed_from)]
    if newer:
        root = os.path.join(checkpoint_dir(run_dir), "superseded")
        os.makedirs(root, exist_ok=True)
        taken = [int(name) for name in os.listdir(root) if name.isdigit()]
        aside = os.path.join(root, str(max(taken, default=0) + 1))   # a folder deleted since frees no number
        os.makedirs(aside)
        for path in newer:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        _fsync_dir(checkpoint_dir(run_dir))
        return aside, [os.path.basename(p) for p in newer]
    return None, []


def _write(tmp, params, velocity, meta):
    """The HDF5 file is built in memory and written with plain writes: HDF5 reports a full
    disk met while flushing its metadata as a RuntimeError, sometimes from a destructor or
    as a crash, where an OSError from a write of ours is one line and exit 5. Costs one
    file's size of memory on rank 0 (AlexNet: 474 MB) and ~0.5 s more than HDF5 writing
    the file itself (python -m mpiconvnet.bench checkpoint: 1.3-1.4 s against 0.8 s)."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["meta"] = text = json.dumps(meta, sort_keys=True)
        f.attrs["meta_" + CHECKSUM] = zlib.crc32(text.encode())
        for group, arrays in (("params", params), ("velocity", velocity)):
            g = f.create_group(group)
            for name, value in arrays.items():
                value = np.require(value, requirements="C")   # not ascontiguousarray: a 0-d array stays 0-d
                g.create_dataset(name, data=value).attrs[CHECKSUM] = zlib.crc32(value)
    with open(tmp, "wb") as stream:
        stream.write(image.getbuffer())   # no copy of the image
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what every checkpoint's meta has held since the first one, and a resume needs
META_TYPES = {"step": int, "model": str, "num_classes": int, "steps_per_epoch": int, "config": dict, "schedule": dict}


class _Unfit(Exception):
    """Why a checkpoint cannot be used, as the end of a sentence that starts with its path."""


def load(path, flag="--checkpoint"):
    """(params, velocity, meta) from a checkpoint file, checked whole: each array against
    its checksum and for NaN and Inf, the momentum buffers against the parameters, the meta
    for every key a resume reads. `flag` is the option that would take an older checkpoint
    instead, for the one line that names it when this one is refused."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    if step_of(path) is None and os.path.getsize(path) and not starts_with(path, HDF5_SIGNATURE):
        # an .npz, a .pt, a text file (a ckpt-N.h5 without the signature is a damaged checkpoint)
        raise CheckpointError(f"{flag} {path} is not a checkpoint (an HDF5 file written by python -m "
                              f"mpiconvnet.train); give a checkpoint file or a run directory (an .npz of weights "
                              f"starts a new run with train --init-weights)")
    try:
        with h5py.File(path, "r", locking=False) as f:
            if "meta" not in f.attrs or "params" not in f:
                raise CheckpointError(f"{flag} {path} is not an mpiconvnet checkpoint (a data shard?); give a "
                                      f"checkpoint from a run's checkpoints/ folder")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {path} has format version {version}, this mpiconvnet reads "
                                      f"{FORMAT_VERSION}")
            meta = _read_meta(f)
            params, velocity = _read_arrays(f, "params"), _read_arrays(f, "velocity")
        _check_complete(params, velocity, meta)
    except CheckpointError:
        raise
    except _Unfit as e:
        raise unusable(path, str(e), flag) from None
    except (OSError, KeyError, ValueError, TypeError) as e:   # ValueError: a meta that is not JSON
        raise unusable(path, f"is unreadable ({e})", flag) from None
    return params, velocity, meta


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def starts_with(path, signature):
    """Whether the file begins with these bytes (a format's signature)."""
    with open(path, "rb") as f:
        return f.read(len(signature)) == signature


def _read_meta(f):
    text = f.attrs["meta"]
    text = text.decode() if isinstance(text, bytes) else text
    _verify(f.attrs.get("meta_" + CHECKSUM), text.encode(), "its meta attribute")
    meta = json.loads(text)
    if not isinstance(meta, dict):
        raise _Unfit("is damaged (its meta attribute is not a JSON object)")
    return meta


def _read_arrays(f, group):
    if group not in f:
        raise _Unfit(f"is incomplete (it has no {group} group)")
    arrays = {}
    for name, dataset in f[group].items():
        value = dataset[()]
        _verify(dataset.attrs.get(CHECKSUM), np.require(value, requirements="C"), f"{group}/{name}")
        if not np.all(np.isfinite(value)):
            # a diverging run can write one before its loss shows it; resumed, the loss is NaN
            raise _Unfit(f"holds NaN or Inf in {group}/{name}")
        arrays[name] = value
    return arrays


def _verify(expected, data, what):
    """A checksum that does not match means bytes changed after the write. None: a file
    from before checksums."""
    if expected is not None and zlib.crc32(data) != int(expected):
        raise _Unfit(f"is damaged ({what} does not match its checksum)")


def _check_complete(params, velocity, meta):
    """A checkpoint with a part missing (a hand-edited file, a tool's) fails here with one
    line, not later in the optimizer or the schedule with a traceback per rank."""
    missing = [key for key in META_TYPES if key not in meta]
    if missing:
        raise _Unfit(f"is incomplete (its meta attribute lacks {', '.join(missing)})")
    for key, kind in META_TYPES.items():
        if not isinstance(meta[key], kind):
            raise _Unfit(f"is damaged (its meta's {key} is {meta[key]!r}, not a {kind.__name__})")
    classes = meta.get("classes")   # absent from checkpoints written before 2026-11-25
    if classes is not None and not (isinstance(classes, list) and len(classes) == meta["num_classes"]
                                    and all(isinstance(c, str) for c in classes)):
        raise _Unfit(f"is damaged (its meta's classes is not a list of {meta['num_classes']} class names)")
    for name in sorted(set(params) | set(velocity)):
        if name not in params or name not in velocity:
            raise _Unfit(f"is incomplete ({'velocity' if name in params else 'params'}/{name} is missing)")
        if velocity[name].shape != params[name].shape:
            raise _Unfit(f"is damaged (velocity/{name} has shape {velocity[name].shape}, params/{name} "
                         f"{params[name].shape})")


def unusable(path, problem, flag="--checkpoint"):
    """The CheckpointError for a checkpoint that cannot be used: "checkpoint PATH <problem>",
    then the next older checkpoint to give with `flag` instead."""
    return CheckpointError(f"checkpoint {path} {problem}; {_instead(path, flag)}")


def older_checkpoint(path):
    """The newest checkpoint of an earlier step in path's folder, or None."""
    step, folder = step_of(path), os.path.dirname(os.path.abspath(path))
    if step is None:
        return None
    try:
        names = os.listdir(folder)
    except OSError:   # a folder that can be entered but not listed: no advice, still one line
        return None
    older = sorted((step_of(f), f) for f in names if NAME.match(f) and step_of(f) < step)
    return os.path.join(os.path.dirname(path), older[-1][1]) if older else None


def _instead(path, flag):
    """The fix for a checkpoint that cannot be used: the next older one, by its path."""
    older = older_checkpoint(path)
    if older:
        return f"use the older one instead: {flag} {older}"
    if step_of(path) is None:
        return f"give {flag} an older checkpoint"
    return f"no older checkpoint is beside it in {os.path.dirname(path) or '.'} to give {flag} instead"


def class_mismatch(meta, classes, path, data_dir):
    """The one line saying how data_dir's class list differs from the one the checkpoint
    at `path` was trained on, or None: the same list, or a checkpoint that records none."""
    trained = meta.get("classes")
    if trained is None or list(trained) == list(classes):
        return None
    if len(trained) != len(classes):
        return f"{data_dir} has {len(classes)} classes, checkpoint {path} was trained on {len(trained)}"
    label = next(i for i, (a, b) in enumerate(zip(trained, classes)) if a != b)
    return (f"{data_dir} has other classes than checkpoint {path} was trained on: label {label} is "
            f"{classes[label]} there, {trained[label]} in the checkpoint")


def find_checkpoint(path, flag="--checkpoint"):
    """A checkpoint file as given, or the newest checkpoint of a run directory or of its
    checkpoints/ folder."""
    if os.path.isdir(path):
        found = list_checkpoints(path) or checkpoints_in(path)
        if not found:
            raise CheckpointError(f"{flag} {path}: holds no checkpoints/ckpt-*.h5 (nor ckpt-*.h5 itself); give a "
                                  f"checkpoint file")
        return found[-1]
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: no such file or directory; give a checkpoint file or a run directory")
    return path


def load_given(given, flag="--checkpoint"):
    """(path, params, velocity, meta) of the checkpoint `given` names (find_checkpoint). A
    directory's newest checkpoint is chosen again once when it vanished before it was
    opened: a live run with --keep-checkpoints 1 prunes it as it writes the next one."""
    path = find_checkpoint(given, flag)
    try:
        return (path, *load(path, flag))
    except CheckpointError:
        if not os.path.isdir(given) or os.path.exists(path):
            raise
    path = find_checkpoint(given, flag)
    return (path, *load(path, flag))


def resolve_resume(resume, run_dir):
    """The checkpoint to start from: None for a fresh run. A run directory means its newest
    checkpoint, as --checkpoint and --init-weights take one; unlike auto, a directory
    without checkpoints is an error, not a fresh start."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    return find_checkpoint(resume, "--resume")
