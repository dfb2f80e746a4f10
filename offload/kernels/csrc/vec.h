// Portable SIMD vectors through GCC/Clang vector extensions: the same source compiles to AVX-512
// (16 floats), AVX2 (8 floats) or plain SSE/NEON code, whatever -march=native allows.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef LLAMA_OFFLOAD_VEC_WIDTH
#if defined(__AVX512F__)
#define LLAMA_OFFLOAD_VEC_WIDTH 16
#elif defined(__AVX__)
#define LLAMA_OFFLOAD_VEC_WIDTH 8
#else
#define LLAMA_OFFLOAD_VEC_WIDTH 4
#endif
#endif

namespace llama_offload {

constexpr int kW = LLAMA_OFFLOAD_VEC_WIDTH;  // floats per vector

typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kW * sizeof(int32_t))));

inline vfloat load_f(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vfloat splat(float s) {
  return vfloat{} + s;
}

// kW signed bytes -> kW floats. Widening conversions go through intrinsics where available because
// compilers scalarize __builtin_convertvector from 8- and 16-byte vectors.
inline vfloat load_i8_as_f(const int8_t* p) {
#if LLAMA_OFFLOAD_VEC_WIDTH == 16 && defined(__AVX512F__)
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm512_cvtepi32_ps(v);
#elif LLAMA_OFFLOAD_VEC_WIDTH == 8 && defined(__AVX2__)
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_cvtepi32_ps(v);
#else
  vint v;
  for (int i = 0; i < kW; ++i) v[i] = p[i];
  return __builtin_convertvector(v, vfloat);
#endif
}

// kW packed bytes -> their high nibbles (hi) and the whole bytes (byte = 16 * hi + lo) as floats.
inline void load_hi_and_byte_as_f(const uint8_t* p, vfloat& hi, vfloat& byte) {
#if LLAMA_OFFLOAD_VEC_WIDTH == 16 && defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = (vfloat)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  byte = (vfloat)_mm512_cvtepi32_ps(v);
#elif LLAMA_OFFLOAD_VEC_WIDTH == 8 && defined(__AVX2__)
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  hi = (vfloat)_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  byte = (vfloat)_mm256_cvtepi32_ps(v);
#else
  vint v;
  for (int i = 0; i < kW; ++i) v[i] = p[i];
  hi = __builtin_convertvector(v >> 4, vfloat);
  byte = __builtin_convertvector(v, vfloat);
#endif
}

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

inline float dot(const float* a, const float* b, int64_t n) {
  vfloat acc = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += load_f(a + i) * load_f(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace llama_offload
