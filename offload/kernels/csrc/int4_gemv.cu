// One token times a plain-layout int4 weight on CUDA: y[n] = sum_k x[k] * (q[n,k] - zero[n,g]) * scale[n,g].
//
// The weight is offload/kernels/int4_format.py's Int4Weight as it is: packed uint8 [N, K/2] (input 2j in the
// high nibble of byte j, 2j + 1 in the low one), scales and zeros [N, K/group] in x's dtype. A block holds the
// whole of x, one 32-input chunk per thread (one 16-byte load of weights per row), and reduces ROWS rows.
//
// A nibble becomes a float without shifting it down: OR-ing 0x4B000000 (2^23) onto a word masked to one nibble
// in place gives 2^23 + q * 16^p exactly, and subtracting 2^23 leaves q * 16^p; the thread's x values were
// multiplied by 16^-p beforehand (exact: a power of two), so each nibble costs a LOP3, an FADD and an FFMA.
// Bits 20..31 do not fit the 23-bit significand, so the top three nibbles are taken from the word shifted
// right by 12. Each chunk sits inside one group (groups are multiples of 32 inputs), so the zero folds out:
// sum (q - z) s x = s (sum q x - z sum x), with sum x of the chunk computed once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr float TWO_23 = 8388608.0f;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ float bits_to_float(uint16_t bits);
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
template <> __device__ __forceinline__ float bits_to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }

// q * 16^p as a float for the nibble masked in place in `word`.
__device__ __forceinline__ float nibble(uint32_t word, uint32_t mask) {
  return __uint_as_float((word & mask) | 0x4B000000u) - TWO_23;
}

// The eight nibbles of one little-endian word, inputs 0..7 of its 8: byte b holds input 2b high, 2b + 1 low,
// so the nibble at bits 4i is input i ^ 1. Inputs scaled as SCALE[] says (16^-p of where each nibble sits).
__device__ __forceinline__ float word_dot(uint32_t w, const float* xs) {
  const uint32_t h = w >> 12;  // nibbles 5..7 (inputs 4, 7, 6) now at bits 8..19
  float acc = nibble(w, 0x0000000Fu) * xs[1];
  acc = fmaf(nibble(w, 0x000000F0u), xs[0], acc);
  acc = fmaf(nibble(w, 0x00000F00u), xs[3], acc);
  acc = fmaf(nibble(w, 0x0000F000u), xs[2], acc);
  acc = fmaf(nibble(w, 0x000F0000u), xs[5], acc);
  acc = fmaf(nibble(h, 0x00000F00u), xs[4], acc);
  acc = fmaf(nibble(h, 0x0000F000u), xs[7], acc);
  acc = fmaf(nibble(h, 0x000F0000u), xs[6], acc);
  return acc;
}

// 16^-p for inputs 0..7 of a word: where word_dot finds each one's nibble.
__device__ __constant__ float SCALE[8] = {1.0f / 16, 1.0f, 1.0f / 4096, 1.0f / 256,
                                          1.0f / 256, 1.0f / 65536, 1.0f / 65536, 1.0f / 4096};

template <typename T, int ROWS>
__global__ void int4_gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ packed,
                                 const T* __restrict__ scales, const T* __restrict__ zeros, T* __restrict__ y,
                                 int n, int chunks, int groups, int chunks_per_group) {
  __shared__ float partial[32][ROWS];  // [warp][row]
  const int chunk = threadIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * ROWS;
  const bool active = chunk < chunks;

  float xs[32];
  float x_sum = 0.0f;
  uint4 words[ROWS];
  if (active) {
    union {
      uint4 vectors[4];
      uint16_t bits[32];
    } xc;  // the chunk's 32 inputs in four 16-byte loads
#pragma unroll
    for (int j = 0; j < 4; ++j) xc.vectors[j] = __ldg(reinterpret_cast<const uint4*>(x) + 4 * chunk + j);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float v = bits_to_float<T>(xc.bits[i]);
      x_sum += v;
      xs[i] = v * SCALE[i % 8];
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, n - 1);  // rows past n repeat the last one; never stored
      words[r] = __ldg(packed + (size_t)row * chunks + chunk);
    }
  }
  const int group = chunk / chunks_per_group;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = 0.0f;
    if (active) {
      const int row = min(row0 + r, n - 1);
      const float s = to_float(scales[(size_t)row * groups + group]);
      const float z = to_float(zeros[(size_t)row * groups + group]);
      float q_dot = word_dot(words[r].x, xs);
      q_dot += word_dot(words[r].y, xs + 8);
      q_dot += word_dot(words[r].z, xs + 16);
      q_dot += word_dot(words[r].w, xs + 24);
      v = s * (q_dot - z * x_sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if (lane == 0) partial[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS && row0 + threadIdx.x < n) {
    float sum = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) sum += partial[w][threadIdx.x];
    y[row0 + threadIdx.x] = from_float<T>(sum);
  }
}

template <typename T, int ROWS>
int launch(const void* x, const void* packed, const void* scales, const void* zeros, void* y, int n, int k,
           int groups, cudaStream_t stream) {
  const int chunks = k / 32;
  const int threads = (chunks + 31) / 32 * 32;
  const int blocks = (n + ROWS - 1) / ROWS;
  int4_gemv_kernel<T, ROWS><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(packed), static_cast<const T*>(scales),
      static_cast<const T*>(zeros), static_cast<T*>(y), n, chunks, groups, chunks / groups);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_rows(int rows, const void* x, const void* packed, const void* scales, const void* zeros, void* y, int n,
                int k, int groups, cudaStream_t s) {
  switch (rows) {
    case 2: return launch<T, 2>(x, packed, scales, zeros, y, n, k, groups, s);
    case 4: return launch<T, 4>(x, packed, scales, zeros, y, n, k, groups, s);
    case 16: return launch<T, 16>(x, packed, scales, zeros, y, n, k, groups, s);
    default: return launch<T, 8>(x, packed, scales, zeros, y, n, k, groups, s);
  }
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. rows: rows a block reduces (2, 4, 8 or 16). Returns a cudaError_t (0: launched).
// Needs k % 32 == 0, k <= 32768, (k / groups) % 32 == 0, x and packed 16-byte aligned; the caller checks.
extern "C" int int4_gemv(int dtype, int rows, const void* x, const void* packed, const void* scales,
                         const void* zeros, void* y, int n, int k, int groups, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == 0 ? launch_rows<__nv_bfloat16>(rows, x, packed, scales, zeros, y, n, k, groups, s)
                    : launch_rows<__half>(rows, x, packed, scales, zeros, y, n, k, groups, s);
}
