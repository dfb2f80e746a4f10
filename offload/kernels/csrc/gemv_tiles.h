// How the GEMVs walk several tokens. token_chunks: tokens in chunks of at most 4, each chunk's size a
// compile-time constant (a chunk keeps its vector sums in registers). gemv_tiles, the loop of the int4
// kernels, of the dense and int8 prefill blocks and of the dense passes of up to 8 tokens: tiles of 8 output
// rows; within a tile, token chunks while the tile's rows stay in cache, each chunk in blocks of R rows (R set
// per chunk size: a block keeps R x TB vector sums) and single rows for the rest.
#pragma once

#include <cstdint>
#include <type_traits>

namespace llama_offload {

template <int N>
using Int = std::integral_constant<int, N>;

// chunk(Int<TB>, t): tokens [t, t + TB).
template <typename Chunk>
inline void token_chunks(int64_t T, const Chunk& chunk) {
  for (int64_t t = 0; t < T; t += 4) {
    switch (T - t) {
      case 1: chunk(Int<1>{}, t); break;
      case 2: chunk(Int<2>{}, t); break;
      case 3: chunk(Int<3>{}, t); break;
      default: chunk(Int<4>{}, t); break;
    }
  }
}

template <int R, int TB, typename Block>
inline void gemv_rows_of_tile(int64_t t, int64_t nb, int64_t nb1, const Block& block) {
  int64_t n = nb;
  for (; n + R <= nb1; n += R) block(Int<R>{}, Int<TB>{}, t, n);
  for (; n < nb1; ++n) block(Int<1>{}, Int<TB>{}, t, n);
}

// block(Int<R>, Int<TB>, t, n): output rows [n, n + R) for tokens [t, t + TB). R1..R4: the block height for
// chunks of 1..4 tokens.
template <int R1, int R2, int R3, int R4, typename Block>
inline void gemv_tiles(int64_t T, int64_t n0, int64_t n1, const Block& block) {
  constexpr int64_t kTile = 8;
  for (int64_t nb = n0; nb < n1; nb += kTile) {
    const int64_t nb1 = nb + kTile < n1 ? nb + kTile : n1;
    token_chunks(T, [&](auto TB, int64_t t) {
      constexpr int R = TB == 1 ? R1 : TB == 2 ? R2 : TB == 3 ? R3 : R4;
      gemv_rows_of_tile<R, TB>(t, nb, nb1, block);
    });
  }
}

}  // namespace llama_offload
