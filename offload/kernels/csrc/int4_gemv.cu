// A few tokens times a plain-layout int4 weight on CUDA: y[t, n] = sum_k x[t, k] * (q[n,k] - zero[n,g]) * scale[n,g].
//
// The weight is offload/kernels/int4_format.py's Int4Weight as it is: packed uint8 [N, K/2] (input 2j in the
// high nibble of byte j, 2j + 1 in the low one), scales and zeros [N, K/group] in x's dtype.
//
// Integer dot products, as llama.cpp's quantized GEMVs do: each block first rounds its x to int8 per 32-input
// chunk (x ~ d * xi, d = max|x| / 127) into shared memory; a weight word's eight nibbles then meet their
// inputs in two __dp4a (four products each) after one mask and one shift, about 0.6 instructions a weight
// where float conversion needs three. Each chunk sits inside one group (groups are multiples of 32 inputs),
// so the zero folds out: sum (q - z) s x = s (d sum q xi - z d sum xi).
//
// A warp owns ROWS_PER_WARP rows whole; lane l takes chunks l, l + 32, ...; loads of BATCH chunks a row are
// issued together, the first batch before x is staged. Every token's arithmetic is the same whatever the
// token count, the launch shape or the stream (explicitly rounded float operations, a fixed lane order and
// reduction tree): a pass of several tokens gives each token bit for bit what a one-token step gives it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int MAX_TOKENS = 8;

__device__ __forceinline__ float bits_to_float_bf16(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ float bits_to_float(uint16_t bits);
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint16_t bits) {
  return bits_to_float_bf16(bits);
}
template <> __device__ __forceinline__ float bits_to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }

// One token's x for one 32-input chunk, as the dot products want it: for weight word j (inputs 8j..8j+7),
// `even` holds int8 inputs 8j, 8j+2, 8j+4, 8j+6 in bytes 0..3 (the high nibbles of the word's bytes) and
// `odd` inputs 8j+1, ..., 8j+7 (the low nibbles). words[0] = even0, odd0, even1, odd1; words[1] the same
// for words 2 and 3.
struct ChunkX {
  uint4 words[2];
};

// Smem per token: chunks ChunkX, then chunks floats d, then chunks floats d * sum xi.
constexpr int SMEM_BYTES_PER_CHUNK = sizeof(ChunkX) + 2 * sizeof(float);

template <typename T>
__device__ void quantize_chunk(const T* __restrict__ x, ChunkX* out, float* d_out, float* dsum_out) {
  union {
    uint4 vectors[4];
    uint16_t bits[32];
  } raw;
#pragma unroll
  for (int j = 0; j < 4; ++j) raw.vectors[j] = __ldg(reinterpret_cast<const uint4*>(x) + j);
  float v[32];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    v[i] = bits_to_float<T>(raw.bits[i]);
    amax = fmaxf(amax, fabsf(v[i]));
  }
  const float inv = amax > 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
  uint32_t packed[8];
  int sum = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t even = 0, odd = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int e = max(-127, min(127, __float2int_rn(__fmul_rn(v[8 * w + 2 * b], inv))));
      const int o = max(-127, min(127, __float2int_rn(__fmul_rn(v[8 * w + 2 * b + 1], inv))));
      sum += e + o;
      even |= (uint32_t(e) & 0xFFu) << (8 * b);
      odd |= (uint32_t(o) & 0xFFu) << (8 * b);
    }
    packed[2 * w] = even;
    packed[2 * w + 1] = odd;
  }
  out->words[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  out->words[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  const float d = __fdiv_rn(amax, 127.0f);
  *d_out = d;
  *dsum_out = __fmul_rn(d, float(sum));
}

// sum over the chunk's 32 inputs of q * xi, for one row's 16 bytes of weights.
__device__ __forceinline__ int chunk_dot(const uint4& w, const ChunkX& xc) {
  int acc = 0;
  acc = __dp4a(int((w.x >> 4) & 0x0F0F0F0Fu), int(xc.words[0].x), acc);
  acc = __dp4a(int(w.x & 0x0F0F0F0Fu), int(xc.words[0].y), acc);
  acc = __dp4a(int((w.y >> 4) & 0x0F0F0F0Fu), int(xc.words[0].z), acc);
  acc = __dp4a(int(w.y & 0x0F0F0F0Fu), int(xc.words[0].w), acc);
  acc = __dp4a(int((w.z >> 4) & 0x0F0F0F0Fu), int(xc.words[1].x), acc);
  acc = __dp4a(int(w.z & 0x0F0F0F0Fu), int(xc.words[1].y), acc);
  acc = __dp4a(int((w.w >> 4) & 0x0F0F0F0Fu), int(xc.words[1].z), acc);
  acc = __dp4a(int(w.w & 0x0F0F0F0Fu), int(xc.words[1].w), acc);
  return acc;
}

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int TOKENS>
__global__ void __launch_bounds__(WARPS * 32)
    int4_gemv_kernel(const T* __restrict__ x, int x_stride, const uint4* __restrict__ packed,
                     const T* __restrict__ scales, const T* __restrict__ zeros, T* __restrict__ y, int y_stride,
                     int tokens, int n, int chunks, int groups, int chunks_per_group) {
  extern __shared__ uint4 smem[];
  ChunkX* xq = reinterpret_cast<ChunkX*>(smem);                   // [tokens][chunks]
  float* xd = reinterpret_cast<float*>(xq + tokens * chunks);     // [tokens][chunks]
  float* xdsum = xd + tokens * chunks;                            // [tokens][chunks]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * WARPS + warp) * ROWS_PER_WARP;

  uint4 w[BATCH][ROWS_PER_WARP];
  auto load_batch = [&](int first) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int c = first + 32 * b;
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int row = min(row0 + r, n - 1);  // rows past n repeat the last one; never stored
        w[b][r] = c < chunks ? __ldg(packed + size_t(row) * chunks + c) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  load_batch(lane);  // in flight while x is staged

  for (int i = threadIdx.x; i < tokens * chunks; i += WARPS * 32) {
    const int t = i / chunks, c = i % chunks;
    quantize_chunk<T>(x + size_t(t) * x_stride + 32 * c, &xq[i], &xd[i], &xdsum[i]);
  }
  __syncthreads();

  float acc[TOKENS][ROWS_PER_WARP];
#pragma unroll
  for (int t = 0; t < TOKENS; ++t)
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) acc[t][r] = 0.0f;

  auto use_batch = [&](int first) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int c = first + 32 * b;
      if (c >= chunks) break;
      const int group = c / chunks_per_group;
      float s[ROWS_PER_WARP], z[ROWS_PER_WARP];
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const size_t at = size_t(min(row0 + r, n - 1)) * groups + group;
        s[r] = to_float(scales[at]);
        z[r] = to_float(zeros[at]);
      }
#pragma unroll
      for (int t = 0; t < TOKENS; ++t) {
        if (t >= tokens) break;
        const int at = t * chunks + c;
        const ChunkX xc = xq[at];
        const float d = xd[at], dsum = xdsum[at];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
          const float inner = __fmaf_rn(d, float(chunk_dot(w[b][r], xc)), -__fmul_rn(z[r], dsum));
          acc[t][r] = __fmaf_rn(s[r], inner, acc[t][r]);
        }
      }
    }
  };
  for (int first = lane; first - lane < chunks; first += 32 * BATCH) {
    if (first != lane) load_batch(first);
    use_batch(first);
  }

#pragma unroll
  for (int t = 0; t < TOKENS; ++t) {
    if (t >= tokens) break;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      float v = acc[t][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v = __fadd_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
      if (lane == 0 && row0 + r < n) y[size_t(t) * y_stride + row0 + r] = from_float<T>(v);
    }
  }
}

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int TOKENS>
int launch(const void* x, int x_stride, const void* packed, const void* scales, const void* zeros, void* y,
           int y_stride, int tokens, int n, int k, int groups, cudaStream_t stream) {
  const int chunks = k / 32;
  const int smem = tokens * chunks * SMEM_BYTES_PER_CHUNK;
  auto kernel = int4_gemv_kernel<T, WARPS, ROWS_PER_WARP, BATCH, TOKENS>;
  static int smem_allowed = 48 * 1024;  // raised once per instantiation when a launch needs more
  if (smem > smem_allowed) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return int(err);
    smem_allowed = smem;
  }
  const int rows_per_block = WARPS * ROWS_PER_WARP;
  kernel<<<(n + rows_per_block - 1) / rows_per_block, WARPS * 32, smem, stream>>>(
      static_cast<const T*>(x), x_stride, static_cast<const uint4*>(packed), static_cast<const T*>(scales),
      static_cast<const T*>(zeros), static_cast<T*>(y), y_stride, tokens, n, chunks, groups, chunks / groups);
  return int(cudaGetLastError());
}

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH>
int launch_tokens(const void* x, int x_stride, const void* packed, const void* scales, const void* zeros, void* y,
                  int y_stride, int tokens, int n, int k, int groups, cudaStream_t s) {
  return tokens == 1 ? launch<T, WARPS, ROWS_PER_WARP, BATCH, 1>(x, x_stride, packed, scales, zeros, y, y_stride,
                                                                   tokens, n, k, groups, s)
                     : launch<T, WARPS, ROWS_PER_WARP, BATCH, MAX_TOKENS>(x, x_stride, packed, scales, zeros, y,
                                                                            y_stride, tokens, n, k, groups, s);
}

template <typename T>
int launch_shape(int shape, const void* x, int x_stride, const void* packed, const void* scales, const void* zeros,
                 void* y, int y_stride, int tokens, int n, int k, int groups, cudaStream_t s) {
#define INT4_GEMV_SHAPE(id, warps, rows, batch) \
  case id: return launch_tokens<T, warps, rows, batch>(x, x_stride, packed, scales, zeros, y, y_stride, tokens, n, k, groups, s);
  switch (shape) {
    INT4_GEMV_SHAPE(1, 4, 4, 2)
    INT4_GEMV_SHAPE(2, 4, 4, 1)
    INT4_GEMV_SHAPE(3, 4, 8, 1)
    INT4_GEMV_SHAPE(4, 4, 8, 2)
    INT4_GEMV_SHAPE(5, 8, 4, 2)
    INT4_GEMV_SHAPE(6, 2, 4, 2)
    INT4_GEMV_SHAPE(7, 4, 2, 2)
    INT4_GEMV_SHAPE(8, 2, 8, 1)
    default: return int(cudaErrorInvalidValue);
  }
#undef INT4_GEMV_SHAPE
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. shape: the launch shape (see launch_shape). x [tokens, k] with rows x_stride
// apart, y [tokens, n] with rows y_stride apart. Returns a cudaError_t (0: launched). Needs 1 <= tokens <= 8,
// k % 32 == 0, (k / groups) % 32 == 0, x rows and packed 16-byte aligned, tokens * k / 32 * 40 bytes of shared
// memory; the caller checks.
extern "C" int int4_gemv(int dtype, int shape, int tokens, const void* x, int x_stride, const void* packed,
                         const void* scales, const void* zeros, void* y, int y_stride, int n, int k, int groups,
                         void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (tokens < 1 || tokens > MAX_TOKENS) return int(cudaErrorInvalidValue);
  return dtype == 0 ? launch_shape<__nv_bfloat16>(shape, x, x_stride, packed, scales, zeros, y, y_stride, tokens, n,
                                                  k, groups, s)
                    : launch_shape<__half>(shape, x, x_stride, packed, scales, zeros, y, y_stride, tokens, n, k,
                                           groups, s);
}
