"""Data-parallel SGD: the training loop behind `python -m mpiconvnet.train`.

Each step every rank computes gradients on its slice of the global batch, scaled so that
they are its share of the global-batch mean; the gradient buckets are summed over ranks
while backward still runs; every rank applies the same update, so the replicas never
diverge (--sync grads, the default). With float64 and the same data, N ranks and one rank
with the same global batch compute the same weights (tests/test_train.py). With
--sync params each rank updates its own replica and the replicas are averaged every
--average-every steps (averaging.py). With --sync async rank 0 serves the weights and
the other ranks push gradients to it without waiting for each other (async_sgd.py). With
--parallel hybrid the fully connected layers are split across the ranks instead of
replicated (model_parallel.py); the convolutions' gradients are reduced as above. With
--parallel model every layer is split and every rank runs the whole batch: nothing is
replicated, so only the activations' gathers communicate.
"""
import math
import signal
import sys
import time

import numpy as np

from mpiconvnet import async_sgd, checkpoint
from mpiconvnet.averaging import ReplicaAverager
from mpiconvnet.backends import get_backend
from mpiconvnet.buckets import GradientBuckets, GradientReducer
from mpiconvnet.config import from_dict, reduces_gradient_buckets
from mpiconvnet.data.loader import BatchLoader
from mpiconvnet.data.sampler import DistributedSampler
from mpiconvnet.data.shards import ShardedDataset, load_index
from mpiconvnet.distributed import Heartbeat
from mpiconvnet.evaluation import evaluate
from mpiconvnet.model_parallel import Shards
from mpiconvnet.models import build_model
from mpiconvnet.optim import SGD, LearningRate

# exit codes a job script can act on (documented in README and jobs/README.md)
EXIT_OK = 0
EXIT_USAGE = 2          # bad flag, missing data, sizes that do not fit: nothing was done
EXIT_STALLED = 3        # a rank stopped answering
EXIT_NONFINITE = 4      # the loss became NaN or Inf; the last good checkpoint is untouched
EXIT_CANNOT_WRITE = 5   # --out is full or not writable; the last complete checkpoint is kept
EXIT_PREEMPTED = 75     # SIGTERM/SIGUSR1/SIGINT: checkpoint written, run again with --resume auto


class NonFiniteLoss(RuntimeError):
    pass


def what_to_do_after_a_nonfinite_loss(out):
    """The advice that ends the line of a NaN/Inf loss: from a kept checkpoint, or afresh."""
    fix = "with a lower --lr, or check the data's mean (a healthy first loss is ln(classes))"
    if not checkpoint.list_checkpoints(out):
        return f"no checkpoint was written before it: run the same command again {fix}"
    return (f"the checkpoints in {checkpoint.checkpoint_dir(out)} are kept; resume from one well before the loss "
            f"grew (--resume PATH) {fix}")


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption) and
    SIGINT (ctrl-c at an interactive mpirun): each stops every rank after the same step,
    with a checkpoint, rather than mid-step with a traceback per rank. SIGINT only from
    catch_interrupt() on: during the set-up ctrl-c should still stop at once."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def catch_interrupt(self):
        """From here on SIGINT too; TERM and USR1 again, in case a library started during
        the set-up (MPI, CUDA) put its own handlers in their place."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg, world, train_set, val_set):
        self.cfg, self.world = cfg, world
        self.train_set, self.val_set = train_set, val_set
        # the ranks that share out the training data: all of them, but for --sync async's
        # server; with --parallel model every rank reads the whole batch, as one rank would
        self.workers, self.worker_index = world.size, world.rank
        if cfg.sync == "async":
            self.workers, self.worker_index = world.size - 1, max(world.rank - 1, 0)
        elif cfg.parallel == "model":
            self.workers, self.worker_index = 1, 0
        self.batch_per_rank = cfg.global_batch // self.workers
        shards = None
        if cfg.parallel in ("hybrid", "model"):   # layers split across the ranks (model_parallel.py)
            shards = Shards(world.comm, world.rank, world.size, get_backend(cfg.backend),
                            split_convs=cfg.parallel == "model")
        self.net = build_model(cfg.model, num_classes=train_set.num_classes, backend=cfg.backend,
                               dtype=cfg.dtype, seed=cfg.seed, shards=shards)
        ops = self.net.ops
        ops.set_num_threads(cfg.threads)
        self.buckets = attach_gradient_buckets(self.net, int(cfg.bucket_mb * 2**20))
        self.heartbeat = Heartbeat(world, cfg.stall_timeout)
        self.optimizer = SGD(ops, self.net.params, cfg.momentum, cfg.weight_decay, cfg.bias_lr_mult)
        cuda_aware = _cuda_aware(cfg.backend, world)
        self.reducer, self.averager = None, None
        if reduces_gradient_buckets(cfg):
            self.reducer = GradientReducer(world, self.buckets, overlap=cfg.overlap, cuda_aware=cuda_aware,
                                           timeout=cfg.stall_timeout, average=False,
                                           on_stall=lambda: self.heartbeat.report_stall(self.step))
        elif cfg.sync == "params":
            self.averager = ReplicaAverager(world, ops, [*self.net.params.values(), *self.optimizer.velocity.values()],
                                            cuda_aware=cuda_aware)
        self.steps_per_epoch = self._sampler(0).steps_per_epoch
        self.schedule = LearningRate(cfg, self.steps_per_epoch)
        self.step = 0
        self.progress = None     # rank 0's tqdm bar while run() runs
        self.evaluated_at = None  # the step of the last evaluation
        self.saved_at = None      # the step of the last checkpoint
        self.saved_evaluated_at = None  # the evaluated_at that checkpoint records
        self.window = None        # run()'s metrics window, whose loss sum a checkpoint keeps
        self.restored_window = {}

    def _sampler(self, epoch):
        return DistributedSampler(self.train_set.num_images, self.worker_index, self.workers, self.cfg.seed,
                                  epoch, self.batch_per_rank, self.cfg.drop_last)

    # -- state ---------------------------------------------------------------------

    def broadcast_parameters(self):
        """Rank 0's weights everywhere (they agree by seed already; this makes it a fact)."""
        if self.world.size == 1:
            return
        state = self.net.state_dict()
        for name in self.net.param_shapes:
            self.world.comm.Bcast(state[name], root=0)
        self.net.load_state_dict(state)

    def save_checkpoint(self):
        self.world.progress(f"the checkpoint of step {self.step}")
        # (written again after the run's last evaluation: the replicas are averaged already)
        if self.averager is not None and self.step % self.cfg.average_every and self.saved_at != self.step:
            # replicas between averagings differ: the checkpoint holds their mean, which
            # every scheduled checkpoint of an uninterrupted run takes too
            self.averager.average()
        # whole arrays: for a split model, gathering them is a collective of every rank
        params = self.net.state_dict()
        velocity = {n: self.net.whole(n, v) for n, v in self.optimizer.state_dict().items()}
        if self.world.is_root:
            window = self.window
            self.write_checkpoint(params, velocity, None if window is None else
                                  {"loss": window["loss"], "loss_steps": window["loss_steps"]})
        self.world.barrier()
        self.saved_at, self.saved_evaluated_at = self.step, self.evaluated_at
        self.world.progress(f"the step after the checkpoint of step {self.step}")

    def write_checkpoint(self, params, velocity, log_window):
        """Rank 0's part of a checkpoint (--sync async's server calls it alone). log_window:
        the loss summed over the global steps since the last metrics line, {"loss",
        "loss_steps"}, which a run resumed from the checkpoint carries on (None: nothing)."""
        meta = {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                "step_in_epoch": self.step % self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "model": self.cfg.model, "num_classes": self.net.num_classes, "world_size": self.world.size,
                "classes": self.train_set.classes,   # the label order evaluate and a resume check
                "config": self.cfg.to_dict(), "schedule": self.schedule.state_dict(),
                "evaluated_at": self.evaluated_at,
                "log_window": log_window,
                "rng": {"seed": self.cfg.seed, "note": "all draws are functions of (seed, epoch, step, rank)"}}
        checkpoint.save(self.cfg.out, self.step, params, velocity, meta, self.cfg.keep_checkpoints)
        self.saved_at = self.step

    def restore(self, path):
        params, velocity, meta = checkpoint.load(path, "--resume")
        saved = from_dict(meta["config"])
        for key in ("model", "global_batch", "seed", "drop_last", "dtype"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} was made with {key}={getattr(saved, key)!r}, this run has "
                    f"{getattr(self.cfg, key)!r}; resume with the same --{key.replace('_', '-')} or start a new --out")
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {meta['steps_per_epoch']} steps per epoch, this "
                                             f"data set gives {self.steps_per_epoch}; resume on the same data")
        mismatch = checkpoint.class_mismatch(meta, self.train_set.classes, path, self.cfg.data)
        if mismatch:
            raise checkpoint.CheckpointError(f"{mismatch}; resume on the data set it was trained on")
        self.net.load_state_dict(params, source=path)
        self.optimizer.load_state_dict({n: self.net.local_part(n, v) for n, v in velocity.items()}, source=path)
        try:
            self.schedule.load_state_dict(meta["schedule"])
        except KeyError as e:
            raise checkpoint.unusable(path, f"is incomplete (its meta's schedule lacks {e})", "--resume") from None
        except (TypeError, ValueError) as e:
            raise checkpoint.unusable(path, f"is damaged (its meta's schedule does not load: {e})",
                                      "--resume") from None
        self.step = int(meta["step"])
        # a checkpoint's evaluation comes after it (checkpoints before 2026-11-25 do not say):
        # the resumed run does it again unless the checkpoint was written again afterwards
        self.evaluated_at = self.saved_evaluated_at = meta.get("evaluated_at")
        self.saved_at = self.step
        self.restored_window = meta.get("log_window") or {}

    # -- the loop --------------------------------------------------------------------

    def train_step(self, images, labels, lr):
        """One step; returns (this rank's mean loss, exposed communication seconds)."""
        if self.averager is not None:
            return self._local_step(images, labels, lr)
        if self.reducer is None:   # --parallel model: see _split_step
            return self._split_step(images, labels, lr)
        self.reducer.begin()
        # gradients scaled by 1/size: the allreduce's sum is then the global-batch mean
        loss, _ = self.net.loss_and_grads(images, labels, step=self.step,
                                          sample_offset=self.world.rank * self.batch_per_rank,
                                          on_grads_ready=self._reduce_when_ready,
                                          grad_scale=1.0 / self.world.size)
        exposed = self.reducer.finish()
        self.optimizer.step(self.net.grads, lr)
        return loss, exposed

    def _split_step(self, images, labels, lr):
        """--parallel model: every rank computes the loss of the whole batch from the
        gathered logits; scaled by 1/size, the gathers' reductions sum those copies into one
        loss's gradient. No parameter is replicated, so nothing else is reduced."""
        loss, _ = self.net.loss_and_grads(images, labels, step=self.step, grad_scale=1.0 / self.world.size)
        self.optimizer.step(self.net.grads, lr)
        return loss, 0.0

    def _reduce_when_ready(self, names):
        self.reducer.grads_ready(replicated(self.net, names))

    def _local_step(self, images, labels, lr):
        """--sync params: this rank's own gradient on its own replica, then every
        average_every steps the mean of the replicas (averaging.py)."""
        loss, _ = self.net.loss_and_grads(images, labels, step=self.step,
                                          sample_offset=self.world.rank * self.batch_per_rank)
        self.optimizer.step(self.net.grads, lr)
        exposed = 0.0
        if (self.step + 1) % self.cfg.average_every == 0:
            exposed = self.averager.average()
        return loss, exposed

    def total_steps(self):
        """The step this run ends after: its last epoch's end, or --max-steps."""
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def run(self, stop, progress=None, log=None):
        """Train until the last epoch, max_steps or a stop signal; returns an exit code."""
        cfg, world = self.cfg, self.world
        self.progress = progress
        if cfg.sync == "async":
            return EXIT_PREEMPTED if async_sgd.run(self, stop, progress, log) == "preempted" else EXIT_OK
        total_steps = self.total_steps()
        # twice the heartbeat's limit: where the heartbeat can name a silent rank, it does first
        world.start_watchdog(2 * cfg.stall_timeout)
        # the loss sums over the steps since the last metrics line, those before a resume
        # included (the checkpoint holds them), so a resumed run logs the lines it would
        # have; the times and images/s count this process's steps only. Set before the
        # evaluation below: a stop during it rewrites the checkpoint, sums included
        window = {"loss": 0.0, "loss_steps": 0, "images": 0, "data": 0.0, "compute": 0.0, "comm": 0.0, "steps": 0,
                  "t": time.perf_counter(), **self.restored_window}
        self.window = window
        if self._evaluation_due():   # resumed from a checkpoint written before its evaluation
            self._evaluate(self.step // self.steps_per_epoch - 1, log)
            if self.step < total_steps and self._stopped_during_evaluation(stop):
                return EXIT_PREEMPTED
            window["t"] = time.perf_counter()   # images/s: training time only
        while self.step < total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            with BatchLoader(cfg.data, split="train", rank=self.worker_index, size=self.workers,
                             batch_per_rank=self.batch_per_rank, epoch=epoch, start_step=start, seed=cfg.seed,
                             crop_size=self.net.input_size, train=True, mean=cfg.mean,
                             divide_by_std=self.net.spec.standardize_input, pca_lighting=cfg.pca_lighting,
                             drop_last=cfg.drop_last, workers=cfg.workers,
                             prefetch=cfg.prefetch, stall_timeout=cfg.stall_timeout) as loader:
                world.progress(f"the first step of epoch {epoch}")
                waited = loader.time_waiting
                # compute: the host's time from here, less waiting for data and exposed
                # communication (the model input, staged one batch ahead, is compute)
                since = time.perf_counter()
                # the next batch's copy to the GPU runs during this step (device_batches)
                for batch, images in loader.device_batches(self.net.ops):
                    world.progress(f"step {self.step + 1}")
                    self.heartbeat.beat(self.step)
                    lr = self.schedule.at(self.step)
                    loss, exposed = self.train_step(images, batch.labels, lr)
                    # one small collective per step: the global loss and whether any rank
                    # was asked to stop, so every rank stops after the same step
                    loss_sum, stop_votes = self.heartbeat.allreduce_sum(
                        np.array([loss, 1.0 if stop.received else 0.0]), self.step)
                    global_loss = loss_sum / world.size
                    data = loader.time_waiting - waited
                    waited = loader.time_waiting
                    compute = time.perf_counter() - since - data - exposed
                    if not math.isfinite(global_loss):
                        raise NonFiniteLoss(f"loss became {global_loss} at step {self.step} (epoch {epoch}, lr {lr:g}); "
                                            f"{what_to_do_after_a_nonfinite_loss(cfg.out)}")
                    self.step += 1
                    window["loss"] += global_loss
                    window["loss_steps"] += 1
                    window["images"] += cfg.global_batch
                    window["data"] += data
                    window["compute"] += compute
                    window["comm"] += exposed
                    window["steps"] += 1
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{global_loss:.3f}", lr=f"{lr:.3g}")
                    if self.step % cfg.log_every == 0 or self.step == total_steps:
                        # a last line off the --log-every grid (--max-steps) keeps its loss sum
                        # for the checkpoint: a longer run resumed from it logs what an
                        # uninterrupted run would
                        self._log_window(window, epoch, lr, log, progress,
                                         keep_loss=self.step % cfg.log_every != 0)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    if stop_votes > 0:
                        # no evaluation first: the time left may be short; the checkpoint
                        # says it is due, and the resumed run does it before its first step
                        self.save_checkpoint()
                        world.print(f"stopped by {stop.received or 'a signal on another rank'} after step "
                                    f"{self.step}; checkpoint written, continue with --resume auto")
                        return EXIT_PREEMPTED
                    # the checkpoint first: an evaluation cut short (preemption, a bad val
                    # shard) then loses no training. The checkpoint says its evaluation is
                    # not done, and a run resumed from it does it before its first step.
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or end_of_epoch \
                            or self.step == total_steps:
                        self.save_checkpoint()
                    if self._evaluation_due():
                        self._evaluate(epoch, log)
                        if self.step < total_steps and self._stopped_during_evaluation(stop):
                            return EXIT_PREEMPTED
                    since = time.perf_counter()
                    if self.step == total_steps:
                        break
        if self.evaluated_at != self.step:
            # the run's last evaluation; mid-epoch (--max-steps) it leaves the plateau schedule
            # alone, as a longer run would never have made it
            self._evaluate(max(self.step - 1, 0) // self.steps_per_epoch, log,
                           report=self.step % self.steps_per_epoch == 0)
        if self.saved_at == self.step and self.saved_evaluated_at != self.evaluated_at:
            # the last checkpoint again, now saying its evaluation is done: a finished run
            # run once more (a requeue) then evaluates nothing twice
            self.save_checkpoint()
        return EXIT_OK

    def _stopped_during_evaluation(self, stop):
        """Whether a stop came during the evaluation just done (minutes, at an epoch end):
        every rank votes, as after each step, so all of them end here instead of after one
        more step. The epoch's checkpoint, written before the evaluation, is written again
        saying the evaluation is done, so the resumed run does not redo it: one checkpoint's
        time, what any stop costs. Not asked after the last step: the run ends there anyway,
        and exit 75 would requeue a finished job."""
        votes = self.heartbeat.allreduce_sum(np.array([1.0 if stop.received else 0.0]), self.step,
                                             "the stop vote after the evaluation")
        if votes[0] == 0:
            return False
        self.save_checkpoint()
        self.world.print(f"stopped by {stop.received or 'a signal on another rank'} after step {self.step} and its "
                         f"evaluation; checkpoint written, continue with --resume auto")
        return True

    def _evaluation_due(self):
        """At the end of an epoch that --eval-every evaluates, not yet evaluated."""
        epochs_done, within = divmod(self.step, self.steps_per_epoch)
        return (self.step > 0 and within == 0 and self.cfg.eval_every > 0 and epochs_done % self.cfg.eval_every == 0
                and self.evaluated_at != self.step)

    def _log_window(self, window, epoch, lr, log, progress, keep_loss=False):
        """Every rank calls this at the same steps (it holds a collective)."""
        elapsed = time.perf_counter() - window["t"]
        steps = max(window["steps"], 1)
        # the rank nearest to running out of memory is the one that matters
        memory = self.heartbeat.allreduce_max(np.array([float(self.net.ops.memory_high_water())]), self.step,
                                              "the memory high water's allreduce")[0]
        record = {"kind": "train", "step": self.step, "epoch": epoch,
                  "loss": window["loss"] / max(window["loss_steps"], 1), "lr": lr,
                  "images_per_s": window["images"] / max(elapsed, 1e-9),
                  "time_data": window["data"] / steps, "time_compute": window["compute"] / steps,
                  "time_comm": window["comm"] / steps, "memory_mb": memory / 2**20, "time": time.time()}
        if log is not None:
            log.write(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{record['images_per_s']:.0f}")
        window.update(images=0, data=0.0, compute=0.0, comm=0.0, steps=0, t=time.perf_counter())
        if not keep_loss:
            window.update(loss=0.0, loss_steps=0)

    def evaluate_now(self, log):
        """An evaluation of the current weights by every rank (a collective), labelled with
        the epoch of the last step done, as the evaluations at epoch ends are."""
        return self._evaluate(max(self.step - 1, 0) // self.steps_per_epoch, log)

    def _evaluate(self, epoch, log, report=True):
        """report: tell the plateau schedule (epoch-end evaluations only)."""
        self.evaluated_at = self.step
        self.world.progress(f"the evaluation after step {self.step}")
        if self.val_set is None:
            return None
        result = evaluate(self.net, self.world, self.cfg.data, self.batch_per_rank, crops=self.cfg.eval_crops,
                          mean=self.cfg.mean, workers=self.cfg.workers, seed=self.cfg.seed,
                          stall_timeout=self.cfg.stall_timeout)
        if report:
            self.schedule.report_evaluation(result["top1"])
        record = {"kind": "eval", "step": self.step, "epoch": epoch, **result, "time": time.time()}
        if log is not None:
            log.write(record)
        line = (f"evaluation after step {self.step} (epoch {epoch}): top-1 {result['top1']:.4f}  "
                f"top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  on {result['images']} images")
        if self.progress is not None:
            self.progress.write(line, file=sys.stdout)   # above the bar, not through it
        else:
            self.world.print(line)
        return result

    def close(self):
        self.world.stop_watchdog()
        if self.reducer is not None:
            self.reducer.close()


def attach_gradient_buckets(net, bucket_bytes):
    """Allreduce buckets for the model's replicated parameters, made its gradient arrays.
    The split fc layers of --parallel hybrid get arrays of their own: their gradients are
    whole where they are made, and are not reduced."""
    buckets = GradientBuckets(net.ops, {n: s for n, s in net.param_shapes.items() if n not in net.split_names},
                              net.dtype, bucket_bytes)
    split = {n: net.ops.zeros(net.param_shapes[n], net.dtype) for n in net.split_names}
    net.use_gradient_arrays({**buckets.views, **split})
    return buckets


def replicated(net, names):
    """The names among `names` whose gradients the buckets reduce."""
    return [n for n in names if n not in net.split_names]


def _cuda_aware(backend, world):
    if backend != "cuda" or world.size == 1:
        return False
    from mpiconvnet.backends.cuda.mpi_cuda import cuda_aware_mpi
    return cuda_aware_mpi()


def open_datasets(cfg):
    """The train split (required) and the val split (None when the data set has none)."""
    train_set = ShardedDataset(cfg.data, "train")
    # a data set packed without --val trains without evaluation
    val_set = ShardedDataset(cfg.data, "val") if "val" in load_index(cfg.data)["splits"] else None
    if cfg.mean == "image":
        train_set.mean_image()   # read now: missing or damaged, the run stops before any work
    return train_set, val_set
