// The loop the GEMVs share for several tokens: tiles of 8 output rows; within a tile, tokens in chunks of
// at most 4 while the tile's rows stay in cache, each chunk in blocks of R rows (R set per chunk size: a
// block keeps R x TB vector sums in registers) and single rows for the tile's remainder.
#pragma once

#include <cstdint>
#include <type_traits>

namespace llama_offload {

template <int N>
using Int = std::integral_constant<int, N>;

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
    for (int64_t t = 0; t < T; t += 4) {
      switch (T - t) {
        case 1: gemv_rows_of_tile<R1, 1>(t, nb, nb1, block); break;
        case 2: gemv_rows_of_tile<R2, 2>(t, nb, nb1, block); break;
        case 3: gemv_rows_of_tile<R3, 3>(t, nb, nb1, block); break;
        default: gemv_rows_of_tile<R4, 4>(t, nb, nb1, block); break;
      }
    }
  }
}

}  // namespace llama_offload
