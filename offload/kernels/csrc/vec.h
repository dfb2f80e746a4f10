// Portable SIMD vectors through GCC/Clang vector extensions: the same source compiles to AVX-512
// (16 floats), AVX2 (8 floats) or plain SSE/NEON code, whatever -march=native allows.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#if defined(__AVX__)
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

// kW bfloat16 values -> floats: a bfloat16 is the high half of a float32, so widen and shift.
inline vfloat load_bf16_as_f(const uint16_t* p) {
#if LLAMA_OFFLOAD_VEC_WIDTH == 16 && defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vfloat)_mm512_slli_epi32(v, 16);
#elif LLAMA_OFFLOAD_VEC_WIDTH == 8 && defined(__AVX2__)
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_slli_epi32(v, 16);
#else
  vint v;
  for (int i = 0; i < kW; ++i) v[i] = int32_t(uint32_t(p[i]) << 16);
  return (vfloat)v;
#endif
}

// kW float16 values -> floats (F16C where the CPU has it).
inline vfloat load_f16_as_f(const uint16_t* p) {
#if LLAMA_OFFLOAD_VEC_WIDTH == 16 && defined(__AVX512F__)
  return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif LLAMA_OFFLOAD_VEC_WIDTH == 8 && defined(__F16C__)
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vfloat v;
  for (int i = 0; i < kW; ++i) v[i] = float(c10::Half(p[i], c10::Half::from_bits()));
  return v;
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

// Element loaders for float32, bfloat16, float16 and int8 storage (bfloat16 and float16 as raw uint16 bits):
// load() widens kW elements to floats, one() a single element.
struct LoadF32 {
  using T = float;
  static vfloat load(const float* p) { return load_f(p); }
  static float one(const float* p) { return *p; }
};
struct LoadBF16 {
  using T = uint16_t;
  static vfloat load(const uint16_t* p) { return load_bf16_as_f(p); }
  static float one(const uint16_t* p) {
    const uint32_t bits = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
struct LoadF16 {
  using T = uint16_t;
  static vfloat load(const uint16_t* p) { return load_f16_as_f(p); }
  static float one(const uint16_t* p) { return float(c10::Half(*p, c10::Half::from_bits())); }
};
struct LoadI8 {  // int8 weights, their per-row scale applied after the sum
  using T = int8_t;
  static vfloat load(const int8_t* p) { return load_i8_as_f(p); }
  static float one(const int8_t* p) { return float(*p); }
};

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
