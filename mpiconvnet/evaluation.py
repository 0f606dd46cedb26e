"""Distributed, exact evaluation: every validation image counted once, for any rank count.

Each rank scores its own contiguous share of the split (EvalSampler), and the counts,
not the averages, are summed over ranks, so 50,000 images on 3 ranks still give
correct/50,000. With 10 crops the softmax probabilities of the crops are averaged
(Krizhevsky 2012) before top-k.
"""
import numpy as np

from mpiconvnet.data.loader import BatchLoader


def softmax(logits):
    # logits: (N, K); shift by the row maximum so exp never overflows
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_batch(probabilities, labels):
    """(top-1 correct, top-5 correct, summed cross-entropy) for probabilities (N, K)."""
    k = min(5, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    top1 = int((top[:, 0] == labels).sum())
    top5 = int((top == labels[:, None]).any(axis=1).sum())
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.maximum(picked, 1e-30)).sum())
    return top1, top5, loss


def evaluate(net, world, data_dir, batch_per_rank, crops=1, mean="channel", workers=1, split="val", seed=0,
             stall_timeout=None):
    """{'top1', 'top5', 'loss', 'images'} over the whole split, identical on every rank."""
    totals = np.zeros(4)   # top-1 correct, top-5 correct, summed loss, images
    # --parallel model: every rank runs every image (its share of each layer), so every
    # rank reads them all, and their counts, the same everywhere, are not summed
    same_images = net.shards is not None and net.shards.split_convs
    rank, size = (0, 1) if same_images else (world.rank, world.size)
    with BatchLoader(data_dir, split=split, rank=rank, size=size, batch_per_rank=batch_per_rank,
                     epoch=0, start_step=0, seed=seed, crop_size=net.input_size, train=False, mean=mean,
                     divide_by_std=net.spec.standardize_input, workers=workers, crops=crops,
                     stall_timeout=stall_timeout) as loader:
        missing_steps = 0
        if net.shards is not None and world.size > 1 and not same_images:
            # a split model's forward is a collective: a rank whose share of the split runs
            # out first (shares differ by at most one image) joins the others' last steps
            # with no images. Agreed on before the first step, as a collective of its own.
            from mpi4py import MPI
            missing_steps = world.comm.allreduce(len(loader), op=MPI.MAX) - len(loader)
        for batch, images in loader.device_batches(net.ops):
            world.progress(f"the evaluation ({split}, {int(totals[3])} images scored)")
            labels = batch.labels
            n = len(labels)
            probabilities = softmax(net.forward(images, train=False).astype(np.float64))
            if crops > 1:
                # images arrive as crops consecutive per image: (n * crops, 3, H, W)
                probabilities = probabilities.reshape(n, crops, -1).mean(axis=1)
            top1, top5, loss = score_batch(probabilities, labels)
            totals += (top1, top5, loss, n)
        for _ in range(missing_steps):
            net.forward(np.zeros((0, 3, net.input_size, net.input_size), net.dtype), train=False)
    world.progress(f"the evaluation's final sum ({split}, {int(totals[3])} images scored here)")
    top1, top5, loss, images = totals if same_images else world.allreduce_sum(totals)
    images = max(images, 1)
    return {"top1": top1 / images, "top5": top5 / images, "loss": loss / images, "images": int(images)}
