"""Turn uint8 NHWC images into the float32 NCHW crops a model eats: random crop + flip
(+ PCA lighting) for training, centre crop or 10 crops for evaluation, mean subtraction
and optional division by the standard deviation.

    plan = batch_augmentation(seed, epoch, step, rank, batch_per_rank, size,
                              image_size=256, crop_size=227, pca_lighting=True)
    x = crop_batch(images, plan, 227, mean_as_chw(ds.mean_image()))   # (b, 3, 227, 227)
    x = crop_batch(images, eval_plan(b, 256, 227, crops=10), 227,
                   mean_as_chw(ds.mean))                              # (b*10, 3, 227, 227)

A CropPlan (which window of which image, mirrored or not, lit how) is drawn on the host;
crop_batch is the reference that carries it out, and the backends' crop_flip_normalize
does the same where the model lives (the loader ships uint8 images, see loader.py).

Every output value is (pixel + lighting - mean) / std on the 0-255 scale, with the mean
taken at the same source pixel as the image (per channel, or the mean image cropped and
flipped together with the image, as Krizhevsky and theano_alexnet did).

Cost: one pass per image that reads the uint8 window and writes float32 with the mean
already subtracted (numpy casts inside the ufunc). A per-image loop of slices beats one
fancy-index gather over the batch by ~8x here (64 x 227^2 x 3: 7 ms vs 57 ms), because
the gather builds index arrays and copies 3-byte elements one at a time.
"""
from dataclasses import dataclass

import numpy as np

# AlexNet's PCA lighting, as published with fb.resnet.torch: eigenvalues and eigenvectors
# (columns) of the RGB covariance of ImageNet pixels on the 0-1 scale.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float64)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], dtype=np.float64)
PCA_ALPHA_STD = 0.1


@dataclass
class CropPlan:
    """The m windows a batch of n images becomes: crop i is image sources[i] at offsets[i]."""
    sources: np.ndarray    # int64 (m,): which image of the batch
    offsets: np.ndarray    # int64 (m, 2): top-left (y, x) of each crop
    flips: np.ndarray      # bool (m,): mirror left-right
    lighting: np.ndarray   # float32 (m, 3): RGB shift on the 0-255 scale, or None

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, part):
        """The crops `part` (a slice) of this plan; sources still index the whole batch."""
        lighting = None if self.lighting is None else self.lighting[part]
        return CropPlan(self.sources[part], self.offsets[part], self.flips[part], lighting)


def pca_lighting_shift(alpha):
    """float32 (n, 3): the RGB shift 255 * eigvec @ (alpha * eigval) for alpha (n, 3).

    The eigenvalues belong to pixels on the 0-1 scale; our pixels are 0-255, so the shift
    is scaled by 255 (alpha ~ N(0, 0.1) moves a pixel by about 0.1 * 0.22 * 255 ~ 5 levels
    along the first component).
    """
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1, 3)
    # shift[n, i] = 255 * sum_j eigvec[i, j] * alpha[n, j] * eigval[j]; written as a
    # broadcast sum, not @, so loader processes forked from a parent never enter BLAS
    return (255.0 * (PCA_EIGVEC[None, :, :] * (alpha * PCA_EIGVAL)[:, None, :]).sum(axis=2)).astype(np.float32)


def draw_augmentation(rng, n, image_size, crop_size, pca_lighting):
    """Draw offsets, flips and (optionally) lighting for n images from rng, in a fixed order."""
    if crop_size > image_size:
        raise ValueError(f"crop size {crop_size} is larger than the stored images ({image_size}px); "
                         f"use a smaller model input or re-pack with a larger --image-size")
    offsets = rng.integers(0, image_size - crop_size + 1, size=(n, 2), dtype=np.int64)
    flips = rng.random(n) < 0.5
    # drawn last, so turning lighting on or off leaves the crops and flips unchanged
    lighting = pca_lighting_shift(rng.normal(0.0, PCA_ALPHA_STD, size=(n, 3))) if pca_lighting else None
    return CropPlan(np.arange(n, dtype=np.int64), offsets, flips, lighting)


def batch_augmentation(seed, epoch, step, rank, batch_per_rank, size, image_size, crop_size, pca_lighting):
    """The random choices of rank's slice of the global batch at (epoch, step).

    Drawn for the whole global batch from one generator seeded by (seed, epoch, step),
    then sliced like the sampler slices the images: the choices depend on neither timing
    nor loader process count, a resumed run redraws them exactly, and N ranks of b images
    get exactly the crops one rank of N*b images gets (the trainer's equivalence test).
    Drawing B instead of b numbers costs microseconds.
    """
    rng = np.random.default_rng((seed, epoch, step))
    whole = draw_augmentation(rng, batch_per_rank * size, image_size, crop_size, pca_lighting)
    mine = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
    lighting = None if whole.lighting is None else whole.lighting[mine]
    return CropPlan(np.arange(batch_per_rank, dtype=np.int64), whole.offsets[mine], whole.flips[mine], lighting)


def mean_as_chw(mean):
    """float32 (3, 1, 1) from a per-channel mean (3,), or (3, S, S) from a mean image (S, S, 3)."""
    mean = np.asarray(mean, dtype=np.float32)
    if mean.shape == (3,):
        return mean.reshape(3, 1, 1)
    if mean.ndim == 3 and mean.shape[2] == 3:
        return np.ascontiguousarray(mean.transpose(2, 0, 1))
    raise ValueError(f"mean has shape {mean.shape}; expected (3,) per channel or (S, S, 3) for a mean image")


def center_offset(image_size, crop_size):
    """(y, x) of the centred crop; odd margins put the extra pixel below and right."""
    margin = (image_size - crop_size) // 2
    return margin, margin


def ten_crop_offsets(image_size, crop_size):
    """int64 (5, 2): top-left, top-right, bottom-left, bottom-right, centre."""
    far = image_size - crop_size
    return np.array([(0, 0), (0, far), (far, 0), (far, far), center_offset(image_size, crop_size)], dtype=np.int64)


def check_plan(plan, num_images, image_size, crop_size):
    """Raise ValueError unless every crop of plan lies inside one of the num_images images."""
    if not len(plan):
        return
    sources, offsets = np.asarray(plan.sources), np.asarray(plan.offsets)
    if sources.min() < 0 or sources.max() >= num_images:
        raise ValueError(f"crop sources outside 0..{num_images - 1} for a batch of {num_images} images")
    if offsets.min() < 0 or offsets.max() > image_size - crop_size:
        raise ValueError(f"crop offsets outside 0..{image_size - crop_size} for {crop_size}px crops of "
                         f"{image_size}px images")


def crop_batch(images, plan, crop_size, mean_chw, std=None, out=None):
    """float32 (m, 3, crop, crop): the m windows of `plan` cut out of images, normalised.

    images: uint8 (n, S, S, 3); plan: a CropPlan of m crops; mean_chw: float32 (3, 1, 1)
    or (3, S, S) from mean_as_chw; std: (3,) or None; out: float32 (m, 3, crop, crop) to fill.
    """
    sources, offsets, flips, shift = plan.sources, plan.offsets, plan.flips, plan.lighting
    num_out = len(sources)
    size = images.shape[1]
    if out is None:
        out = np.empty((num_out, 3, crop_size, crop_size), dtype=np.float32)
    if out.shape != (num_out, 3, crop_size, crop_size) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected ({num_out}, 3, {crop_size}, {crop_size}) float32")
    check_plan(plan, len(images), size, crop_size)
    mean_is_image = mean_chw.shape[1] != 1
    inv_std = None if std is None else (1.0 / np.asarray(std, dtype=np.float32)).reshape(3, 1, 1)
    for i in range(num_out):
        y, x = int(offsets[i, 0]), int(offsets[i, 1])
        window = images[sources[i], y:y + crop_size, x:x + crop_size].transpose(2, 0, 1)   # (3, c, c) uint8 view
        mean = mean_chw[:, y:y + crop_size, x:x + crop_size] if mean_is_image else mean_chw
        if flips[i]:
            window = window[:, :, ::-1]
            if mean_is_image:
                mean = mean[:, :, ::-1]
        if shift is not None and not mean_is_image:
            # folding the lighting into the (3, 1, 1) mean keeps it a single pass
            mean = mean - shift[i].reshape(3, 1, 1)
        np.subtract(window, mean, out=out[i], dtype=np.float32)
        if shift is not None and mean_is_image:
            out[i] += shift[i].reshape(3, 1, 1)
        if inv_std is not None:
            out[i] *= inv_std
    return out


def eval_plan(count, image_size, crop_size, crops=1):
    """The evaluation crops of `count` images: the centre (crops=1) or ten (crops=10).

    With 10 crops, per image and in this order: the top-left, top-right, bottom-left,
    bottom-right and centre crops, then the same five windows mirrored; image i owns
    crops [10 i, 10 i + 10), so scores average with scores.reshape(b, 10, classes).mean(1).
    """
    if crop_size > image_size:
        raise ValueError(f"crop size {crop_size} is larger than the stored images ({image_size}px); "
                         f"use a smaller model input or re-pack with a larger --image-size")
    if crops == 1:
        offsets = np.tile(np.array(center_offset(image_size, crop_size), dtype=np.int64), (count, 1))
        flips = np.zeros(count, dtype=bool)
    elif crops == 10:
        five = ten_crop_offsets(image_size, crop_size)
        offsets = np.tile(np.concatenate([five, five]), (count, 1))                # (b*10, 2)
        flips = np.tile(np.repeat([False, True], 5), count)                         # (b*10,)
    else:
        raise ValueError(f"crops is {crops}; evaluation uses 1 (centre) or 10 (corners, centre and mirrors)")
    sources = np.repeat(np.arange(count, dtype=np.int64), crops)
    return CropPlan(sources, offsets, flips, None)
