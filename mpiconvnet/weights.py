"""Weights in and out of a run: `.npz` files with PyTorch names and layouts.

Out: `python -m mpiconvnet.export` writes a checkpoint's weights as `.npz`, in our names
(`conv1.weight`, ..., `fc8.bias`: the names of `torch_twin.py`'s nn.Module) or, for
alexnet-owt, in torchvision's (`features.0.weight`, ..., `classifier.6.bias`), so that

    state = {k: torch.from_numpy(v) for k, v in numpy.load("owt.npz").items()}
    torchvision.models.alexnet(num_classes=...).load_state_dict(state)

works as it stands. In: `train --init-weights FILE` starts a run from such a file (either
naming), or from another run's checkpoint, instead of the random init; `--init-skip fc8`
leaves the listed layers at their random init, for fine-tuning to another class count.
"""
import os
import zipfile
import zlib

import numpy as np

from mpiconvnet import checkpoint
from mpiconvnet.models import ModelError

# torchvision.models.AlexNet's module indices: features = conv, relu, pool, conv, relu,
# pool, conv, relu, conv, relu, conv, relu, pool; classifier = dropout, linear, relu,
# dropout, linear, relu, linear. Its layer shapes are alexnet-owt's.
TORCHVISION_ALEXNET = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
                       "conv4": "features.8", "conv5": "features.10",
                       "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
NAMINGS = ("ours", "torchvision")


def to_torchvision(state, model):
    """Our names → torchvision's AlexNet names (alexnet-owt only: the others differ in shape)."""
    if model != "alexnet-owt":
        raise ModelError(f"--names torchvision: torchvision's AlexNet is alexnet-owt, this checkpoint is {model}; "
                         f"export it with --names ours")
    return {_rename(name, TORCHVISION_ALEXNET): value for name, value in state.items()}


def from_torchvision(state):
    """torchvision's AlexNet names → ours; a state already in our names comes back as it is."""
    if not any(name.startswith(("features.", "classifier.")) for name in state):
        return state
    ours = {prefix: layer for layer, prefix in TORCHVISION_ALEXNET.items()}
    return {_rename(name, ours): value for name, value in state.items()}


def _rename(name, table):
    layer, _, kind = name.rpartition(".")
    return f"{table.get(layer, layer)}.{kind}"


NPZ_HINT = ("give an .npz of named arrays (python -m mpiconvnet.export; from a PyTorch state dict: "
            "numpy.savez(path, **{k: v.numpy() for k, v in state_dict.items()})), a checkpoint or a run directory")


def read_weights(path):
    """(state, classes, file_names) from an .npz file, a checkpoint file or a run directory
    (its newest checkpoint): state is {name: array} in our names, classes the class list
    of the training set (None where not recorded: an .npz, an older checkpoint), file_names
    {our name: the file's} where the file named them otherwise (torchvision's), for messages."""
    if not os.path.exists(path):
        raise ModelError(f"--init-weights {path}: no such file; give an .npz of weights, a checkpoint or a run "
                         f"directory")
    if os.path.isdir(path) or checkpoint.starts_with(path, checkpoint.HDF5_SIGNATURE):   # whatever its name ends with
        _, params, _, meta = checkpoint.load_given(path, "--init-weights")
        return params, meta.get("classes"), {}
    if checkpoint.starts_with(path, b"\x93NUMPY"):
        raise ModelError(f"--init-weights {path}: an .npy holds one unnamed array, not named weights; {NPZ_HINT}")
    if not checkpoint.starts_with(path, b"PK"):   # every .npz is a zip; a text file, a pickled .pt are not
        raise ModelError(f"--init-weights {path}: not an .npz of weights (nor a zip, nor a checkpoint); {NPZ_HINT}")
    try:
        with np.load(path, allow_pickle=False) as f:
            state = {}
            for name in f.files:
                state[name] = f[name]
                if not isinstance(state[name], np.ndarray):   # a member that is no .npy: torch.save's zip
                    raise ModelError(f"--init-weights {path}: a zip but not an .npz of weights (its {name} is no "
                                     f"NumPy array: a torch.save file?); {NPZ_HINT}")
    except ModelError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:   # truncated, corrupt, objects
        raise ModelError(f"--init-weights {path}: not a readable .npz of arrays ({e}); {NPZ_HINT}") from None
    for name, value in state.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ModelError(f"--init-weights {path}: {name} is not finite floating-point numbers "
                             f"(dtype {value.dtype}); {NPZ_HINT}")
    ours = from_torchvision(state)
    return ours, None, dict(zip(ours, state))


def initial_state(net, path, skip_layers=(), world=None, classes=None, data_dir=None):
    """The whole-array state to start `net` from: the file's arrays, and net's own (random)
    ones for the layers in skip_layers. A collective of `world`'s ranks. `classes`: the
    class list of the run's training set (data_dir), checked against the one a checkpoint
    records while its classifier is taken over."""
    try:
        (state, trained_classes, file_names), failure = read_weights(path), None
    except (ModelError, checkpoint.CheckpointError) as error:
        failure = error
    if world is not None and world.size > 1:
        # a file that one node cannot read stops every rank, before the gathers below
        failures = world.comm.allgather(None if failure is None else f"rank {world.rank}: {failure}")
        if failure is None and any(failures):
            raise ModelError(next(f for f in failures if f))
    if failure is not None:
        raise failure
    own = net.state_dict()
    layers = {name.split(".")[0] for name in own}
    unknown = sorted(set(skip_layers) - layers)
    if unknown:
        raise ModelError(f"--init-skip {','.join(unknown)}: not a layer of {net.name} "
                         f"(its layers: {', '.join(sorted(layers))})")
    classifier = list(own)[-1].split(".")[0]   # forward order: the classifier last
    if (classes is not None and trained_classes is not None and classifier not in skip_layers
            and len(trained_classes) == len(classes)):
        # the same count in another order (or other classes) would start every label from
        # another class's weights (another count fails the shape check below); fine-tuning
        # to other classes starts the classifier afresh instead
        mismatch = checkpoint.class_mismatch({"classes": trained_classes}, classes, path, data_dir)
        if mismatch:
            raise ModelError(f"--init-weights: {mismatch}; to fine-tune to these classes keep the classifier's "
                             f"random init with --init-skip {classifier}")
    merged = {}
    for name, value in own.items():
        layer = name.split(".")[0]
        if layer in skip_layers:
            merged[name] = value
        elif name not in state:
            raise ModelError(f"--init-weights {path}: has no {name} for model {net.name}; give weights of this "
                             f"model, or keep that layer's random init with --init-skip {layer}")
        elif tuple(state[name].shape) != tuple(value.shape):
            # another class count changes the classifier alone; any other layer, another model
            fix = (f"keep that layer's random init with --init-skip {layer}" if layer == classifier else
                   f"these are another model's weights; give weights of model {net.name}")
            held = file_names.get(name, name)   # the name the file holds it under (torchvision's)
            held = name if held == name else f"{held} (our {name})"
            raise ModelError(f"--init-weights {path}: {held} has shape {tuple(state[name].shape)}, {net.name} with "
                             f"{net.num_classes} classes has {tuple(value.shape)}; {fix}")
        else:
            merged[name] = state[name]
    unused = sorted(set(state) - set(own))
    if unused:
        raise ModelError(f"--init-weights {path}: holds {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}, "
                         f"which {net.name} does not have; give weights of model {net.name}")
    return merged


def classes_path(npz_path):
    """Where export writes the class list beside an .npz: m.npz → m.classes.txt (a key inside
    the .npz would break torchvision's load_state_dict)."""
    return os.path.splitext(npz_path)[0] + ".classes.txt"


# what str.splitlines() ends a line at: a class name holding one reads back as two names
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def write_npz(path, state, classes=None):
    """np.savez to path, and `classes` (one name a line, in label order) to classes_path(path)
    when given, atomically: a crash leaves the old files or none, never half of one."""
    files = [path] + ([classes_path(path)] if classes is not None else [])
    broken = next((name for name in classes or [] if any(c in LINE_BREAKS for c in name)), None)
    if broken is not None:   # preprocess refuses such class folders since 2026-11-25; older sets may hold one
        raise checkpoint.OutputError(f"class {broken!r} has a line break in its name, which {files[-1]} (one name a "
                                     f"line) cannot hold; the weights go with that data set: rename the class folder, "
                                     f"pack it again (preprocess refuses such names now) and train on it")
    for name in files:
        if os.path.lexists(name) and (os.path.islink(name) or not os.path.isfile(name)):
            raise checkpoint.OutputError(f"--out {path}: {name} exists and is not a regular file (a link, a device, "
                                         f"a folder); give another --out")
    partials = [name + ".tmp" for name in files]
    try:
        with open(partials[0], "wb") as f:   # a file object: savez would append .npz to a name
            np.savez(f, **state)
            f.flush()
            os.fsync(f.fileno())
        if classes is not None:
            with open(partials[1], "w") as f:
                f.write("".join(name + "\n" for name in classes))
                f.flush()
                os.fsync(f.fileno())
        for partial, name in zip(partials, files):
            os.replace(partial, name)
        if classes is None and os.path.isfile(classes_path(path)):
            os.remove(classes_path(path))   # another checkpoint's list, beside weights it no longer describes
    except OSError as error:
        for partial in partials:
            if os.path.lexists(partial):
                os.remove(partial)
        raise checkpoint.OutputError(checkpoint.output_problem(path, error)) from None
