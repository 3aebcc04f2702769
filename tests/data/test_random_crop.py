"""Random crop with zero padding: seeded, shape-preserving, a whole-pixel shift of at most pad."""
import numpy as np
import pytest

from arraybn.data import AugmentConfig, augment_batch, random_crop

CROP_ONLY = dict(rotation=0, shear=0, zoom=0, shift=0)


def _shifted(image, dr, dc, fill):
    """``image`` (C, H, W) moved by (dr, dc) pixels, uncovered pixels = fill."""
    _, h, w = image.shape
    out = np.full_like(image, fill)
    out[:, max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)] = \
        image[:, max(-dr, 0):h + min(-dr, 0), max(-dc, 0):w + min(-dc, 0)]
    return out


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_each_crop_is_its_image_shifted_by_at_most_pad_pixels(rng, pad):
    images = rng.standard_normal((40, 2, 9, 7)).astype(np.float32)
    crops, offsets = random_crop(images, pad, np.random.default_rng(1), fill=-0.5)
    assert crops.shape == images.shape and crops.dtype == np.float32
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad
    assert len({tuple(o) for o in offsets}) > 1                    # not one shift for all
    for image, crop, (r, c) in zip(images, crops, offsets):
        np.testing.assert_array_equal(crop, _shifted(image, pad - r, pad - c, -0.5))


def test_all_shifts_in_the_range_occur(rng):
    _, offsets = random_crop(np.zeros((2000, 1, 4, 4)), 2, np.random.default_rng(0))
    assert {tuple(o) for o in offsets} == {(r, c) for r in range(5) for c in range(5)}


def test_pad_zero_is_the_identity(rng):
    images = rng.standard_normal((3, 1, 5, 5))
    crops, _ = random_crop(images, 0, np.random.default_rng(0))
    np.testing.assert_array_equal(crops, images)
    assert crops is not images
    out = augment_batch(images, np.random.default_rng(0), AugmentConfig(**CROP_ONLY, crop=0))
    np.testing.assert_array_equal(out, images)


def test_crop_in_augment_batch_is_seeded_and_shifts_whole_pixels(rng):
    images = rng.standard_normal((6, 1, 10, 10)).astype(np.float32)
    config = AugmentConfig(**CROP_ONLY, crop=2)
    a = augment_batch(images, np.random.default_rng(5), config, fill=0.25)
    b = augment_batch(images, np.random.default_rng(5), config, fill=0.25)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment_batch(images, np.random.default_rng(6), config,
                                               fill=0.25))
    for image, crop in zip(images, a):
        shifts = [(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)
                  if np.array_equal(crop, _shifted(image, dr, dc, 0.25))]
        assert len(shifts) == 1


def test_crop_follows_the_affine_map_in_one_seeded_call(rng):
    images = rng.standard_normal((4, 1, 12, 12))
    with_crop = augment_batch(images, np.random.default_rng(3), AugmentConfig(crop=3))
    again = augment_batch(images, np.random.default_rng(3), AugmentConfig(crop=3))
    np.testing.assert_array_equal(with_crop, again)
    affine_only = augment_batch(images, np.random.default_rng(3), AugmentConfig())
    assert not np.allclose(with_crop, affine_only)


@pytest.mark.parametrize("crop", [-1, 1.5])
def test_bad_crop_is_a_clear_error(crop):
    with pytest.raises(ValueError, match="augmentation.*crop|augmentation range crop"):
        AugmentConfig(crop=crop)
