// CUDA kernels of vt-model (feature `cuda`): batch norm (f32), the residual add + ReLU and
// the stem's max-pool (f32, bf16 and f16), each forward and backward, evaluation-mode batch
// norm, for NCHW-contiguous tensors, and the optimisers' update of a parameter (f32). They
// compute what the CPU kernels beside them compute (same formulas and orders of operations;
// built with --fmad=false so that `a * b + c` rounds twice, as on the CPU) in a few passes
// over memory instead of candle's chains of broadcast operations and their autograd.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#define THREADS 256

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// y = x * scale[c] + shift[c], then ReLU when `relu`. One block per (image, channel) plane.
template <typename T>
__device__ void channel_affine(const T *x, const T *scale, const T *shift, T *y,
                               uint32_t channels, uint32_t plane, int relu) {
    const size_t base = (size_t)blockIdx.x * plane;
    const uint32_t c = blockIdx.x % channels;
    const float s = to_float(scale[c]), t = to_float(shift[c]);
    for (uint32_t i = threadIdx.x; i < plane; i += blockDim.x) {
        float v = to_float(x[base + i]) * s + t;
        y[base + i] = from_float<T>(relu ? fmaxf(v, 0.0f) : v);
    }
}

#define CHANNEL_AFFINE(NAME, T)                                                               \
    extern "C" __global__ void NAME(const T *x, const T *scale, const T *shift, T *y,         \
                                    uint32_t channels, uint32_t plane, int relu) {            \
        channel_affine<T>(x, scale, shift, y, channels, plane, relu);                         \
    }
CHANNEL_AFFINE(channel_affine_f32, float)
CHANNEL_AFFINE(channel_affine_bf16, __nv_bfloat16)
CHANNEL_AFFINE(channel_affine_f16, __half)

// Welford's running (count, mean, M2), merged with Chan et al.'s formula.
struct Moments {
    double count, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    double count = a.count + b.count;
    if (count == 0.0) return a;
    double delta = b.mean - a.mean;
    return {count, a.mean + delta * b.count / count,
            a.m2 + b.m2 + delta * delta * a.count * b.count / count};
}

// The sum over a block of each thread's value; the result is valid in thread 0.
template <typename V, typename F>
__device__ V block_reduce(V value, V *shared, F combine) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (uint32_t half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + half]);
        __syncthreads();
    }
    return shared[0];
}

// Block (c, s) of a (channels, splits) grid: the moments of channel c over images
// [s * n / splits, (s + 1) * n / splits), into partial[c * splits + s].
extern "C" __global__ void bn_moments_partial(const float *x, Moments *partial, uint32_t n,
                                              uint32_t channels, uint32_t plane) {
    __shared__ Moments shared[THREADS];
    const uint32_t c = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
    const uint32_t first = (uint32_t)((uint64_t)s * n / splits);
    const uint32_t last = (uint32_t)((uint64_t)(s + 1) * n / splits);
    float count = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (uint32_t img = first; img < last; ++img) {
        const float *p = x + ((size_t)img * channels + c) * plane;
        // Unrolled so that several loads are in flight ahead of the dependent updates.
#pragma unroll 4
        for (uint32_t i = threadIdx.x; i < plane; i += blockDim.x) {
            float v = p[i];
            count += 1.0f;
            float delta = v - mean;
            mean += delta / count;
            m2 += delta * (v - mean);
        }
    }
    Moments total = block_reduce(Moments{count, mean, m2}, shared,
                                 [](Moments a, Moments b) { return merge(a, b); });
    if (threadIdx.x == 0) partial[c * splits + s] = total;
}

// moments = (2, C): each channel's mean and biased variance from its `splits` partials.
extern "C" __global__ void bn_moments_finish(const Moments *partial, float *moments,
                                             uint32_t channels, uint32_t splits) {
    const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    Moments total = {0.0, 0.0, 0.0};
    for (uint32_t s = 0; s < splits; ++s) total = merge(total, partial[c * splits + s]);
    moments[c] = (float)total.mean;
    moments[channels + c] = (float)(total.count > 0.0 ? total.m2 / total.count : 0.0);
}

// params = (3, C): scale = gamma * inv_std, shift = beta - mean * scale and inv_std, from
// moments (2, C: mean, variance) and affine (2, C: gamma, beta), as the CPU's `channels`.
extern "C" __global__ void bn_params(const float *moments, const float *affine, float *params,
                                     uint32_t channels, double eps) {
    const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    float mean = moments[c], var = moments[channels + c];
    float gamma = affine[c], beta = affine[channels + c];
    float inv_std = (float)(1.0 / sqrt((double)var + eps));
    float scale = gamma * inv_std;
    params[c] = scale;
    params[channels + c] = beta - mean * scale;
    params[2 * channels + c] = inv_std;
}

// The incoming gradient, or 0 where the fused ReLU clipped the output.
__device__ __forceinline__ float masked_grad(float v, float g, float scale, float shift, int relu) {
    return relu && v * scale + shift <= 0.0f ? 0.0f : g;
}

struct GradSums {
    double g, gx;
};

// Block (c, s): the sums of g and of g * x_hat over channel c of images
// [s * n / splits, (s + 1) * n / splits), into partial[c * splits + s].
extern "C" __global__ void bn_grad_partial(const float *x, const float *dy, const float *moments,
                                           const float *params, GradSums *partial, uint32_t n,
                                           uint32_t channels, uint32_t plane, int relu) {
    __shared__ GradSums shared[THREADS];
    const uint32_t c = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
    const uint32_t first = (uint32_t)((uint64_t)s * n / splits);
    const uint32_t last = (uint32_t)((uint64_t)(s + 1) * n / splits);
    const float mean = moments[c], scale = params[c], shift = params[channels + c];
    const float inv_std = params[2 * channels + c];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (uint32_t img = first; img < last; ++img) {
        const size_t base = ((size_t)img * channels + c) * plane;
        for (uint32_t i = threadIdx.x; i < plane; i += blockDim.x) {
            float v = x[base + i];
            float g = masked_grad(v, dy[base + i], scale, shift, relu);
            sum_g += g;
            sum_gx += g * ((v - mean) * inv_std);
        }
    }
    GradSums total = block_reduce(GradSums{sum_g, sum_gx}, shared,
                                  [](GradSums a, GradSums b) { return GradSums{a.g + b.g, a.gx + b.gx}; });
    if (threadIdx.x == 0) partial[c * splits + s] = total;
}

// grad_affine = (2, C): dL/dgamma = sum(g * x_hat) and dL/dbeta = sum(g) per channel.
extern "C" __global__ void bn_grad_finish(const GradSums *partial, float *grad_affine,
                                          uint32_t channels, uint32_t splits) {
    const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    double g = 0.0, gx = 0.0;
    for (uint32_t s = 0; s < splits; ++s) {
        g += partial[c * splits + s].g;
        gx += partial[c * splits + s].gx;
    }
    grad_affine[c] = (float)gx;
    grad_affine[channels + c] = (float)g;
}

// dL/dx = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), one block per plane.
extern "C" __global__ void bn_grad_input(const float *x, const float *dy, const float *moments,
                                         const float *affine, const float *params, const float *grad_affine, float *dx,
                                         uint32_t channels, uint32_t plane, float count, int relu) {
    const size_t base = (size_t)blockIdx.x * plane;
    const uint32_t c = blockIdx.x % channels;
    const float mean = moments[c], gamma = affine[c];
    const float scale = params[c], shift = params[channels + c], inv_std = params[2 * channels + c];
    const float factor = gamma * inv_std;
    const float mean_gx = grad_affine[c] / count, mean_g = grad_affine[channels + c] / count;
    for (uint32_t i = threadIdx.x; i < plane; i += blockDim.x) {
        float v = x[base + i];
        float x_hat = (v - mean) * inv_std;
        dx[base + i] = factor * (masked_grad(v, dy[base + i], scale, shift, relu) - mean_g - x_hat * mean_gx);
    }
}

// Element-wise kernels in f32, bf16 and f16 (computing in f32).
#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

#define ADD_RELU(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *a, const T *b, T *y, size_t n) {                 \
        GRID_STRIDE(i, n) y[i] = from_float<T>(fmaxf(to_float(a[i]) + to_float(b[i]), 0.0f)); \
    }
ADD_RELU(add_relu_f32, float)
ADD_RELU(add_relu_bf16, __nv_bfloat16)
ADD_RELU(add_relu_f16, __half)

#define RELU_GRAD(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const T *y, const T *g, T *dx, size_t n) {                \
        GRID_STRIDE(i, n) dx[i] = to_float(y[i]) > 0.0f ? g[i] : from_float<T>(0.0f);         \
    }
RELU_GRAD(relu_grad_f32, float)
RELU_GRAD(relu_grad_bf16, __nv_bfloat16)
RELU_GRAD(relu_grad_f16, __half)

// Max-pool 3x3, stride 2, padding 1 over (planes, h, w), as max_pool.rs: NaN propagates, and
// the gradient goes to the window's first maximum in row-major order (its last NaN for a
// NaN window).
__device__ __forceinline__ float max_nan(float a, float b) { return a > b || isnan(a) ? a : b; }

template <typename T>
__device__ __forceinline__ float pool_window(const T *p, uint32_t h, uint32_t w, uint32_t oy,
                                             uint32_t ox) {
    // Rows in the CPU kernel's order: the centre row, then the one above, then below; in each
    // row the centre column, then left, then right.
    const uint32_t cy = oy * 2, cx = ox * 2;
    auto row_max = [&](uint32_t y) {
        const T *r = p + (size_t)y * w;
        float m = to_float(r[cx]);
        if (cx >= 1) m = max_nan(m, to_float(r[cx - 1]));
        if (cx + 1 < w) m = max_nan(m, to_float(r[cx + 1]));
        return m;
    };
    float m = row_max(cy);
    if (cy >= 1) m = max_nan(m, row_max(cy - 1));
    if (cy + 1 < h) m = max_nan(m, row_max(cy + 1));
    return m;
}

// One block per (image, channel) plane: 32-bit index arithmetic (64-bit division cost the
// backward pass 7x its memory time).
#define MAX_POOL(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *x, T *y, uint32_t h, uint32_t w, uint32_t out_h, \
                                    uint32_t out_w) {                                         \
        const T *p = x + (size_t)blockIdx.x * h * w;                                          \
        T *q = y + (size_t)blockIdx.x * out_h * out_w;                                        \
        for (uint32_t o = threadIdx.x; o < out_h * out_w; o += blockDim.x)                    \
            q[o] = from_float<T>(pool_window(p, h, w, o / out_w, o % out_w));                 \
    }
MAX_POOL(max_pool_f32, float)
MAX_POOL(max_pool_bf16, __nv_bfloat16)
MAX_POOL(max_pool_f16, __half)

// The input index (within its plane) that output (oy, ox) took its maximum `max` from.
template <typename T>
__device__ __forceinline__ uint32_t pool_argmax(const T *p, uint32_t h, uint32_t w, uint32_t oy,
                                                uint32_t ox, float max) {
    const uint32_t y0 = oy * 2 >= 1 ? oy * 2 - 1 : 0, y1 = min(oy * 2 + 2, h);
    const uint32_t x0 = ox * 2 >= 1 ? ox * 2 - 1 : 0, x1 = min(ox * 2 + 2, w);
    uint32_t best = y0 * w + x0;
    if (isnan(max)) {
        for (uint32_t iy = y0; iy < y1; ++iy)
            for (uint32_t ix = x0; ix < x1; ++ix)
                if (isnan(to_float(p[iy * w + ix]))) best = iy * w + ix;
        return best;
    }
    for (uint32_t iy = y0; iy < y1; ++iy)
        for (uint32_t ix = x0; ix < x1; ++ix)
            if (to_float(p[iy * w + ix]) == max) return iy * w + ix;
    return best;
}

// The backward pass in two launches. First each output's argmax, found once, as a code for
// its place in the window: (iy + 1 - 2 * oy) * 3 + (ix + 1 - 2 * ox), 0 to 8. Then one thread
// per input element sums, in row-major output order, the gradients of the outputs whose code
// points at it (a gather, so no atomics and the CPU's summation order). Searching the window
// from each input that equals its maximum instead made most warps run the search for a few
// threads: 1.9-2.2 ms for the stem of vt-resnet18 at 224 px, batch 128 (H100), about 7x its
// memory traffic.
template <typename T>
__device__ void max_pool_argmax(const T *x, const T *y, uint8_t *code, uint32_t h, uint32_t w,
                                uint32_t out_h, uint32_t out_w) {
    const T *p = x + (size_t)blockIdx.x * h * w;
    const size_t out_base = (size_t)blockIdx.x * out_h * out_w;
    for (uint32_t o = threadIdx.x; o < out_h * out_w; o += blockDim.x) {
        const uint32_t oy = o / out_w, ox = o % out_w;
        const uint32_t at = pool_argmax(p, h, w, oy, ox, to_float(y[out_base + o]));
        code[out_base + o] = (uint8_t)((at / w + 1 - 2 * oy) * 3 + (at % w + 1 - 2 * ox));
    }
}

template <typename T>
__device__ void max_pool_grad(const uint8_t *code, const T *dy, T *dx, uint32_t h, uint32_t w,
                              uint32_t out_h, uint32_t out_w) {
    const size_t in_base = (size_t)blockIdx.x * h * w, out_base = (size_t)blockIdx.x * out_h * out_w;
    for (uint32_t at = threadIdx.x; at < h * w; at += blockDim.x) {
        const uint32_t iy = at / w, ix = at % w;
        // Outputs whose 3x3 window (rows 2 * oy - 1 ..= 2 * oy + 1) holds row iy.
        const uint32_t oy0 = iy / 2, oy1 = min((iy + 1) / 2, out_h - 1);
        const uint32_t ox0 = ix / 2, ox1 = min((ix + 1) / 2, out_w - 1);
        float sum = 0.0f;
        for (uint32_t oy = oy0; oy <= oy1; ++oy)
            for (uint32_t ox = ox0; ox <= ox1; ++ox) {
                const size_t o = out_base + oy * out_w + ox;
                if (code[o] == (iy + 1 - 2 * oy) * 3 + (ix + 1 - 2 * ox)) sum += to_float(dy[o]);
            }
        dx[in_base + at] = from_float<T>(sum);
    }
}

#define MAX_POOL_GRAD(ARGMAX, GRAD, T)                                                        \
    extern "C" __global__ void ARGMAX(const T *x, const T *y, uint8_t *code, uint32_t h,      \
                                      uint32_t w, uint32_t out_h, uint32_t out_w) {           \
        max_pool_argmax<T>(x, y, code, h, w, out_h, out_w);                                   \
    }                                                                                         \
    extern "C" __global__ void GRAD(const uint8_t *code, const T *dy, T *dx, uint32_t h,      \
                                    uint32_t w, uint32_t out_h, uint32_t out_w) {             \
        max_pool_grad<T>(code, dy, dx, h, w, out_h, out_w);                                   \
    }
MAX_POOL_GRAD(max_pool_argmax_f32, max_pool_grad_f32, float)
MAX_POOL_GRAD(max_pool_argmax_bf16, max_pool_grad_bf16, __nv_bfloat16)
MAX_POOL_GRAD(max_pool_argmax_f16, max_pool_grad_f16, __half)

// AdamW's step for one parameter tensor, as optimizer.rs's CPU loop (same operations in the
// same order). `fresh`: the moments are zeros (the first step), `m` and `v` are not read.
extern "C" __global__ void adamw_f32(const float *theta, const float *grad, const float *m,
                                     const float *v, float *theta_out, float *m_out,
                                     float *v_out, uint32_t n, int fresh, float decay,
                                     float beta1, float beta2, float keep1, float keep2,
                                     float inv_bias2_sqrt, float eps, float step) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float mi = (fresh ? 0.0f : m[i]) * beta1 + g * keep1;
        const float vi = (fresh ? 0.0f : v[i]) * beta2 + g * g * keep2;
        theta_out[i] = theta[i] * decay - mi / (sqrtf(vi) * inv_bias2_sqrt + eps) * step;
        m_out[i] = mi;
        v_out[i] = vi;
    }
}

// SGD's step with momentum for one parameter tensor, as optimizer.rs's CPU loop. `fresh`: the
// first step, whose buffer is the step's gradient (`buf` is not read); `weight_decay` 0 adds
// nothing, as the CPU loop skips it.
extern "C" __global__ void sgd_f32(const float *theta, const float *grad, const float *buf,
                                   float *theta_out, float *buf_out, uint32_t n, int fresh,
                                   float weight_decay, float momentum, int nesterov, float lr) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float t = theta[i];
        const float d = weight_decay != 0.0f ? grad[i] + t * weight_decay : grad[i];
        const float b = fresh ? d : buf[i] * momentum + d;
        const float update = nesterov ? d + b * momentum : b;
        theta_out[i] = t - update * lr;
        buf_out[i] = b;
    }
}
