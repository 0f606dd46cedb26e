"""Top-1 and top-5 of a checkpoint on a packed split, distributed and exact.

    python -m mpiconvnet.evaluate --data shards/ --checkpoint runs/a/checkpoints/ckpt-00001000.h5
    python -m mpiconvnet.evaluate --data shards/ --checkpoint runs/a --crops 10 --json
    mpirun -np 4 python -m mpiconvnet.evaluate --data shards/ --checkpoint runs/a --backend cuda
    srun --mpi=pmi2 python -m mpiconvnet.evaluate --data shards/ --checkpoint runs/a   (or jobs/evaluate.sbatch)

--checkpoint takes a checkpoint file, or a run directory or its checkpoints/ folder (the
newest checkpoint). Every image of the split is counted exactly once whatever the rank
count. A --data with other classes than the training set (another order included) is
refused: its labels would be scored against other classes. --crops, --backend and
--stall-timeout default to the training run's, so the run's own data set gives the
numbers of its metrics.jsonl.

Exit codes: 0 evaluated; 2 bad flag, data, checkpoint or set-up (one line); 3 a rank, or one
of its loader processes, stopped answering; 130 ctrl-c or SIGTERM (scancel, a time limit).
"""
import json
import signal
import sys

from mpiconvnet import checkpoint, distributed
from mpiconvnet.cli import Parser
from mpiconvnet.config import ConfigError, from_dict
from mpiconvnet.data.loader import LoaderError
from mpiconvnet.data.shards import SPLITS, DatasetError, ShardedDataset
from mpiconvnet.evaluation import evaluate
from mpiconvnet.models import ModelError, build_model


def parse_args(argv):
    p = Parser(prog="python -m mpiconvnet.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[-1].strip())
    p.add_argument("--data", required=True, help="data set directory written by python -m preprocess")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory or its checkpoints/ folder (newest checkpoint)")
    p.add_argument("--split", default="val", choices=SPLITS, help="split to score (default val)")
    p.add_argument("--crops", type=int, choices=(1, 10), default=None,
                   help="1: centre crop; 10: 10 crops averaged (default: the training run's --eval-crops)")
    p.add_argument("--batch", type=int, default=64, help="images per rank per batch (default 64)")
    p.add_argument("--backend", choices=("numpy", "cuda"), default=None, help="default: the training run's")
    p.add_argument("--workers", type=int, default=1, help="loader processes per rank (default 1; 0: in-process)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank (default 1)")
    p.add_argument("--stall-timeout", type=float, default=None,
                   help="seconds: a rank that makes no progress for twice this (one batch) ends the run with exit 3 "
                        "(default: the training run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = flag_problem(args)
    if problem:
        if distributed.first_rank_by_environment():   # every rank has the same flags: said once
            print(f"mpiconvnet.evaluate: {problem}", file=sys.stderr)
        return 2
    # a SIGTERM (scancel, a time limit) ends it as ctrl-c does: one line and 130
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            # before MPI starts: the checkpoint names the backend, which picks the GPUs
            path, params, _, meta = checkpoint.load_given(args.checkpoint)
            cfg, unreadable = from_dict(meta["config"]), None
        except (checkpoint.CheckpointError, ConfigError) as e:
            # a rank that cannot read it (a node without the file) still joins MPI, on
            # no GPU, so that rank 0 can say why every rank stops
            cfg, unreadable = None, str(e)
        backend = args.backend or (cfg.backend if cfg else "numpy")
        try:
            world = distributed.init(backend, args.threads, need_threads=False, failure=unreadable)
        except distributed.SetupError as e:
            if e.echo:   # said by the rank it stops; a rank stopped by another rank's is silent
                print(f"mpiconvnet.evaluate: {e}", file=sys.stderr)
            return 2
        try:
            net, failure = checked_model(args, path, params, meta, cfg, backend), None
        except (DatasetError, ModelError, checkpoint.CheckpointError) as e:
            failure = e
        # every rank stops, and rank 0 says why once, naming the rank where not all met it
        # (a node without the data)
        failure = world.first_failure(failure)
        if failure is not None:
            world.print(f"mpiconvnet.evaluate: {failure}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if distributed.first_rank_by_environment():
            print("mpiconvnet.evaluate: interrupted", file=sys.stderr)
        return 130
    crops = args.crops or cfg.eval_crops
    stall_timeout = args.stall_timeout or cfg.stall_timeout
    world.start_watchdog(2 * stall_timeout)   # a rank that hangs ends the run
    try:
        result = evaluate(net, world, args.data, args.batch, crops=crops, mean=cfg.mean, workers=args.workers,
                          split=args.split, seed=cfg.seed, stall_timeout=stall_timeout)
    except DatasetError as e:   # a shard that cannot be read; only this rank may have met it
        print(f"mpiconvnet.evaluate: rank {world.rank}: {e}", file=sys.stderr, flush=True)
        world.abort(2)
        return 2
    except LoaderError as e:    # a loader process died or hung: the others may wait in a collective
        print(f"mpiconvnet.evaluate: rank {world.rank}: {e}", file=sys.stderr, flush=True)
        world.abort(3)
        return 3
    except KeyboardInterrupt:   # ctrl-c or SIGTERM: one line, not a traceback per rank
        world.print("mpiconvnet.evaluate: interrupted", file=sys.stderr)
        world.abort(130)
        return 130
    world.stop_watchdog()
    result.update(checkpoint=path, step=meta["step"], split=args.split, crops=crops, model=cfg.model)
    if world.is_root:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{cfg.model} at step {meta['step']} on {args.split} ({result['images']} images, "
                  f"{crops} crop{'s' if crops > 1 else ''}): top-1 {result['top1']:.4f}  "
                  f"top-5 {result['top5']:.4f}  (errors {1 - result['top1']:.4f} / {1 - result['top5']:.4f})  "
                  f"loss {result['loss']:.4f}")
    return 0


def flag_problem(args):
    """What is wrong with a flag's value that argparse let through, or None."""
    if args.stall_timeout is not None and not args.stall_timeout > 0:
        return f"--stall-timeout {args.stall_timeout} must be positive"
    for flag, value, least in (("--batch", args.batch, 1), ("--workers", args.workers, 0),
                               ("--threads", args.threads, 1)):
        if value < least:
            return f"{flag} {value} must be at least {least}"
    return None


def checked_model(args, path, params, meta, cfg, backend):
    """The checkpoint's network, checked against the --data split it is to score."""
    data = ShardedDataset(args.data, args.split)
    if data.num_classes != meta["num_classes"]:
        raise ModelError(f"{args.data} has {data.num_classes} classes, checkpoint {path} was trained on "
                         f"{meta['num_classes']}; evaluate on the data set it was trained on")
    mismatch = checkpoint.class_mismatch(meta, data.classes, path, args.data)
    if mismatch:
        raise ModelError(f"{mismatch}; evaluate on the data set it was trained on")
    net = build_model(cfg.model, num_classes=meta["num_classes"], backend=backend, dtype=cfg.dtype, seed=cfg.seed)
    if data.image_size < net.input_size:
        raise ModelError(f"{args.data}: images are {data.image_size}px, model {cfg.model} crops {net.input_size}px; "
                         f"evaluate on the data set it was trained on")
    net.load_state_dict(params, source=path)
    return net


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
