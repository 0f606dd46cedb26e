"""Crops, flips, mean subtraction, PCA lighting and evaluation crops of augment.py."""
import numpy as np
import pytest

from mpiconvnet.data import augment

SIZE, CROP = 12, 8


def position_images(n):
    """uint8 (n, S, S, 3): channel 0 = row, 1 = column, 2 = image number, so each output
    pixel says where it came from."""
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    images[..., 0] = np.arange(SIZE)[None, :, None]
    images[..., 1] = np.arange(SIZE)[None, None, :]
    images[..., 2] = np.arange(n)[:, None, None]
    return images


def reference_crop(image, y, x, flip, mean_hwc):
    """float64 (3, c, c): the crop written the slow obvious way, for one image."""
    out = np.empty((3, CROP, CROP))
    for row in range(CROP):
        for col in range(CROP):
            source_col = x + (CROP - 1 - col if flip else col)
            for channel in range(3):
                out[channel, row, col] = (float(image[y + row, source_col, channel])
                                          - float(mean_hwc[y + row, source_col, channel]))
    return out


def test_offsets_cover_the_range_and_flips_are_fair():
    choices = augment.draw_augmentation(np.random.default_rng(0), 4000, SIZE, CROP, pca_lighting=False)
    assert choices.offsets.min() == 0 and choices.offsets.max() == SIZE - CROP
    assert set(np.unique(choices.offsets)) == set(range(SIZE - CROP + 1))
    assert 0.45 < choices.flips.mean() < 0.55
    assert choices.lighting is None
    with pytest.raises(ValueError, match="crop size"):
        augment.draw_augmentation(np.random.default_rng(0), 1, 8, 9, False)


@pytest.mark.parametrize("mean_kind", ["channel", "image"])
def test_crop_flip_and_mean_match_the_reference(mean_kind):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)
    if mean_kind == "channel":
        mean = np.array([100.5, 50.25, 3.0], dtype=np.float32)
        mean_hwc = np.broadcast_to(mean, (SIZE, SIZE, 3))
    else:
        mean = mean_hwc = rng.uniform(0, 255, size=(SIZE, SIZE, 3)).astype(np.float32)
    choices = augment.draw_augmentation(rng, 6, SIZE, CROP, pca_lighting=False)
    choices.flips[:2] = [True, False]          # both cases present whatever the draw
    out = augment.crop_batch(images, choices, CROP, augment.mean_as_chw(mean))
    assert out.shape == (6, 3, CROP, CROP) and out.dtype == np.float32
    for i in range(6):
        y, x = choices.offsets[i]
        np.testing.assert_allclose(out[i], reference_crop(images[i], y, x, choices.flips[i], mean_hwc), rtol=1e-6)


def test_positions_of_a_flipped_crop():
    images = position_images(2)
    choices = augment.CropPlan(np.arange(2), np.array([[1, 3], [4, 0]]), np.array([False, True]), None)
    out = augment.crop_batch(images, choices, CROP, augment.mean_as_chw(np.zeros(3)))
    np.testing.assert_array_equal(out[0, 0, :, 0], np.arange(1, 1 + CROP))      # rows from y=1
    np.testing.assert_array_equal(out[0, 1, 0], np.arange(3, 3 + CROP))         # columns from x=3
    np.testing.assert_array_equal(out[1, 1, 0], np.arange(CROP)[::-1])          # mirrored: x=7..0
    np.testing.assert_array_equal(out[1, 0, :, 0], np.arange(4, 4 + CROP))      # rows unchanged by a flip
    assert (out[1, 2] == 1).all()


def test_mean_image_is_cropped_and_flipped_with_the_image():
    # images equal to the mean image leave exactly zero only if the mean crop is aligned
    rng = np.random.default_rng(2)
    mean_image = rng.integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.float32)
    images = np.repeat(mean_image.astype(np.uint8)[None], 32, axis=0)
    choices = augment.draw_augmentation(rng, 32, SIZE, CROP, pca_lighting=False)
    assert choices.flips.any() and not choices.flips.all()
    out = augment.crop_batch(images, choices, CROP, augment.mean_as_chw(mean_image))
    assert np.abs(out).max() == 0
    # a mean image that is not flat differs from its own mirror, so a missed flip would show
    assert np.abs(mean_image - mean_image[:, ::-1]).max() > 0


def test_pca_lighting_shift_matches_the_formula():
    alpha = np.array([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0], [-0.3, 0.1, 0.2]])
    shift = augment.pca_lighting_shift(alpha)
    for n in range(3):
        for channel in range(3):
            want = 255 * sum(augment.PCA_EIGVEC[channel][j] * alpha[n][j] * augment.PCA_EIGVAL[j] for j in range(3))
            assert shift[n, channel] == pytest.approx(want, rel=1e-6, abs=1e-6)
    # the first component moves all channels the same way, by ~0.22*255*alpha
    assert shift[0, 0] == pytest.approx(255 * (-0.5675 * 0.1 * 0.2175 + 0.7192 * -0.2 * 0.0188
                                               + 0.4009 * 0.05 * 0.0045), rel=1e-6)


@pytest.mark.parametrize("mean_kind", ["channel", "image"])
def test_lighting_and_std_are_applied_per_image(mean_kind):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8)
    mean = (np.array([120.0, 110.0, 90.0], dtype=np.float32) if mean_kind == "channel"
            else rng.uniform(0, 255, size=(SIZE, SIZE, 3)).astype(np.float32))
    std = np.array([60.0, 55.0, 50.0], dtype=np.float32)
    choices = augment.draw_augmentation(rng, 4, SIZE, CROP, pca_lighting=True)
    assert choices.lighting.shape == (4, 3) and np.abs(choices.lighting).max() > 0.1
    plain = augment.crop_batch(images, augment.CropPlan(choices.sources, choices.offsets, choices.flips, None), CROP,
                                augment.mean_as_chw(mean))
    lit = augment.crop_batch(images, choices, CROP, augment.mean_as_chw(mean), std=std)
    want = (plain + choices.lighting[:, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(lit, want, rtol=1e-5, atol=1e-5)


def test_lighting_does_not_change_crops_or_flips():
    a = augment.batch_augmentation(1, 2, 3, 0, 8, 1, SIZE, CROP, pca_lighting=False)
    b = augment.batch_augmentation(1, 2, 3, 0, 8, 1, SIZE, CROP, pca_lighting=True)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.flips, b.flips)


def test_centre_crop_and_ten_crop_order():
    images = position_images(3)
    zero = augment.mean_as_chw(np.zeros(3))
    centre = augment.crop_batch(images, augment.eval_plan(3, SIZE, CROP), CROP, zero)
    assert centre.shape == (3, 3, CROP, CROP)
    np.testing.assert_array_equal(centre[1, 0, :, 0], np.arange(2, 2 + CROP))   # (12 - 8) / 2 = 2
    np.testing.assert_array_equal(centre[1, 1, 0], np.arange(2, 2 + CROP))      # not mirrored
    ten = augment.crop_batch(images, augment.eval_plan(3, SIZE, CROP, crops=10), CROP, zero)
    assert ten.shape == (30, 3, CROP, CROP)
    far = SIZE - CROP
    corners = [(0, 0), (0, far), (far, 0), (far, far), (2, 2)]
    for i in range(3):
        for k in range(10):
            crop = ten[10 * i + k]
            y, x = corners[k % 5]
            assert (crop[2] == i).all()                     # image i owns rows 10i..10i+9
            assert crop[0, 0, 0] == y
            columns = np.arange(x, x + CROP)
            np.testing.assert_array_equal(crop[1, 0], columns[::-1] if k >= 5 else columns)
    with pytest.raises(ValueError, match="crops"):
        augment.eval_plan(3, SIZE, CROP, crops=5)


def test_odd_margin_centre_crop():
    assert augment.center_offset(256, 227) == (14, 14)
    assert augment.center_offset(256, 224) == (16, 16)


def test_choices_are_a_pure_function_of_the_seed_tuple():
    args = dict(image_size=SIZE, crop_size=CROP, pca_lighting=True)
    a = augment.batch_augmentation(7, 1, 5, 0, 4, 2, **args)
    b = augment.batch_augmentation(7, 1, 5, 0, 4, 2, **args)
    for left, right in [(a.offsets, b.offsets), (a.flips, b.flips), (a.lighting, b.lighting)]:
        np.testing.assert_array_equal(left, right)
    for other in [(8, 1, 5), (7, 2, 5), (7, 1, 6)]:
        c = augment.batch_augmentation(*other, 0, 4, 2, **args)
        assert not np.array_equal(a.lighting, c.lighting)


@pytest.mark.parametrize("size", [2, 4])
def test_rank_slices_concatenate_to_the_one_rank_choices(size):
    args = dict(image_size=SIZE, crop_size=CROP, pca_lighting=True)
    single = augment.batch_augmentation(3, 0, 9, 0, 3 * size, 1, **args)
    ranks = [augment.batch_augmentation(3, 0, 9, rank, 3, size, **args) for rank in range(size)]
    np.testing.assert_array_equal(np.concatenate([r.offsets for r in ranks]), single.offsets)
    np.testing.assert_array_equal(np.concatenate([r.flips for r in ranks]), single.flips)
    np.testing.assert_array_equal(np.concatenate([r.lighting for r in ranks]), single.lighting)
    assert not np.array_equal(ranks[0].offsets, ranks[1].offsets)


def test_out_must_match():
    images = position_images(2)
    with pytest.raises(ValueError, match="out has shape"):
        augment.crop_batch(images, augment.eval_plan(2, SIZE, CROP), CROP, augment.mean_as_chw(np.zeros(3)),
                           out=np.empty((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="crop sources outside 0..1"):
        augment.crop_batch(images, augment.eval_plan(3, SIZE, CROP), CROP, augment.mean_as_chw(np.zeros(3)))
    with pytest.raises(ValueError, match="mean has shape"):
        augment.mean_as_chw(np.zeros((4, 4)))


def test_a_plan_slice_keeps_its_sources():
    plan = augment.batch_augmentation(5, 0, 1, 0, 6, 1, SIZE, CROP, pca_lighting=True)
    part = plan[2:4]
    assert len(part) == 2
    np.testing.assert_array_equal(part.sources, [2, 3])
    np.testing.assert_array_equal(part.offsets, plan.offsets[2:4])
    np.testing.assert_array_equal(part.lighting, plan.lighting[2:4])
