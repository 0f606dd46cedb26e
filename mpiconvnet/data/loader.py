"""Prefetching batch loader: worker processes read shards into a ring of shared-memory
slots of uint8 images; the trainer reads ready slots without copying and turns them into
the model's float32 crops on its backend.

    from mpiconvnet.data.loader import BatchLoader
    with BatchLoader("/data/imagenet", rank=r, size=n, batch_per_rank=64, epoch=e,
                     start_step=s, seed=0, crop_size=227, workers=2) as loader:
        for batch in loader:                  # batch.pixels: uint8 (64, 256, 256, 3)
            x = loader.model_input(batch, ops) # float32 (64, 3, 227, 227) on ops' device
            ... batch.labels (64,) int64, batch.step
        # or, with the next batch's copy to the GPU overlapping this step:
        for batch, x in loader.device_batches(ops): ...
    with BatchLoader(root, train=False, rank=r, size=n, batch_per_rank=50,
                     crop_size=227, crops=10) as loader:  # val split, each image once
        for batch in loader:
            x = loader.model_input(batch, ops)           # (50*10, 3, 227, 227)

Why uint8 and not finished crops: the crop/flip/cast/mean pass costs ~0.15 ms per 227 px
image in NumPy (a strided per-element loop) while reading the image costs ~0.02 ms, so a
loader that did it would be 5x slower than the bytes it moves; on a GPU the same pass is
one kernel over a batch 4x smaller to copy than float32 crops. The random choices (a
CropPlan) are drawn in the consumer from (seed, epoch, step, rank): tiny, and the same
whoever draws them.

One loader covers one epoch (from start_step). Batch k is a pure function of (seed,
epoch, step, rank, size), so batches are identical for any `workers` and `prefetch`.
The pixels it yields are a view of a slot that is refilled once the next batch is asked
for: use them (or copy them to the GPU) before the next iteration.

Processes start with fork, not spawn: spawn re-runs the trainer's main module in every
child, and under mpirun that module's `from mpi4py import MPI` would initialise MPI a
second time with the parent's process-manager environment. Forked children never call
MPI and leave through os._exit, so mpi4py's atexit MPI_Finalize never runs in them; they
start in milliseconds; and they share the ring through an anonymous mmap that leaves no
/dev/shm file behind after a crash. h5py is imported here, before any fork (an import
started after fork can deadlock on a lock held by another parent thread), but no file is
opened in the parent: the reader opens shards lazily in whichever process reads. A fork
copies only the forking thread, so create loaders while no other thread of the trainer is
inside h5py (a checkpoint writer thread, say): a lock it held would stay held in the child.
Checked under `mpiexec -n 2` with MPICH: forked workers run beside the MPI ranks.
"""
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from typing import NamedTuple

import h5py  # noqa: F401  imported before fork on purpose, see above
import numpy as np
import simplejpeg  # noqa: F401  same reason: jpeg shards decode in the workers

from mpiconvnet.data import augment
from mpiconvnet.data.sampler import DistributedSampler, EvalSampler
from mpiconvnet.data.shards import DatasetError, ShardedDataset
from mpiconvnet.parent_death import die_with_parent

# how often an idle worker checks that its parent still exists, and how often a waiting
# parent checks that its workers do
LIVENESS_POLL_S = 0.5
# close() gives workers this long to leave on their own before killing them
JOIN_TIMEOUT_S = 2.0


class LoaderError(RuntimeError):
    """A loader worker failed, died or hung; the message says which, and for a failure
    carries the worker's traceback."""


class Batch(NamedTuple):
    """One rank's batch: uint8 images and what the model should see of them."""
    step: int               # step within the epoch
    pixels: np.ndarray      # uint8 (count, S, S, 3), a view of a shared slot
    labels: np.ndarray      # int64 (count,)
    plan: augment.CropPlan  # the count (train) or count * crops (eval) windows to cut


class BatchMaker:
    """Reads batch `step` into given arrays and draws its crop plan; the same code runs
    in-process (workers=0) and in every worker, which is what makes the batches
    independent of the worker count."""

    def __init__(self, dataset, sampler, train, seed, crop_size, pca_lighting, crops):
        self.dataset = dataset
        self.sampler = sampler
        self.train = train
        self.seed = seed
        self.crop_size = crop_size
        self.pca_lighting = pca_lighting
        self.crops = crops
        # read once in the parent (the reader closes the shards again), inherited by workers
        self.labels = dataset.labels

    def fill(self, step, pixels_out, labels_out):
        """Read batch `step` into pixels_out (>= count, S, S, 3) and labels_out (>= count,); return count."""
        indices = self.sampler.indices_for_step(step)               # int64 (count,)
        count = len(indices)
        self.dataset.read(indices, out=pixels_out[:count])
        labels_out[:count] = self.labels[indices]
        return count

    def plan(self, step, count):
        """The crops of batch `step`, which holds `count` images."""
        if not self.train:
            return augment.eval_plan(count, self.dataset.image_size, self.crop_size, self.crops)
        sampler = self.sampler
        return augment.batch_augmentation(self.seed, sampler.epoch, step, sampler.rank, sampler.batch_per_rank,
                                          sampler.size, self.dataset.image_size, self.crop_size,
                                          self.pca_lighting)


def shared_array(shape, dtype):
    """A zeroed array in an anonymous shared mapping: forked children write, the parent sees."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise LoaderError(f"cannot map {nbytes / 2**20:.0f} MiB for the loader's batch slots {tuple(shape)} ({e}); "
                          f"lower --workers or --prefetch (max(prefetch, workers) + 1 batches a rank)") from None
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


_pin_warned = False


def _pin_slots(pixels, ops):
    """ops.pin_host_memory(pixels), or False (and one warning per process) when the driver
    refuses: the uploads then stay synchronous, slower but correct."""
    global _pin_warned
    try:
        return ops.pin_host_memory(pixels)
    except Exception as e:
        if not _pin_warned:
            _pin_warned = True
            print(f"loader: could not page-lock the batch slots ({e}); batch uploads stay synchronous",
                  file=sys.stderr)
        return False


def _worker_main(maker, connection, pixels, labels, parent_pid):
    """Loop in a worker: receive (step, slot), fill the slot, answer (step, slot, count)."""
    # a stop reaches every process of the group or job step (ctrl-c; SIGTERM or SIGUSR1 from
    # mpiexec, scancel or a time limit): the parent handles it and closes us. The parent's
    # handler, inherited by the fork, would run here instead: evaluate's raised a traceback
    # per worker, and the trainer's made close() wait for a SIGTERM that did nothing
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
    die_with_parent()   # a stopped worker would otherwise keep mpiexec's output pipe, and so mpiexec, alive
    if os.getppid() != parent_pid:
        return    # the parent ended before the line above took effect
    try:
        while True:
            try:
                if not connection.poll(LIVENESS_POLL_S):
                    if os.getppid() != parent_pid:
                        return    # the parent died without closing us (SIGKILL, OOM)
                    continue
                order = connection.recv()
            except (EOFError, OSError):
                return            # the parent closed the pipe: nobody is left to report to
            if order is None:
                return
            step, slot = order
            try:
                count = maker.fill(step, pixels[slot], labels[slot])
                reply = ("ok", step, slot, count)
            except DatasetError as error:   # a shard gone bad: its one line says which, and the fix
                reply = ("bad data", step, str(error))
            except BaseException:
                reply = ("error", step, traceback.format_exc())
            try:
                connection.send(reply)
            except (OSError, ValueError):
                return
            if reply[0] != "ok":
                return
    finally:
        maker.dataset.close()


class BatchLoader:
    """Batches of one epoch for one rank, in step order, prepared by `workers` processes
    (0: in this process) into max(prefetch, workers) + 1 shared slots (one is held by the
    consumer while the others fill)."""

    def __init__(self, data_dir, split=None, *, rank=0, size=1, batch_per_rank, epoch=0, start_step=0, seed=0,
                 crop_size, train=True, mean="channel", divide_by_std=False, pca_lighting=False, drop_last=True,
                 shuffle=True, workers=1, prefetch=2, crops=1, stall_timeout=None):
        self._processes = []
        self.stall_timeout = stall_timeout   # seconds a batch may take a worker before it counts as hung
        self._connections = []
        self._closed = False
        if mean not in ("channel", "image"):
            raise ValueError(f"mean is {mean!r}; choose 'channel' (per-channel mean) or 'image' (mean image)")
        if train and crops != 1:
            raise ValueError(f"crops={crops} is for evaluation (train=False); training takes one random crop")
        if crops not in (1, 10):
            raise ValueError(f"crops is {crops}; evaluation uses 1 (centre) or 10 (corners, centre and mirrors)")
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers={workers}, prefetch={prefetch}: need workers >= 0 and prefetch >= 1")
        split = split or ("train" if train else "val")
        self.dataset = ShardedDataset(data_dir, split)
        if crop_size > self.dataset.image_size:
            raise ValueError(f"crop size {crop_size} is larger than the {self.dataset.image_size}px images in "
                             f"{data_dir}; use a smaller model input or re-pack with a larger --image-size")
        if train:
            self.sampler = DistributedSampler(self.dataset.num_images, rank, size, seed, epoch, batch_per_rank,
                                              drop_last=drop_last, shuffle=shuffle)
        else:
            self.sampler = EvalSampler(self.dataset.num_images, rank, size, batch_per_rank)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} is outside 0..{self.steps_per_epoch} for this epoch")
        self.epoch, self.start_step, self.crops = epoch, start_step, crops
        self.batch_per_rank, self.crop_size = batch_per_rank, crop_size
        self.time_waiting = 0.0   # seconds next() spent waiting for (or, with workers=0, making) data
        mean_values = self.dataset.mean_image() if mean == "image" else self.dataset.mean
        self.mean_chw = augment.mean_as_chw(mean_values)
        self.std = self.dataset.std if divide_by_std else None
        self._maker = BatchMaker(self.dataset, self.sampler, train, seed, crop_size, pca_lighting, crops)
        self.workers = workers
        num_slots = max(prefetch, workers) + 1 if workers else 1
        self.num_slots = num_slots
        image_size = self.dataset.image_size
        pixel_shape = (num_slots, batch_per_rank, image_size, image_size, 3)
        if workers:
            self._pixels = shared_array(pixel_shape, np.uint8)
            self._labels = shared_array((num_slots, batch_per_rank), np.int64)
        else:
            self._pixels = np.empty(pixel_shape, dtype=np.uint8)
            self._labels = np.empty((num_slots, batch_per_rank), dtype=np.int64)
        self._free_slots = list(range(num_slots))
        self._held_slot = None        # the slot whose views the consumer was last given
        self._pinned = None           # the slots page-locked for a GPU backend (model_input)
        self._upload = None           # (ops, event after the held slot's upload to the device)
        self._ready = {}              # step -> (slot, count)
        self._next_order = start_step
        self._next_step = start_step
        if workers:
            self._start_workers()

    # --- processes ---------------------------------------------------------------------

    def _start_workers(self):
        try:
            context = multiprocessing.get_context("fork")
        except ValueError:
            raise LoaderError("this platform cannot fork; run the loader in-process with workers=0") from None
        parent_pid = os.getpid()
        for worker_id in range(self.workers):
            parent_end, worker_end = context.Pipe(duplex=True)
            process = context.Process(target=_worker_main, name=f"mpiconvnet-loader-{worker_id}", daemon=True,
                                      args=(self._maker, worker_end, self._pixels, self._labels, parent_pid))
            process.start()
            worker_end.close()
            self._processes.append(process)
            self._connections.append(parent_end)
        self._send_orders()

    def _send_orders(self):
        """Hand every free slot the next unordered step; worker = step's turn in the round."""
        while self._free_slots and self._next_order < self.steps_per_epoch:
            slot = self._free_slots.pop(0)
            worker = (self._next_order - self.start_step) % self.workers
            try:
                self._connections[worker].send((self._next_order, slot))
            except (BrokenPipeError, ConnectionResetError):
                self._report_death(worker)
            self._next_order += 1

    def _receive(self):
        """Block until some worker reports; raise LoaderError if one failed or died."""
        sentinels = {process.sentinel: worker for worker, process in enumerate(self._processes)}
        ready = multiprocessing.connection.wait(self._connections + list(sentinels), timeout=LIVENESS_POLL_S)
        # read the pipes before looking at exits: a failing worker sends its traceback, then exits
        for worker, connection in enumerate(self._connections):
            if connection in ready:
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    self._report_death(worker)
                if message[0] == "bad data":
                    self.close()
                    raise DatasetError(message[2])
                if message[0] == "error":
                    _, step, worker_traceback = message
                    self._fail(f"loader worker {worker} failed on step {step} of epoch {self.epoch} "
                                       f"(split {self.dataset.split!r} of {self.dataset.root}):\n{worker_traceback}")
                _, step, slot, count = message
                self._ready[step] = (slot, count)
        for sentinel, worker in sentinels.items():
            if sentinel in ready and not self._connections[worker].poll():
                self._report_death(worker)

    def _report_death(self, worker):
        process = self._processes[worker]
        process.join(JOIN_TIMEOUT_S)      # reap it, so that exitcode is known
        self._fail(f"loader worker {worker} (pid {process.pid}) died with exit code {process.exitcode} before the "
                   f"epoch ended (negative: killed by that signal, -9 often by the out-of-memory killer); "
                   f"retry with fewer workers or with workers=0")

    def _fail(self, message):
        self.close()
        raise LoaderError(message)

    # --- iteration ---------------------------------------------------------------------

    def __len__(self):
        """The number of batches this loader yields (steps from start_step to the epoch's end)."""
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        return self

    def __next__(self):
        """The next Batch, in step order."""
        if self._closed:
            raise StopIteration
        if self._held_slot is not None:
            # the consumer has moved on: its previous slot may be refilled, once the device
            # has read it (a copy from page-locked memory runs after the call that queued it)
            self._wait_for_upload()
            self._free_slots.append(self._held_slot)
            self._held_slot = None
            if self.workers:
                self._send_orders()
        step = self._next_step
        if step >= self.steps_per_epoch:
            self.close()
            raise StopIteration
        started = time.perf_counter()
        if self.workers:
            while step not in self._ready:
                self._receive()
                if step not in self._ready and self.stall_timeout is not None \
                        and time.perf_counter() - started > self.stall_timeout:
                    worker = (step - self.start_step) % self.workers
                    self._fail(f"loader worker {worker} (pid {self._processes[worker].pid}) has made no batch for "
                               f"step {step} of epoch {self.epoch} in {self.stall_timeout:g} s: hung, stopped or "
                               f"stuck reading {self.dataset.root} (its file system?); the run stops here")
            slot, count = self._ready.pop(step)
        else:
            slot = self._free_slots.pop(0)
            count = self._maker.fill(step, self._pixels[slot], self._labels[slot])
        self.time_waiting += time.perf_counter() - started
        self._held_slot = slot
        self._next_step = step + 1
        return Batch(step, self._pixels[slot, :count], self._labels[slot, :count], self._maker.plan(step, count))

    def _wait_for_upload(self):
        """Wait until the device has read the held slot (its upload is DMA, after the call)."""
        if self._upload is not None:
            ops, event = self._upload
            ops.wait_event(event)
            self._upload = None

    def model_input(self, batch, ops):
        """float32 (len(batch.plan), 3, c, c) on the backend `ops`: batch's crops, flipped,
        lit and normalised with this loader's mean and std (ops.crop_flip_normalize).

        On a GPU backend the slots are page-locked on first use, so the batch's upload is
        DMA that the host does not wait for; the slot is refilled only after it is done."""
        return ops.crop_staged(self._stage(batch, ops))

    def device_batches(self, ops):
        """(batch, x) for every batch, x = model_input(batch, ops), with the next batch
        staged (ops.stage_batch) before this one is handed out: on a GPU its copy to the
        device then runs beside the step the caller queues on x, not between two steps.

        The batch handed out has its own copy of the labels and no pixels (None): its slot
        is already being refilled."""
        ahead = None
        for batch in self:
            staged = self._stage(batch, ops)
            if ahead is not None:
                yield ahead[0], ops.crop_staged(ahead[1])
            ahead = (batch._replace(pixels=None, labels=batch.labels.copy()), staged)
        if ahead is not None:
            yield ahead[0], ops.crop_staged(ahead[1])

    def _stage(self, batch, ops):
        """ops.stage_batch of batch; the slot is refilled only after its copy is done."""
        if not ops.HOST_MEMORY and self._pinned is None:
            self._pinned = _pin_slots(self._pixels, ops)
        staged = ops.stage_batch(batch.pixels, batch.plan, self.crop_size, self.mean_chw, self.std)
        if staged.copied is not None:
            self._upload = (ops, staged.copied)
        return staged

    # --- shutdown ----------------------------------------------------------------------

    def close(self):
        """Stop the workers (politely, then by force) and drop the file handles; idempotent."""
        if self._closed:
            return
        self._closed = True
        for connection in self._connections:
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass          # that worker is already gone
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():   # hung in a read: SIGKILL, as it ignores SIGTERM (_worker_main)
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()
        self._processes, self._connections = [], []
        if getattr(self, "_upload", None) is not None:   # __init__ may have failed before setting it
            self._wait_for_upload()                      # the device may still be reading a slot
        self._pinned = None                # unpinned before the slots' mapping can go
        if getattr(self, "dataset", None) is not None:   # absent when __init__ failed early
            self.dataset.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        # a loader dropped mid-epoch (an exception in the training loop) still stops its workers
        if getattr(self, "_processes", None) is not None:
            self.close()
