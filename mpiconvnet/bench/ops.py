"""Per-op speed of the NumPy backend against PyTorch CPU, layer by layer through AlexNet.

    python -m mpiconvnet.bench ops --threads 2
    python -m mpiconvnet.bench ops --threads 2 --batch 64 --repeat 3 --only conv2,lrn1

Times every layer's forward and backward at AlexNet's shapes (Krizhevsky 2012, 227x227
input, conv2/4/5 in two groups) with the NumPy backend and with PyTorch (when it imports)
on the same thread count, the two taking turns, and prints the best of --repeat runs, the
GFLOP/s of the GEMM layers and the ratio torch time / numpy time (above 1: NumPy is faster).
"""
import sys
import time

import numpy as np

import mpiconvnet.backends.numpy_backend as B
from mpiconvnet.bench._args import at_least, thread_count
from mpiconvnet.cli import Parser
from mpiconvnet.torch_twin import torch_sgd

LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
ALEXNET_PARAMETERS = [(96, 3, 11, 11), (96,), (256, 48, 5, 5), (256,), (384, 256, 3, 3), (384,),
                      (384, 192, 3, 3), (384,), (256, 192, 3, 3), (256,), (4096, 9216), (4096,),
                      (4096, 4096), (4096,), (1000, 4096), (1000,)]     # 61 M parameters


def alexnet_layers(batch):
    """(name, kind, input shape, parameters) for each layer of AlexNet's training step."""
    N = batch
    conv = lambda cin, hw, k, g, r, stride, pad: dict(x=(N, cin, hw, hw), w=(k, cin // g, r, r),
                                                      stride=stride, pad=pad, groups=g)
    return [
        ("conv1", "conv", conv(3, 227, 96, 1, 11, 4, 0) | dict(need_dx=False)),
        ("relu1", "relu", dict(x=(N, 96, 55, 55))),
        ("lrn1", "lrn", dict(x=(N, 96, 55, 55))),
        ("pool1", "pool", dict(x=(N, 96, 55, 55))),
        ("conv2", "conv", conv(96, 27, 256, 2, 5, 1, 2)),
        ("relu2", "relu", dict(x=(N, 256, 27, 27))),
        ("lrn2", "lrn", dict(x=(N, 256, 27, 27))),
        ("pool2", "pool", dict(x=(N, 256, 27, 27))),
        ("conv3", "conv", conv(256, 13, 384, 1, 3, 1, 1)),
        ("conv4", "conv", conv(384, 13, 384, 2, 3, 1, 1)),
        ("conv5", "conv", conv(384, 13, 256, 2, 3, 1, 1)),
        ("relu3-5", "relu", dict(x=(N, 384 + 384 + 256, 13, 13))),
        ("pool5", "pool", dict(x=(N, 256, 13, 13))),
        ("fc6", "linear", dict(x=(N, 9216), w=(4096, 9216))),
        ("drop6", "dropout", dict(x=(N, 4096))),
        ("fc7", "linear", dict(x=(N, 4096), w=(4096, 4096))),
        ("drop7", "dropout", dict(x=(N, 4096))),
        ("fc8", "linear", dict(x=(N, 4096), w=(1000, 4096))),
        ("loss", "loss", dict(x=(N, 1000))),
        ("sgd", "sgd", dict(x=(1,), shapes=ALEXNET_PARAMETERS)),   # the update, in the "fwd" column
    ]


def gemm_flops(kind, spec):
    """Multiply-adds x 2 of forward and of backward (data + filter) for the GEMM layers."""
    if kind == "conv":
        N, C, H, _ = spec["x"]
        K, Cg, R, S = spec["w"]
        P = (H + 2 * spec["pad"] - R) // spec["stride"] + 1
        forward = 2 * N * K * Cg * R * S * P * P
        return forward, forward * (2 if spec.get("need_dx", True) else 1)
    if kind == "linear":
        forward = 2 * spec["x"][0] * spec["w"][0] * spec["w"][1]
        return forward, 2 * forward
    return 0, 0


def best_times(functions, repeat, clock):
    """The best of `repeat` timings of each function, taking turns: on a shared machine a
    burst of someone else's work then slows every contender alike, not just one of them."""
    for fn in functions:
        fn()                                              # warm-up: allocations, page faults
    best = [float("inf")] * len(functions)
    for _ in range(repeat):
        for i, fn in enumerate(functions):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def numpy_layer(kind, spec, rng):
    """(forward, backward) closures running the NumPy backend on random float32 data."""
    f32 = lambda shape: rng.standard_normal(shape, dtype=np.float32)
    x = f32(spec["x"])
    if kind == "conv":
        w, b = f32(spec["w"]) * 0.01, f32(spec["w"][:1])
        args = (spec["stride"], spec["pad"], spec["groups"])
        y = B.conv_forward(x, w, b, *args)
        dy = f32(y.shape)
        def backward():
            if spec.get("need_dx", True):
                B.conv_backward_data(dy, w, x.shape, *args)
            B.conv_backward_filter(x, dy, w.shape, *args)
            B.conv_backward_bias(dy)
        return (lambda: B.conv_forward(x, w, b, *args)), backward
    if kind == "relu":
        y = B.relu_forward(x)
        return (lambda: B.relu_forward(x)), (lambda: B.relu_backward(y, x))
    if kind == "lrn":
        x = np.maximum(x, 0) * 10                        # post-ReLU activations
        y = B.lrn_forward(x, **LRN)
        return (lambda: B.lrn_forward(x, **LRN)), (lambda: B.lrn_backward(x, y, x, **LRN))
    if kind == "pool":
        y = B.maxpool_forward(x, 3, 2)
        return (lambda: B.maxpool_forward(x, 3, 2)), (lambda: B.maxpool_backward(x, y, y, 3, 2))
    if kind == "dropout":
        _, mask = B.dropout_forward(x, 0.5, 1, 1)
        return (lambda: B.dropout_forward(x, 0.5, 1, 1)), (lambda: B.dropout_backward(x, mask, 0.5))
    if kind == "linear":
        w, b = f32(spec["w"]) * 0.01, f32(spec["w"][:1])
        dy = f32((x.shape[0], w.shape[0]))
        def backward():
            B.linear_backward_data(dy, w)
            B.linear_backward_filter(x, dy)
            B.linear_backward_bias(dy)
        return (lambda: B.linear_forward(x, w, b)), backward
    if kind == "loss":
        labels = rng.integers(0, x.shape[1], x.shape[0])
        return (lambda: B.softmax_cross_entropy(x, labels)), (lambda: None)
    if kind == "sgd":
        tensors = [(f32(shape), f32(shape), np.zeros(shape, np.float32)) for shape in spec["shapes"]]
        def update():
            for param, grad, velocity in tensors:
                B.sgd_momentum_update(param, grad, velocity, 0.01, 0.9, 5e-4)
        return update, (lambda: None)
    raise ValueError(kind)


def torch_layer(torch, kind, spec, rng):
    """(forward, backward) closures running PyTorch on the same shapes; backward is autograd's."""
    F = torch.nn.functional
    f32 = lambda shape, grad=False: torch.tensor(rng.standard_normal(shape, dtype=np.float32), requires_grad=grad)
    x = f32(spec["x"], grad=spec.get("need_dx", True))
    params = []
    if kind == "conv":
        w, b = f32(spec["w"], True), f32(spec["w"][:1], True)
        params = [w, b]
        fn = lambda: F.conv2d(x, w, b, stride=spec["stride"], padding=spec["pad"], groups=spec["groups"])
    elif kind == "relu":
        fn = lambda: F.relu(x)
    elif kind == "lrn":
        fn = lambda: F.local_response_norm(x, LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"])
    elif kind == "pool":
        fn = lambda: F.max_pool2d(x, 3, 2)
    elif kind == "dropout":
        fn = lambda: F.dropout(x, 0.5, training=True)
    elif kind == "linear":
        w, b = f32(spec["w"], True), f32(spec["w"][:1], True)
        params = [w, b]
        fn = lambda: F.linear(x, w, b)
    elif kind == "loss":
        labels = torch.tensor(rng.integers(0, spec["x"][1], spec["x"][0]))
        fn = lambda: F.cross_entropy(x, labels)
    elif kind == "sgd":
        params = [f32(shape, True) for shape in spec["shapes"]]
        for param in params:
            param.grad = f32(param.shape)
        # every tensor a weight here, with the same lr and weight decay as ours
        optimizer = torch_sgd(torch, [(f"w{i}.weight", p) for i, p in enumerate(params)], lr=0.01)
        return optimizer.step, (lambda: None)
    else:
        raise ValueError(kind)
    inputs = ([x] if x.requires_grad else []) + params
    y = fn()
    dy = torch.ones_like(y)

    def forward():
        with torch.no_grad():
            fn()
    return forward, lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)


def parse(argv):
    parser = Parser(prog="python -m mpiconvnet.bench ops", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=thread_count, default=1, help="threads for the NumPy backend's pool and for torch")
    parser.add_argument("--batch", type=at_least(1), default=64)
    parser.add_argument("--repeat", type=at_least(1), default=3, help="runs per op; the best is reported")
    parser.add_argument("--only", default="", help="comma-separated layer names (default: all)")
    parser.add_argument("--no-torch", action="store_true", help="time the NumPy backend only")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, robust on a shared machine; with --threads 1 only "
                             "(more threads add their CPU time up)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error(f"--clock cpu adds up the CPU time of all {args.threads} threads, so its columns would not "
                     f"be times per call: use it with --threads 1, or --clock wall")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    layers = alexnet_layers(args.batch)
    names = [name for name, _, _ in layers]
    only = [name for name in args.only.split(",") if name]
    unknown = [name for name in only if name not in names]
    if unknown:
        print(f"bench ops: unknown layer(s) {', '.join(unknown)} in --only; choose from {', '.join(names)}",
              file=sys.stderr)
        return 2
    layers = [layer for layer in layers if not only or layer[0] in only]
    if not B.set_num_threads(args.threads):
        print("bench ops: could not set the BLAS thread count (NumPy is not using OpenBLAS); "
              "set OMP_NUM_THREADS instead", file=sys.stderr)

    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("bench ops: torch does not import; timing NumPy only", file=sys.stderr)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    results = {}
    for name, kind, spec in layers:                      # layer by layer: only one layer's arrays live
        functions = list(numpy_layer(kind, spec, rng))
        if torch is not None:
            functions += torch_layer(torch, kind, spec, rng)
        times = best_times(functions, args.repeat, clock)
        results[name] = times if torch is not None else times + [None, None]
        del functions

    print(f"AlexNet ops, batch {args.batch}, {args.threads} thread(s), float32, best of {args.repeat} ({args.clock} clock); "
          f"ms per call; ratio = torch / numpy (fwd + bwd)")
    header = f"{'layer':8s} {'np fwd':>8s} {'np bwd':>8s} {'GFLOP/s':>8s} {'th fwd':>8s} {'th bwd':>8s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    total = np.zeros(4)
    for name, kind, spec in layers:
        t = results[name]
        flop_f, flop_b = gemm_flops(kind, spec)
        rate = f"{(flop_f + flop_b) / (t[0] + t[1]) / 1e9:8.0f}" if flop_f else f"{'':8s}"
        torch_cols = (f"{t[2] * 1e3:8.1f} {t[3] * 1e3:8.1f} {(t[2] + t[3]) / (t[0] + t[1]):6.2f}"
                      if t[2] is not None else "")
        print(f"{name:8s} {t[0] * 1e3:8.1f} {t[1] * 1e3:8.1f} {rate} {torch_cols}")
        total += [v if v is not None else np.nan for v in t]
    torch_total = f"{total[2] * 1e3:8.1f} {total[3] * 1e3:8.1f} {(total[2] + total[3]) / (total[0] + total[1]):6.2f}" \
        if torch is not None else ""
    print("-" * len(header))
    print(f"{'total':8s} {total[0] * 1e3:8.1f} {total[1] * 1e3:8.1f} {'':8s} {torch_total}")
    print(f"numpy: {args.batch / (total[0] + total[1]):.1f} img/s over these ops"
          + (f"; torch: {args.batch / (total[2] + total[3]):.1f} img/s" if torch is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
