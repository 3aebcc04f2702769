"""The IDX format of MNIST-style datasets: a reader (gzip-compressed or raw) and a raw writer.

An IDX file is a 4-byte magic number ``00 00 TT DD`` (TT: element type, DD: number of
dimensions), DD big-endian uint32 sizes, then the elements in C order. MNIST images are
``TT = 0x08`` (unsigned byte) with 3 dimensions, labels ``0x08`` with 1.
"""
import gzip
import os
import zlib

import numpy as np

from arraybn.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(UserError, ValueError):
    """An IDX file is truncated, corrupt or not what was expected; the message names the file."""


def _read_bytes(path):
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXFormatError(f"{path}: corrupt or truncated gzip data ({exc}); "
                             "download the file again") from None


def parse_idx(data, name="<bytes>"):
    """Decode IDX bytes into a NumPy array of the stored shape and type (native byte order)."""
    if len(data) < 4:
        raise IDXFormatError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, type_code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in IDX_TYPES:
        raise IDXFormatError(f"{name}: not an IDX file (magic number {data[:4].hex()}; expected "
                             "0000 followed by a type byte 08-0e and a dimension count)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IDXFormatError(f"{name}: header declares {ndim} dimensions but the file is "
                             f"{len(data)} bytes long")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise IDXFormatError(f"{name}: {state}: shape {shape} needs {expected} data bytes, "
                             f"found {len(data) - header}; download the file again")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array):
    """Write a uint8 array as a raw IDX file (the inverse of ``read_idx``)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim == 0:
        raise ValueError(f"write_idx writes uint8 arrays of 1 or more dimensions, "
                         f"got {array.dtype} of shape {array.shape}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def read_idx(path):
    """Read an IDX file (``.gz`` or raw, detected from the content) into a NumPy array."""
    return parse_idx(_read_bytes(path), os.fspath(path))


def read_images(path):
    """Images as uint8 ``(N, H, W)``; anything else is an IDXFormatError naming the file."""
    images = read_idx(path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IDXFormatError(f"{path}: expected uint8 images of shape (N, H, W), "
                             f"got {images.dtype} of shape {images.shape}")
    if min(images.shape) == 0:
        raise IDXFormatError(f"{path}: holds no images (shape {images.shape})")
    return images


def read_labels(path, num_classes=10):
    """Labels as int64 ``(N,)``, each in ``[0, num_classes)``."""
    labels = read_idx(path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{path}: expected uint8 labels of shape (N,), "
                             f"got {labels.dtype} of shape {labels.shape}")
    if labels.size and int(labels.max()) >= num_classes:
        raise IDXFormatError(f"{path}: label {int(labels.max())} is out of range for "
                             f"{num_classes} classes (0..{num_classes - 1})")
    return labels.astype(np.int64)
