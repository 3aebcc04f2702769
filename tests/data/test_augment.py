"""Affine augmentation: exact on transforms with known answers, seeded, vectorised per image."""
import numpy as np
import pytest

from arraybn.data import AugmentConfig, augment_batch, random_affine, warp_affine

NO_CHANGE = AugmentConfig(rotation=0, shear=0, zoom=0, shift=0)


def _maps(n, matrix=((1.0, 0.0), (0.0, 1.0)), offset=(0.0, 0.0)):
    return np.tile(np.asarray(matrix, float), (n, 1, 1)), np.tile(np.asarray(offset, float), (n, 1))


def test_zero_ranges_give_the_identity(rng):
    images = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    out = augment_batch(images, np.random.default_rng(0), NO_CHANGE)
    assert out.dtype == np.float32 and np.allclose(out, images, atol=1e-6)


def test_integer_shift_moves_pixels_and_fills_the_border(rng):
    images = rng.standard_normal((2, 1, 5, 5))
    inverse, offset = _maps(2, offset=(-1.0, 2.0))   # source = output + (-1, 2)
    out = warp_affine(images, inverse, offset, fill=-7.0)
    assert np.allclose(out[:, :, 1:, :3], images[:, :, :4, 2:])
    assert np.all(out[:, :, 0, :] == -7.0) and np.all(out[:, :, :, 3:] == -7.0)


def test_quarter_turn_matches_rot90(rng):
    images = rng.standard_normal((1, 1, 7, 7))
    inverse, offset = _maps(1, matrix=((0.0, -1.0), (1.0, 0.0)))
    out = warp_affine(images, inverse, offset)
    assert np.allclose(out[0, 0], np.rot90(images[0, 0], k=-1))


def test_half_pixel_shift_is_bilinear_average():
    images = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    inverse, offset = _maps(1, offset=(0.0, 0.5))
    out = warp_affine(images, inverse, offset)
    assert np.allclose(out[0, 0, :, :3], (images[0, 0, :, :3] + images[0, 0, :, 1:]) / 2)


def test_each_image_gets_its_own_transform_and_seed_reproduces_it(rng):
    images = np.repeat(rng.random((1, 1, 10, 10)).astype(np.float32), 4, axis=0)
    a = augment_batch(images, np.random.default_rng(5))
    b = augment_batch(images, np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    assert not np.array_equal(a, augment_batch(images, np.random.default_rng(6)))


def test_random_maps_stay_within_the_configured_ranges():
    inverse, offset = random_affine(500, 28, 28, np.random.default_rng(0),
                                    AugmentConfig(rotation=0, shear=0, zoom=0.2, shift=0.1))
    scales = 1.0 / np.diagonal(inverse, axis1=1, axis2=2)
    assert scales.min() >= 0.8 - 1e-12 and scales.max() <= 1.2 + 1e-12
    assert np.abs(offset).max() <= 0.1 * 28 / 0.8 + 1e-9


@pytest.mark.parametrize("bad", [dict(rotation=-1), dict(zoom=1.0), dict(shift=float("nan"))])
def test_bad_ranges_are_rejected(bad):
    with pytest.raises(ValueError, match="augmentation"):
        AugmentConfig(**bad)
