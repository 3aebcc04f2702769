// Augmentation kernel of the arraybn CuPy backend: the affine warp and the random crop of a
// batch of images in one element-wise pass, one thread per output pixel (all channels).
//
// Compiled by NVRTC with exactly the options of arraybn/backends/cuda_build.py and loaded with
// cupy.RawModule(path=...); the instantiations are the NAME_EXPRESSIONS of
// arraybn/backends/cupy_augment.py, which also checks every argument before a launch.
// No #include: NVRTC compiles this file on its own.
//
// images and out are (N, C, H, W), C-contiguous. maps is (N, 6) doubles per image: the inverse
// map a00 a01 a10 a11 and the offset; shift is (N, 2) ints, the crop window's shift. Output
// pixel (i, j) of image n is pixel (row, col) = (i, j) + shift[n] of the warped image, or fill
// when (row, col) lies outside the frame (the window over the crop's padding); the warped
// pixel is the bilinear blend of the four pixels around its source point
//     src = A (p - centre) + (centre + offset),   p = (row, col), centre = ((H-1)/2, (W-1)/2),
// a tap outside the image reading fill.
//
// The values are those of the NumPy reference (arraybn/data/augment.py: warp_affine, then
// crop_at) bit for bit: the same float64 operations in the same order, every product and sum
// rounded on its own (the _rn intrinsics are never contracted into an FMA, although the module
// is compiled with -fmad=true), the fractional parts rounded to T, and the four weights and
// the blend (((0 + w00 v00) + w01 v01) + w10 v10) + w11 v11 computed in T.

#define AUG_MAX_THREADS 256

__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }

__device__ __forceinline__ double clamped(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);    // far outside: any tap there reads fill
}

template <typename T>
__device__ __forceinline__ T tap(const T* image, long long r, long long c, int height, int width,
                                 T fill) {
    return (r >= 0 && r < height && c >= 0 && c < width) ? image[r * width + c] : fill;
}

template <typename T>
__global__ void __launch_bounds__(AUG_MAX_THREADS) augment_affine_crop(
        const T* __restrict__ images, const double* __restrict__ maps,
        const int* __restrict__ shift, double fill, long long pixels, int channels, int height,
        int width, T* __restrict__ out) {
    const long long plane = (long long)height * width;
    const T fill_t = (T)fill;
    const T one = (T)1, zero = (T)0;
    const double centre_r = (height - 1) / 2.0, centre_c = (width - 1) / 2.0;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)gridDim.x * blockDim.x) {
        const long long n = p / plane;
        const long long within = p - n * plane;
        const int i = (int)(within / width), j = (int)(within - (long long)i * width);
        const long long row = i + (long long)shift[2 * n], col = j + (long long)shift[2 * n + 1];
        T* target = out + n * channels * plane + within;
        if (row < 0 || row >= height || col < 0 || col >= width) {
            for (int c = 0; c < channels; ++c) target[c * plane] = fill_t;
            continue;
        }
        const double* m = maps + 6 * n;
        const double grid_r = (double)row - centre_r, grid_c = (double)col - centre_c;
        const double src_r = add_rn(add_rn(mul_rn(m[0], grid_r), mul_rn(m[1], grid_c)),
                                    add_rn(centre_r, m[4]));
        const double src_c = add_rn(add_rn(mul_rn(m[2], grid_r), mul_rn(m[3], grid_c)),
                                    add_rn(centre_c, m[5]));
        const double top = floor(src_r), left = floor(src_c);
        const T frac_r = (T)(src_r - top), frac_c = (T)(src_c - left);
        const long long r0 = (long long)clamped(top, -2.0, (double)height);
        const long long c0 = (long long)clamped(left, -2.0, (double)width);
        const T w00 = mul_rn(one - frac_r, one - frac_c), w01 = mul_rn(one - frac_r, frac_c);
        const T w10 = mul_rn(frac_r, one - frac_c), w11 = mul_rn(frac_r, frac_c);
        const T* image = images + n * channels * plane;
        for (int c = 0; c < channels; ++c, image += plane) {
            T acc = add_rn(zero, mul_rn(w00, tap(image, r0, c0, height, width, fill_t)));
            acc = add_rn(acc, mul_rn(w01, tap(image, r0, c0 + 1, height, width, fill_t)));
            acc = add_rn(acc, mul_rn(w10, tap(image, r0 + 1, c0, height, width, fill_t)));
            target[c * plane] = add_rn(acc, mul_rn(w11, tap(image, r0 + 1, c0 + 1, height, width,
                                                            fill_t)));
        }
    }
}
