"""A float32 GEMM for the convolutions' narrow products, out (M, N) = A (M, K) @ B (K, N) with
M small (the output channels, 6-128) and N long (the output positions).

OpenBLAS runs these shapes well below its peak: W (16, 144) @ columns (144, 784), ResNet-20's
16-channel forward per image, at 90 GFLOP/s on one thread of this machine (Xeon, AVX-512),
where it reaches 148 on 512x512x512. Its kernels are tuned for large square blocks; here A is
tiny and every B element is used only M times. This GEMM keeps an MR x (NV vectors) tile of
``out`` in registers while it walks down K: per step of K, NV vector loads of a row of B, MR
broadcasts of a column of A (packed once, ``pack_rows``) and MR * NV fused multiply-adds. With
MR = 8 and NV = 3 (24 of AVX-512's 32 registers) the same product runs at 133 GFLOP/s, 32 x 288 x
784 at 127 against 107 (one thread).

The tile is written in LLVM IR (``_tile``, a Numba intrinsic) because LLVM's loop vectoriser
does not keep a tile of accumulators in registers across the K loop; the rest is ordinary Numba.
Every element of ``out`` is one chain of fused multiply-adds in the order k = 0, 1, ..., K-1
(rounded once per step), the same on any machine with FMA and on any number of threads: the
results are reproducible, but not NumPy's bits (OpenBLAS sums in blocks of its own). Ragged
edges are masked loads and stores (columns) and zero rows of the packed A (rows), so any M, N
and K >= 1 run through the same tile.

Without AVX-512 the tile uses 8-lane vectors and MR = 4 (AVX2's 16 registers); without FMA
(``available`` False) the callers keep OpenBLAS.
"""
import functools

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


@intrinsic
def _tile(typingctx, packed, b, out, depth, ldb, ldc, rows, columns):
    """out[r * ldc + j] = sum over k < depth of packed[k * MR + r] * b[k * ldb + j], for
    r < rows (<= MR) and j < columns (<= NR); all arguments integers: the three float32
    arrays' addresses, then the depth (K >= 1), the row strides of b and out in elements and
    the tile's valid rows and columns."""
    signature = types.void(*[types.intp] * 8)

    def codegen(context, builder, sig, args):
        packed_at, b_at, out_at, depth, ldb, ldc, rows, columns = args
        fma, load, store, vector_at = _vector_ops(builder)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        a_ptr, b_ptr, out_ptr = (builder.inttoptr(address, F32.as_pointer())
                                 for address in (packed_at, b_at, out_at))
        masks = _column_masks(builder, columns)
        zero = ir.Constant(VECTOR, [0.0] * LANES)

        entry = builder.block
        loop, done = builder.append_basic_block("tile_k"), builder.append_basic_block("tile_out")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(i64(0), entry)
        sums = [[builder.phi(VECTOR) for _ in range(NV)] for _ in range(MR)]
        for phi in (phi for row in sums for phi in row):
            phi.add_incoming(zero, entry)
        b_row = builder.mul(k, ldb)
        b_vectors = [builder.call(load, [vector_at(b_ptr, builder.add(b_row, i64(v * LANES))),
                                         i32(4), masks[v], zero]) for v in range(NV)]
        a_row = builder.mul(k, i64(MR))
        updated = []
        for r in range(MR):
            a_value = _splat(builder, builder.load(builder.gep(a_ptr, [builder.add(
                a_row, i64(r))])), VECTOR)
            updated.append([builder.call(fma, [a_value, b_vectors[v], sums[r][v]])
                            for v in range(NV)])
        k_next = builder.add(k, i64(1))
        k.add_incoming(k_next, builder.block)
        for r in range(MR):
            for v in range(NV):
                sums[r][v].add_incoming(updated[r][v], builder.block)
        builder.cbranch(builder.icmp_signed("<", k_next, depth), loop, done)
        builder.position_at_end(done)
        for r in range(MR):
            with builder.if_then(builder.icmp_signed("<", i64(r), rows)):
                out_row = builder.mul(i64(r), ldc)
                for v in range(NV):
                    builder.call(store, [updated[r][v], vector_at(out_ptr, builder.add(
                        out_row, i64(v * LANES))), i32(4), masks[v]])
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
        fma, load, _, vector_at = _vector_ops(builder)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        zero = ir.Constant(VECTOR, [0.0] * LANES)

        def row_starts(address, count, valid, stride):
            base = builder.inttoptr(address, F32.as_pointer())
            return [builder.gep(base, [builder.mul(builder.select(
                builder.icmp_signed("<", i64(i), valid), i64(i), i64(0)), stride)])
                for i in range(count)]
        a_rows, b_rows = row_starts(a_at, DR, rows, lda), row_starts(b_at, DS, columns, ldb)
        full = builder.and_(depth, i64(-LANES))

        def step(p, sums, mask):
            """sums + this step's products: unmasked loads, or masked by ``mask``."""
            def read(row):
                pointer = vector_at(row, p)
                if mask is None:
                    return builder.load(pointer, align=4)
                return builder.call(load, [pointer, i32(4), mask, zero])
            a_vectors, b_vectors = [read(row) for row in a_rows], [read(row) for row in b_rows]
            return [[builder.call(fma, [a_vectors[r], b_vectors[c], sums[r][c]])
                     for c in range(DS)] for r in range(DR)]

        def merge(incoming):
            """phi nodes joining [(sums, block), ...]."""
            joined = [[builder.phi(VECTOR) for _ in range(DS)] for _ in range(DR)]
            for sums, block in incoming:
                for r in range(DR):
                    for c in range(DS):
                        joined[r][c].add_incoming(sums[r][c], block)
            return joined

        zeros = [[zero] * DS for _ in range(DR)]
        entry = builder.block
        loop, after = builder.append_basic_block("dot_p"), builder.append_basic_block("dot_tail")
        builder.cbranch(builder.icmp_signed(">", full, i64(0)), loop, after)
        builder.position_at_end(loop)
        p = builder.phi(i64)
        p.add_incoming(i64(0), entry)
        sums = merge([(zeros, entry)])
        updated = step(p, sums, None)
        p_next = builder.add(p, i64(LANES))
        p.add_incoming(p_next, builder.block)
        for r in range(DR):
            for c in range(DS):
                sums[r][c].add_incoming(updated[r][c], builder.block)
        builder.cbranch(builder.icmp_signed("<", p_next, full), loop, after)
        builder.position_at_end(after)
        sums = merge([(zeros, entry), (updated, loop)])
        before_tail = builder.block
        tail, done = builder.append_basic_block("dot_last"), builder.append_basic_block("dot_out")
        builder.cbranch(builder.icmp_signed("<", full, depth), tail, done)
        builder.position_at_end(tail)
        last = step(full, sums, _column_masks(builder, builder.sub(depth, full))[0])
        builder.branch(done)
        builder.position_at_end(done)
        sums = merge([(sums, before_tail), (last, tail)])
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
        return context.get_dummy_value()
    return signature, codegen


@jit()
def gemm_nt(a, b, out, accumulate):
    """out (M, N) = a (M, P) @ b (N, P).T, or out += that if ``accumulate`` (each element's
    dot product added to it once, as NumPy's ``out += a @ b.T`` adds); float32, rows
    contiguous. Faster than OpenBLAS where N is small: 144 x 16 x 784 (a weight gradient of
    ResNet-20's 16-channel convolution, per image) at 91 GFLOP/s against 71, one thread; at 32
    or more columns OpenBLAS wins."""
    m, depth = a.shape
    n = b.shape[0]
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
