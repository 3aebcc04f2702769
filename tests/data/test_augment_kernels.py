"""The backends' augmentation kernels (``Backend.augment_ops``) against the NumPy reference.

The reference is ``warp_affine`` then ``crop_at``; a kernel warps and crops in one pass and must
give the same values bit for bit (same float64 coordinates, same rounding of the weights to the
data type, same order of the blend, no FMA contraction), for every kind of transform alone and
combined. The draws are checked to be the ones the trainer made before the kernels existed.
"""
import re

import numpy as np
import pytest

import arraybn
from arraybn.data import (AugmentConfig, Transforms, apply_transforms, augment_batch, crop_at,
                          draw_transforms, random_affine, random_crop_offsets, warp_affine)
from tests.benchmark_scripts import load_benchmark
from tests.conftest import to_host

KERNEL_BACKENDS = ["numba", pytest.param("cupy", marks=pytest.mark.gpu)]
NONE = dict(rotation=0.0, shear=0.0, zoom=0.0, shift=0.0)
CASES = {
    "rotation": AugmentConfig(**dict(NONE, rotation=30.0)),
    "shear": AugmentConfig(**dict(NONE, shear=0.4)),
    "zoom": AugmentConfig(**dict(NONE, zoom=0.3)),
    "shift": AugmentConfig(**dict(NONE, shift=0.3)),
    "crop": AugmentConfig(**NONE, crop=2),
    "affine": AugmentConfig(),
    "affine+crop": AugmentConfig(crop=2),
    "far outside": AugmentConfig(rotation=180.0, shear=0.5, zoom=0.5, shift=0.9, crop=6),
}
SHAPES = [(1, 1, 28, 28), (5, 3, 7, 9), (64, 1, 28, 28), (4, 2, 1, 6)]


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    return arraybn.get_backend(request.param)


def _reference(images, transforms, fill):
    out = warp_affine(images, transforms.inverse, transforms.offset, fill)
    if transforms.corners is None:
        return out
    return crop_at(out, transforms.corners, transforms.pad, fill)


def _images(rng, shape, dtype):
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_numpy_reference_bit_for_bit(kernel_backend, rng, case, dtype, shape):
    images = _images(rng, shape, dtype)
    transforms = draw_transforms(shape[0], shape[2], shape[3], np.random.default_rng(7),
                                 CASES[case])
    want = _reference(images, transforms, fill=-0.42)
    got = apply_transforms(kernel_backend.xp.asarray(images), transforms, -0.42, kernel_backend)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(to_host(got), want)


@pytest.mark.parametrize("fill", [0.0, 1.5, -3.25])
def test_fill_outside_the_image_and_on_the_crop_padding(kernel_backend, rng, fill):
    images = _images(rng, (6, 1, 8, 8), np.float32)
    config = AugmentConfig(**dict(NONE, shift=0.6), crop=4)
    transforms = draw_transforms(6, 8, 8, np.random.default_rng(1), config)
    got = to_host(apply_transforms(kernel_backend.xp.asarray(images), transforms, fill,
                                   kernel_backend))
    np.testing.assert_array_equal(got, _reference(images, transforms, fill))
    assert (got == np.float32(fill)).mean() > 0.2        # the fill really shows


def test_window_entirely_on_the_padding_is_all_fill(kernel_backend, rng):
    images = _images(rng, (2, 2, 5, 5), np.float64)
    inverse, offset = np.tile(np.eye(2), (2, 1, 1)), np.zeros((2, 2))
    transforms = Transforms(inverse, offset, np.array([[0, 0], [12, 3]]), pad=6)
    got = to_host(apply_transforms(kernel_backend.xp.asarray(images), transforms, 0.5,
                                   kernel_backend))
    np.testing.assert_array_equal(got, _reference(images, transforms, 0.5))
    assert np.all(got == 0.5)


@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_images_shared_out_among_threads_equal_the_reference(rng, tasks):
    """Each thread's images (11 into 2, 3 or 5 uneven shares) come out as on one thread."""
    from arraybn.backends import numba_augment_kernels as kernels
    images = _images(rng, (11, 2, 9, 8), np.float32)
    transforms = draw_transforms(11, 9, 8, np.random.default_rng(3), AugmentConfig(crop=2))
    framed, out = np.full((11, 2, 11, 10), np.nan, np.float32), np.full_like(images, np.nan)
    kernels._affine_crop_parallel(images, transforms.inverse, transforms.offset,
                                  np.asarray(transforms.window_shifts(), np.int64), -0.42, tasks,
                                  framed, out)
    np.testing.assert_array_equal(out, _reference(images, transforms, -0.42))


def test_a_batch_is_shared_out_from_the_threshold(rng, monkeypatch):
    from arraybn.backends import numba_augment_kernels as kernels
    shared, real = [], kernels._affine_crop_parallel
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 4)
    monkeypatch.setattr(kernels, "_affine_crop_parallel",
                        lambda *args: (shared.append(args[5]), real(*args)))
    numba = arraybn.get_backend("numba")
    for n in (3 * kernels.MIN_TASK_IMAGES, 2 * kernels.MIN_TASK_IMAGES - 1):
        images = _images(rng, (n, 1, 6, 6), np.float32)
        transforms = draw_transforms(n, 6, 6, np.random.default_rng(4), AugmentConfig())
        np.testing.assert_array_equal(apply_transforms(images, transforms, 0.0, numba),
                                      _reference(images, transforms, 0.0))
    assert shared == [3]                                   # the second batch ran on one thread


def test_empty_batch_and_non_contiguous_images(rng):
    numba = arraybn.get_backend("numba")
    empty = draw_transforms(0, 6, 6, np.random.default_rng(0), AugmentConfig(crop=1))
    assert apply_transforms(np.zeros((0, 1, 6, 6), np.float32), empty, 0.0, numba).shape == \
        (0, 1, 6, 6)
    images = _images(rng, (3, 2, 9, 9), np.float32).transpose(0, 1, 3, 2)   # a strided view
    transforms = draw_transforms(3, 9, 9, np.random.default_rng(2), AugmentConfig(crop=1))
    np.testing.assert_array_equal(apply_transforms(images, transforms, 0.25, numba),
                                  _reference(images, transforms, 0.25))


def test_the_draws_are_the_trainers_earlier_ones():
    """draw_transforms makes the rng calls of the earlier augment_batch, in its order: the
    affine maps, then the crop corners (random_crop drew them from the same rng)."""
    config = AugmentConfig(crop=2)
    drawn_rng, plain_rng = np.random.default_rng(11), np.random.default_rng(11)
    transforms = draw_transforms(10, 28, 28, drawn_rng, config)
    inverse, offset = random_affine(10, 28, 28, plain_rng, config)
    corners = random_crop_offsets(10, 2, plain_rng)
    np.testing.assert_array_equal(transforms.inverse, inverse)
    np.testing.assert_array_equal(transforms.offset, offset)
    np.testing.assert_array_equal(transforms.corners, corners)
    assert drawn_rng.random() == plain_rng.random()             # and nothing more was drawn
    np.testing.assert_array_equal(transforms.window_shifts(), corners - 2)


def test_augment_batch_on_numba_is_the_seeded_reference(rng):
    images = _images(rng, (16, 1, 28, 28), np.float32)
    for seed in range(3):
        want = augment_batch(images, np.random.default_rng(seed), AugmentConfig(crop=2), -0.8)
        got = augment_batch(images, np.random.default_rng(seed), AugmentConfig(crop=2), -0.8,
                            backend=arraybn.get_backend("numba"))
        np.testing.assert_array_equal(got, want)


def test_rows_of_the_transforms_are_those_images_transforms():
    transforms = draw_transforms(9, 8, 8, np.random.default_rng(0), AugmentConfig(crop=1))
    part = transforms[3:7]
    np.testing.assert_array_equal(part.inverse, transforms.inverse[3:7])
    np.testing.assert_array_equal(part.corners, transforms.corners[3:7])
    assert part.pad == 1 and draw_transforms(2, 8, 8, np.random.default_rng(0),
                                             AugmentConfig()).corners is None


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("images, error, message", [
    (np.zeros((4, 8, 8), np.float32), ValueError, r"shape \(N, C, H, W\).*images\[:, None\]"),
    (np.zeros((4, 1, 8, 8), np.uint8), TypeError, r"float32 or float64.*got uint8.*astype"),
    (np.zeros((4, 1, 8, 8), np.int64), TypeError, r"float32 or float64.*got int64"),
    (np.zeros((3, 1, 8, 8), np.float32), ValueError, r"4 transforms for a batch of 3 images"),
], ids=["3-d", "uint8", "int64", "too-many-maps"])
def test_bad_batches_are_clear_errors(backend_name, images, error, message):
    transforms = draw_transforms(4, 8, 8, np.random.default_rng(0), AugmentConfig(crop=1))
    with pytest.raises(error, match=message):
        apply_transforms(images, transforms, 0.0, arraybn.get_backend(backend_name))


@pytest.mark.parametrize("images, maps, error, message", [
    (np.zeros((2, 8, 8)), {}, ValueError, r"images must be an array of shape \(N, C, H, W\)"),
    (np.zeros((2, 1, 8, 8), np.float16), {}, TypeError, "float32 or float64, got float16"),
    (np.zeros((2, 1, 8, 8)), {"inverse": np.zeros((3, 2, 2))}, ValueError,
     r"inverse must have shape \(2, 2, 2\).*batch of 2; got shape \(3, 2, 2\)"),
    (np.zeros((2, 1, 8, 8)), {"shift": np.zeros(2)}, ValueError, r"shift must have shape \(2, 2\)"),
], ids=["3-d", "float16", "inverse rows", "shift shape"])
def test_the_numba_kernel_checks_its_arguments(images, maps, error, message):
    kernels = arraybn.get_backend("numba").augment_ops()
    args = dict(inverse=np.tile(np.eye(2), (2, 1, 1)), offset=np.zeros((2, 2)),
                shift=np.zeros((2, 2), np.int64))
    args.update(maps)
    with pytest.raises(error, match=message):
        kernels.affine_crop(images, args["inverse"], args["offset"], args["shift"], 0.0)


def test_only_backends_with_a_kernel_offer_one():
    assert arraybn.get_backend("numpy").augment_ops() is None
    assert callable(arraybn.get_backend("numba").augment_ops().affine_crop)


def test_the_speed_benchmark_checks_equality_and_prints_its_table(monkeypatch, capsys):
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")          # what the script would set, undone afterwards
    benchmark = load_benchmark("augment_speed")
    benchmark.main(["--batch", "3", "--size", "9", "--repeats", "1"])
    table = capsys.readouterr().out
    assert "3 9x9 float32 images" in table
    assert len(re.findall(r"\| [\d.]+x +\|", table)) == len(benchmark.CASES)
