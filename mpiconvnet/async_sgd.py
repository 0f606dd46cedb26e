"""Asynchronous SGD with a parameter server (`--sync async`): the GPU asynchronous SGD of
Paine et al. 2013, after Downpour SGD (Dean et al. 2012).

Rank 0 is the server: it holds the weights and the momentum and applies every update.
Ranks 1..N-1 are workers: each reads its own share of the training set, computes the
gradient of a batch of global_batch / workers images on the weights it last received, and
every --async-every batches pushes the mean of those gradients. The server applies it at
once (SGD with momentum, the run's learning-rate schedule) and sends the new weights back
to that worker only. No rank waits for the others: a gradient may come from weights a few
updates old (its staleness), which is the price of never waiting for the slowest rank.

Steps, epochs, the schedule and checkpoints count global-batch equivalents: `workers`
pushed batches make one step, so an epoch sees every image once, as in the synchronous
modes. With one worker and --async-every 1 this is synchronous SGD on one rank, update
for update (tests/test_async.py checks it to 1e-12 in float64, and an exact resume, the
metrics lines too: the server's loss sums since the last line go into the checkpoint).

What the synchronous modes have and this one does not: evaluations during training (the
run evaluates once at the end; `python -m mpiconvnet.evaluate` reads any checkpoint), and
an exact resume with more than one worker: a resumed run starts every worker at the
checkpoint's step, since which batches each worker had done is not recorded (their order
of arrival is not reproducible anyway). Stalls are caught as in the other modes: the
server names a worker it has not heard from for --stall-timeout seconds (or that takes no
message for as long), a worker names the server after twice that (the server may be
waiting on a silent worker meanwhile), and either aborts all ranks (exit 3).

Messages (point-to-point, each waited for at most --stall-timeout seconds by the server,
twice that by a worker; the server receives headers from any worker):
  worker -> server  header [kind, batches, loss sum, data s, compute s, comm s, memory high
                    water bytes] (float64),
                    then, for PUSH, the summed gradients as one flat array
  server -> worker  a reply [GO | STOP | FAILED], then, for GO, the weights as one flat array
  server -> worker  once the worker is done or stopped: [ALIVE] every --stall-timeout / 2
                    while other workers still train, then [END]; the worker waits for END
                    before the run's closing collectives, so a worker that finishes hours
                    before the slowest one is not taken for a hung server
"""
import math
import sys
import time

import numpy as np

from mpiconvnet.data.loader import BatchLoader

TAG_HEADER, TAG_GRADS, TAG_REPLY, TAG_PARAMS, TAG_END = 301, 302, 303, 304, 305
PUSH, DONE, STOPPED = 0.0, 1.0, 2.0     # header kinds
GO, STOP, FAILED = 0.0, 1.0, 2.0        # replies
ALIVE, END = 0.0, 1.0                   # to workers waiting for the others (TAG_END)
HEADER_SIZE = 7


class FlatParameters:
    """The model's parameters (or gradients) as one host array, in the model's order:
    one message per exchange instead of one per tensor."""

    def __init__(self, net):
        self.ops = net.ops
        self.shapes = dict(net.param_shapes)
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self.buffer = net.ops.pinned_host_empty((sum(sizes),), np.dtype(net.dtype))
        self.views, offset = {}, 0
        for (name, shape), size in zip(self.shapes.items(), sizes):
            self.views[name] = self.buffer[offset:offset + size].reshape(shape)
            offset += size

    def gather(self, arrays):
        """Copy backend arrays {name: array} into the buffer (complete on return)."""
        for name, view in self.views.items():
            self.ops.copy_to_host(view, arrays[name])
        return self.buffer

    def scatter(self, arrays):
        """Copy the buffer into backend arrays {name: array}."""
        for name, view in self.views.items():
            self.ops.copy_from_host(arrays[name], view)
        self.ops.synchronize()   # the buffer may be refilled as soon as this returns


class ParameterServer:
    """Rank 0: applies the workers' gradients as they arrive, writes the checkpoints and
    the metrics."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.comm = trainer.world.comm
        net = trainer.net
        self.weights = FlatParameters(net)
        self.received = FlatParameters(net)
        self.grads = {name: net.ops.zeros(shape, net.dtype) for name, shape in self.weights.shapes.items()}
        self.batches = trainer.step * trainer.workers      # worker batches applied so far
        # the metrics window, with the loss sums a checkpoint kept: a resumed run then logs
        # the lines the uninterrupted run did (exactly so with one worker)
        self.window = _Window(trainer.restored_window, trainer.workers)

    def run(self, stop, progress, log, total_steps):
        """Serve until every worker is done or stopped; returns ("done" | "preempted" | None,
        the failure's message or None)."""
        from mpi4py import MPI
        t, cfg = self.trainer, self.trainer.cfg
        self.weights.gather(t.net.params)
        for worker in range(1, t.world.size):
            self._to(worker, self.weights.buffer, TAG_PARAMS)
        workers = set(range(1, t.world.size))
        active = set(workers)
        stopping, failure = None, None
        window = self.window
        header, status = np.empty(HEADER_SIZE), MPI.Status()
        heard = {worker: time.monotonic() for worker in active}   # when each worker last spoke
        next_alive = time.monotonic() + cfg.stall_timeout / 2     # when the finished ones hear from us
        while active:
            if active != workers and time.monotonic() >= next_alive:
                for worker in sorted(workers - active):
                    self._to(worker, np.array([ALIVE]), TAG_END)
                next_alive = time.monotonic() + cfg.stall_timeout / 2
            request = self.comm.Irecv(header, source=MPI.ANY_SOURCE, tag=TAG_HEADER)
            # wake up when the longest-silent worker's time is up, even if no one writes, or
            # when the finished workers are due to hear that the server still serves
            deadline = min(heard[w] for w in active) + cfg.stall_timeout
            arrived = _receive_by(request, min(deadline, next_alive) if active != workers else deadline, status)
            if arrived:
                heard[status.Get_source()] = time.monotonic()
            # and check after every message: the others' pushes must not hide a silent one
            silent = self._silent(active, heard)
            if silent:
                _die(t.world, f"rank 0: workers {silent} sent nothing for {cfg.stall_timeout:.0f} s at step "
                              f"{t.step} (dead, hung or stuck in I/O); aborting all ranks")
            if not arrived:
                continue   # woken to tell the finished workers the server still serves
            worker, kind = status.Get_source(), header[0]
            if kind != PUSH:
                active.discard(worker)
                if kind == STOPPED and stopping is None:
                    stopping = stop.received or "a signal on another rank"
                continue
            _complete(self.comm.Irecv(self.received.buffer, source=worker, tag=TAG_GRADS), cfg.stall_timeout,
                      t.world, f"rank 0: worker {worker} sent a header but not its gradients for "
                               f"{cfg.stall_timeout:.0f} s at step {t.step}; aborting all ranks")
            batches, loss = int(header[1]), header[2] / header[1]
            if stopping is None and not math.isfinite(loss):
                from mpiconvnet.trainer import what_to_do_after_a_nonfinite_loss   # trainer imports this module
                failure = (f"loss became {loss} at step {t.step} (a push from worker {worker}); "
                           f"{what_to_do_after_a_nonfinite_loss(cfg.out)}")
                stopping = "failure"
            if stopping is None and stop.received:
                stopping = stop.received
            if stopping is not None:   # gradients that arrive after the decision are dropped
                self._to(worker, np.array([FAILED if failure else STOP]), TAG_REPLY)
                active.discard(worker)
                continue
            self._apply(batches)
            window.add(header, cfg.global_batch // t.workers)
            self._to(worker, np.array([GO]), TAG_REPLY)
            self._to(worker, self.weights.gather(t.net.params), TAG_PARAMS)
            heard[worker] = time.monotonic()   # its silence counts from when it could speak again
            before, t.step = t.step, min(self.batches // t.workers, total_steps)
            if progress is not None and t.step > before:
                progress.update(t.step - before)
                progress.set_postfix(loss=f"{loss:.3f}")
            on_grid = _crossed(before, t.step, cfg.log_every)
            if on_grid or t.step == total_steps:
                # a last line off the --log-every grid (--max-steps) keeps its loss sum for the
                # checkpoint, as in sync training: a longer run resumed from it logs the same
                window.write(t, log, progress, keep_loss=not on_grid)
            if _crossed(before, t.step, cfg.checkpoint_every) or _crossed(before, t.step, t.steps_per_epoch):
                self.save()
            if t.step >= total_steps:
                stopping = "the last step"   # max_steps: the others stop at their next push
        for worker in sorted(workers):
            self._to(worker, np.array([END]), TAG_END)
        if failure:
            return None, failure
        if stopping not in (None, "the last step"):
            self.save()
            t.world.print(f"stopped by {stopping} after step {t.step}; checkpoint written, continue with "
                          f"--resume auto")
            return "preempted", None
        self.save()
        return "done", None

    def _silent(self, active, heard):
        """The active workers not heard from for --stall-timeout. Before naming one, the
        server looks for a header it has sent already: after a pause of the server's own (a
        slow checkpoint, a busy machine) its workers are not silent, only not yet read. MPI
        moves a few messages per probe, so it keeps looking for up to a second."""
        timeout = self.trainer.cfg.stall_timeout
        until = time.monotonic() + 1.0
        while True:
            silent = [w for w in active if time.monotonic() - heard[w] > timeout]
            for w in silent:
                if self.comm.Iprobe(source=w, tag=TAG_HEADER):
                    heard[w] = time.monotonic()
            silent = sorted(w for w in silent if time.monotonic() - heard[w] > timeout)
            if not silent or time.monotonic() > until:
                return silent
            time.sleep(1e-3)

    def _to(self, worker, buffer, tag):
        """Send to a worker, or name it after --stall-timeout if it never takes the message."""
        timeout = self.trainer.cfg.stall_timeout
        _complete(self.comm.Isend(buffer, dest=worker, tag=tag), timeout, self.trainer.world,
                  f"rank 0: worker {worker} took nothing for {timeout:.0f} s at step {self.trainer.step} "
                  f"(dead, hung or stuck in I/O); aborting all ranks")

    def _apply(self, batches):
        t = self.trainer
        # the mean of the pushed gradients: each is already the mean over its batch
        if batches > 1:
            self.received.buffer /= batches
        self.received.scatter(self.grads)
        t.optimizer.step(self.grads, t.schedule.at(self.batches // t.workers))
        self.batches += batches

    def save(self):
        if self.trainer.saved_at != self.trainer.step:
            self.write_checkpoint()

    def write_checkpoint(self):
        t = self.trainer
        t.write_checkpoint(t.net.state_dict(), t.optimizer.state_dict(), self.window.saved(t.workers))


class AsyncWorker:
    """Ranks 1..N-1: compute gradients on their share of the data with the weights they
    last received, push every --async-every batches."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.comm = trainer.world.comm
        self.weights = FlatParameters(trainer.net)
        self.pushed = FlatParameters(trainer.net)
        self.summed = np.zeros_like(self.pushed.buffer)
        self.pending = 0          # batches summed since the last push
        self.loss_sum = 0.0
        self.times = np.zeros(3)  # data, compute, communication seconds since the last push

    def run(self, stop):
        """Train until this worker's epochs are done or the server says stop; returns
        "done", "preempted" or "failed"."""
        t, cfg = self.trainer, self.trainer.cfg
        self._from_server(self.weights.buffer, TAG_PARAMS)
        self.weights.scatter(t.net.params)
        step = t.step   # this worker's own batch count: the dropout masks' step
        total = t.total_steps()
        while step < total:
            epoch, start = divmod(step, t.steps_per_epoch)
            with BatchLoader(cfg.data, split="train", rank=t.worker_index, size=t.workers,
                             batch_per_rank=t.batch_per_rank, epoch=epoch, start_step=start, seed=cfg.seed,
                             crop_size=t.net.input_size, train=True, mean=cfg.mean,
                             divide_by_std=t.net.spec.standardize_input, pca_lighting=cfg.pca_lighting,
                             drop_last=cfg.drop_last, workers=cfg.workers, prefetch=cfg.prefetch,
                             stall_timeout=cfg.stall_timeout) as loader:
                waited = loader.time_waiting
                since = time.perf_counter()   # compute: the time from here less waiting for data
                for batch, images in loader.device_batches(t.net.ops):
                    loss, grads = t.net.loss_and_grads(images, batch.labels, step=step,
                                                       sample_offset=t.worker_index * t.batch_per_rank)
                    self._add(loss, grads)
                    data = loader.time_waiting - waited
                    waited = loader.time_waiting
                    self.times += (data, time.perf_counter() - since - data, 0.0)
                    step += 1
                    if stop.received:
                        self._send_header(STOPPED)
                        return "preempted"
                    last = step % t.steps_per_epoch == 0 or step == total
                    if self.pending == cfg.async_every or last:
                        reply = self._exchange()
                        if reply != GO:
                            return "failed" if reply == FAILED else "preempted"
                    since = time.perf_counter()
                    if step == total:
                        break
        self._send_header(DONE)
        return "done"

    def _add(self, loss, grads):
        buffer = self.pushed.gather(grads)
        if self.pending == 0:
            self.summed[...] = buffer
        else:
            self.summed += buffer
        self.pending += 1
        self.loss_sum += loss

    def wait_for_the_end(self):
        """Once this worker is done or stopped: wait until the server has heard the last of
        every worker. The server says it is alive every --stall-timeout / 2 meanwhile, so
        only a server that stops saying so is named (after twice --stall-timeout)."""
        note = np.empty(1)
        while True:
            self._from_server(note, TAG_END)
            if note[0] == END:
                return

    def _send_header(self, kind):
        memory = float(self.trainer.net.ops.memory_high_water())
        header = np.array([kind, self.pending, self.loss_sum, *self.times, memory])
        self._to_server(header, TAG_HEADER)

    def _exchange(self):
        started = time.perf_counter()
        self._send_header(PUSH)
        self._to_server(self.summed, TAG_GRADS)
        self.pending, self.loss_sum, self.times[:] = 0, 0.0, 0.0
        reply = np.empty(1)
        self._from_server(reply, TAG_REPLY)
        if reply[0] == GO:
            self._from_server(self.weights.buffer, TAG_PARAMS)
            self.weights.scatter(self.trainer.net.params)
        self.times[2] += time.perf_counter() - started   # reported with the next push
        return reply[0]

    def _to_server(self, buffer, tag):
        self._within_timeout(self.comm.Isend(buffer, dest=0, tag=tag))

    def _from_server(self, buffer, tag):
        self._within_timeout(self.comm.Irecv(buffer, source=0, tag=tag))

    def _within_timeout(self, request):
        # twice the server's deadline: the server itself may wait up to --stall-timeout for
        # another, silent worker before it answers this one, and it is the server that can
        # name that worker; a worker names the server only when the server is the silent one
        t, timeout = self.trainer, 2 * self.trainer.cfg.stall_timeout
        _complete(request, timeout, t.world,
                  f"rank {t.world.rank}: no answer from the parameter server (rank 0) for {timeout:.0f} s; "
                  f"aborting all ranks")


class _Window:
    """The server's running sums between two metrics lines. The loss sums (over worker
    batches) go into checkpoints as sync training's do, per global step, so a run may
    switch modes when it resumes; the times and images/s count this process's batches."""

    def __init__(self, restored=None, workers=1):
        self.memory = 0.0   # the largest memory high water any worker reported (never reset)
        self.loss, self.loss_batches = 0.0, 0
        if restored:
            self.loss = restored["loss"] * workers
            self.loss_batches = round(restored["loss_steps"] * workers)
        self.reset()

    def reset(self):
        self.batches, self.images, self.times = 0, 0, np.zeros(3)
        self.started = time.perf_counter()

    def saved(self, workers):
        """The loss sums as a checkpoint keeps them: `workers` batches make a global step."""
        return {"loss": self.loss / workers, "loss_steps": self.loss_batches / workers}

    def add(self, header, batch_images):
        batches = int(header[1])
        self.batches += batches
        self.loss += header[2]
        self.loss_batches += batches
        self.images += batches * batch_images
        self.times += header[3:6]
        self.memory = max(self.memory, header[6])

    def write(self, trainer, log, progress, keep_loss=False):
        if not self.batches:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        per_batch = self.times / self.batches
        last = max(trainer.step - 1, 0)   # the last step taken: its epoch and lr, as in sync training
        record = {"kind": "train", "step": trainer.step, "epoch": last // trainer.steps_per_epoch,
                  "loss": self.loss / self.loss_batches, "lr": trainer.schedule.at(last),
                  "images_per_s": self.images / elapsed, "time_data": per_batch[0], "time_compute": per_batch[1],
                  "time_comm": per_batch[2],
                  "memory_mb": max(self.memory, trainer.net.ops.memory_high_water()) / 2**20, "time": time.time()}
        if log is not None:
            log.write(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
        self.reset()
        if not keep_loss:
            self.loss, self.loss_batches = 0.0, 0


def _wait(request, deadline, status=None):
    """Poll `request` until it completes (True) or the monotonic deadline passes (False).
    The pause between polls grows to 1 ms at most: a push is answered within about a
    millisecond, and the waiting rank does not spin a core the workers need."""
    pause = 1e-5
    while not request.Test(status):
        if time.monotonic() > deadline:
            request.Cancel()
            return False
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True


def _receive_by(request, deadline, status):
    """_wait for a receive that is given up at the deadline and posted again later. Its
    cancel may come too late, when a message has matched it already: that message is kept
    (the wait after a receive's cancel returns at once, cancelled or received)."""
    if _wait(request, deadline, status):
        return True
    request.Wait(status)
    return not status.Is_cancelled()


def _complete(request, timeout, world, message):
    """Wait for a non-blocking MPI request; abort all ranks with `message` after `timeout` s."""
    if not _wait(request, time.monotonic() + timeout):
        _die(world, message)


def _die(world, message):
    from mpiconvnet.trainer import EXIT_STALLED
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    world.abort(EXIT_STALLED)


def _crossed(before, after, every):
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


def run(trainer, stop, progress, log):
    """--sync async on every rank: the server on rank 0, workers elsewhere, then one
    evaluation of the final weights by all ranks. Returns "done", "preempted" or raises
    the failure (as trainer.NonFiniteLoss) on every rank."""
    from mpiconvnet.trainer import NonFiniteLoss
    t, cfg = trainer, trainer.cfg
    total_steps = t.total_steps()
    if t.world.is_root:
        server = ParameterServer(t)
        outcome, failure = server.run(stop, progress, log, total_steps)
    else:
        worker = AsyncWorker(t)
        outcome, failure = worker.run(stop), None
        worker.wait_for_the_end()
    # every rank learns the outcome and the final weights, then they evaluate together: all
    # blocking collectives, so from here a rank that hangs ends the run as in sync training
    t.world.start_watchdog(2 * cfg.stall_timeout)
    t.world.progress("the end of the asynchronous training (every rank's outcome)")
    outcome, failure, step = t.world.broadcast_object((outcome, failure, t.step))
    t.step = step
    if outcome == "failed" or failure:
        raise NonFiniteLoss(failure or "the loss became NaN or Inf on a worker")
    if outcome == "preempted":
        return outcome
    weights = FlatParameters(t.net)
    if t.world.is_root:
        weights.gather(t.net.params)
    t.world.progress("the broadcast of the final weights")
    t.world.comm.Bcast(weights.buffer, root=0)
    weights.scatter(t.net.params)
    if t.evaluated_at != t.step:   # a finished run resumed once more has nothing to do
        t.evaluate_now(log)
        if t.world.is_root:   # the last checkpoint again, now saying its evaluation is done
            server.write_checkpoint()
    return outcome
