// Portable SIMD vectors through GCC/Clang vector extensions: the same source compiles to AVX-512
// (16 floats), AVX2 (8 floats) or plain SSE/NEON code, whatever -march=native allows.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef LLAMA_OFFLOAD_VEC_WIDTH
#if defined(__AVX512F__)
#define LLAMA_OFFLOAD_VEC_WIDTH 16
#else
#define LLAMA_OFFLOAD_VEC_WIDTH 8
#endif
#endif

namespace llama_offload {

constexpr int kW = LLAMA_OFFLOAD_VEC_WIDTH;  // floats per vector

typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kW * sizeof(int32_t))));
typedef int8_t vbyte __attribute__((vector_size(kW)));
typedef uint8_t vubyte __attribute__((vector_size(kW)));

inline vfloat load_f(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vfloat splat(float s) {
  return vfloat{} + s;
}

// kW signed bytes -> kW floats (sign-extend, then convert).
inline vfloat load_i8_as_f(const int8_t* p) {
  vbyte b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vint), vfloat);
}

// kW packed bytes -> their high nibbles (hi) and low nibbles (lo) as floats.
inline void load_nibbles_as_f(const uint8_t* p, vfloat& hi, vfloat& lo) {
  vubyte b;
  std::memcpy(&b, p, sizeof(b));
  const vint v = __builtin_convertvector(b, vint);
  hi = __builtin_convertvector(v >> 4, vfloat);
  lo = __builtin_convertvector(v & 15, vfloat);
}

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

}  // namespace llama_offload
