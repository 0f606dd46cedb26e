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


def read_weights(path):
    """{name: array} from an .npz file, a checkpoint file or a run directory (its newest
    checkpoint), in our names."""
    if not os.path.exists(path):
        raise ModelError(f"--init-weights {path}: no such file; give an .npz of weights, a checkpoint or a run "
                         f"directory")
    if os.path.isdir(path) or _starts_with(path, HDF5_SIGNATURE):   # whatever its name ends with
        params, _, _ = checkpoint.load(checkpoint.find_checkpoint(path, "--init-weights"), "--init-weights")
        return params
    hint = "give an .npz of named arrays (numpy.savez, python -m mpiconvnet.export), a checkpoint or a run directory"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):   # an .npy: one array, no names
            raise ValueError("it holds one unnamed array")
        with loaded as f:
            state = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:   # truncated, corrupt, objects
        raise ModelError(f"--init-weights {path}: not a readable .npz of arrays ({e}); {hint}") from None
    for name, value in state.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ModelError(f"--init-weights {path}: {name} is not finite floating-point numbers "
                             f"(dtype {value.dtype}); {hint}")
    return from_torchvision(state)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _starts_with(path, signature):
    with open(path, "rb") as f:
        return f.read(len(signature)) == signature


def initial_state(net, path, skip_layers=(), world=None):
    """The whole-array state to start `net` from: the file's arrays, and net's own (random)
    ones for the layers in skip_layers. A collective of `world`'s ranks."""
    try:
        state, failure = read_weights(path), None
    except (ModelError, checkpoint.CheckpointError) as error:
        state, failure = None, error
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
            classifier = layer == list(own)[-1].split(".")[0]   # forward order: the classifier last
            fix = (f"keep that layer's random init with --init-skip {layer}" if classifier else
                   f"these are another model's weights; give weights of model {net.name}")
            raise ModelError(f"--init-weights {path}: {name} has shape {tuple(state[name].shape)}, {net.name} with "
                             f"{net.num_classes} classes has {tuple(value.shape)}; {fix}")
        else:
            merged[name] = state[name]
    unused = sorted(set(state) - set(own))
    if unused:
        raise ModelError(f"--init-weights {path}: holds {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}, "
                         f"which {net.name} does not have; give weights of model {net.name}")
    return merged


def write_npz(path, state):
    """np.savez to path, atomically: a crash leaves the old file or none, never half of one."""
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise checkpoint.OutputError(f"--out {path} exists and is not a regular file (a link, a device, a folder); "
                                     f"give a file name")
    partial = path + ".tmp"
    try:
        with open(partial, "wb") as f:   # a file object: savez would append .npz to a name
            np.savez(f, **state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as error:
        if os.path.exists(partial):
            os.remove(partial)
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise checkpoint.OutputError(f"cannot write {path}: {reason}; free space, fix permissions or give another "
                                     f"--out") from None
