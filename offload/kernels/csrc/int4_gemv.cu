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
// The sublayer around it can come along: RMSNorm (with its weight) applied to x as it is staged, the residual
// added to the result, for a stacked gate/up weight SiLU(gate) * up as the result (a warp takes a gate row
// and its up row together), or, for a stacked q/k/v weight, RoPE on q and k and the write of k and v into the
// cache (Meta's interleaved pairs are adjacent rows, both a group's), so a decode step's block runs in four of
// these launches besides attention (engine/int4_block_step.py).
//
// A group of KSPLIT warps owns ROWS_PER_WARP rows: warp s of the group takes the row's inputs in runs of
// 32 * BATCH chunks s, s + KSPLIT, ..., lane l chunk l of each run, and the group's KSPLIT partial sums are
// added in warp order at the end (KSPLIT > 1 puts more loads in flight on long rows: w2's). Loads of BATCH chunks
// a row are issued together, the first batch before x is staged. The grid is one wave of blocks, each staging x
// once and then taking tiles of rows blockIdx.x, + gridDim.x, ... Every token's arithmetic is the same whatever the token count or the stream (explicitly
// rounded float operations, a fixed lane order and reduction tree): a pass of several tokens gives each token
// bit for bit what a one-token step gives it. Launch shapes of one KSPLIT give the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

namespace {

constexpr int MAX_TOKENS = 8;
constexpr int MAX_CALL_TOKENS = 1024;  // a launch takes these in chunks of MAX_TOKENS (grid y)

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ float bits_to_float(uint16_t bits);
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint16_t bits) {
  return __uint_as_float(uint32_t(bits) << 16);
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

// Smem per token: chunks ChunkX, then chunks floats each of d, d * sum xi and (RMS_NORM) the chunk's sum of
// squares; then one float a token, its 1 / RMS.
constexpr int SMEM_BYTES_PER_CHUNK = sizeof(ChunkX) + 3 * sizeof(float);

// What the kernel multiplies: x as it is, or RMSNorm(x) * norm_weight (the sublayer's norm folded in).
enum Prologue { PLAIN = 0, RMS_NORM = 1 };

}  // namespace

// A q/k/v projection's epilogue: its n rows are n_heads q heads, n_kv_heads k heads, n_kv_heads v heads of
// head_dim rows each. Token t (batch row b = t / seqlen, step position tt = t % seqlen) rotates pair i of q and
// k by cos, sin [b * c_b + tt * c_t + i * c_i] (x's dtype); q goes to y; k and v to keys, values at
// b * kv_b + head * kv_h + slots[b * s_b + tt * s_t] * kv_p. As llama/fused_ops.py's rope_store does it.
struct RopeStore {
  const void *cos, *sin;
  const long long* slots;
  void *keys, *values;
  long long c_b, c_t, c_i, s_b, s_t, kv_b, kv_h, kv_p;
  int seqlen, n_heads, n_kv_heads, head_dim;
};

namespace {

template <typename T>
__device__ __forceinline__ void load32(const T* __restrict__ p, float* v) {
  union {
    uint4 vectors[4];
    uint16_t bits[32];
  } raw;
#pragma unroll
  for (int j = 0; j < 4; ++j) raw.vectors[j] = __ldg(reinterpret_cast<const uint4*>(p) + j);
#pragma unroll
  for (int i = 0; i < 32; ++i) v[i] = bits_to_float<T>(raw.bits[i]);
}

// The 32 inputs of chunk c of one token's row, with the prologue applied (inv_rms: that row's 1 / RMS).
template <typename T, int PROLOGUE>
__device__ __forceinline__ void prologue_chunk(const T* __restrict__ row, int c, const T* __restrict__ norm_weight,
                                               float inv_rms, float* v) {
  load32(row + 32 * c, v);
  if (PROLOGUE == RMS_NORM) {
    float w[32];
    load32(norm_weight + 32 * c, w);
#pragma unroll
    for (int i = 0; i < 32; ++i) v[i] = __fmul_rn(__fmul_rn(v[i], inv_rms), w[i]);
  }
}

__device__ __forceinline__ float sum_of_squares(const float* v) {
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) ss = __fmaf_rn(v[i], v[i], ss);
  return ss;
}

__device__ void quantize_chunk(const float* v, ChunkX* out, float* d_out, float* dsum_out) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
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

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int KSPLIT, int TOKENS, int PROLOGUE>
__global__ void __launch_bounds__(WARPS * 32)
    int4_gemv_kernel(const T* __restrict__ x, int x_stride, const T* __restrict__ norm_weight, float eps,
                     const uint4* __restrict__ packed, const T* __restrict__ scales, const T* __restrict__ zeros,
                     const T* __restrict__ residual, int residual_stride, int gated, const RopeStore rope,
                     T* __restrict__ y,
                     int y_stride, int tokens, int n, int chunks, int groups, int chunks_per_group) {
  // A launch of more than TOKENS tokens: blockIdx.y takes tokens blockIdx.y * TOKENS, ... as a call of its own.
  const int first_token = blockIdx.y * TOKENS;
  x += size_t(first_token) * x_stride;
  y += size_t(first_token) * y_stride;
  if (residual != nullptr) residual += size_t(first_token) * residual_stride;
  tokens = min(TOKENS, tokens - first_token);
  extern __shared__ uint4 smem[];
  ChunkX* xq = reinterpret_cast<ChunkX*>(smem);                   // [tokens][chunks]
  float* xd = reinterpret_cast<float*>(xq + tokens * chunks);     // [tokens][chunks]
  float* xdsum = xd + tokens * chunks;                            // [tokens][chunks]
  float* chunk_ss = xdsum + tokens * chunks;                      // [tokens][chunks]
  float* inv_rms = chunk_ss + tokens * chunks;                    // [tokens]
  static_assert(WARPS % KSPLIT == 0, "a block holds whole row groups");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slice = warp % KSPLIT;  // which runs of the row's chunks this warp takes
  // Plain: the group's rows are its outputs j0 .. j0 + ROWS_PER_WARP - 1. Gated: its outputs are
  // SiLU(gate) * up of ROWS_PER_WARP / 2 rows j0 + r, whose gate is weight row j0 + r and up row half + j0 + r.
  constexpr int GATED_OUTPUTS = ROWS_PER_WARP / 2;
  const int outputs = gated ? n / 2 : n;
  // Tiles of the output, each WARPS / KSPLIT groups' rows; a block takes tiles blockIdx.x, + gridDim.x, ...,
  // staging x once for all of them.
  const int per_group = gated ? GATED_OUTPUTS : ROWS_PER_WARP;
  const int tiles = (outputs + WARPS / KSPLIT * per_group - 1) / (WARPS / KSPLIT * per_group);
  int tile = blockIdx.x;
  int j0 = (tile * (WARPS / KSPLIT) + warp / KSPLIT) * per_group;
  constexpr int RUN = 32 * BATCH;  // chunks a group's warp loads at once, lane l the l-th of each 32
  const int first_run = RUN * slice;
  auto weight_row = [&](int r) {  // outputs past the last repeat it; never stored
    if (!gated) return min(j0 + r, n - 1);
    const int j = min(j0 + (r < GATED_OUTPUTS ? r : r - GATED_OUTPUTS), outputs - 1);
    return r < GATED_OUTPUTS ? j : outputs + j;
  };

  uint4 w[BATCH][ROWS_PER_WARP];
  auto load_batch = [&](int first) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int c = first + 32 * b;
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int row = weight_row(r);
        w[b][r] = c < chunks ? __ldg(packed + size_t(row) * chunks + c) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  load_batch(first_run + lane);  // in flight while x is staged

  // Staging x: every sum below runs in an order fixed by the chunk alone (not by the token's place in the call,
  // nor by the block's size), so each token's result is its one-token call's.
  const int k = 32 * chunks;
  float v[32];
  if (PROLOGUE == RMS_NORM) {
    for (int t = 0; t < tokens; ++t)
      for (int c = threadIdx.x; c < chunks; c += WARPS * 32) {
        load32(x + size_t(t) * x_stride + 32 * c, v);
        chunk_ss[t * chunks + c] = sum_of_squares(v);
      }
    __syncthreads();
    if (warp == 0)
      for (int t = 0; t < tokens; ++t) {
        float ss = 0.0f;
        for (int c = lane; c < chunks; c += 32) ss = __fadd_rn(ss, chunk_ss[t * chunks + c]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) ss = __fadd_rn(ss, __shfl_xor_sync(0xFFFFFFFFu, ss, off));
        if (lane == 0) inv_rms[t] = __frsqrt_rn(__fadd_rn(__fdiv_rn(ss, float(k)), eps));
      }
    __syncthreads();
  }
  for (int t = 0; t < tokens; ++t)
    for (int c = threadIdx.x; c < chunks; c += WARPS * 32) {
      prologue_chunk<T, PROLOGUE>(x + size_t(t) * x_stride, c, norm_weight, PROLOGUE == RMS_NORM ? inv_rms[t] : 1.0f,
                                  v);
      quantize_chunk(v, &xq[t * chunks + c], &xd[t * chunks + c], &xdsum[t * chunks + c]);
    }
  __syncthreads();

  float acc[TOKENS][ROWS_PER_WARP];
  auto use_batch = [&](int first) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int c = first + 32 * b;
      if (c >= chunks) break;
      const int group = c / chunks_per_group;
      float s[ROWS_PER_WARP], z[ROWS_PER_WARP];
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const size_t at = size_t(weight_row(r)) * groups + group;
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
  auto store = [&](int tokens, const float (&acc)[TOKENS][ROWS_PER_WARP]) {
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      if (t >= tokens) break;
      const float* sums = acc[t];
      T* out = y + size_t(t) * y_stride;
      if (gated) {
#pragma unroll
        for (int r = 0; r < GATED_OUTPUTS; ++r) {
          const float g = sums[r], u = sums[r + GATED_OUTPUTS];
          if (j0 + r < outputs) out[j0 + r] = from_float<T>(__fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, __expf(-g))), u));
        }
      } else if (rope.keys != nullptr) {
        static_assert(ROWS_PER_WARP % 2 == 0, "a RoPE pair is two rows of one group");
        const int b = (first_token + t) / rope.seqlen, tt = (first_token + t) % rope.seqlen;
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r += 2) {
          const int row = j0 + r;
          if (row >= n) break;
          const int head = row / rope.head_dim, d = row % rope.head_dim;
          // Each value rounded as the projection's output would be, then rotated in float32.
          float x0 = to_float(from_float<T>(sums[r])), x1 = to_float(from_float<T>(sums[r + 1]));
          if (head < rope.n_heads + rope.n_kv_heads) {
            const long long at = b * rope.c_b + tt * rope.c_t + (d / 2) * rope.c_i;
            const float c = to_float(static_cast<const T*>(rope.cos)[at]);
            const float sn = to_float(static_cast<const T*>(rope.sin)[at]);
            const float r0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
            const float r1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, sn));
            x0 = r0;
            x1 = r1;
          }
          T* dst;
          if (head < rope.n_heads) {
            dst = out + row;
          } else {
            const int kv = head < rope.n_heads + rope.n_kv_heads ? head - rope.n_heads : head - rope.n_heads - rope.n_kv_heads;
            const long long slot = rope.slots[b * rope.s_b + tt * rope.s_t];
            dst = static_cast<T*>(head < rope.n_heads + rope.n_kv_heads ? rope.keys : rope.values) + b * rope.kv_b +
                  kv * rope.kv_h + slot * rope.kv_p + d;
          }
          dst[0] = from_float<T>(x0);
          dst[1] = from_float<T>(x1);
        }
      } else {
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
          if (j0 + r >= n) continue;
          float v = sums[r];
          if (residual != nullptr) v = __fadd_rn(v, to_float(residual[size_t(t) * residual_stride + j0 + r]));
          out[j0 + r] = from_float<T>(v);
        }
      }
    }
  };

  for (; tile < tiles; tile += gridDim.x, j0 += gridDim.x * (WARPS / KSPLIT) * per_group) {
#pragma unroll
    for (int t = 0; t < TOKENS; ++t)
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) acc[t][r] = 0.0f;
    if (tile != int(blockIdx.x)) load_batch(first_run + lane);
    for (int run = first_run; run < chunks; run += RUN * KSPLIT) {
      if (run != first_run) load_batch(run + lane);
      use_batch(run + lane);
    }

    // Each warp's sums over its lanes, then (KSPLIT > 1) the group's warps' sums in warp order.
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      if (t >= tokens) break;
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc[t][r] = __fadd_rn(acc[t][r], __shfl_xor_sync(0xFFFFFFFFu, acc[t][r], off));
    }
    if (KSPLIT > 1) {
      __shared__ float partial[KSPLIT > 1 ? WARPS : 1][TOKENS][ROWS_PER_WARP];
      if (lane == 0)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
          if (t >= tokens) break;
#pragma unroll
          for (int r = 0; r < ROWS_PER_WARP; ++r) partial[warp][t][r] = acc[t][r];
        }
      __syncthreads();
      if (slice == 0)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
          if (t >= tokens) break;
#pragma unroll
          for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
            for (int s = 1; s < KSPLIT; ++s) acc[t][r] = __fadd_rn(acc[t][r], partial[warp + s][t][r]);
        }
      __syncthreads();  // read before the next tile writes
    }
    if (slice == 0 && lane == 0) store(tokens, acc);
  }
}

struct Args {
  const void *x, *norm_weight, *packed, *scales, *zeros, *residual;
  void* y;
  int x_stride, prologue, residual_stride, gated, y_stride, tokens, n, k, groups;
  float eps;
  RopeStore rope;
};

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int KSPLIT, int TOKENS, int PROLOGUE>
int launch(const Args& a, cudaStream_t stream) {
  const int chunks = a.k / 32;
  const int chunk_tokens = std::min(a.tokens, TOKENS), token_chunks = (a.tokens + TOKENS - 1) / TOKENS;
  const int smem = chunk_tokens * (chunks * SMEM_BYTES_PER_CHUNK + int(sizeof(float)));
  auto kernel = int4_gemv_kernel<T, WARPS, ROWS_PER_WARP, BATCH, KSPLIT, TOKENS, PROLOGUE>;
  static int smem_allowed = 48 * 1024;  // raised once per instantiation when a launch needs more
  if (smem > smem_allowed) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return int(err);
    smem_allowed = smem;
  }
  const int outputs_per_block = WARPS / KSPLIT * (a.gated ? ROWS_PER_WARP / 2 : ROWS_PER_WARP);
  const int outputs = a.gated ? a.n / 2 : a.n;
  // One wave of blocks, each staging x once for the tiles it takes (a block a tile paid the staging once per
  // tile: a norm's two passes over x made wqkv and w13 2.5-5 us slower).
  int device = 0, sms = 0, resident = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, WARPS * 32, smem);
  if (err != cudaSuccess) return int(err);
  const int tiles = (outputs + outputs_per_block - 1) / outputs_per_block;
  const dim3 grid(std::max(1, std::min(tiles, resident * sms / token_chunks)), token_chunks);
  kernel<<<grid, WARPS * 32, smem, stream>>>(
      static_cast<const T*>(a.x), a.x_stride, static_cast<const T*>(a.norm_weight), a.eps,
      static_cast<const uint4*>(a.packed), static_cast<const T*>(a.scales), static_cast<const T*>(a.zeros),
      static_cast<const T*>(a.residual), a.residual_stride, a.gated, a.rope, static_cast<T*>(a.y), a.y_stride,
      a.tokens, a.n,
      chunks, a.groups, chunks / a.groups);
  return int(cudaGetLastError());
}

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int KSPLIT, int PROLOGUE>
int launch_tokens(const Args& a, cudaStream_t s) {
  return a.tokens == 1 ? launch<T, WARPS, ROWS_PER_WARP, BATCH, KSPLIT, 1, PROLOGUE>(a, s)
                       : launch<T, WARPS, ROWS_PER_WARP, BATCH, KSPLIT, MAX_TOKENS, PROLOGUE>(a, s);
}

template <typename T, int WARPS, int ROWS_PER_WARP, int BATCH, int KSPLIT>
int launch_prologue(const Args& a, cudaStream_t s) {  // each prologue its own kernel: PLAIN's registers stay lean
  return a.prologue == RMS_NORM ? launch_tokens<T, WARPS, ROWS_PER_WARP, BATCH, KSPLIT, RMS_NORM>(a, s)
                                : launch_tokens<T, WARPS, ROWS_PER_WARP, BATCH, KSPLIT, PLAIN>(a, s);
}

// The launch shapes bench/int4_gemv_bench.py times: (warps a block, rows a group, chunks in flight a row, warps a
// group).
template <typename T>
int launch_shape(int shape, const Args& a, cudaStream_t s) {
  switch (shape) {
    case 1: return launch_prologue<T, 4, 4, 2, 1>(a, s);
    case 2: return launch_prologue<T, 4, 8, 1, 1>(a, s);
    case 3: return launch_prologue<T, 8, 4, 2, 1>(a, s);
    case 4: return launch_prologue<T, 4, 2, 2, 1>(a, s);
    case 5: return launch_prologue<T, 8, 4, 2, 2>(a, s);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. shape: the launch shape (see launch_shape). x [tokens, k] with rows x_stride apart;
// prologue: PLAIN or RMS_NORM (norm_weight [k], eps); residual [tokens, n] rows residual_stride apart, added to
// the product, or null; gated: the weight's n rows are gate rows then up rows, and y [tokens, n / 2] gets
// SiLU(gate) * up (no residual then); rope: a q/k/v weight's epilogue (see RopeStore; y [tokens, n_heads *
// head_dim] gets rotated q; no residual, not gated), or null; y rows y_stride apart. Returns a cudaError_t (0:
// launched). Tokens past 8 go in chunks of 8, each summed as a call of its own, in the same launch. Needs
// 1 <= tokens <= MAX_CALL_TOKENS, k % 32 == 0, (k / groups) % 32 == 0, n even when gated, x rows,
// norm_weight and packed 16-byte aligned, min(tokens, 8) * (k / 32 * 44 + 4) bytes of shared memory; the caller
// checks.
extern "C" int int4_gemv(int dtype, int shape, int tokens, const void* x, int x_stride, int prologue,
                         const void* norm_weight, float eps, const void* packed, const void* scales,
                         const void* zeros, const void* residual, int residual_stride, int gated,
                         const RopeStore* rope, void* y, int y_stride, int n, int k, int groups, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (tokens < 1 || tokens > MAX_CALL_TOKENS || prologue < PLAIN || prologue > RMS_NORM || (gated && (n % 2 || residual)) ||
      (rope && (gated || residual || rope->head_dim % 2 || rope->seqlen < 1 || rope->keys == nullptr ||
                n != (rope->n_heads + 2 * rope->n_kv_heads) * rope->head_dim)))
    return int(cudaErrorInvalidValue);
  Args a{x, norm_weight, packed, scales, zeros, residual, y, x_stride, prologue, residual_stride, gated,
         y_stride, tokens, n, k, groups, eps, RopeStore{}};
  if (rope) a.rope = *rope;
  return dtype == 0 ? launch_shape<__nv_bfloat16>(shape, a, s) : launch_shape<__half>(shape, a, s);
}
