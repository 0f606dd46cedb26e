"""The AlexNet family, with PyTorch parameter names and layouts.

    from mpiconvnet.models import build_model
    net = build_model("alexnet", num_classes=1000, backend="numpy", dtype="float32", seed=0)
    logits = net.forward(x, train=False)            # x: (N, 3, H, W) float, NCHW
    loss, grads = net.loss_and_grads(x, labels)     # grads: {name: array}
    net.save_npz("alexnet.npz")                     # conv1.weight (96, 3, 11, 11), fc6.weight (4096, 9216), ...

`python -m mpiconvnet.models` prints each model with its input size and parameter count.

Models:
- alexnet       Krizhevsky 2012: 227 input, conv 96-256-384-384-256, groups=2 on conv2/4/5,
                LRN after the ReLU of conv1/conv2 and max pool 3/2 after the LRN, fc
                4096-4096-classes with dropout 0.5 after fc6 and fc7. The paper's init:
                weights N(0, 0.01), bias 1 on conv2/4/5 and fc6/7, 0 elsewhere.
- caffenet      the same layers with pool before LRN; Caffe's bvlc_alexnet init: conv std
                0.01, fc6/fc7 std 0.005, fc8 std 0.01, bias 0.1 where the paper used 1.
- alexnet-owt   torchvision's single tower ("one weird trick"): 64-192-384-256-256, no LRN,
                no groups, 224 input, dropout before fc6 and fc7; PyTorch's default init.
- alexnet-mini  the same layer kinds (groups, LRN, overlapping pool, dropout) scaled to a
                56 input, for demos and tests on a 2-core CPU; He-normal init so that a few
                epochs learn.
"""
import sys
from dataclasses import dataclass

import numpy as np

from mpiconvnet.backends import get_backend, mean_loss
from mpiconvnet.layers import LRN, Conv, Dropout, Flatten, Linear, MaxPool, ReLU
from mpiconvnet.model_parallel import ChannelSlice, GatherBatch, GatherChannels, GatherColumns, LocalRows


@dataclass
class StepContext:
    """What layers need to know about the current call besides their input."""
    params: dict
    train: bool
    seed: int = 0
    step: int = 0
    sample_offset: int = 0      # this rank's first sample in the global batch

    def dropout_counter(self, layer_index):
        # a counter unique to (step, dropout layer): masks never repeat across steps
        return (self.step * 8 + layer_index) % 2**32


# --------------------------------------------------------------------------- model specs
# a spec is a list of layer descriptions; ("conv", name, out_ch, kernel, stride, pad, groups)

def _alexnet_features(pool_before_lrn):
    def block(conv):
        lrn_pool = [("pool",), ("lrn",)] if pool_before_lrn else [("lrn",), ("pool",)]
        return [conv, ("relu",)] + lrn_pool
    return (block(("conv", "conv1", 96, 11, 4, 0, 1))
            + block(("conv", "conv2", 256, 5, 1, 2, 2))
            + [("conv", "conv3", 384, 3, 1, 1, 1), ("relu",),
               ("conv", "conv4", 384, 3, 1, 1, 2), ("relu",),
               ("conv", "conv5", 256, 3, 1, 1, 2), ("relu",), ("pool",)])


def _classifier_dropout_after(hidden):
    # Krizhevsky/Caffe: dropout on the outputs of fc6 and fc7
    return [("flatten",), ("fc", "fc6", hidden), ("relu",), ("dropout",),
            ("fc", "fc7", hidden), ("relu",), ("dropout",), ("fc", "fc8", None)]


def _classifier_dropout_before(hidden):
    # torchvision: dropout on the inputs of fc6 and fc7
    return [("flatten",), ("dropout",), ("fc", "fc6", hidden), ("relu",),
            ("dropout",), ("fc", "fc7", hidden), ("relu",), ("fc", "fc8", None)]


def _paper_init(rng, name, shape):
    """Krizhevsky 2012: N(0, 0.01) weights; bias 1 on conv2/4/5 and fc6/7 (feeds ReLUs positive input)."""
    layer, kind = name.split(".")
    if kind == "weight":
        return rng.normal(0.0, 0.01, shape)
    one = layer in ("conv2", "conv4", "conv5", "fc6", "fc7")
    return np.full(shape, 1.0 if one else 0.0)


def _caffe_init(rng, name, shape):
    layer, kind = name.split(".")
    if kind == "weight":
        return rng.normal(0.0, 0.005 if layer in ("fc6", "fc7") else 0.01, shape)
    return np.full(shape, 0.1 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0)


def _pytorch_default_init(rng, name, shape, fan_in):
    # nn.Conv2d / nn.Linear reset_parameters: kaiming_uniform(a=sqrt(5)) on weights, which
    # is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound on biases
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


def _he_init(rng, name, shape, fan_in):
    if name.endswith(".weight"):
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    return np.zeros(shape)


@dataclass(frozen=True)
class ModelSpec:
    input_size: int
    features: list
    classifier: list
    init: str                   # paper | caffe | pytorch | he
    standardize_input: bool     # True: inputs divided by the per-channel std (torchvision's
    #                             convention, what PyTorch's and He's init assume); False:
    #                             mean-subtracted 0-255 pixels (Krizhevsky's and Caffe's)


MODELS = {
    "alexnet": ModelSpec(227, _alexnet_features(False), _classifier_dropout_after(4096), "paper", False),
    "caffenet": ModelSpec(227, _alexnet_features(True), _classifier_dropout_after(4096), "caffe", False),
    "alexnet-owt": ModelSpec(224, [
        ("conv", "conv1", 64, 11, 4, 2, 1), ("relu",), ("pool",),
        ("conv", "conv2", 192, 5, 1, 2, 1), ("relu",), ("pool",),
        ("conv", "conv3", 384, 3, 1, 1, 1), ("relu",),
        ("conv", "conv4", 256, 3, 1, 1, 1), ("relu",),
        ("conv", "conv5", 256, 3, 1, 1, 1), ("relu",), ("pool",),
    ], _classifier_dropout_before(4096), "pytorch", True),
    "alexnet-mini": ModelSpec(56, [
        ("conv", "conv1", 32, 5, 2, 2, 1), ("relu",), ("lrn",), ("pool",),
        ("conv", "conv2", 64, 5, 1, 2, 2), ("relu",), ("lrn",), ("pool",),
        ("conv", "conv3", 96, 3, 1, 1, 1), ("relu",),
        ("conv", "conv4", 96, 3, 1, 1, 2), ("relu",),
        ("conv", "conv5", 64, 3, 1, 1, 2), ("relu",), ("pool",),
    ], _classifier_dropout_after(256), "he", True),
}


class ModelError(ValueError):
    """A wrong model name, or weights that do not fit the model (one line, with the fix)."""


# --------------------------------------------------------------------------- the network

def build_layers(name, num_classes, ops, dropout=0.5, shards=None):
    """The layers of model `name` over backend module `ops`, and its parameter shapes.

    With `shards` (model_parallel.Shards, --parallel hybrid) each fully connected layer
    holds this rank's rows only and gathers are put around them (model_parallel.py); the
    shapes are then this rank's. With shards.split_convs (--parallel model) the
    convolutions hold this rank's output channels too.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    layers, shape, dropouts = [], (1, 3, spec.input_size, spec.input_size), 0
    split_width = None      # full width of the split activation between two split fc layers
    split_channels = None   # channel count of a split convolution's output (--parallel model)
    split_convs = shards is not None and shards.split_convs
    for item in spec.features + spec.classifier:
        kind = item[0]
        # a convolution, LRN and fc6's flattening need every channel; not a grouped
        # convolution whose ranks' groups are their own channels (the two towers)
        towers = kind == "conv" and split_channels is not None and _own_channels_feed_own_groups(
            item, split_channels, shards)
        if split_channels is not None and kind in ("conv", "lrn", "flatten") and not towers:
            layers.append(GatherChannels(shards, split_channels))
            shape, split_channels = layers[-1].output_shape(shape), None
        if kind == "fc" and shards is not None and not (split_convs and split_width is None):
            layers.append(GatherBatch(shards) if split_width is None else GatherColumns(shards, split_width))
            shape = layers[-1].output_shape(shape)
        if kind == "conv" and split_convs:
            group_inputs, layer = _split_conv(item, split_channels or shape[1], ops, shards)
            if group_inputs is not None and not towers:
                layers.append(group_inputs)
                shape = group_inputs.output_shape(shape)
            split_channels = item[2]
        elif kind == "conv":
            _, lname, out_ch, k, stride, pad, groups = item
            layer = Conv(ops, lname, shape[1], out_ch, k, stride, pad, groups)
        elif kind == "fc":
            _, lname, out = item
            out = out or num_classes
            if shards is not None:
                if out < shards.size:
                    mode = "model" if split_convs else "hybrid"
                    raise ModelError(f"--parallel {mode} splits {lname}'s {out} outputs over {shards.size} ranks, "
                                     f"leaving some with none; use at most {out} ranks, or --parallel data")
                start, stop = shards.share(out)
                split_width, out = out, stop - start
            layer = Linear(ops, lname, shape[1], out)
        elif kind == "relu":
            layer = ReLU(ops)
        elif kind == "lrn":
            layer = LRN(ops)
        elif kind == "pool":
            layer = MaxPool(ops)
        elif kind == "dropout":
            columns = None if split_width is None else (shards.share(split_width)[0], split_width)
            layer = Dropout(ops, dropout, dropouts, columns)
            dropouts += 1
        else:
            layer = Flatten(ops)
        shape = layer.output_shape(shape)
        layers.append(layer)
    if shards is not None:
        layers.append(GatherColumns(shards, split_width))
        if not split_convs:   # --parallel model: every rank has every image already
            layers.append(LocalRows(shards))
    param_shapes = {}          # name -> shape, in forward order
    for layer in layers:
        if layer.params:
            weight, bias = layer.params
            param_shapes[weight], param_shapes[bias] = layer.weight_shape, layer.bias_shape
    return layers, param_shapes


def _own_channels_feed_own_groups(item, channels, shards):
    """Whether, on every rank, the groups of grouped convolution `item` that its output
    share belongs to take exactly the rank's share of the `channels` before it: then the
    convolution needs no gather (Krizhevsky's towers: conv4 and conv5 on 2 ranks)."""
    _, _, out_ch, _, _, _, groups = item
    if groups == 1 or out_ch < shards.size:
        return False
    per_group, inputs = out_ch // groups, channels // groups
    outputs, own = shards.bounds(out_ch), shards.bounds(channels)
    return all((a // per_group * inputs, ((b - 1) // per_group + 1) * inputs) == (own[j], own[j + 1])
               for j, (a, b) in enumerate(zip(outputs[:-1], outputs[1:])))


def _split_conv(item, in_channels, ops, shards):
    """(ChannelSlice or None, Conv): this rank's output channels of convolution `item`,
    given every input channel; a grouped convolution first takes its group's inputs. The
    weights are rows of the whole layer's, as for a split fc layer."""
    _, lname, out_ch, k, stride, pad, groups = item
    if out_ch < shards.size:
        raise ModelError(f"--parallel model splits {lname}'s {out_ch} channels over {shards.size} ranks, leaving "
                         f"some with none; use at most {out_ch} ranks")
    start, stop = shards.share(out_ch)
    if groups == 1:
        return None, Conv(ops, lname, in_channels, stop - start, k, stride, pad, 1)
    # each rank's channels must lie in one group, or be whole groups side by side; every
    # rank checks every share, so all of them refuse together
    per_group, inputs = out_ch // groups, in_channels // groups
    bounds = shards.bounds(out_ch)
    if any(a // per_group != (b - 1) // per_group and (a % per_group or b % per_group)
           for a, b in zip(bounds[:-1], bounds[1:])):
        raise ModelError(f"--parallel model: {lname} has {groups} groups of {per_group} channels, and {shards.size} "
                         f"ranks do not split it along groups; use a number of ranks that divides {groups} or is a "
                         f"multiple of it, or --parallel hybrid")
    first, last = start // per_group, (stop - 1) // per_group
    spanned = last - first + 1
    group_inputs = None if spanned == groups else ChannelSlice(ops, first * inputs, (last + 1) * inputs)
    return group_inputs, Conv(ops, lname, spanned * inputs, stop - start, k, stride, pad, spanned)


class Net:
    """A sequential convnet whose parameters live on one backend.

    With `shards` (--parallel hybrid) the fully connected layers hold this rank's rows
    only (`split_names`), and with --parallel model the convolutions their output
    channels too; `state_dict` and `load_state_dict` still speak whole arrays, so
    checkpoints are the same whichever way the model ran, and are then collectives.
    """

    def __init__(self, name, num_classes, backend, dtype, seed, dropout=0.5, shards=None):
        self.name, self.num_classes, self.seed = name, num_classes, seed
        self.backend_name = backend
        self.ops = get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.shards = shards
        self.layers, self.param_shapes = build_layers(name, num_classes, self.ops, dropout, shards)
        self.full_shapes = build_layers(name, num_classes, None, dropout)[1]
        self.split_names = set()   # parameters of which this rank holds some rows only
        if shards is not None:
            kinds = (Linear, Conv) if shards.split_convs else (Linear,)
            self.split_names = {n for layer in self.layers if isinstance(layer, kinds) for n in layer.params}
        self.spec = MODELS[name]
        self.input_size = self.spec.input_size
        initial = self._initial_values(self.spec.init, seed)
        self.params = {n: self.ops.to_device(self.local_part(n, a)) for n, a in initial.items()}
        self.use_gradient_arrays({n: self.ops.zeros(s, self.dtype) for n, s in self.param_shapes.items()})

    def _initial_values(self, init, seed):
        # parameters are drawn whole in float64 on the host, in forward order, from one
        # generator: the same seed gives the same weights on every backend, dtype and split
        rng = np.random.default_rng(seed)
        values = {}
        for pname, shape in self.full_shapes.items():
            fan_in = int(np.prod(self.full_shapes[pname.replace(".bias", ".weight")][1:]))
            if init == "paper":
                value = _paper_init(rng, pname, shape)
            elif init == "caffe":
                value = _caffe_init(rng, pname, shape)
            elif init == "pytorch":
                value = _pytorch_default_init(rng, pname, shape, fan_in)
            else:
                value = _he_init(rng, pname, shape, fan_in)
            values[pname] = value.astype(self.dtype)
        return values

    # -- parameters ------------------------------------------------------------------

    @property
    def num_parameters(self):
        return int(sum(np.prod(s) for s in self.full_shapes.values()))

    def local_part(self, name, full):
        """This rank's rows of parameter `name` (a host array of its whole shape)."""
        if name not in self.split_names:
            return full
        start, stop = self.shards.share(self.full_shapes[name][0])
        return np.ascontiguousarray(full[start:stop])

    def whole(self, name, part):
        """Parameter `name` whole, from every rank's rows (a host array of this rank's
        rows, e.g. its momentum); a collective for split names."""
        if name not in self.split_names or self.shards.size == 1:
            return part
        return self.shards.gather_host_rows(part, self.shards.widths(self.full_shapes[name][0]))

    def use_gradient_arrays(self, grads):
        """Have backward write gradients into these arrays (e.g. views into allreduce buckets)."""
        missing = set(self.param_shapes) - set(grads)
        if missing:
            raise ModelError(f"gradient arrays missing for {sorted(missing)}")
        self.grads = grads
        for layer in self.layers:
            layer.grads = grads

    def state_dict(self):
        """{name: numpy array} on the host, PyTorch names and layouts, whole arrays (a
        collective when the model is split)."""
        return {n: self.whole(n, self.ops.to_host(a)) for n, a in self.params.items()}

    def load_state_dict(self, state, source="state dict"):
        """Whole arrays in; a split model keeps its rows."""
        names = set(self.full_shapes)
        if set(state) != names:
            extra, missing = sorted(set(state) - names), sorted(names - set(state))
            raise ModelError(f"{source}: does not fit model {self.name} (missing {missing}, unexpected {extra})")
        for pname, shape in self.full_shapes.items():
            value = np.asarray(state[pname])
            if tuple(value.shape) != tuple(shape):
                raise ModelError(f"{source}: {pname} has shape {tuple(value.shape)}, model {self.name} "
                                 f"with {self.num_classes} classes expects {tuple(shape)}")
        for pname in self.param_shapes:
            value = self.local_part(pname, np.asarray(state[pname], self.dtype))
            self.ops.copy_into(self.params[pname], self.ops.to_device(value))

    def save_npz(self, path):
        np.savez(path, **self.state_dict())

    def load_npz(self, path):
        with np.load(path, allow_pickle=False) as f:
            self.load_state_dict({k: f[k] for k in f.files}, source=str(path))

    # -- computation -----------------------------------------------------------------

    def _input(self, x):
        x = np.asarray(x, self.dtype) if isinstance(x, np.ndarray) else x
        expected = (3, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ModelError(f"model {self.name} takes input (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if isinstance(x, np.ndarray):
            return self.ops.to_device(x)
        # a backend array (crop_flip_normalize makes float32): cast where it lives
        return x if x.dtype == self.dtype else x.astype(self.dtype)

    def forward_device(self, x, train, step=0, sample_offset=0):
        """Logits as a backend array; keeps what backward needs when train=True."""
        ctx = StepContext(self.params, train, self.seed, step, sample_offset)
        x = self._input(x)
        layers = self.layers
        if x.shape[0] == 0 and self.shards is not None:
            # a rank out of evaluation images still takes part in the gathers: it brings
            # no rows to the first, and skips the convolutions (no kernel runs on 0 images)
            first = next(i for i, layer in enumerate(layers) if isinstance(layer, GatherBatch))
            features = int(np.prod(self.full_shapes[layers[first + 1].params[0]][1:]))
            x, layers = self.ops.zeros((0, features), self.dtype), layers[first:]
        for layer in layers:
            x = layer.forward(x, ctx)
        return x

    def forward(self, x, train=False, step=0, sample_offset=0):
        """Logits as a host numpy array (N, classes)."""
        return self.ops.to_host(self.forward_device(x, train, step, sample_offset))

    def backward(self, dlogits, on_grads_ready=None):
        """Fill self.grads from dL/dlogits; call on_grads_ready(names) as each layer finishes.

        The callback is how the trainer starts reducing a gradient bucket while the rest
        of backward still runs (fc8 finishes first, conv1 last).
        """
        dy = dlogits
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            dy = layer.backward(dy, need_dx=i > 0)
            if layer.params and on_grads_ready is not None:
                on_grads_ready(layer.params)

    def loss_and_grads(self, x, labels, step=0, sample_offset=0, on_grads_ready=None, grad_scale=1.0):
        """Mean softmax cross-entropy over the batch and its gradients {name: array}.

        grad_scale multiplies the gradients (not the loss): a rank holding 1/size of the
        global batch passes 1/size, so the sum over ranks is the global-batch mean.
        """
        logits = self.forward_device(x, True, step, sample_offset)
        loss_rows, dlogits = self.ops.softmax_cross_entropy_rows(logits, np.asarray(labels, np.int64))
        if grad_scale != 1.0:
            self.ops.scale_(dlogits, grad_scale)   # (N, classes): far cheaper than scaling every gradient
        self.backward(dlogits, on_grads_ready)
        # read the loss only now: on a GPU the read waits for the queue, and reading it before
        # the backward pass was queued left the GPU idle while Python queued it
        return mean_loss(self.ops.to_host(loss_rows)), self.grads


def build_model(name, num_classes=1000, backend="numpy", dtype="float32", seed=0, dropout=0.5, shards=None):
    return Net(name, num_classes, backend, dtype, seed, dropout, shards)


def describe(num_classes=1000):
    lines = [f"{'model':<14}{'input':>8}{'parameters':>14}"]
    for name, spec in MODELS.items():
        _, shapes = build_layers(name, num_classes, ops=None)
        count = sum(int(np.prod(s)) for s in shapes.values())
        lines.append(f"{name:<14}{spec.input_size:>8}{count:>14,}")
    return "\n".join(lines)


def main(argv=None):
    """python -m mpiconvnet.models [--classes N]: each model with its input size and parameter count."""
    argv = sys.argv[1:] if argv is None else argv
    classes = 1000
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python -m mpiconvnet.models [--classes N]: each model with its input size and parameter count")
        return 0
    if argv[:1] == ["--classes"] and len(argv) == 2 and argv[1].isdigit():
        classes = int(argv[1])
    elif argv:
        print("usage: python -m mpiconvnet.models [--classes N]", file=sys.stderr)
        return 2
    print(describe(classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
