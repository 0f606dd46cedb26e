"""The distributed training sampler and the exactly-once evaluation split."""
import numpy as np
import pytest

from mpiconvnet.data.sampler import DistributedSampler, EvalSampler, eval_range


def all_batches(num_images, size, batch_per_rank, drop_last, seed=5, epoch=2):
    """[step][rank] -> indices, for every rank of one epoch."""
    samplers = [DistributedSampler(num_images, rank, size, seed, epoch, batch_per_rank, drop_last=drop_last)
                for rank in range(size)]
    steps = samplers[0].steps_per_epoch
    assert all(s.steps_per_epoch == steps for s in samplers)
    return [[s.indices_for_step(step) for s in samplers] for step in range(steps)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_image_exactly_once_when_batches_divide(drop_last):
    batches = all_batches(num_images=48, size=3, batch_per_rank=4, drop_last=drop_last)
    assert len(batches) == 4
    seen = np.concatenate([i for step in batches for i in step])
    assert seen.dtype == np.int64
    np.testing.assert_array_equal(np.sort(seen), np.arange(48))
    # shuffled, not the identity
    assert not np.array_equal(seen, np.arange(48))


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_slices_concatenate_to_the_one_rank_batch(size, drop_last):
    batch_per_rank, num_images = 3, 50
    single = DistributedSampler(num_images, 0, 1, 7, 1, batch_per_rank * size, drop_last=drop_last)
    batches = all_batches(num_images, size, batch_per_rank, drop_last, seed=7, epoch=1)
    assert len(batches) == single.steps_per_epoch
    for step, per_rank in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate(per_rank), single.indices_for_step(step))


def test_drop_and_pad_step_counts_and_wraparound():
    drop = DistributedSampler(50, 0, 3, 1, 0, 4, drop_last=True)
    pad = DistributedSampler(50, 0, 3, 1, 0, 4, drop_last=False)
    assert (drop.steps_per_epoch, pad.steps_per_epoch) == (4, 5)        # 50 images, global batch 12
    np.testing.assert_array_equal(drop.permutation, pad.permutation)
    last = np.concatenate([DistributedSampler(50, r, 3, 1, 0, 4, drop_last=False).indices_for_step(4)
                           for r in range(3)])
    # images 48, 49 of the permutation, then wrapped to its start
    np.testing.assert_array_equal(last, pad.permutation[np.r_[48, 49, 0:10]])
    seen = np.concatenate([i for step in all_batches(50, 3, 4, drop_last=False, seed=1, epoch=0) for i in step])
    np.testing.assert_array_equal(np.unique(seen), np.arange(50))
    dropped = np.concatenate([i for step in all_batches(50, 3, 4, drop_last=True, seed=1, epoch=0) for i in step])
    assert len(np.unique(dropped)) == len(dropped) == 48


def test_tiny_set_wraps_more_than_once_and_drop_refuses():
    pad = DistributedSampler(5, 1, 2, 0, 0, 6, drop_last=False)
    assert pad.steps_per_epoch == 1
    np.testing.assert_array_equal(pad.indices_for_step(0), pad.permutation[np.arange(6, 12) % 5])
    with pytest.raises(ValueError, match="drop_last=False"):
        DistributedSampler(5, 0, 2, 0, 0, 6, drop_last=True)


def test_permutation_depends_on_seed_and_epoch_only():
    a = DistributedSampler(100, 0, 2, 3, 4, 5)
    assert np.array_equal(a.permutation, DistributedSampler(100, 1, 4, 3, 4, 7).permutation)
    assert not np.array_equal(a.permutation, DistributedSampler(100, 0, 2, 3, 5, 5).permutation)
    assert not np.array_equal(a.permutation, DistributedSampler(100, 0, 2, 4, 4, 5).permutation)
    unshuffled = DistributedSampler(10, 0, 1, 3, 4, 5, shuffle=False)
    np.testing.assert_array_equal(unshuffled.indices_for_step(1), np.arange(5, 10))


def test_mid_epoch_start_reproduces_the_rest_of_the_epoch():
    whole = list(DistributedSampler(97, 1, 2, 11, 3, 4, drop_last=False).steps())
    resumed = list(DistributedSampler(97, 1, 2, 11, 3, 4, drop_last=False).steps(start_step=5))
    assert [s for s, _ in resumed] == list(range(5, len(whole)))
    for (s1, i1), (s2, i2) in zip(whole[5:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(i1, i2)
    assert list(DistributedSampler(97, 1, 2, 11, 3, 4).steps(start_step=12)) == []
    with pytest.raises(ValueError):
        list(DistributedSampler(97, 1, 2, 11, 3, 4).steps(start_step=13))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_images", [23, 2])
def test_eval_counts_every_image_exactly_once(size, num_images):
    seen, counts = [], []
    for rank in range(size):
        sampler = EvalSampler(num_images, rank, size, batch_per_rank=4)
        batches = [indices for _, indices in sampler.steps()]
        assert all(1 <= len(b) <= 4 for b in batches)
        assert len(batches) == sampler.steps_per_epoch
        counts.append(sum(len(b) for b in batches))
        seen.extend(batches)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(num_images))
    assert sum(counts) == num_images and max(counts) - min(counts) <= 1


def test_eval_range_partitions():
    ranges = [eval_range(10, r, 4) for r in range(4)]
    assert ranges == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError):
        eval_range(10, 4, 4)
