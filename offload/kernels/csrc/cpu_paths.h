// The instruction-set paths the kernels choose between at run time: each one is on when this CPU has its
// instructions (CPUID, and the OS saving the 512-bit registers) and set_cpu_paths has not switched it off
// (tests force each path in turn); bf16_row_prefetch, a tuning choice rather than an instruction set, is on by
// default where it was measured to help. A path's code is compiled for its target with function attributes, so
// the extension builds under any -march, and every kernel keeps its portable path as the fallback.
#pragma once

#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#define LLAMA_OFFLOAD_X86_PATHS 1
#include <immintrin.h>
#define LLAMA_OFFLOAD_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define LLAMA_OFFLOAD_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

namespace llama_offload {

enum class CpuPath {
  kAvx512Bf16,  // "avx512_bf16": bfloat16 dot products (dense bfloat16 weights)
  kAvx512Vnni,  // "avx512_vnni": int8 dot products (int4 passes of up to 8 tokens, x rounded to int8)
  // "bf16_row_prefetch": the bfloat16 dot-product rows prefetch 2 KB ahead. Where avx512_bf16 is, on by default
  // on Intel's CPUs only: on a 2-core AMD EPYC the prefetches cost a fifth of bfloat16 decode (SmolLM2-135M, one
  // thread 53-59 tok/s with them, 68-70 without; BENCHMARKS.md), while Intel's row streams left lines to
  // the hardware prefetcher without them.
  kBf16RowPrefetch,
};

bool cpu_path_on(CpuPath path);

// The names of the paths on now.
std::vector<std::string> cpu_paths();

// Switches on the named paths that this CPU has and off all others; returns the names that were on.
// Throws on an unknown name.
std::vector<std::string> set_cpu_paths(const std::vector<std::string>& names);

}  // namespace llama_offload
