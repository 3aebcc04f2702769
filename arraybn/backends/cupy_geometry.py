"""Launch geometry of the CuPy backend's kernels: pure functions of the shape and the device size.

Kept apart from ``cupy_backend`` so that it can be tested (and reasoned about) without CUDA.
"""
import functools
from dataclasses import dataclass

BATCH = 8                 # BN_BATCH in the .cu: values a thread reduces per Chan merge
MAX_THREADS = 256         # BN_MAX_THREADS in the .cu
COLS_BELOW_BYTES = 128    # rows of M values shorter than this use the 'cols' layout
MIN_VALUES_PER_BLOCK = 2048
VECTOR_BYTES = 16         # float4 / double2 loads


def ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return ceil_div(a, b) * b


@dataclass(frozen=True)
class ReductionPlan:
    """How a partial kernel splits (N, C, M) and where the merge kernel finds each channel's parts.

    ``sizes`` are the layout's integer kernel arguments after the data pointers: rows:
    (N, C, M, chunk_len, chunks); cols: (N, K, M, TX, TY, rows_per_chunk). Channel c's parts are
    ``(p // group) * stride + c * group + p % group`` for p < ``parts_per_channel``, in arrays of
    ``parts`` entries per field.
    """
    layout: str
    vec: int
    grid: tuple
    block: tuple
    sizes: tuple
    parts: int
    parts_per_channel: int
    group: int
    stride: int

    @property
    def merge_block(self):
        return (min(MAX_THREADS, _round_up(self.parts_per_channel, 32)),)


def reduction_layout(m, itemsize, aligned):
    """('rows', values per load) for rows of at least 128 bytes, else ('cols', 1)."""
    if m * itemsize < COLS_BELOW_BYTES:
        return "cols", 1
    return "rows", elementwise_vec(m, itemsize, aligned)


@functools.lru_cache(maxsize=512)
def reduction_plan(n, c, m, itemsize, aligned, resident_blocks):
    """The partial-reduction geometry for x3 of shape (n, c, m); ``aligned``: 16-byte pointers.

    The grid is at most one wave of ``resident_blocks`` (blocks the device runs at once) where
    the shape allows: every block of a rows-layout reduction has the same work, so a second,
    partial wave would leave most of the GPU idle.
    """
    layout, vec = reduction_layout(m, itemsize, aligned)
    if layout == "cols":
        return _cols_plan(n, c, m, resident_blocks)
    return _rows_plan(n, c, m, vec, resident_blocks)


def _rows_plan(n, c, m, vec, resident_blocks):
    per_channel = n * m
    chunks = max(1, min(resident_blocks // c, ceil_div(per_channel, MIN_VALUES_PER_BLOCK)))
    chunk_len = _round_up(ceil_div(per_channel, chunks), vec)
    chunks = ceil_div(per_channel, chunk_len)
    threads = min(MAX_THREADS, _round_up(ceil_div(chunk_len, BATCH), 32))
    return ReductionPlan("rows", vec, (c * chunks,), (threads,), (n, c, m, chunk_len, chunks),
                         parts=c * chunks, parts_per_channel=chunks, group=chunks,
                         stride=c * chunks)


def _cols_plan(n, c, m, resident_blocks):
    k = c * m
    if k <= MAX_THREADS:
        tx = k
    else:
        tx = _round_up(ceil_div(k, ceil_div(k, MAX_THREADS)), 32)
    ty = max(1, MAX_THREADS // tx)
    tiles = ceil_div(k, tx)
    chunks = max(1, min(resident_blocks // tiles, ceil_div(n, ty * BATCH), 65535))
    rows_per_chunk = ceil_div(n, chunks)
    chunks = ceil_div(n, rows_per_chunk)
    return ReductionPlan("cols", 1, (tiles, chunks), (tx * ty,), (n, k, m, tx, ty, rows_per_chunk),
                         parts=chunks * k, parts_per_channel=chunks * m, group=m, stride=k)


def elementwise_vec(m, itemsize, aligned):
    """Values per load in the element-wise kernels: a 16-byte vector when rows allow it."""
    vec = VECTOR_BYTES // itemsize
    return vec if aligned and m % vec == 0 else 1
