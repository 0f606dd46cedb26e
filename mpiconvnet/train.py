"""Train an AlexNet-class convnet on HDF5 shards, one MPI rank per GPU (or CPU process).

    python -m mpiconvnet.train --data shards/ --out runs/a --model alexnet-mini --epochs 10 --global-batch 128
    mpirun -np 4 python -m mpiconvnet.train --data shards/ --out runs/a --global-batch 256 --backend cuda
    srun --mpi=pmi2 python -m mpiconvnet.train --config run.toml --resume auto

Flags override the TOML file given by --config, which overrides the defaults; every flag
is listed by --help. The resolved config is saved as RUN_DIR/config.json and in every
checkpoint.

Exit codes: 0 finished; 2 bad flags, data or set-up (one line; nothing done, but for a shard
found damaged mid-run: repair it, then --resume auto); 3 a rank stopped answering, or one of
its loader processes died or made no batch for --stall-timeout; 4
the loss became NaN/Inf (checkpoints kept: --resume PATH of an earlier one, lower --lr); 5
--out cannot be written (full disk, quota, permissions; the last complete checkpoint is
kept); 75 stopped by SIGTERM/SIGUSR1/SIGINT (ctrl-c) after writing a checkpoint: run the
same command with --resume auto to continue.
"""
import os
import sys

import numpy as np

from mpiconvnet import checkpoint, distributed
from mpiconvnet.config import ConfigError, help_text, reduces_gradient_buckets, resolve
from mpiconvnet.data.loader import LoaderError
from mpiconvnet.data.shards import DatasetError
from mpiconvnet.models import MODELS, ModelError
from mpiconvnet.run_lock import RunLock
from mpiconvnet.metrics import MetricsLog
from mpiconvnet.trainer import (EXIT_CANNOT_WRITE, EXIT_NONFINITE, EXIT_STALLED, EXIT_USAGE, NonFiniteLoss,
                                StopSignal, Trainer, open_datasets)
from mpiconvnet.weights import initial_state


def check_before_work(cfg, world, train_set, val_set):
    """Everything that can be wrong with the inputs, found before the first step (--data
    was checked before the data set was opened)."""
    if not cfg.out:
        raise ConfigError("--out is required: the run directory for config, metrics and checkpoints")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out {cfg.out} is a file; give the run directory (new, or a run's to resume)")
    if cfg.sync == "async" and world.size < 2:
        raise ConfigError("--sync async needs at least 2 ranks: rank 0 serves the weights, the others train "
                          "(mpirun -np 3 or more for several workers)")
    workers = world.size - 1 if cfg.sync == "async" else 1 if cfg.parallel == "model" else world.size
    if cfg.global_batch % workers:
        raise ConfigError(f"--global-batch {cfg.global_batch} does not divide by {workers} "
                          f"{'workers' if cfg.sync == 'async' else 'ranks'}; use a multiple of {workers}")
    input_size = MODELS[cfg.model].input_size
    if train_set.image_size < input_size:
        raise ConfigError(f"{cfg.data}: images are {train_set.image_size}px, model {cfg.model} crops "
                          f"{input_size}px; repack with python -m preprocess ... --image-size "
                          f"{max(256, input_size)} or pick a smaller model")
    if cfg.resume and cfg.resume != "auto" and not os.path.exists(cfg.resume):
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint; give a file, a run directory or 'auto'")
    if cfg.schedule == "plateau" and val_set is None:
        raise ConfigError(f"--schedule plateau follows the validation top-1, and {cfg.data} has no val split; pack "
                          f"one (python -m preprocess ... --val) or choose another --schedule")
    if train_set.num_images == 0:   # whatever --drop-last says: the sampler has nothing to draw from
        raise ConfigError(f"{cfg.data} holds no training images (every input was skipped when it was packed: "
                          f"see its skipped.tsv); fix the inputs and pack them again with python -m preprocess")
    if cfg.drop_last and cfg.global_batch > train_set.num_images:
        raise ConfigError(f"--global-batch {cfg.global_batch} is larger than the {train_set.num_images} training images "
                          f"of {cfg.data}, so dropping the last batch leaves no step; lower --global-batch or pad the "
                          f"batch with --drop-last false")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nflags (default, meaning):\n" + help_text())
        return 0
    notes = []
    try:
        cfg, unusable = resolve(argv, notes=notes), None
    except ConfigError as e:
        # a rank that cannot read its flags (a --config file one node lacks) still joins
        # MPI, so that rank 0 can say why every rank stops
        cfg, unusable = None, str(e)
    if cfg is not None and distributed.first_rank_by_environment():   # a refused run's one line is its error
        for note in notes:
            print(f"mpiconvnet.train: note: {note}", file=sys.stderr)
    # before the set-up, which may take minutes (MPI, GPUs, data checks, a checkpoint to
    # restore): a USR1 or TERM from SLURM meanwhile then stops the run after its first step,
    # with a checkpoint and exit 75, instead of killing it without either
    stop = StopSignal()
    out_lock = RunLock()
    try:
        if cfg is None:
            world = distributed.init(failure=unusable)
        else:
            world = distributed.init(cfg.backend, cfg.threads, cfg.allow_gpu_sharing,
                                     need_threads=cfg.overlap and reduces_gradient_buckets(cfg))
    except distributed.SetupError as e:
        # each cause is said once, by the first rank it stops: a rank with no GPU may be the only one
        if e.echo:
            print(f"mpiconvnet.train: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not cfg.data:   # the same on every rank
            raise ConfigError("--data is required: a directory written by python -m preprocess")
        try:
            train_set, val_set = open_datasets(cfg)
            check_before_work(cfg, world, train_set, val_set)
            failure = None
        except (ConfigError, DatasetError, ModelError) as e:
            failure = e
        # rank 0 says once why every rank stops, naming the rank where only some met it (a
        # node without the data), whose line was lost before
        failure = world.first_failure(failure)
        if failure is not None:
            raise ConfigError(failure)
        trainer = Trainer(cfg, world, train_set, val_set)
        # after the checks of the inputs (a bad --data must not leave an --out behind), before
        # anything looks at --out: what another run writes there is not ours to judge
        busy = world.broadcast_object(out_lock.take(cfg.out) if world.is_root else None)
        if busy:
            raise ConfigError(busy)
        resume_from = checkpoint.resolve_resume(cfg.resume, cfg.out)
        earlier = checkpoint.list_checkpoints(cfg.out)
        if earlier and not resume_from:
            raise ConfigError(f"--out {cfg.out} holds the checkpoints of an earlier run (newest "
                              f"{os.path.basename(earlier[-1])}); continue it with --resume auto, or choose a new --out")
        if resume_from:
            trainer.restore(resume_from)
        elif cfg.init_weights:
            skip = [layer.strip() for layer in cfg.init_skip.split(",") if layer.strip()]
            trainer.net.load_state_dict(initial_state(trainer.net, cfg.init_weights, skip, world,
                                                      train_set.classes, cfg.data),
                                        source=cfg.init_weights)
    except (ConfigError, DatasetError, ModelError, checkpoint.CheckpointError) as e:
        if world.is_root:
            print(f"mpiconvnet.train: {e}", file=sys.stderr)
        out_lock.abandon()
        return EXIT_USAGE

    try:
        if world.is_root:
            write_config(cfg)
            removed = remove_partial_checkpoints(cfg)
            if removed:
                print(f"mpiconvnet: removed {', '.join(removed)} from {checkpoint.checkpoint_dir(cfg.out)}: "
                      f"checkpoints an earlier run was killed while writing", file=sys.stderr)
            if resume_from:
                aside, names = set_aside_newer(cfg, resume_from, trainer.step)
                if names:
                    print(f"mpiconvnet: resuming from step {trainer.step}: the later checkpoints "
                          f"{', '.join(names)} moved to {aside}", file=sys.stderr)
        world.barrier()
        if not resume_from:
            trainer.broadcast_parameters()
        code = train(cfg, world, trainer, resume_from, stop)
    except checkpoint.OutputError as e:
        print(f"mpiconvnet.train: {e}", file=sys.stderr, flush=True)
        world.abort(EXIT_CANNOT_WRITE)   # the other ranks may wait for this one in a collective
        return EXIT_CANNOT_WRITE
    except DatasetError as e:   # a shard that broke after the checks at the start (only this rank may see it)
        print(f"mpiconvnet.train: rank {world.rank}: {e}", file=sys.stderr, flush=True)
        world.abort(EXIT_USAGE)
        return EXIT_USAGE
    except LoaderError as e:    # one of this rank's loader processes died or hung: the others wait for it
        print(f"mpiconvnet.train: rank {world.rank}: {e}", file=sys.stderr, flush=True)
        world.abort(EXIT_STALLED)
        return EXIT_STALLED
    except NonFiniteLoss as e:
        world.print(f"mpiconvnet.train: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        trainer.close()
        out_lock.release()
    world.print(run_directory_line(cfg.out))
    return code


def run_directory_line(out):
    """Where the results are: only what is there (a run with nothing left to train, resumed
    from another directory's checkpoint, wrote neither metrics nor checkpoints)."""
    names = [name for name in ("config.json", "metrics.jsonl", "checkpoints/")
             if os.path.exists(os.path.join(out, name))]
    line = f"run directory: {out} ({', '.join(names)})"
    if "metrics.jsonl" in names:
        line += f"; plot with python -m mpiconvnet.plot {out}"
    return line


def nothing_to_train(cfg, trainer):
    """The line of a resume at or past the step where this run ends."""
    at, end = trainer.step, trainer.total_steps()
    # what ends the run before `at`: --max-steps, --epochs or both
    limits = [flag for flag, step in (("--epochs", cfg.epochs * trainer.steps_per_epoch),
                                      ("--max-steps", cfg.max_steps)) if step and step <= at]
    return (f"mpiconvnet: resumed at step {at}, and this run ends at step {end} ("
            + ", ".join(f"{flag} {getattr(cfg, flag[2:].replace('-', '_'))}" for flag in limits)
            + "): nothing to train" + (", only the last evaluation to do" if trainer.evaluated_at != at else "")
            + f"; raise {' and '.join(limits)} to train on")


def set_aside_newer(cfg, resumed_from, step):
    """(the folder, [names]) of the later checkpoints moved aside; (None, []) for none."""
    try:
        return checkpoint.set_aside_newer(cfg.out, resumed_from, step)
    except OSError as error:
        folder = checkpoint.checkpoint_dir(cfg.out)
        raise checkpoint.OutputError(checkpoint.cannot_write(folder, error, cfg.out)) from None


def remove_partial_checkpoints(cfg):
    try:
        return checkpoint.remove_partial(cfg.out)
    except OSError as error:
        folder = checkpoint.checkpoint_dir(cfg.out)
        raise checkpoint.OutputError(checkpoint.cannot_write(folder, error, cfg.out)) from None


def write_config(cfg):
    path = os.path.join(cfg.out, "config.json")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        with open(path, "w") as f:
            f.write(cfg.to_json() + "\n")
    except OSError as error:
        raise checkpoint.OutputError(checkpoint.cannot_write(path, error, cfg.out)) from None


def train(cfg, world, trainer, resume_from, stop):
    """The banner, rank 0's progress bar and the run; returns the exit code."""
    stop.catch_interrupt()
    log = MetricsLog(cfg.out, world.is_root, trainer.step, trainer.evaluated_at)   # step 0: a fresh file
    world.print(f"mpiconvnet: {cfg.model} ({trainer.net.num_parameters:,} parameters) on {world.size} rank(s), "
                f"backend {cfg.backend}, global batch {cfg.global_batch}, {trainer.steps_per_epoch} steps/epoch"
                + (", fc layers split across the ranks" if cfg.parallel == "hybrid" else "")
                + (", every layer split across the ranks" if cfg.parallel == "model" else "")
                + (f", asynchronous: rank 0 serves the weights to {world.size - 1} worker(s)"
                   if cfg.sync == "async" else "")
                + (f", resuming at step {trainer.step} from {resume_from}" if resume_from else "")
                + (f", starting from the weights in {cfg.init_weights}" if cfg.init_weights and not resume_from else "")
                + (f" but {cfg.init_skip}" if cfg.init_skip and not resume_from else ""))
    if trainer.step >= trainer.total_steps():
        world.print(nothing_to_train(cfg, trainer))
    progress = None
    if world.is_root and cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=trainer.total_steps(), initial=trainer.step, unit="step", dynamic_ncols=True,
                        file=sys.stderr)
    try:
        # an overflow on the way to a NaN loss is said once, by the loss check after the
        # step (exit 4), not as NumPy warnings naming our source lines
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return trainer.run(stop, progress, log)
    finally:
        if progress is not None:
            progress.close()   # before any message about how the run ended


if __name__ == "__main__":
    sys.exit(main())
