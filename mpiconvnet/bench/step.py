"""Images/s of a whole training step (forward, backward, SGD update) on synthetic data,
against the same network in PyTorch on the same threads or GPU, measured in the same run.

    python -m mpiconvnet.bench step --model alexnet --batch 64 --threads 2
    python -m mpiconvnet.bench step --model alexnet --batch 128 --backend cuda [--tf32]

Prediction: a training step costs ~3x the forward FLOPs (forward, backward to data,
backward to weights); `flops` below counts them from the layer shapes, so the table also
shows the GFLOP/s each implementation reaches.
"""
import json
import sys
import time

import numpy as np

from mpiconvnet.bench._args import at_least, model_names, thread_count
from mpiconvnet.cli import Parser


def layer_flops(net, batch):
    """[FLOPs of each layer's forward] for `batch` images: multiply-adds x 2 of the conv and
    fc layers, 0 for the rest (their cost is memory traffic, not arithmetic)."""
    shape, flops = (batch, 3, net.input_size, net.input_size), []
    for layer in net.layers:
        out = layer.output_shape(shape)
        per_output = int(np.prod(layer.weight_shape[1:])) if layer.params else 0   # (in/groups)*kh*kw, or in
        flops.append(2 * int(np.prod(out)) * per_output)
        shape = out
    return flops


def forward_flops(net, batch):
    return sum(layer_flops(net, batch))


def timed(step, synchronize):
    start = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - start


def make_ours(args, x, labels):
    """(net, one training step, synchronize) of mpiconvnet on the chosen backend."""
    from mpiconvnet.models import build_model
    from mpiconvnet.optim import SGD
    net = build_model(args.model, num_classes=1000, backend=args.backend, dtype="float32", seed=0)
    if args.backend == "cuda":
        net.ops.set_tf32(args.tf32)
    opt = SGD(net.ops, net.params)
    x_dev = net.ops.to_device(x)
    state = {"step": 0}

    def step():
        loss, grads = net.loss_and_grads(x_dev, labels, step=state["step"])
        opt.step(grads, 0.001)
        state["step"] += 1

    return net, step, net.ops.synchronize


def make_torch(args, net, x, labels):
    """(one training step, synchronize) of the same network in PyTorch."""
    import torch
    from mpiconvnet.torch_twin import torch_sgd, torch_twin
    device = "cuda" if args.backend == "cuda" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = torch_twin(net, torch).to(device).train()
    opt = torch_sgd(torch, model.named_parameters(), lr=0.001)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(labels).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()

    return step, (torch.cuda.synchronize if device == "cuda" else (lambda: None))


def main(argv):
    p = Parser(prog="python -m mpiconvnet.bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=model_names(), default="alexnet")
    p.add_argument("--batch", type=at_least(1), default=64)
    p.add_argument("--threads", type=thread_count, default=2, help="CPU threads for both implementations")
    p.add_argument("--backend", choices=("numpy", "cuda"), default="numpy")
    p.add_argument("--steps", type=at_least(1), help="timed steps, the median is reported (default 5 on numpy, 30 on cuda)")
    p.add_argument("--warmup", type=at_least(0), help="untimed steps first (default 2 on numpy, 5 on cuda: cuDNN's "
                                                 "algorithm searches run in the first steps)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in both (cuda only)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--json", action="store_true", help="also print one JSON line of the results")
    p.add_argument("--profile", action="store_true",
                   help="also print each implementation's GPU kernels and how busy the GPU was (cuda; needs torch)")
    p.add_argument("--host-profile", action="store_true",
                   help="also print where our step spends its host (Python) time, by function (cProfile)")
    args = p.parse_args(argv)
    if args.tf32 and args.backend != "cuda":
        p.error("--tf32 is a mode of the GPU's tensor cores: use it with --backend cuda")
    if args.profile and args.backend != "cuda":
        p.error("--profile reads the GPU's kernel timeline: use it with --backend cuda (--host-profile works on both)")
    if args.profile:
        try:
            import torch.profiler  # noqa: F401
        except ImportError:
            p.error("--profile needs PyTorch (its profiler reads the kernel timeline): pip install torch")
    # a GPU step takes milliseconds: more of them cost nothing and steady the median
    if args.steps is None:
        args.steps = 30 if args.backend == "cuda" else 5
    if args.warmup is None:
        args.warmup = 5 if args.backend == "cuda" else 2

    from mpiconvnet.backends import get_backend
    from mpiconvnet.distributed import SetupError, init, set_blas_threads
    if args.backend == "cuda":
        try:
            init("cuda", args.threads, need_threads=False)   # one process: device 0, or a one-line error
        except SetupError as e:
            print(f"bench step: {e}", file=sys.stderr)
            return 2
    set_blas_threads(args.threads)
    get_backend(args.backend).set_num_threads(args.threads)   # after: the NumPy backend keeps BLAS at 1
    rng = np.random.default_rng(0)
    from mpiconvnet.models import MODELS
    size = MODELS[args.model].input_size
    x = rng.normal(0, 1, size=(args.batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch).astype(np.int64)

    net, our_step, our_sync = make_ours(args, x, labels)
    # forward, data gradient and weight gradient of every layer, less conv1's data gradient,
    # which neither side computes (the images need none)
    flops = 3 * forward_flops(net, args.batch) - layer_flops(net, args.batch)[0]
    contenders = [("mpiconvnet " + args.backend, our_step, our_sync)]
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch is not importable: no baseline (pip install torch to compare)")
        else:
            if args.backend == "cuda" and not torch.cuda.is_available():
                print(f"torch {torch.__version__} sees no GPU (a CPU-only build?): no baseline "
                      "(install a CUDA build of torch to compare)")
            else:
                torch.set_num_threads(args.threads)
                contenders.append((f"pytorch {torch.__version__} " + ("cuda" if args.backend == "cuda" else "cpu"),)
                                  + make_torch(args, net, x, labels))
    for _, step, sync in contenders:
        for _ in range(args.warmup):
            timed(step, sync)
    # the two take turns step by step, so a burst of other load on a shared machine hits
    # both alike; medians per implementation
    times = {name: [] for name, _, _ in contenders}
    for _ in range(args.steps):
        for name, step, sync in contenders:
            times[name].append(timed(step, sync))
    rows = [(name, float(np.median(t))) for name, t in times.items()]
    ours = rows[0][1]
    theirs = rows[1][1] if len(rows) > 1 else None
    where = f"{args.threads} thread(s)"
    if args.backend == "cuda":
        from mpiconvnet.backends.cuda import context
        where = "1 GPU" + (" TF32" if args.tf32 else " FP32") + f", cuDNN {context.get().conv_api()} API"
    print(f"{args.model}, batch {args.batch}, {where}, median of {args.steps} steps; "
          f"predicted work {flops / 1e9:.1f} GFLOP per step (3x forward, less conv1's data gradient)")
    print(f"{'implementation':<28}{'ms/step':>10}{'images/s':>12}{'GFLOP/s':>10}")
    for name, seconds in rows:
        print(f"{name:<28}{seconds * 1e3:>10.2f}{args.batch / seconds:>12.1f}{flops / seconds / 1e9:>10.1f}")
    result = {"model": args.model, "batch": args.batch, "backend": args.backend, "threads": args.threads,
              "tf32": args.tf32, "ours_images_per_s": args.batch / ours, "ours_ms_per_step": ours * 1e3}
    if args.backend == "cuda":
        result["cudnn_api"] = context.get().conv_api()
    if theirs is not None:
        ratio = theirs / ours
        result.update(torch_images_per_s=args.batch / theirs, ratio=ratio)
        target = ">= 1.3x (AlexNet, batch 64, 2 threads)" if args.backend == "numpy" else ">= 1x (same precision)"
        print(f"ratio mpiconvnet / pytorch: {ratio:.2f}x   (target {target}; the two take turns step by step, "
              f"but on a busy machine PyTorch's threads suffer most: compare with --threads 1)")
    if args.backend == "cuda":
        # device memory each caching allocator holds (in one process the two are separate);
        # the NumPy backend's figure, the process's peak resident set, would include PyTorch's
        result["ours_device_mb"] = net.ops.memory_high_water() / 2**20
        line = f"device memory held: mpiconvnet {result['ours_device_mb']:.0f} MB (its pool)"
        if theirs is not None:
            result["torch_device_mb"] = torch.cuda.max_memory_reserved() / 2**20
            line += f", pytorch {result['torch_device_mb']:.0f} MB (the most its caching allocator reserved)"
        print(line)
    if args.json:
        print(json.dumps(result))
    if args.host_profile:
        print_host_profile(contenders[0][1], contenders[0][2], args.steps)
    if args.profile and args.backend == "cuda":
        for name, step, sync in contenders:
            print_kernel_profile(name, step, sync, args.steps)
    return 0


def print_host_profile(step, synchronize, steps, rows=25):
    """Our step under cProfile: on a GPU the host's own time per step is what bounds small
    batches (the GPU waits while Python queues the next kernel)."""
    import cProfile
    import pstats
    synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\nhost time of our step by function, over {steps} steps (tottime: the function's own time)")
    stats.sort_stats("tottime").print_stats(rows)


def print_kernel_profile(name, step, synchronize, steps, rows=15):
    """Time in GPU kernels per step, by kernel, through PyTorch's profiler (CUPTI sees every
    kernel of the process, ours from PyCUDA, cuDNN and cuBLAS included), and the fraction of
    the step's wall time the GPU was busy: what is left is launch overhead and waiting."""
    from torch.profiler import ProfilerActivity, profile
    synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize()
    wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.key_averages() if _device_time(e) > 0]
    kernels.sort(key=_device_time, reverse=True)
    busy = sum(_device_time(e) for e in kernels) / 1e6 / steps
    print(f"\n{name}: {wall * 1e3:.2f} ms per step (profiled), GPU busy {busy * 1e3:.2f} ms ({busy / wall:.0%})")
    print(f"{'ms/step':>9}{'calls':>7}  kernel")
    for e in kernels[:rows]:
        print(f"{_device_time(e) / 1e3 / steps:>9.3f}{e.count // steps:>7}  {e.key[:110]}")


def _device_time(event):
    """An event's own time on the GPU in microseconds (the attribute's name changed in torch 2.4)."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return value
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
