"""Which images each rank reads at each step: training (shuffled, padded or dropped) and
evaluation (every image exactly once).

    from mpiconvnet.data.sampler import DistributedSampler, EvalSampler
    sampler = DistributedSampler(num_images=1281167, rank=r, size=4, seed=0, epoch=3,
                                 batch_per_rank=64, drop_last=True, shuffle=True)
    for step, indices in sampler.steps(start_step=0):   # indices: int64 (64,)
        ...

Everything is plain integers in, int64 arrays out, so the whole sharding logic runs and is
tested in one process; no MPI here.
"""
import numpy as np


class DistributedSampler:
    """The training order of one epoch, cut into global batches, each cut into rank slices.

    All ranks draw the same permutation from (seed, epoch). Step s uses
    permutation[s*B:(s+1)*B] with B = batch_per_rank * size, and rank r takes the
    contiguous slice [r*b:(r+1)*b] of it: the N-rank global batch is exactly the 1-rank
    batch of the same B, which is what makes N-rank synchronous SGD equal 1-rank SGD.

    The last global batch is usually incomplete (1,281,167 is not divisible by most B).
    drop_last=True skips it; drop_last=False fills it by wrapping around to the start of
    the permutation. Either way every rank runs the same number of steps, so no rank waits
    forever in an allreduce.
    """

    def __init__(self, num_images, rank, size, seed, epoch, batch_per_rank, drop_last=True, shuffle=True):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1} (size {size})")
        if batch_per_rank < 1:
            raise ValueError(f"batch_per_rank is {batch_per_rank}; it must be at least 1")
        if num_images < 1:
            raise ValueError(f"the training split has {num_images} images; pack some with python -m preprocess")
        self.num_images = int(num_images)
        self.rank, self.size = int(rank), int(size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.batch_per_rank = int(batch_per_rank)
        self.global_batch = self.batch_per_rank * self.size
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        if self.drop_last:
            self.steps_per_epoch = self.num_images // self.global_batch
            if self.steps_per_epoch == 0:
                raise ValueError(f"global batch {self.global_batch} ({self.size} ranks x {self.batch_per_rank}) is larger "
                                 f"than the {self.num_images} training images, so dropping the last batch leaves no step; "
                                 f"lower the batch size or pad the last batch (drop_last=False)")
        else:
            self.steps_per_epoch = -(-self.num_images // self.global_batch)
        if self.shuffle:
            # a tuple seed: (seed, epoch) and (seed + 1, epoch - 1) give unrelated streams
            self.permutation = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_images)
        else:
            self.permutation = np.arange(self.num_images, dtype=np.int64)

    def __len__(self):
        return self.steps_per_epoch

    def indices_for_step(self, step_in_epoch):
        """int64 (batch_per_rank,): this rank's images at one step of the epoch."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} is outside epoch {self.epoch}'s 0..{self.steps_per_epoch - 1}")
        start = step_in_epoch * self.global_batch + self.rank * self.batch_per_rank
        # modulo wraps the padded last batch around to the start of the permutation (only
        # reachable with drop_last=False); a tiny set may wrap more than once
        positions = np.arange(start, start + self.batch_per_rank, dtype=np.int64) % self.num_images
        return self.permutation[positions].astype(np.int64, copy=False)

    def steps(self, start_step=0):
        """Yield (step_in_epoch, indices) from start_step to the end of the epoch; resuming
        at start_step gives exactly the batches an uninterrupted epoch would have had."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} is outside 0..{self.steps_per_epoch} for epoch {self.epoch}")
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.indices_for_step(step)

    def __iter__(self):
        return self.steps(0)


def eval_range(num_images, rank, size):
    """(first, stop): the contiguous block of the evaluation split that rank reads.

    Blocks partition 0..num_images-1, differ in length by at most one, and may be empty
    when there are more ranks than images. Counting each image exactly once matters more
    than equal work: padding here would bias the reported accuracy.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1} (size {size})")
    return rank * num_images // size, (rank + 1) * num_images // size


class EvalSampler:
    """Batches of this rank's evaluation block, in global order; the last may be short.

    Ranks may have one image (and so one step) more or fewer than others: the evaluator
    sums correct counts and image counts over ranks with MPI at the end, never per step.
    """

    def __init__(self, num_images, rank, size, batch_per_rank):
        if batch_per_rank < 1:
            raise ValueError(f"batch_per_rank is {batch_per_rank}; it must be at least 1")
        self.num_images = int(num_images)
        self.rank, self.size = int(rank), int(size)
        self.batch_per_rank = int(batch_per_rank)
        self.first, self.stop = eval_range(self.num_images, self.rank, self.size)
        self.num_local = self.stop - self.first
        self.steps_per_epoch = -(-self.num_local // self.batch_per_rank)

    def __len__(self):
        return self.steps_per_epoch

    def indices_for_step(self, step):
        """int64 (<= batch_per_rank,): the images of evaluation step `step` on this rank."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"evaluation step {step} is outside 0..{self.steps_per_epoch - 1}")
        start = self.first + step * self.batch_per_rank
        return np.arange(start, min(start + self.batch_per_rank, self.stop), dtype=np.int64)

    def steps(self, start_step=0):
        """Yield (step, indices) from start_step to the end of this rank's block."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} is outside 0..{self.steps_per_epoch} for evaluation")
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.indices_for_step(step)

    def __iter__(self):
        return self.steps(0)
