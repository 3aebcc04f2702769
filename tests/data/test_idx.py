"""The IDX reader (round trips, every kind of broken file, each error naming the file) and writer."""
import gzip

import numpy as np
import pytest

from arraybn.data import IDXFormatError, parse_idx, read_idx, read_images, read_labels
from arraybn.data import write_idx as arraybn_write_idx
from tests.data.idx_files import idx_bytes, write_idx


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip_gzip_and_raw(tmp_path, rng, suffix):
    images = rng.integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    path = write_idx(tmp_path / f"images{suffix}", images)
    out = read_images(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)


def test_gzip_is_detected_from_content_not_name(tmp_path):
    labels = np.array([3, 1, 4], np.uint8)
    path = write_idx(tmp_path / "labels.raw", labels, compress=True)
    assert np.array_equal(read_labels(path), [3, 1, 4])


def test_other_element_types_decode_big_endian():
    data = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + (258).to_bytes(4, "big") + \
        (-1).to_bytes(4, "big", signed=True)
    out = parse_idx(data)
    assert out.dtype == np.dtype(np.int32) and out.tolist() == [258, -1]


def _write_bytes(tmp_path, data, name="bad-idx"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "too short"),
    (b"\x12\x34\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "not an IDX file"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "declares 3 dimensions"),
    (b"\x00\x00\x08\x00", "declares 0 dimensions"),
])
def test_malformed_headers(tmp_path, data, message):
    path = _write_bytes(tmp_path, data)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_data_names_the_file(tmp_path):
    data = idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-5]
    path = _write_bytes(tmp_path, gzip.compress(data), "train-images-idx3-ubyte.gz")
    with pytest.raises(IDXFormatError, match="truncated") as info:
        read_images(path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_trailing_bytes_are_an_error(tmp_path):
    path = _write_bytes(tmp_path, idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_labels(path)


def test_truncated_gzip_stream(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = _write_bytes(tmp_path, packed[:len(packed) // 2], "labels.gz")
    with pytest.raises(IDXFormatError, match="corrupt or truncated gzip") as info:
        read_labels(path)
    assert "labels.gz" in str(info.value)


def test_labels_out_of_range(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([0, 9, 10], np.uint8))
    with pytest.raises(IDXFormatError, match="label 10 is out of range"):
        read_labels(path)


def test_images_must_be_three_dimensional(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((4, 9), np.uint8))
    with pytest.raises(IDXFormatError, match=r"shape \(N, H, W\)"):
        read_images(path)


def test_labels_must_be_one_dimensional(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros((4, 2), np.uint8))
    with pytest.raises(IDXFormatError, match=r"shape \(N,\)"):
        read_labels(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_write_idx_round_trips_through_the_reader(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    path = arraybn_write_idx(tmp_path / "images", images)
    np.testing.assert_array_equal(read_idx(path), images)
    assert path.read_bytes()[:8] == bytes([0, 0, 8, 3, 0, 0, 0, 3])


def test_write_idx_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="uint8 arrays of 1 or more dimensions, got float32"):
        arraybn_write_idx(tmp_path / "x", np.zeros((2, 2), np.float32))
