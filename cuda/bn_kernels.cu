// Batch-normalization kernels of the arraybn CuPy backend.
//
// Compiled by NVRTC with exactly the options of arraybn/backends/cuda_build.py (-ftz=false:
// float32 subnormals are kept, as on the CPU) and loaded with cupy.RawModule(path=...); the
// template instantiations it asks for are the NAME_EXPRESSIONS of
// arraybn/backends/cupy_backend.py, which also checks every argument (dtype, C-contiguity,
// shape, 16-byte alignment for vector loads) before a launch.
// No #include: NVRTC compiles this file on its own.
//
// Data is x3 of shape (N, C, M), C-contiguous (M = product of the spatial axes, 1 for dense
// layers); the element (n, c, m) sits at offset (n * C + c) * M + m. Per-channel arrays are
// double (C,). Element-wise maths is done in double and rounded once to the data type.
//
// Reductions (moments, backward sums) run in two kernels so that they fill the GPU even when
// C is small: a partial kernel in which each block reduces one piece of one channel's N * M
// values and writes (count, mean, M2) or (sum gy, sum gy * (x - mean)), and a merge kernel
// with one block per channel. Two layouts for the partial kernel:
//   rows  (M * itemsize >= 128 bytes, conv layers): channel c is N rows of M contiguous values;
//         block b reduces a contiguous piece of the channel's flattened (n, m) range, so
//         consecutive threads read consecutive m (coalesced), with float4/double2 loads when
//         M is a multiple of the vector width.
//   cols  (small M, dense layers): x3 is an (N, K = C * M) matrix; a block of TX * TY threads
//         reduces TX consecutive columns over a chunk of rows, TY rows at a time, so
//         consecutive threads read consecutive columns (coalesced). One partial per column.
// Partial arrays hold Pt values per field, field-major: part[f * Pt + i]. Channel c's parts
// are i = (p / G) * S + c * G + p % G for p < P (rows: G = chunks; cols: G = M, S = K).
// Variances are Welford/Chan merges of exact two-pass moments of BATCH-value batches; never
// E[x^2] - E[x]^2.

#define BN_MAX_THREADS 256
#define BN_BATCH 8

struct Moments {
    double n, mean, m2;   // count, mean, sum of squared deviations from the mean
};

struct Sums {
    double gy, gy_xc;     // sum gy, sum gy * (x - mean)
};

__device__ __forceinline__ void merge(Moments& a, const Moments& b) {
    // Chan et al.: exact merge of two (count, mean, M2) summaries.
    if (b.n == 0.0) return;
    if (a.n == 0.0) { a = b; return; }
    const double n = a.n + b.n;
    const double delta = b.mean - a.mean;
    const double share_b = b.n / n;
    a.mean += delta * share_b;
    a.m2 += b.m2 + delta * delta * a.n * share_b;
    a.n = n;
}

__device__ __forceinline__ long long smaller(long long a, long long b) {
    return a < b ? a : b;           // not min(): no overload set to rely on under NVRTC
}

__device__ __forceinline__ void merge(Sums& a, const Sums& b) {
    a.gy += b.gy;
    a.gy_xc += b.gy_xc;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores of VEC consecutive values, converted to / from double.

template <typename T, int VEC> struct Vec;

template <typename T> struct Vec<T, 1> {
    static __device__ __forceinline__ void load(const T* __restrict__ p, double* v) {
        v[0] = static_cast<double>(*p);
    }
    static __device__ __forceinline__ void store(T* __restrict__ p, const double* v) {
        *p = static_cast<T>(v[0]);
    }
};

template <> struct Vec<float, 4> {
    static __device__ __forceinline__ void load(const float* __restrict__ p, double* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float* __restrict__ p, const double* v) {
        *reinterpret_cast<float4*>(p) = make_float4(static_cast<float>(v[0]), static_cast<float>(v[1]),
                                                    static_cast<float>(v[2]), static_cast<float>(v[3]));
    }
};

template <> struct Vec<double, 2> {
    static __device__ __forceinline__ void load(const double* __restrict__ p, double* v) {
        const double2 q = *reinterpret_cast<const double2*>(p);
        v[0] = q.x; v[1] = q.y;
    }
    static __device__ __forceinline__ void store(double* __restrict__ p, const double* v) {
        *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
    }
};

// ---------------------------------------------------------------------------------------------
// Block-level merge: thread (tx, ty) = (tid % TX, tid / TX) holds one accumulator of column tx;
// threads with ty >= TY hold nothing. Returns, in the threads with ty == 0, the merge of
// column tx over all ty. Every thread of the block must call it.

template <class Acc>
__device__ Acc block_merge(Acc acc, int TX, int TY) {
    __shared__ Acc slots[BN_MAX_THREADS];
    const int tx = threadIdx.x % TX;
    const int ty = threadIdx.x / TX;
    if (ty < TY) slots[ty * TX + tx] = acc;
    __syncthreads();
    int half = 1;
    while (half < TY) half <<= 1;
    for (half >>= 1; half > 0; half >>= 1) {
        if (ty < half && ty + half < TY) merge(slots[ty * TX + tx], slots[(ty + half) * TX + tx]);
        __syncthreads();
    }
    return slots[tx];
}

__device__ __forceinline__ Moments batch_moments(const double* v, int count) {
    // Exact two-pass moments of v[0..count), count in 1..BN_BATCH.
    double sum = 0.0;
#pragma unroll
    for (int k = 0; k < BN_BATCH; ++k) if (k < count) sum += v[k];
    const double mean = (count == BN_BATCH) ? sum * (1.0 / BN_BATCH) : sum / count;
    double m2 = 0.0;
#pragma unroll
    for (int k = 0; k < BN_BATCH; ++k) {
        if (k < count) { const double d = v[k] - mean; m2 += d * d; }
    }
    Moments out = {static_cast<double>(count), mean, m2};
    return out;
}

// ---------------------------------------------------------------------------------------------
// Rows layout: a thread's walk through its block's piece [begin, end) of channel c's flattened
// (n, m) range, VEC values at a time, blockDim.x * VEC values per step; no division per step.

template <int VEC>
struct RowWalk {
    long long j, end, offset;           // flat index, its element offset in x3
    long long step, step_offset, row_gap;
    int m, step_m, M;                   // column of j; 32-bit (the backend checks M < 2**30)

    __device__ RowWalk(long long begin, long long end_, long long c, long long C, long long M_)
        : end(end_), M(static_cast<int>(M_)) {
        j = begin + static_cast<long long>(threadIdx.x) * VEC;
        const long long n = j / M_;
        m = static_cast<int>(j - n * M_);
        offset = (n * C + c) * M_ + m;
        step = static_cast<long long>(blockDim.x) * VEC;
        step_m = static_cast<int>(step % M_);
        step_offset = (step / M_) * C * M_ + step_m;
        row_gap = (C - 1) * M_;         // skip the other channels when m wraps to the next n
    }
    __device__ __forceinline__ bool valid() const { return j < end; }
    __device__ __forceinline__ void next() {
        j += step;
        offset += step_offset;
        m += step_m;
        if (m >= M) { m -= M; offset += row_gap; }
    }
};

__device__ __forceinline__ void row_piece(long long per_channel, long long chunk_len, int chunks,
                                          long long* c, long long* begin, long long* end) {
    // Block b reduces piece b % chunks of channel b / chunks.
    *c = blockIdx.x / chunks;
    *begin = (blockIdx.x % chunks) * chunk_len;
    *end = smaller(*begin + chunk_len, per_channel);
}

__device__ __forceinline__ void store_moments(double* __restrict__ part, long long Pt, long long i,
                                              const Moments& acc) {
    part[i] = acc.n;
    part[Pt + i] = acc.mean;
    part[2 * Pt + i] = acc.m2;
}

__device__ __forceinline__ void store_sums(double* __restrict__ part, long long Pt, long long i,
                                           const Sums& acc) {
    part[i] = acc.gy;
    part[Pt + i] = acc.gy_xc;
}

// Partial moments, rows layout. grid = C * chunks blocks; part has Pt = C * chunks entries.
template <typename T, int VEC>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_moments_rows(const T* __restrict__ x, long long N, long long C, long long M,
                long long chunk_len, int chunks, double* __restrict__ part, long long Pt) {
    long long c, begin, end;
    row_piece(N * M, chunk_len, chunks, &c, &begin, &end);
    Moments acc = {0.0, 0.0, 0.0};
    for (RowWalk<VEC> walk(begin, end, c, C, M); walk.valid();) {
        double v[BN_BATCH];
        int count = 0;
#pragma unroll
        for (int u = 0; u < BN_BATCH / VEC; ++u) {
            if (walk.valid()) { Vec<T, VEC>::load(x + walk.offset, v + u * VEC); count += VEC; }
            walk.next();
        }
        merge(acc, batch_moments(v, count));
    }
    acc = block_merge(acc, 1, blockDim.x);
    if (threadIdx.x == 0) store_moments(part, Pt, blockIdx.x, acc);
}

// Partial backward sums, rows layout; same geometry as bn_moments_rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_backward_rows(const T* __restrict__ gy, const T* __restrict__ x, const double* __restrict__ mean,
                 long long N, long long C, long long M, long long chunk_len, int chunks,
                 double* __restrict__ part, long long Pt) {
    long long c, begin, end;
    row_piece(N * M, chunk_len, chunks, &c, &begin, &end);
    const double mu = mean[c];
    Sums acc = {0.0, 0.0};
    for (RowWalk<VEC> walk(begin, end, c, C, M); walk.valid();) {
#pragma unroll
        for (int u = 0; u < BN_BATCH / VEC; ++u) {
            if (walk.valid()) {
                double g[VEC], xv[VEC];
                Vec<T, VEC>::load(gy + walk.offset, g);
                Vec<T, VEC>::load(x + walk.offset, xv);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    acc.gy += g[k];
                    acc.gy_xc += g[k] * (xv[k] - mu);
                }
            }
            walk.next();
        }
    }
    acc = block_merge(acc, 1, blockDim.x);
    if (threadIdx.x == 0) store_sums(part, Pt, blockIdx.x, acc);
}

// ---------------------------------------------------------------------------------------------
// Cols layout: x3 as an (N, K) matrix. grid = (ceil(K / TX), row chunks), block = TX * TY
// threads; block (t, r) reduces columns [t * TX, t * TX + TX) over rows
// [r * rows_per_chunk, ...). part has Pt = chunks * K entries, entry r * K + column.

struct ColTile {
    int tx, ty;
    long long col, first_row, end_row;
    bool active;

    __device__ ColTile(long long N, long long K, int TX, int TY, long long rows_per_chunk) {
        tx = threadIdx.x % TX;
        ty = threadIdx.x / TX;
        col = static_cast<long long>(blockIdx.x) * TX + tx;
        const long long chunk_start = static_cast<long long>(blockIdx.y) * rows_per_chunk;
        first_row = chunk_start + ty;
        end_row = smaller(chunk_start + rows_per_chunk, N);
        active = ty < TY && col < K;
    }
    __device__ __forceinline__ long long part_index(long long K) const {
        return static_cast<long long>(blockIdx.y) * K + col;
    }
};

template <typename T>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_moments_cols(const T* __restrict__ x, long long N, long long K, int TX, int TY,
                long long rows_per_chunk, double* __restrict__ part, long long Pt) {
    const ColTile tile(N, K, TX, TY, rows_per_chunk);
    Moments acc = {0.0, 0.0, 0.0};
    if (tile.active) {
        const long long stride = static_cast<long long>(TY);
        for (long long row = tile.first_row; row < tile.end_row; row += stride * BN_BATCH) {
            double v[BN_BATCH];
            int count = 0;
#pragma unroll
            for (int u = 0; u < BN_BATCH; ++u) {
                const long long r = row + u * stride;
                if (r < tile.end_row) { v[u] = static_cast<double>(x[r * K + tile.col]); ++count; }
            }
            merge(acc, batch_moments(v, count));
        }
    }
    acc = block_merge(acc, TX, TY);
    if (tile.ty == 0 && tile.col < K) store_moments(part, Pt, tile.part_index(K), acc);
}

template <typename T>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_backward_cols(const T* __restrict__ gy, const T* __restrict__ x, const double* __restrict__ mean,
                 long long N, long long K, long long M, int TX, int TY, long long rows_per_chunk,
                 double* __restrict__ part, long long Pt) {
    const ColTile tile(N, K, TX, TY, rows_per_chunk);
    Sums acc = {0.0, 0.0};
    if (tile.active) {
        const double mu = mean[tile.col / M];
        const long long stride = static_cast<long long>(TY);
        for (long long row = tile.first_row; row < tile.end_row; row += stride * BN_BATCH) {
#pragma unroll
            for (int u = 0; u < BN_BATCH; ++u) {
                const long long r = row + u * stride;
                if (r < tile.end_row) {
                    const double g = static_cast<double>(gy[r * K + tile.col]);
                    acc.gy += g;
                    acc.gy_xc += g * (static_cast<double>(x[r * K + tile.col]) - mu);
                }
            }
        }
    }
    acc = block_merge(acc, TX, TY);
    if (tile.ty == 0 && tile.col < K) store_sums(part, Pt, tile.part_index(K), acc);
}

// ---------------------------------------------------------------------------------------------
// Merge kernels: grid = C blocks, one per channel; P parts per channel (layout above).

__device__ __forceinline__ long long part_of_channel(long long p, long long c, long long G,
                                                     long long S) {
    return (p / G) * S + c * G + p % G;
}

__device__ Moments channel_moments(const double* __restrict__ part, long long Pt, long long P,
                                   long long G, long long S) {
    const long long c = blockIdx.x;
    Moments acc = {0.0, 0.0, 0.0};
    for (long long p = threadIdx.x; p < P; p += blockDim.x) {
        const long long i = part_of_channel(p, c, G, S);
        const Moments piece = {part[i], part[Pt + i], part[2 * Pt + i]};
        merge(acc, piece);
    }
    return block_merge(acc, 1, blockDim.x);
}

// mean[c] and biased var[c] of every channel.
extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
bn_merge_moments(const double* __restrict__ part, long long Pt, long long P, long long G, long long S,
                 double* __restrict__ mean, double* __restrict__ var) {
    const Moments total = channel_moments(part, Pt, P, G, S);
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = total.mean;
        var[blockIdx.x] = total.m2 / total.n;
    }
}

// ---------------------------------------------------------------------------------------------
// The per-channel end of a training step, with no host synchronisation: the host reads status[]
// once per training step (the backend's take_deferred_failures), not after every BN call.
// status[slot] = 1 marks a BN call whose statistics are unusable; the host then checks that
// call's statistics itself and raises the error that names them.
// The running buffers are updated all or none, as on the CPU (where a non-finite batch raises
// before any buffer changes): the merge/finish kernel flags the call, and bn_update_running,
// launched after it on the same stream, updates every channel only if the flag is clear.

__device__ __forceinline__ bool bn_finite(double v) {
    return v - v == 0.0;            // false for NaN and +-inf; no math header under NVRTC
}

// inv_std[c] = 1 / sqrt(var + eps) if mean and var are finite; otherwise inv_std[c] is NaN and
// status[slot] is set.
__device__ __forceinline__ void finish_channel(long long c, double mu, double v, double eps,
                                               double* __restrict__ inv_std,
                                               int* __restrict__ status, int slot) {
    if (!(bn_finite(mu) && bn_finite(v))) {
        inv_std[c] = v - v;         // NaN
        status[slot] = 1;           // every writer stores the same value: no atomic needed
        return;
    }
    inv_std[c] = 1.0 / sqrt(v + eps);
}

// As bn_merge_moments, then finish_channel, and scale[c] = gamma * inv_std (gamma when
// center_only != 0): the per-channel part of a training forward in one launch.
extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
bn_merge_train(const double* __restrict__ part, long long Pt, long long P, long long G, long long S,
               const double* __restrict__ gamma, double eps, int center_only,
               double* __restrict__ mean, double* __restrict__ var, double* __restrict__ inv_std,
               double* __restrict__ scale, int* __restrict__ status, int slot) {
    const Moments total = channel_moments(part, Pt, P, G, S);
    if (threadIdx.x == 0) {
        const long long c = blockIdx.x;
        const double v = total.m2 / total.n;
        mean[c] = total.mean;
        var[c] = v;
        finish_channel(c, total.mean, v, eps, inv_std, status, slot);
        scale[c] = center_only ? gamma[c] : gamma[c] * inv_std[c];
    }
}

// finish_channel for given statistics (batch renormalization, a group's merged statistics):
// one thread per channel.
extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
bn_finish_statistics(const double* __restrict__ mean, const double* __restrict__ var, long long C,
                     double eps, double* __restrict__ inv_std, int* __restrict__ status,
                     int slot) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c < C) finish_channel(c, mean[c], var[c], eps, inv_std, status, slot);
}

// Unless status[slot] is set (some channel's statistics were not finite: then no buffer
// changes), the running buffers that `update` names (bit 0: mean, bit 1: var) become
// (1 - momentum) * r + momentum * batch, with the unbiased var * unbias for running_var, in
// double and rounded once. One thread per channel.
template <typename RM, typename RV>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_update_running(const double* __restrict__ mean, const double* __restrict__ var, long long C,
                  double momentum, double unbias, int update, RM* __restrict__ running_mean,
                  RV* __restrict__ running_var, const int* __restrict__ status, int slot) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C || status[slot] != 0) return;
    const double keep = 1.0 - momentum;
    if (update & 1) running_mean[c] = static_cast<RM>(keep * static_cast<double>(running_mean[c])
                                                      + momentum * mean[c]);
    if (update & 2) running_var[c] = static_cast<RV>(keep * static_cast<double>(running_var[c])
                                                     + momentum * var[c] * unbias);
}

// Inference with the running statistics: mean[c] = running_mean, scale[c] = 1 / sqrt(running_var
// + eps) (1 when center_only != 0; running_var unread), a = gamma * scale, b = beta - mean * a.
// status[slot] is set when a statistic is NaN/inf or running_var is negative.
template <typename RM, typename RV>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_inference_coefficients(const double* __restrict__ gamma, const double* __restrict__ beta,
                          const RM* __restrict__ running_mean, const RV* __restrict__ running_var,
                          long long C, double eps, int center_only, double* __restrict__ a,
                          double* __restrict__ b, double* __restrict__ mean,
                          double* __restrict__ scale, int* __restrict__ status, int slot) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double mu = static_cast<double>(running_mean[c]);
    const double v = center_only ? 1.0 : static_cast<double>(running_var[c]);
    if (!(bn_finite(mu) && bn_finite(v) && v >= 0.0)) status[slot] = 1;
    const double s = center_only ? 1.0 : 1.0 / sqrt(v + eps);
    mean[c] = mu;
    scale[c] = s;
    a[c] = gamma[c] * s;
    b[c] = beta[c] - mu * a[c];
}

// sum_gy[c], sum_gy_xc[c] and the gx coefficients k_gy = sum_gy / count,
// k_xc = w * sum_gy_xc / count (both 0 when centered == 0: statistics were constants).
extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
bn_merge_backward(const double* __restrict__ part, long long Pt, long long P, long long G, long long S,
                  const double* __restrict__ w, double count, int centered,
                  double* __restrict__ sum_gy, double* __restrict__ sum_gy_xc,
                  double* __restrict__ k_gy, double* __restrict__ k_xc) {
    const long long c = blockIdx.x;
    Sums acc = {0.0, 0.0};
    for (long long p = threadIdx.x; p < P; p += blockDim.x) {
        const long long i = part_of_channel(p, c, G, S);
        const Sums piece = {part[i], part[Pt + i]};
        merge(acc, piece);
    }
    const Sums total = block_merge(acc, 1, blockDim.x);
    if (threadIdx.x == 0) {
        sum_gy[c] = total.gy;
        sum_gy_xc[c] = total.gy_xc;
        k_gy[c] = centered ? total.gy / count : 0.0;
        k_xc[c] = centered ? w[c] * total.gy_xc / count : 0.0;
    }
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels: a grid-stride walk over the nv = N * C * M / VEC vectors of x3 that
// tracks each vector's column m (in vectors, Mv = M / VEC per row) and channel c without a
// division per step. Consecutive threads touch consecutive vectors: along m for conv layers,
// along c for dense layers.

struct ElemWalk {
    long long v, nv, step;
    int m, c, step_m, step_c, Mv, C;    // 32-bit (the backend checks M, C < 2**30): fewer registers

    __device__ ElemWalk(long long nv_, long long Mv_, long long C_)
        : nv(nv_), Mv(static_cast<int>(Mv_)), C(static_cast<int>(C_)) {
        step = static_cast<long long>(gridDim.x) * blockDim.x;
        v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        const long long row = v / Mv;
        m = static_cast<int>(v - row * Mv);
        c = static_cast<int>(row % C);
        step_m = static_cast<int>(step % Mv);
        step_c = static_cast<int>((step / Mv) % C);
    }
    __device__ __forceinline__ bool valid() const { return v < nv; }
    __device__ __forceinline__ void next() {
        v += step;
        m += step_m;
        c += step_c;
        if (m >= Mv) { m -= Mv; ++c; }
        if (c >= C) c -= C;
    }
};

// y = a[c] * (x - shift[c]) + b[c] when CENTRED, else y = a[c] * x + b[c] (shift unread).
// At most 40 registers (6 blocks of 256 threads per SM keep enough loads in flight). A cap of 32
// (8 blocks) made CUDA 12.9's ptxas spill 76 bytes in bn_affine<float,4,false> for sm_90 with
// -ftz=true; test_cupy_build.py fails on any spill.
template <typename T, int VEC, bool CENTRED>
__global__ void __launch_bounds__(BN_MAX_THREADS, 6)
bn_affine(const T* __restrict__ x, long long nv, long long Mv, long long C,
          const double* __restrict__ a, const double* __restrict__ shift,
          const double* __restrict__ b, T* __restrict__ y) {
    for (ElemWalk walk(nv, Mv, C); walk.valid(); walk.next()) {
        double v[VEC];
        Vec<T, VEC>::load(x + walk.v * VEC, v);
        const double ac = a[walk.c];
        const double bc = b[walk.c];
        const double sc = CENTRED ? shift[walk.c] : 0.0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = CENTRED ? ac * (v[k] - sc) + bc : ac * v[k] + bc;
        Vec<T, VEC>::store(y + walk.v * VEC, v);
    }
}

// gx = scale[c] * (gy - k_gy[c] - k_xc[c] * (x - mean[c])).
template <typename T, int VEC>
__global__ void __launch_bounds__(BN_MAX_THREADS)
bn_grad_input(const T* __restrict__ gy, const T* __restrict__ x, long long nv, long long Mv,
              long long C, const double* __restrict__ scale, const double* __restrict__ mean,
              const double* __restrict__ k_gy, const double* __restrict__ k_xc,
              T* __restrict__ gx) {
    for (ElemWalk walk(nv, Mv, C); walk.valid(); walk.next()) {
        double g[VEC], xv[VEC];
        Vec<T, VEC>::load(gy + walk.v * VEC, g);
        Vec<T, VEC>::load(x + walk.v * VEC, xv);
        const int c = walk.c;
        const double sc = scale[c], mu = mean[c], kg = k_gy[c], kx = k_xc[c];
#pragma unroll
        for (int k = 0; k < VEC; ++k) g[k] = sc * (g[k] - kg - kx * (xv[k] - mu));
        Vec<T, VEC>::store(gx + walk.v * VEC, g);
    }
}
