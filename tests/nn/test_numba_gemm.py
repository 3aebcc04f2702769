"""``numba_gemm``: the float32 GEMM of the convolutions with few channels. Every element one
chain of fused multiply-adds in the order of k (emulated here exactly), any M, N and K through
the same tile (ragged rows and columns masked), nothing written outside ``out``, non-finite
values carried as IEEE arithmetic carries them."""
import os
import subprocess
import sys

import numpy as np
import pytest

from arraybn.backends import numba_gemm

pytestmark = pytest.mark.skipif(not numba_gemm.available(), reason="needs FMA and AVX2")


def _product(a, b, out=None):
    packed = np.empty(numba_gemm.packed_shape(*a.shape), np.float32)
    numba_gemm.pack_rows(a, packed)
    out = np.empty((a.shape[0], b.shape[1]), np.float32) if out is None else out
    numba_gemm.gemm(packed, a.shape[0], b, out)
    return out


def _fma_chain(a, b):
    """acc = fl32(acc + a[:, k] * b[k]) for k = 0, 1, ...: a float32 product is exact in
    float64, and the float64 sum is rounded far below float32's precision, so rounding it to
    float32 gives the fused multiply-add's one rounding except in rare halfway cases (none
    with these seeds: the test passes or fails the same on every run)."""
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        acc = (acc.astype(np.float64)
               + np.outer(a[:, k].astype(np.float64), b[k].astype(np.float64))).astype(np.float32)
    return acc


@pytest.mark.parametrize("m,k,n", [(16, 144, 784), (8, 1, 48), (5, 7, 3), (13, 20, 49),
                                   (1, 3, 50), (17, 9, 97), (32, 33, 16)])
def test_each_element_is_one_fused_multiply_add_chain_in_the_order_of_k(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.uniform(0.5, 1.0, (k, n)).astype(np.float32)      # one sign: no cancellation
    np.testing.assert_array_equal(_product(a, b), _fma_chain(a, b))


def test_random_products_are_within_rounding_of_float64():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((37, 300), (300, 201)))
    bound = 300 * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b))
    assert np.all(np.abs(_product(a, b) - a.astype(np.float64) @ b) <= bound)


def test_views_transposed_a_and_b_and_out_inside_wider_buffers():
    """A transposed (packing reads any strides); b and out rows of wider buffers: the columns
    next to them are neither read into the product nor written."""
    rng = np.random.default_rng(2)
    at = rng.standard_normal((30, 11)).astype(np.float32)          # A = at.T: (11, 30)
    wide_b = rng.standard_normal((30, 70)).astype(np.float32)
    wide_b[:, 50:] = np.nan                                       # never read
    wide_out = np.full((11, 64), 7.0, np.float32)
    _product(at.T, wide_b[:, :50], wide_out[:, 3:53])
    np.testing.assert_array_equal(wide_out[:, 3:53], _fma_chain(at.T.copy(), wide_b[:, :50]))
    assert (wide_out[:, :3] == 7).all() and (wide_out[:, 53:] == 7).all()


def test_non_finite_values_propagate_as_in_ieee_arithmetic():
    a = np.ones((9, 4), np.float32)
    b = np.ones((4, 20), np.float32)
    b[2, 3], b[1, 5], b[0, 6], b[3, 6] = np.nan, np.inf, np.inf, -np.inf
    out = _product(a, b)
    assert np.isnan(out[:, 3]).all() and np.isposinf(out[:, 5]).all()
    assert np.isnan(out[:, 6]).all()                               # inf + (-inf)
    assert (np.delete(out, [3, 5, 6], axis=1) == 4).all()


def test_an_empty_depth_gives_zeros_and_empty_outputs_are_fine():
    np.testing.assert_array_equal(_product(np.zeros((3, 0), np.float32),
                                           np.zeros((0, 5), np.float32)), np.zeros((3, 5)))
    assert _product(np.ones((3, 4), np.float32), np.ones((4, 0), np.float32)).shape == (3, 0)


def _lane_dots(a, b):
    """gemm_nt's sums, emulated: lane l of each dot product an FMA chain over p = l, l + LANES,
    ... (as ``_fma_chain``), then the lanes added as a tree, halves first, in float32."""
    lanes = numba_gemm.LANES
    depth = a.shape[1]
    padded = -(-depth // lanes) * lanes
    a = np.pad(a, ((0, 0), (0, padded - depth)))
    b = np.pad(b, ((0, 0), (0, padded - depth)))
    acc = np.zeros((a.shape[0], b.shape[0], lanes), np.float32)
    for start in range(0, padded, lanes):
        step = slice(start, start + lanes)
        products = a[:, None, step].astype(np.float64) * b[None, :, step]
        acc = (acc.astype(np.float64) + products).astype(np.float32)
    while acc.shape[2] > 1:
        half = acc.shape[2] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


@pytest.mark.parametrize("m,n,depth", [(144, 16, 784), (7, 3, 5), (13, 5, 33), (6, 4, 16),
                                       (25, 6, 672), (1, 1, 1)])
def test_gemm_nt_sums_lanes_of_fused_multiply_adds_then_a_tree(m, n, depth):
    """Ragged rows, columns and depths (a partial last vector, a depth below one vector)."""
    rng = np.random.default_rng(m + 100 * n)
    a = rng.standard_normal((m, depth)).astype(np.float32)
    b = rng.uniform(0.5, 1.0, (n, depth)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    numba_gemm.gemm_nt(a, b, out, False)
    np.testing.assert_array_equal(out, _lane_dots(a, b))
    bound = depth * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b).T)
    assert np.all(np.abs(out - a.astype(np.float64) @ b.T.astype(np.float64)) <= bound)


def test_gemm_nt_accumulates_by_adding_each_dot_product_once():
    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((11, 40), (5, 40)))
    start = rng.standard_normal((11, 5)).astype(np.float32)
    total = start.copy()
    numba_gemm.gemm_nt(a, b, total, True)
    np.testing.assert_array_equal(total, start + _lane_dots(a, b))


def test_gemm_nt_reads_only_its_rows_and_depth():
    """a and b as column slices of wider buffers full of NaN beyond: none of it is read; out
    a slice of a wider buffer: nothing else written."""
    rng = np.random.default_rng(8)
    wide_a = np.full((9, 64), np.nan, np.float32)
    wide_b = np.full((3, 64), np.nan, np.float32)
    wide_a[:, :37], wide_b[:, :37] = (rng.standard_normal(shape).astype(np.float32)
                                      for shape in ((9, 37), (3, 37)))
    wide_out = np.full((9, 8), 5.0, np.float32)
    numba_gemm.gemm_nt(wide_a[:, :37], wide_b[:, :37], wide_out[:, 2:5], False)
    np.testing.assert_array_equal(wide_out[:, 2:5], _lane_dots(wide_a[:, :37], wide_b[:, :37]))
    assert (wide_out[:, :2] == 5).all() and (wide_out[:, 5:] == 5).all()


def test_other_dtypes_are_refused():
    a, b = np.ones((3, 4)), np.ones((4, 5))                       # float64
    with pytest.raises(TypeError, match="float32 arrays only"):
        numba_gemm.gemm(np.ones((1, 4, numba_gemm.MR)), 3, b, np.empty((3, 5)))
    with pytest.raises(TypeError, match="float32 arrays only"):
        numba_gemm.gemm_nt(a, b.T.copy(), np.empty((3, 5)), False)


AVX2_CHECK = """
import numpy as np
from llvmlite import binding
features = binding.get_host_cpu_features()
features["avx512f"] = False
binding.get_host_cpu_features = lambda: features
from arraybn.backends import numba_gemm
from tests.nn.test_numba_gemm import _fma_chain, _lane_dots, _product
assert (numba_gemm.LANES, numba_gemm.MR, numba_gemm.DR) == (8, 4, 3)
rng = np.random.default_rng(9)
a, b = rng.standard_normal((11, 30)).astype(np.float32), rng.random((30, 29), np.float32)
assert np.array_equal(_product(a, b), _fma_chain(a, b))
out = np.empty((11, 5), np.float32)
numba_gemm.gemm_nt(a, b[:, :5].T.copy(), out, False)
assert np.array_equal(out, _lane_dots(a, b[:, :5].T.copy()))
print("ok")
"""


def test_the_avx2_tiles_give_the_same_sums(tmp_path):
    """Without AVX-512: 8 lanes, 4 x 3 vectors and 3 x 4 dot products; ``gemm``'s results
    are the same chains as with AVX-512, ``gemm_nt``'s are 8 lanes' (a fresh process that
    hides avx512f from the feature list, with its own Numba cache)."""
    if "avx2" not in numba_gemm.FEATURES:
        pytest.skip("the AVX2 tiles need AVX2")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _explicit_columns(image, k, pad):
    """The im2col columns of one (c, h, w) image for a 'same' k x k convolution, zeros on the
    padding: (c*k*k, h*w), rows (c, ki, kj)."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    return np.stack([padded[ch, ki:ki + h, kj:kj + w].ravel()
                     for ch in range(c) for ki in range(k) for kj in range(k)])


@pytest.mark.parametrize("c,o,k,h,w", [(16, 16, 3, 28, 28), (1, 32, 3, 28, 28),
                                       (4, 5, 5, 17, 16), (3, 4, 3, 16, 17), (2, 9, 5, 3, 4)])
def test_gemm_windows_equals_gemm_on_the_columns_bit_for_bit(c, o, k, h, w):
    """Windows read in place (offsets into the image and a table of valid positions): the
    same bits as ``gemm`` on explicit columns, NaN and infinities on the image's edges (read
    where a window covers them, never where it lies on the padding) and signed zeros
    included."""
    rng = np.random.default_rng(c * 100 + h)
    image = rng.standard_normal((c, h, w)).astype(np.float32)
    image[:, :, 0], image[:, 0, :], image[:, -1, -1] = np.nan, -0.0, np.inf
    weights = rng.standard_normal((o, c * k * k)).astype(np.float32)
    packed = np.empty(numba_gemm.packed_shape(*weights.shape), np.float32)
    numba_gemm.pack_rows(weights, packed)
    pad = (k - 1) // 2
    offsets, table_rows = numba_gemm.window_offsets(c, k, k, pad, h, w, 1)
    got = np.full((o, h * w), 3.0, np.float32)
    table = numba_gemm.window_table(k, k, pad, h, w, 1)
    numba_gemm.gemm_windows(packed, o, image, offsets, table, table_rows, got)
    want = np.empty_like(got)
    with np.errstate(invalid="ignore"):
        numba_gemm.gemm(packed, o, _explicit_columns(image, k, pad), want)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got).any()


@pytest.mark.parametrize("c,o,k,h,w,images", [(64, 64, 3, 7, 7, 3), (5, 9, 5, 4, 6, 2),
                                              (3, 17, 3, 5, 5, 1)])
def test_gemm_windows_across_a_chunk_equals_gemm_on_the_chunks_columns_bit_for_bit(
        c, o, k, h, w, images):
    """A chunk of images copied channel by channel (each channel's planes one after another,
    rows as long as a chunk one image larger, the tail never written): windows read in place
    across the chunk give the bits ``gemm`` gives on the chunk's im2col columns, and never
    read a neighbouring image (the middle image all NaN leaves the others finite)."""
    rng = np.random.default_rng(c + images)
    chunk = rng.standard_normal((images, c, h, w)).astype(np.float32)
    chunk[-1, :, 0, 0], chunk[0, 0, -1, -1] = -0.0, np.inf
    if images > 1:
        chunk[images // 2] = np.nan
    planes = np.full((c, (images + 1) * h * w), np.nan, np.float32)
    planes[:, :images * h * w] = chunk.transpose(1, 0, 2, 3).reshape(c, -1)
    weights = rng.standard_normal((o, c * k * k)).astype(np.float32)
    packed = np.empty(numba_gemm.packed_shape(*weights.shape), np.float32)
    numba_gemm.pack_rows(weights, packed)
    pad = (k - 1) // 2
    offsets, table_rows = numba_gemm.window_offsets(c, k, k, pad, h, w, images + 1)
    table = numba_gemm.window_table(k, k, pad, h, w, images + 1)
    got = np.full((o, images * h * w), 3.0, np.float32)
    numba_gemm.gemm_windows(packed, o, planes, offsets, table, table_rows, got)
    columns = np.concatenate([_explicit_columns(image, k, pad) for image in chunk], axis=1)
    want = np.empty_like(got)
    with np.errstate(invalid="ignore"):
        numba_gemm.gemm(packed, o, columns, want)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    per_image = got.reshape(o, images, h * w)
    others = [i for i in range(images) if images == 1 or i != images // 2]
    assert np.isfinite(per_image[:, others]).any() and not np.isnan(per_image[:, others]).any()
    assert np.isinf(per_image[:, 0]).any()


def test_window_tables_of_a_chunk_repeat_the_images_table():
    one = numba_gemm.window_table(3, 3, 1, 4, 5, 1)
    three = numba_gemm.window_table(3, 3, 1, 4, 5, 3)
    size = 4 * 5
    assert three.shape == (9, 3 * size + numba_gemm.NR)
    for n in range(3):
        np.testing.assert_array_equal(three[:, n * size:(n + 1) * size], one[:, :size])
    assert not three[:, 3 * size:].any()
    offsets, table_rows = numba_gemm.window_offsets(2, 3, 3, 1, 4, 5, 3)
    assert offsets[9] == 3 * size + (0 - 1) * 5 + 0 - 1        # channel 1, window (0, 0)
    assert table_rows[9 + 4] == 4 * three.shape[1]            # channel 1, window (1, 1)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("c,o,k,h,w", [(16, 16, 3, 28, 28), (32, 32, 3, 14, 14),
                                       (4, 5, 5, 17, 16), (3, 4, 3, 16, 17), (2, 9, 5, 3, 4)])
def test_gemm_nt_windows_equals_gemm_nt_on_the_columns_bit_for_bit(c, o, k, h, w, accumulate):
    """The weight gradient with windows read in place: the same bits as ``gemm_nt`` on
    explicit columns (and accumulated the same way), NaN, infinities and signed zeros on the
    image's edges and in gy included; rows that do not fill a tile and ragged depths too."""
    rng = np.random.default_rng(c * 10 + w)
    image = rng.standard_normal((c, h, w)).astype(np.float32)
    image[:, :, 0], image[:, 0, :], image[:, -1, -1] = np.nan, -0.0, np.inf
    gy = rng.standard_normal((o, h * w)).astype(np.float32)
    gy[0, ::7], gy[-1, 3] = -0.0, -np.inf
    pad = (k - 1) // 2
    offsets, table_rows = numba_gemm.window_offsets(c, k, k, pad, h, w, 1)
    start = rng.standard_normal((c * k * k, o)).astype(np.float32)
    got, want = start.copy(), start.copy()
    with np.errstate(invalid="ignore"):
        numba_gemm.gemm_nt_windows(image, offsets, numba_gemm.window_table(k, k, pad, h, w, 1),
                                   table_rows, gy, got, accumulate)
        numba_gemm.gemm_nt(_explicit_columns(image, k, pad), gy, want, accumulate)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got).any() and np.isfinite(got).any()


def test_gemm_nt_windows_refuses_other_dtypes():
    offsets, table_rows = numba_gemm.window_offsets(1, 3, 3, 1, 4, 4, 1)
    with pytest.raises(TypeError, match="float32 arrays only"):
        numba_gemm.gemm_nt_windows(np.ones((1, 4, 4)), offsets,
                                   numba_gemm.window_table(3, 3, 1, 4, 4, 1), table_rows,
                                   np.ones((2, 16), np.float32), np.empty((9, 2), np.float32),
                                   False)


@pytest.mark.parametrize("c,o,k,h,w,images", [(16, 16, 3, 7, 7, 2), (32, 9, 3, 5, 6, 3),
                                              (16, 17, 5, 4, 4, 1)])
def test_gemm_taps_equals_gemm_on_the_transposed_columns_bit_for_bit(c, o, k, h, w, images):
    """The weight gradient by taps: images stored position by position (``c`` channels),
    window offset t read at its shift where the table says (never in a neighbouring image);
    the same bits as ``gemm`` on the explicit (positions, taps * channels) matrix, infinities
    and signed zeros near the edges included."""
    rng = np.random.default_rng(c + o + images)
    chunk = rng.standard_normal((images, c, h, w)).astype(np.float32)
    chunk[0, 0, 0, :], chunk[-1, 1, -1, -1] = -0.0, np.inf
    positions = images * h * w
    stored = np.ascontiguousarray(chunk.transpose(0, 2, 3, 1)).reshape(positions, c)
    pad = (k - 1) // 2
    shifts = numba_gemm.same_shifts(k, k, pad)
    offsets, tap_rows = numba_gemm.shifted_offsets(np.zeros(k * k, np.int64),
                                                   np.arange(k * k), shifts, h, w, images)
    table = numba_gemm.shift_table(shifts, h, w, images)
    gy = rng.standard_normal((o, positions)).astype(np.float32)
    packed = np.empty(numba_gemm.packed_shape(o, positions), np.float32)
    numba_gemm.pack_rows(gy, packed)
    got = np.full((o, k * k * c), 5.0, np.float32)
    with np.errstate(invalid="ignore"):
        numba_gemm.gemm_taps(packed, o, stored, c, offsets * c, table, tap_rows, positions, got)
    columns = np.concatenate([_explicit_columns(image, k, pad) for image in chunk], axis=1)
    b = np.ascontiguousarray(columns.reshape(c, k * k, positions).transpose(2, 1, 0).reshape(
        positions, k * k * c))
    want = np.empty_like(got)
    with np.errstate(invalid="ignore"):
        numba_gemm.gemm(packed, o, b, want)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isinf(got).any() and np.isfinite(got).any()


@pytest.mark.parametrize("image", [np.zeros((4, 3), np.float32),          # 3 channels
                                   np.zeros((4, 32), np.float32)[:, ::2]])  # not contiguous
def test_gemm_taps_refuses_images_it_cannot_read_by_whole_vectors(image):
    c = image.shape[1]
    with pytest.raises(TypeError, match="C-contiguous image and channels a multiple"):
        numba_gemm.gemm_taps(np.zeros((1, 4, numba_gemm.MR), np.float32), 1, image, c,
                             np.zeros(1, np.int64), np.ones((1, 4 + numba_gemm.NR), np.uint8),
                             np.zeros(1, np.int64), 4, np.zeros((1, c), np.float32))
