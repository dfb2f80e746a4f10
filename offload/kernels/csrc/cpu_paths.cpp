#include "cpu_paths.h"

#include <c10/util/Exception.h>

#include <atomic>

#if defined(LLAMA_OFFLOAD_X86_PATHS)
#include <cpuid.h>
#endif

namespace llama_offload {

namespace {

constexpr const char* kNames[] = {"avx512_bf16", "avx512_vnni", "bf16_row_prefetch"};
constexpr unsigned kCount = sizeof(kNames) / sizeof(kNames[0]);

unsigned bit(CpuPath p) {
  return 1u << static_cast<unsigned>(p);
}

unsigned supported() {
  unsigned mask = 0;
#if defined(LLAMA_OFFLOAD_X86_PATHS)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // OSXSAVE: xgetbv is there
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xE6) != 0xE6) return 0;  // the OS saves SSE, AVX, opmask and all 512-bit registers
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!(f && dq && bw && vl)) return 0;
  if (c & (1u << 11)) mask |= bit(CpuPath::kAvx512Vnni);  // leaf 7.0 ECX: AVX512_VNNI
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)))
    mask |= bit(CpuPath::kAvx512Bf16) | bit(CpuPath::kBf16RowPrefetch);
#endif
  return mask;
}

bool intel() {
#if defined(LLAMA_OFFLOAD_X86_PATHS)
  unsigned a, b, c, d;
  // Leaf 0's vendor string "GenuineIntel" in EBX, EDX, ECX.
  return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756E6547u && d == 0x49656E69u && c == 0x6C65746Eu;
#else
  return false;
#endif
}

unsigned defaults() {
  return intel() ? supported() : supported() & ~bit(CpuPath::kBf16RowPrefetch);
}

std::atomic<unsigned>& enabled() {
  static std::atomic<unsigned> mask{defaults()};
  return mask;
}

std::vector<std::string> names_of(unsigned mask) {
  std::vector<std::string> out;
  for (unsigned i = 0; i < kCount; ++i)
    if (mask & (1u << i)) out.emplace_back(kNames[i]);
  return out;
}

}  // namespace

bool cpu_path_on(CpuPath path) {
  return enabled().load(std::memory_order_relaxed) & bit(path);
}

std::vector<std::string> cpu_paths() {
  return names_of(enabled().load());
}

std::vector<std::string> set_cpu_paths(const std::vector<std::string>& names) {
  unsigned mask = 0;
  for (const std::string& name : names) {
    unsigned i = 0;
    while (i < kCount && name != kNames[i]) ++i;
    TORCH_CHECK(i < kCount, "set_cpu_paths: unknown path '", name,
                "' (known: avx512_bf16, avx512_vnni, bf16_row_prefetch)");
    mask |= 1u << i;
  }
  return names_of(enabled().exchange(mask & supported()));
}

}  // namespace llama_offload
