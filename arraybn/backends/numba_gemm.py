"""A float32 GEMM for the convolutions' narrow products, out (M, N) = A (M, K) @ B (K, N) with
M or K small (the output channels) and N long (the output positions).

OpenBLAS runs these shapes well below its peak: W (16, 144) @ columns (144, 784), ResNet-20's
16-channel forward per image, at 90 GFLOP/s on one thread of this machine (Xeon, AVX-512),
where it reaches 148 on 512x512x512. Its kernels are tuned for large square blocks; here A is
tiny and every B element is used only M times. This GEMM keeps an MR x (NV vectors) tile of
``out`` in registers while it walks down K: per step of K, NV vector loads of a row of B, MR
broadcasts of a column of A (packed once, ``pack_rows``) and MR * NV fused multiply-adds. With
MR = 8 and NV = 3 (24 of AVX-512's 32 registers) the same product runs at 133 GFLOP/s, 32 x 288 x
784 at 146 against 109 (one thread; tiles of 6 x 4, 12 x 2, 9 x 3 or 16 x 1 vectors were slower,
and so were passes over K in blocks of 128 rows).

The tile is written in LLVM IR (``_tile``, a Numba intrinsic) because LLVM's loop vectoriser
does not keep a tile of accumulators in registers across the K loop; the rest is ordinary Numba.
Every element of ``out`` is one chain of fused multiply-adds in the order k = 0, 1, ..., K-1
(rounded once per step), the same on any machine with FMA and on any number of threads: the
results are reproducible, but not NumPy's bits (OpenBLAS sums in blocks of its own). Ragged
edges are masked loads and stores (columns) and zero rows of the packed A (rows), so any M, N
and K >= 1 run through the same tile.

``gemm_nt`` is the weight gradient's product, out (M, N) = A (M, P) @ B (N, P).T with N small
(the output channels) and P long: DR x DS dot products at a time (6 x 4 with AVX-512), each in
LANES lanes of fused multiply-adds along P, the lanes then added as a tree. ResNet-20's
16-channel weight gradient per image, 144 x 16 x 784, at 97 GFLOP/s against OpenBLAS's 69.

``gemm_windows`` is ``gemm`` on the im2col columns of a 'same' convolution without writing them:
the tile reads each row of the columns from the image itself (an offset per row, a table of
the positions that lie inside the image, masked loads for the rest), the same sums bit for bit;
``gemm_nt_windows`` is ``gemm_nt`` on them in the same way (a weight gradient per image).

Without AVX-512 the tiles use 8-lane vectors and MR = 4, DR = 3 (AVX2's 16 registers); without
FMA (``available`` False) the callers keep OpenBLAS.
"""
import functools

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic

from arraybn.backends.numba_config import jit, uidx


def _host_features():
    """The host CPU's LLVM feature flags, e.g. {'avx512f', 'fma', ...}."""
    features = binding.get_host_cpu_features()
    return {name for name, enabled in features.items() if enabled}


FEATURES = _host_features()
LANES = 16 if "avx512f" in FEATURES else 8      # float32 lanes of a vector register
MR, NV = (8, 3) if LANES == 16 else (4, 3)      # tile: MR rows of out, NV vectors of LANES
NR = NV * LANES                                  # columns of out per tile
DR, DS = (6, 4) if LANES == 16 else (3, 4)      # ``gemm_nt``'s tile: DR x DS dot products


def available():
    """Whether this GEMM runs at speed here: the CPU has FMA and AVX2 (else LLVM would emulate
    the fused multiply-adds in software)."""
    return {"fma", "avx2"} <= FEATURES


def _declare(module, name, return_type, argument_types):
    """The LLVM intrinsic ``name`` of ``module``, declared once."""
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, ir.FunctionType(return_type, argument_types), name=name)


def _splat(builder, value, vector_type):
    """A vector of ``vector_type`` with every lane ``value``."""
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, i32(0))
    lanes = vector_type.count
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))


F32 = ir.FloatType()
VECTOR = ir.VectorType(F32, LANES)
MASK = ir.VectorType(ir.IntType(1), LANES)


def _vector_ops(builder):
    """(fma, masked load, masked store) of LANES float32 lanes, declared in the builder's
    module, and ``vector_at(base, offset)``: the vector pointer to float pointer base + offset."""
    i32, module = ir.IntType(32), builder.module
    fma = _declare(module, f"llvm.fma.v{LANES}f32", VECTOR, [VECTOR] * 3)
    load = _declare(module, f"llvm.masked.load.v{LANES}f32.p0", VECTOR,
                    [VECTOR.as_pointer(), i32, MASK, VECTOR])
    store = _declare(module, f"llvm.masked.store.v{LANES}f32.p0", ir.VoidType(),
                     [VECTOR, VECTOR.as_pointer(), i32, MASK])

    def vector_at(base, offset):
        return builder.bitcast(builder.gep(base, [offset]), VECTOR.as_pointer())
    return fma, load, store, vector_at


def _column_masks(builder, valid):
    """Per vector v of the tile, the mask of its lanes whose column (v * LANES + lane) is below
    ``valid`` (an i64)."""
    i64 = ir.IntType(64)
    lanes = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
    return [builder.icmp_signed("<", lanes, _splat(builder, builder.sub(valid, i64(v * LANES)),
                                                   ir.VectorType(i64, LANES)))
            for v in range(NV)]


def _summing_loop(builder, initial, stop, step, body, enter=None):
    """Emit a loop from the current block: a counter from 0 by ``step`` while below ``stop``
    (an i64), and accumulators (lists of lists of vectors) from ``initial``; ``body(counter,
    sums)`` emits one step and returns the updated accumulators. Entered unconditionally, or
    where the i1 ``enter`` holds. Returns (the last step's accumulators, the block before the
    loop, the loop's last block), the builder after the loop."""
    i64 = ir.IntType(64)
    entry = builder.block
    loop, done = builder.append_basic_block("loop"), builder.append_basic_block("loop_done")
    if enter is None:
        builder.branch(loop)
    else:
        builder.cbranch(enter, loop, done)
    builder.position_at_end(loop)
    counter = builder.phi(i64)
    counter.add_incoming(i64(0), entry)
    sums = _join(builder, [(initial, entry)])
    updated = body(counter, sums)
    following, end = builder.add(counter, i64(step)), builder.block
    counter.add_incoming(following, end)
    for phis, news in zip(sums, updated):
        for phi, new in zip(phis, news):
            phi.add_incoming(new, end)
    builder.cbranch(builder.icmp_signed("<", following, stop), loop, done)
    builder.position_at_end(done)
    return updated, entry, end


def _join(builder, incoming):
    """Phi nodes joining accumulators from several blocks: [(sums, block), ...]."""
    joined = [[builder.phi(VECTOR) for _ in row] for row in incoming[0][0]]
    for sums, block in incoming:
        for phis, values in zip(joined, sums):
            for phi, value in zip(phis, values):
                phi.add_incoming(value, block)
    return joined


def _broadcast_step(builder, ops, a_ptr, k, b_vectors_at, masks, sums):
    """One step of K of the MR x NV tile: sums + packed A's row k (broadcast) x the NV vectors
    at the vector pointers ``b_vectors_at``, loaded under ``masks``; returns the new sums."""
    fma, load = ops[0], ops[1]
    i64, i32 = ir.IntType(64), ir.IntType(32)
    zero = ir.Constant(VECTOR, [0.0] * LANES)
    b_vectors = [builder.call(load, [b_vectors_at[v], i32(4), masks[v], zero])
                 for v in range(NV)]
    a_row = builder.mul(k, i64(MR))
    updated = []
    for r in range(MR):
        a_value = _splat(builder, builder.load(builder.gep(a_ptr, [builder.add(a_row, i64(r))])),
                         VECTOR)
        updated.append([builder.call(fma, [a_value, b_vectors[v], sums[r][v]])
                        for v in range(NV)])
    return updated


def _tile_sums(builder, ops, packed_at, depth, columns, b_row_and_masks):
    """The MR x NV tile's sums over k < depth, the step's NV b vector pointers and masks from
    ``b_row_and_masks(k, column_masks)``; returns (sums, column masks)."""
    a_ptr = builder.inttoptr(packed_at, F32.as_pointer())
    masks = _column_masks(builder, columns)
    zero = ir.Constant(VECTOR, [0.0] * LANES)

    def step(k, sums):
        return _broadcast_step(builder, ops, a_ptr, k, *b_row_and_masks(k, masks), sums)
    return _summing_loop(builder, [[zero] * NV for _ in range(MR)], depth, 1, step)[0], masks


def _store_tile(builder, ops, out_at, ldc, rows, masks, sums):
    """out's rows r < rows of the tile = sums, columns under ``masks``."""
    store, vector_at, i64, i32 = ops[2], ops[3], ir.IntType(64), ir.IntType(32)
    out_ptr = builder.inttoptr(out_at, F32.as_pointer())
    for r in range(MR):
        with builder.if_then(builder.icmp_signed("<", i64(r), rows)):
            out_row = builder.gep(out_ptr, [builder.mul(i64(r), ldc)])
            for v in range(NV):
                builder.call(store, [sums[r][v], vector_at(out_row, i64(v * LANES)), i32(4),
                                     masks[v]])


def _row_vectors(ops, row):
    """Vector pointers to the NV vectors of a tile's row of b from the float pointer ``row``."""
    return [ops[3](row, ir.IntType(64)(v * LANES)) for v in range(NV)]


@intrinsic
def _tile(typingctx, packed, b, out, depth, ldb, ldc, rows, columns):
    """out[r * ldc + j] = sum over k < depth of packed[k * MR + r] * b[k * ldb + j], for
    r < rows (<= MR) and j < columns (<= NR); all arguments integers: the three float32
    arrays' addresses, then the depth (K >= 1), the row strides of b and out in elements and
    the tile's valid rows and columns."""
    signature = types.void(*[types.intp] * 8)

    def codegen(context, builder, sig, args):
        packed_at, b_at, out_at, depth, ldb, ldc, rows, columns = args
        ops = _vector_ops(builder)
        b_ptr = builder.inttoptr(b_at, F32.as_pointer())
        sums, masks = _tile_sums(builder, ops, packed_at, depth, columns, lambda k, masks: (
            _row_vectors(ops, builder.gep(b_ptr, [builder.mul(k, ldb)])), masks))
        _store_tile(builder, ops, out_at, ldc, rows, masks, sums)
        return context.get_dummy_value()
    return signature, codegen


@intrinsic
def _window_tile(typingctx, packed, image, offsets, table, table_rows, out, depth, ldc, rows,
                 columns):
    """``_tile`` with b's row k the ``image`` (float32) from offsets[k] (int64, may point
    before or past the image: those columns are masked) and its valid columns the nonzero
    bytes of ``table`` from table_rows[k]: an implicit im2col (b[k, j] = image[offsets[k] + j]
    where table[table_rows[k] + j], else 0). image, table and out point at the tile's first
    column; table is readable for NR bytes from there."""
    signature = types.void(*[types.intp] * 10)

    def codegen(context, builder, sig, args):
        packed_at, image_at, offsets_at, table_at, rows_at, out_at, depth, ldc, rows, columns = (
            args)
        ops = _vector_ops(builder)
        i64, i8 = ir.IntType(64), ir.IntType(8)
        bytes_type = ir.VectorType(i8, LANES)
        image, table = (builder.inttoptr(address, pointee.as_pointer()) for address, pointee in
                        ((image_at, F32), (table_at, i8)))
        offsets, table_rows = (builder.inttoptr(address, i64.as_pointer())
                               for address in (offsets_at, rows_at))

        def b_row_and_masks(k, masks):
            row = builder.gep(table, [builder.load(builder.gep(table_rows, [k]))])
            valid = [builder.icmp_unsigned("!=", builder.load(builder.bitcast(builder.gep(
                row, [i64(v * LANES)]), bytes_type.as_pointer()), align=1),
                ir.Constant(bytes_type, [0] * LANES)) for v in range(NV)]
            return (_row_vectors(ops, builder.gep(image, [builder.load(builder.gep(offsets,
                                                                                  [k]))])),
                    [builder.and_(mask, ok) for mask, ok in zip(masks, valid)])
        sums, masks = _tile_sums(builder, ops, packed_at, depth, columns, b_row_and_masks)
        _store_tile(builder, ops, out_at, ldc, rows, masks, sums)
        return context.get_dummy_value()
    return signature, codegen


@intrinsic
def _tap_tile(typingctx, packed, image, offsets, table, table_rows, out, depth, step, ldc,
              rows, columns):
    """``_tile`` with b's vector v in row k the LANES floats of ``image`` from offsets[v] +
    k*step where the byte table[table_rows[v] + k] is nonzero, zeros where it is 0: the
    weight gradient's columns read in place from an image stored position by position (NHWC,
    ``step`` channels), one window offset and LANES channels per vector. offsets and
    table_rows (int64, NV each) are the tile's; integer arguments."""
    signature = types.void(*[types.intp] * 11)

    def codegen(context, builder, sig, args):
        (packed_at, image_at, offsets_at, table_at, rows_at, out_at, depth, step, ldc, rows,
         columns) = args
        ops = _vector_ops(builder)
        i64, i8 = ir.IntType(64), ir.IntType(8)
        image = builder.inttoptr(image_at, F32.as_pointer())
        table = builder.inttoptr(table_at, i8.as_pointer())
        offsets, table_rows = (builder.inttoptr(address, i64.as_pointer())
                               for address in (offsets_at, rows_at))
        bases = [builder.load(builder.gep(offsets, [i64(v)])) for v in range(NV)]
        flags = [builder.gep(table, [builder.load(builder.gep(table_rows, [i64(v)]))])
                 for v in range(NV)]

        def b_row_and_masks(k, masks):
            at = builder.mul(k, step)
            inside = [_splat(builder, builder.icmp_unsigned("!=", builder.load(builder.gep(
                flag, [k])), i8(0)), MASK) for flag in flags]
            return ([ops[3](image, builder.add(base, at)) for base in bases],
                    [builder.and_(mask, ok) for mask, ok in zip(masks, inside)])
        sums, masks = _tile_sums(builder, ops, packed_at, depth, columns, b_row_and_masks)
        _store_tile(builder, ops, out_at, ldc, rows, masks, sums)
        return context.get_dummy_value()
    return signature, codegen


@functools.lru_cache(maxsize=None)
def packed_shape(m, k):
    """The shape of ``pack_rows``'s output for an (m, k) A: (blocks of MR rows, K, MR)."""
    return (-(-m // MR), k, MR)


@jit()
def pack_rows(a, packed):
    """packed[block, k, r] = a[block * MR + r, k], zero for rows past a's last: the layout
    ``gemm`` broadcasts A from. a: (M, K), any strides (a transposed view packs A.T)."""
    m, k = a.shape
    for block in range(packed.shape[0]):
        for kk in range(k):
            for r in range(MR):
                row = block * MR + r
                packed[uidx(block), uidx(kk), uidx(r)] = a[uidx(row), uidx(kk)] if row < m else 0


@jit()
def gemm(packed, m, b, out):
    """out (m, N) = A @ b (K, N), A packed by ``pack_rows``; b and out float32, rows
    contiguous (any row stride: views of wider buffers are fine). Tiles column panel by column
    panel, every row block of a panel before the next panel (the panel of b stays in L1)."""
    depth, n = b.shape
    if b.itemsize != 4 or out.itemsize != 4 or packed.itemsize != 4:
        raise TypeError("numba_gemm.gemm: float32 arrays only")
    if depth == 0:
        out[:, :] = 0
        return
    ldb, ldc = b.strides[0] // 4, out.strides[0] // 4
    blocks = packed.shape[0]
    for j in range(0, n, NR):
        for block in range(blocks):
            _tile(packed[block].ctypes.data, b.ctypes.data + 4 * j,
                  out.ctypes.data + 4 * (block * MR * ldc + j), depth, ldb, ldc,
                  min(MR, m - block * MR), min(NR, n - j))


def _horizontal_sum(builder, vector):
    """The lanes of ``vector`` added as a tree: halves, then quarters, ... (a fixed order)."""
    i32, width = ir.IntType(32), LANES
    while width > 1:
        half = width // 2
        low, high = (builder.shuffle_vector(vector, vector, ir.Constant(
            ir.VectorType(i32, half), list(range(start, start + half)))) for start in (0, half))
        vector, width = builder.fadd(low, high), half
    return builder.extract_element(vector, i32(0))


def _row_starts(builder, address, count, valid, stride):
    """Float pointers to rows 0 .. count-1 of the matrix at ``address`` (an i64) with row
    ``stride``; rows from ``valid`` on point at row 0."""
    base = builder.inttoptr(address, F32.as_pointer())
    return [builder.gep(base, [builder.mul(_row_or_first(builder, i, valid), stride)])
            for i in range(count)]


def _row_or_first(builder, i, valid):
    """i (an i64) if below ``valid``, else 0."""
    i64 = ir.IntType(64)
    return builder.select(builder.icmp_signed("<", i64(i), valid), i64(i), i64(0))


def _read(builder, ops, row, p, mask):
    """The vector at row + p: an unmasked load if ``mask`` is None, else masked (zeros)."""
    load, vector_at = ops[1], ops[3]
    pointer = vector_at(row, p)
    if mask is None:
        return builder.load(pointer, align=4)
    return builder.call(load, [pointer, ir.IntType(32)(4), mask,
                               ir.Constant(VECTOR, [0.0] * LANES)])


def _dot_sums(builder, ops, depth, read):
    """The DR x DS dot products' lane sums over p < depth (>= 1): ``read(p, mask)`` gives the
    DR vectors of a and DS of b at p, ``mask`` None in the main loop (whole vectors), the lanes
    below depth in the last partial step."""
    fma, i64 = ops[0], ir.IntType(64)
    full = builder.and_(depth, i64(-LANES))

    def step(p, sums, mask):
        a_vectors, b_vectors = read(p, mask)
        return [[builder.call(fma, [a_vectors[r], b_vectors[c], sums[r][c]])
                 for c in range(DS)] for r in range(DR)]

    zeros = [[ir.Constant(VECTOR, [0.0] * LANES)] * DS for _ in range(DR)]
    updated, entry, loop = _summing_loop(builder, zeros, full, LANES,
                                         lambda p, sums: step(p, sums, None),
                                         enter=builder.icmp_signed(">", full, i64(0)))
    sums = _join(builder, [(zeros, entry), (updated, loop)])
    before_tail = builder.block
    tail, done = builder.append_basic_block("dot_last"), builder.append_basic_block("dot_out")
    builder.cbranch(builder.icmp_signed("<", full, depth), tail, done)
    builder.position_at_end(tail)
    last = step(full, sums, _column_masks(builder, builder.sub(depth, full))[0])
    builder.branch(done)
    builder.position_at_end(done)
    return _join(builder, [(sums, before_tail), (last, tail)])


def _store_dots(builder, out_at, ldc, rows, columns, accumulate, sums):
    """out[r * ldc + s] = the lanes of sums[r][s] added as a tree, or out's value plus that if
    ``accumulate`` (an i64), for r < rows and s < columns."""
    i64 = ir.IntType(64)
    out_ptr = builder.inttoptr(out_at, F32.as_pointer())
    keep = builder.icmp_signed("!=", accumulate, i64(0))
    for r in range(DR):
        for c in range(DS):
            valid = builder.and_(builder.icmp_signed("<", i64(r), rows),
                                 builder.icmp_signed("<", i64(c), columns))
            with builder.if_then(valid):
                at = builder.gep(out_ptr, [builder.add(builder.mul(i64(r), ldc), i64(c))])
                total = _horizontal_sum(builder, sums[r][c])
                builder.store(builder.select(keep, builder.fadd(builder.load(at), total),
                                             total), at)


@intrinsic
def _dot_tile(typingctx, a, b, out, depth, lda, ldb, ldc, rows, columns, accumulate):
    """out[r * ldc + s] (+= if ``accumulate``) sum over p < depth of a[r * lda + p] *
    b[s * ldb + p], for r < rows (<= DR) and s < columns (<= DS): DR x DS dot products, each
    summed in LANES lanes (lane l takes p = l, l + LANES, ...; the last partial vector masked)
    and the lanes added as a tree (``_horizontal_sum``), then added to out's value if
    ``accumulate``. Rows past ``rows`` and ``columns`` read row 0 (never stored). Integer
    arguments as ``_tile``'s; depth >= 1."""
    signature = types.void(*[types.intp] * 10)

    def codegen(context, builder, sig, args):
        a_at, b_at, out_at, depth, lda, ldb, ldc, rows, columns, accumulate = args
        ops = _vector_ops(builder)
        a_rows = _row_starts(builder, a_at, DR, rows, lda)
        b_rows = _row_starts(builder, b_at, DS, columns, ldb)
        sums = _dot_sums(builder, ops, depth, lambda p, mask: (
            [_read(builder, ops, row, p, mask) for row in a_rows],
            [_read(builder, ops, row, p, mask) for row in b_rows]))
        _store_dots(builder, out_at, ldc, rows, columns, accumulate, sums)
        return context.get_dummy_value()
    return signature, codegen


@intrinsic
def _window_dot_tile(typingctx, image, offsets, table, table_rows, b, out, depth, ldb, ldc,
                     rows, columns, accumulate):
    """``_dot_tile`` with a's row r the ``image`` (float32) from offsets[r], its valid
    positions the nonzero bytes of ``table`` from table_rows[r] (masked loads, zeros for the
    rest): the weight gradient's implicit im2col, as ``_window_tile`` for ``_tile``. offsets
    and table_rows point at the tile's first row; integer arguments."""
    signature = types.void(*[types.intp] * 12)

    def codegen(context, builder, sig, args):
        (image_at, offsets_at, table_at, rows_at, b_at, out_at, depth, ldb, ldc, rows,
         columns, accumulate) = args
        ops = _vector_ops(builder)
        i64, bytes_type = ir.IntType(64), ir.VectorType(ir.IntType(8), LANES)
        image = builder.inttoptr(image_at, F32.as_pointer())
        table = builder.inttoptr(table_at, ir.IntType(8).as_pointer())
        offsets, table_rows = (builder.inttoptr(address, i64.as_pointer())
                               for address in (offsets_at, rows_at))
        firsts = [_row_or_first(builder, i, rows) for i in range(DR)]
        a_rows = [builder.gep(image, [builder.load(builder.gep(offsets, [i]))]) for i in firsts]
        a_tables = [builder.gep(table, [builder.load(builder.gep(table_rows, [i]))])
                    for i in firsts]
        b_rows = _row_starts(builder, b_at, DS, columns, ldb)

        def read(p, mask):
            a_vectors = []
            for row, row_table in zip(a_rows, a_tables):
                inside = builder.icmp_unsigned("!=", builder.load(builder.bitcast(
                    builder.gep(row_table, [p]), bytes_type.as_pointer()), align=1),
                    ir.Constant(bytes_type, [0] * LANES))
                a_vectors.append(_read(builder, ops, row, p, inside if mask is None
                                       else builder.and_(inside, mask)))
            return a_vectors, [_read(builder, ops, row, p, mask) for row in b_rows]
        sums = _dot_sums(builder, ops, depth, read)
        _store_dots(builder, out_at, ldc, rows, columns, accumulate, sums)
        return context.get_dummy_value()
    return signature, codegen


@jit()
def gemm_nt(a, b, out, accumulate):
    """out (M, N) = a (M, P) @ b (N, P).T, or out += that if ``accumulate`` (each element's
    dot product added to it once, as NumPy's ``out += a @ b.T`` adds); float32, rows
    contiguous. Faster than OpenBLAS where N is small: 144 x 16 x 784 (a weight gradient of
    ResNet-20's 16-channel convolution, per image) at 97 GFLOP/s against 69, 288 x 32 x 784 at
    121 against 96, one thread; with 64 columns or more OpenBLAS wins."""
    m, depth = a.shape
    n = b.shape[0]
    if a.itemsize != 4 or b.itemsize != 4 or out.itemsize != 4:
        raise TypeError("numba_gemm.gemm_nt: float32 arrays only")
    if depth == 0:
        if not accumulate:
            out[:, :] = 0
        return
    lda, ldb, ldc = a.strides[0] // 4, b.strides[0] // 4, out.strides[0] // 4
    for r in range(0, m, DR):
        for c in range(0, n, DS):
            _dot_tile(a.ctypes.data + 4 * r * lda, b.ctypes.data + 4 * c * ldb,
                      out.ctypes.data + 4 * (r * ldc + c), depth, lda, ldb, ldc,
                      min(DR, m - r), min(DS, n - c), accumulate)


@jit()
def shift_table(shifts, h, w, images):
    """table[t, (n*h + i)*w + j]: whether position (i + shifts[t, 0], j + shifts[t, 1]) lies
    inside an h x w plane, for ``images`` planes one after another; rows NR bytes longer than
    images*h*w (zero), so a tile may read past the last position. shifts: (T, 2) int64."""
    size = images * h * w
    table = np.zeros((shifts.shape[0], size + NR), np.uint8)
    for t in range(shifts.shape[0]):
        di, dj = shifts[t, 0], shifts[t, 1]
        for n in range(images):
            for i in range(h):
                for j in range(w):
                    table[t, (n * h + i) * w + j] = 0 <= i + di < h and 0 <= j + dj < w
    return table


@jit()
def shifted_offsets(planes, taps, shifts, h, w, images):
    """For implicit im2col rows k reading plane planes[k] (of images*h*w values, planes one
    after another) shifted by shifts[taps[k]] (rows, columns): (offsets, table rows) for
    ``gemm_windows``, planes[k]*images*h*w + di*w + dj and taps[k] times the row length of
    ``shift_table``'s table."""
    size = images * h * w
    offsets = np.empty(planes.size, np.int64)
    table_rows = np.empty(planes.size, np.int64)
    for k in range(planes.size):
        offsets[k] = planes[k] * size + shifts[taps[k], 0] * w + shifts[taps[k], 1]
        table_rows[k] = taps[k] * (size + NR)
    return offsets, table_rows


@jit()
def same_shifts(kh, kw, pad):
    """(kh*kw, 2): the shift (ki - pad, kj - pad) of each window offset (ki, kj) of a 'same'
    convolution (stride 1), in the order ki*kw + kj."""
    shifts = np.empty((kh * kw, 2), np.int64)
    for ki in range(kh):
        for kj in range(kw):
            shifts[ki * kw + kj, 0], shifts[ki * kw + kj, 1] = ki - pad, kj - pad
    return shifts


@jit()
def window_offsets(c, kh, kw, pad, h, w, images):
    """For a 'same' convolution (stride 1, output h x w) of ``images`` (c, h, w) images laid
    out channel by channel, each channel's planes one after another ((c, images*h*w): one
    image, or the channel-major copy of a chunk of them): per im2col row k = (ch, ki, kj), the
    offset of its window, ch*images*h*w + (ki - pad)*w + kj - pad, and its row of
    ``window_table``, ki*kw + kj, times the table's row length."""
    rows = np.arange(c * kh * kw)
    return shifted_offsets(rows // (kh * kw), rows % (kh * kw), same_shifts(kh, kw, pad), h, w,
                           images)


@jit()
def window_table(kh, kw, pad, h, w, images):
    """table[ki*kw + kj, q]: whether output position q = (n*h + i)*w + j (image n of
    ``images`` h x w planes one after another) of a 'same' convolution reads inside its image
    at window offset (ki, kj) (``shift_table``)."""
    return shift_table(same_shifts(kh, kw, pad), h, w, images)


@jit()
def gemm_windows(packed, m, image, offsets, table, table_rows, out):
    """out (m, h*w) = A @ the im2col columns of ``image`` (c, h, w) for a 'same' convolution,
    without writing them: b[k, q] = image.flat[offsets[k] + q] where table.flat[table_rows[k] +
    q], else 0 (``window_offsets``, ``window_table``). The same sums, bit for bit, as ``gemm``
    on the columns."""
    depth, n = offsets.size, out.shape[1]
    if image.itemsize != 4 or out.itemsize != 4 or packed.itemsize != 4:
        raise TypeError("numba_gemm.gemm_windows: float32 arrays only")
    if depth == 0:
        out[:, :] = 0
        return
    ldc, blocks = out.strides[0] // 4, packed.shape[0]
    for j in range(0, n, NR):
        for block in range(blocks):
            _window_tile(packed[block].ctypes.data, image.ctypes.data + 4 * j,
                         offsets.ctypes.data, table.ctypes.data + j, table_rows.ctypes.data,
                         out.ctypes.data + 4 * (block * MR * ldc + j), depth, ldc,
                         min(MR, m - block * MR), min(NR, n - j))


@jit()
def gemm_nt_windows(image, offsets, table, table_rows, b, out, accumulate):
    """out (c*kh*kw, N) = the im2col columns of ``image`` (c, h, w) for a 'same' convolution
    @ b (N, h*w).T (``window_offsets``, ``window_table``), or out += that if ``accumulate``,
    without writing the columns: the same bits as ``gemm_nt`` on them. A weight gradient
    (transposed) per image."""
    m, n, depth = offsets.size, b.shape[0], b.shape[1]
    if image.itemsize != 4 or b.itemsize != 4 or out.itemsize != 4:
        raise TypeError("numba_gemm.gemm_nt_windows: float32 arrays only")
    if depth == 0:
        if not accumulate:
            out[:, :] = 0
        return
    ldb, ldc = b.strides[0] // 4, out.strides[0] // 4
    for r in range(0, m, DR):
        for c in range(0, n, DS):
            _window_dot_tile(image.ctypes.data, offsets.ctypes.data + 8 * r, table.ctypes.data,
                             table_rows.ctypes.data + 8 * r, b.ctypes.data + 4 * c * ldb,
                             out.ctypes.data + 4 * (r * ldc + c), depth, ldb, ldc,
                             min(DR, m - r), min(DS, n - c), accumulate)


@jit()
def gemm_taps(packed, m, image, step, tap_offsets, table, tap_rows, depth, out):
    """out (m, T*step) = A (packed by ``pack_rows``, depth columns) @ B (depth, T*step),
    B[k, t*step + c] = image.flat[tap_offsets[t] + k*step + c] where table.flat[tap_rows[t] +
    k] else 0: the transposed weight gradient of a convolution whose input is stored position
    by position (``step`` channels, a multiple of LANES), window offset t shifted by
    tap_offsets[t] (``shifted_offsets`` times step) and valid where ``shift_table`` says;
    A: gy (m output channels, depth positions). Each element one chain of fused
    multiply-adds over k = 0, 1, ..., depth-1."""
    n = out.shape[1]
    if (image.itemsize != 4 or out.itemsize != 4 or packed.itemsize != 4 or step % LANES
            or not image.flags.c_contiguous):
        raise TypeError("numba_gemm.gemm_taps: float32 arrays, a C-contiguous image and "
                        "channels a multiple of the vector width only")
    if depth == 0:
        out[:, :] = 0
        return
    ldc, blocks = out.strides[0] // 4, packed.shape[0]
    offsets, rows = np.empty(NV, np.int64), np.empty(NV, np.int64)
    for j in range(0, n, NR):
        for v in range(NV):
            column = min(j + v * LANES, n - 1)        # past n: masked, any tap
            offsets[v] = tap_offsets[column // step] + column % step
            rows[v] = tap_rows[column // step]
        for block in range(blocks):
            _tap_tile(packed[block].ctypes.data, image.ctypes.data, offsets.ctypes.data,
                      table.ctypes.data, rows.ctypes.data,
                      out.ctypes.data + 4 * (block * MR * ldc + j), depth, step, ldc,
                      min(MR, m - block * MR), min(NR, n - j))
