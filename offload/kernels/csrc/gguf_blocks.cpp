// GGUF's Q8_0 / Q4_0 / Q4_1 blocks written into our int8 / int4 tensors in one pass over the file's bytes,
// rows spread over torch's threads (loading a 7B Q4_0 file, the torch ops of gguf_blocks.py made six passes
// over strided bytes, 0.75 GB/s on two cores). The values are those of gguf_blocks.py's torch twins, bit for
// bit; that file's docstring says what each block holds.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "gguf_blocks.cpp reads GGUF's little-endian fields directly");

#include "ext.h"

namespace llama_offload {
namespace {

constexpr int64_t kBlockValues = 32;

uint16_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

float half_at(const uint8_t* p) {
  return static_cast<float>(c10::Half(u16_at(p), c10::Half::from_bits()));
}

// The low byte of each of four 16-bit lanes, in lane order.
uint32_t low_bytes(uint64_t lanes) {
  lanes = (lanes | (lanes >> 8)) & 0x0000FFFF0000FFFFull;
  return static_cast<uint32_t>(lanes | (lanes >> 16));
}

// A block's 16 nibble bytes (byte i: value i low, value i + 16 high) -> ours (byte j: value 2j high, 2j + 1 low):
// ours[j] = (q[2j] << 4) | (q[2j + 1] & 15) and ours[8 + j] = (q[2j] & 0xF0) | (q[2j + 1] >> 4), j < 8. Eight
// bytes at a time as four 16-bit lanes (q[2j] low, q[2j + 1] high; little-endian), each lane's result in its
// low byte, then the four low bytes gathered (1.2x the byte-by-byte loop on one core of the development machine).
void repack_nibbles(const uint8_t* q, uint8_t* out) {
  constexpr uint64_t low4 = 0x000F000F000F000Full, high4 = 0x00F000F000F000F0ull;
  for (int half = 0; half < 2; ++half) {
    uint64_t x;
    std::memcpy(&x, q + 8 * half, sizeof x);
    const uint64_t first = ((x << 4) & high4) | ((x >> 8) & low4);
    const uint64_t second = (x & high4) | ((x >> 12) & low4);
    const uint32_t a = low_bytes(first), b = low_bytes(second);
    std::memcpy(out + 4 * half, &a, sizeof a);
    std::memcpy(out + 8 + 4 * half, &b, sizeof b);
  }
}

// Checks shared by the three ops; returns the number of blocks per row.
int64_t check_blocks(const char* op, const at::Tensor& raw, int64_t block_bytes, const at::Tensor& values,
                     int64_t value_bytes_per_block, std::initializer_list<at::Tensor> per_block) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.stride(1) == 1,
              op, ": raw must be CPU uint8 [rows, bytes per row] with contiguous rows, got ", raw.sizes());
  TORCH_CHECK(raw.size(1) % block_bytes == 0, op, ": ", raw.size(1), " bytes per row is not a whole number of ",
              block_bytes, "-byte blocks");
  const int64_t rows = raw.size(0), groups = raw.size(1) / block_bytes;
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && values.dim() == 2 && values.size(0) == rows &&
                  values.size(1) * values.element_size() == groups * value_bytes_per_block,
              op, ": values must be a contiguous CPU [", rows, ", ", groups * value_bytes_per_block,
              " bytes] tensor, got ", values.sizes());
  const at::ScalarType dtype = per_block.begin()->scalar_type();
  for (const at::Tensor& t : per_block) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                    (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && t.dim() == 2 &&
                    t.size(0) == rows && t.size(1) == groups,
                op, ": scales (and zeros) must be contiguous CPU float32, float16 or bfloat16 [", rows, ", ",
                groups, "] of one dtype, got ", t.scalar_type(), " ", t.sizes());
  }
  return groups;
}

// fn(row) for every row, spread over torch's threads in pieces of a few hundred KB.
template <typename Fn>
void for_rows(int64_t rows, int64_t bytes_per_row, const Fn& fn) {
  at::parallel_for(0, rows, row_grain(bytes_per_row), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

// A block's fp16 field as T: its own bits for float16 (NaN payloads included), else rounded from float as
// torch's .to() rounds (to nearest, ties to even).
template <typename T>
T half_field(const uint8_t* p) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return at::Half(u16_at(p), at::Half::from_bits());
  } else {
    return static_cast<T>(half_at(p));
  }
}

template <typename T>
struct Type {
  using type = T;
};

// body(Type<T>{}) with T the C++ type of `dtype` (float32, float16 or bfloat16).
template <typename Body>
void with_scale_type(at::ScalarType dtype, const Body& body) {
  if (dtype == at::kFloat) {
    body(Type<float>{});
  } else if (dtype == at::kHalf) {
    body(Type<at::Half>{});
  } else {
    body(Type<at::BFloat16>{});
  }
}

}  // namespace

void gguf_q8_0_to_int8(const at::Tensor& raw, const at::Tensor& qweight, const at::Tensor& scale) {
  const int64_t groups = check_blocks("gguf_q8_0_to_int8", raw, 34, qweight, kBlockValues, {scale});
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "gguf_q8_0_to_int8: qweight must be int8");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  int8_t* q = qweight.data_ptr<int8_t>();
  const int64_t stride = raw.stride(0);
  with_scale_type(scale.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    T* s = scale.data_ptr<T>();
    for_rows(raw.size(0), raw.size(1), [&](int64_t r) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* block = src + r * stride + g * 34;
        s[r * groups + g] = half_field<T>(block);
        std::memcpy(q + (r * groups + g) * kBlockValues, block + 2, kBlockValues);
      }
    });
  });
}

void gguf_q4_0_to_int4(const at::Tensor& raw, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros) {
  const int64_t groups = check_blocks("gguf_q4_0_to_int4", raw, 18, packed, 16, {scales, zeros});
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* p = packed.data_ptr<uint8_t>();
  const int64_t stride = raw.stride(0);
  with_scale_type(scales.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    T* s = scales.data_ptr<T>();
    T* z = zeros.data_ptr<T>();
    const T eight = static_cast<T>(8.0f);
    for_rows(raw.size(0), raw.size(1), [&](int64_t r) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* block = src + r * stride + g * 18;
        s[r * groups + g] = half_field<T>(block);
        z[r * groups + g] = eight;
        repack_nibbles(block + 2, p + (r * groups + g) * 16);
      }
    });
  });
}

void gguf_q4_1_to_int4(const at::Tensor& raw, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros) {
  const int64_t groups = check_blocks("gguf_q4_1_to_int4", raw, 20, packed, 16, {scales, zeros});
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* p = packed.data_ptr<uint8_t>();
  const int64_t stride = raw.stride(0);
  with_scale_type(scales.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    T* s = scales.data_ptr<T>();
    T* z = zeros.data_ptr<T>();
    for_rows(raw.size(0), raw.size(1), [&](int64_t r) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* block = src + r * stride + g * 20;
        const float d = half_at(block), m = half_at(block + 2);
        const bool flat = d == 0.0f;  // every value equals m: scale -m / 8 with zero 8 gives m at q = 0
        s[r * groups + g] = static_cast<T>(flat ? -m / 8.0f : d);  // computed in float32, then rounded once
        z[r * groups + g] = static_cast<T>(flat ? 8.0f : -m / d);
        repack_nibbles(block + 4, p + (r * groups + g) * 16);
      }
    });
  });
}

}  // namespace llama_offload
