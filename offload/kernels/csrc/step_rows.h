// Where each row of a decode step sits: which sequence's cache it reads and writes, the slot its key and
// value go to, its RoPE factors, and the cached slots it attends, in order. A step of B sequences at one
// position and a token tree of one sequence (each token at its own position, seeing the committed context
// and its ancestors) are both such rows, so both run the same arithmetic per row: a tree token's row is
// bit for bit the one-token step it stands for.
#pragma once

#include <cstdint>
#include <vector>

namespace llama_offload {

struct StepRows {
  std::vector<int64_t> batch;  // [R] the caches' sequence row
  std::vector<int64_t> slot;  // [R] where the row's key and value are written
  std::vector<const float*> cos, sin;  // [R] each head_dim / 2 float32 values
  std::vector<int64_t> seen_at;  // [R + 1] row r attends seen[seen_at[r] .. seen_at[r + 1])
  std::vector<int64_t> seen;  // slots, ascending within a row

  int64_t rows() const { return int64_t(batch.size()); }
  int64_t most_seen() const;
};

// B sequences with one new token each at pos: slots (pos - window, pos] (window 0: all of [0, pos]).
StepRows sequences_at(int64_t B, int64_t pos, int64_t window, const float* cos, const float* sin);

// One sequence's token tree of T tokens in slots start .. start + T - 1; cos, sin [T][half] at each token's
// position; visible [T][start + T] (row-major bool): the slots each token attends.
StepRows tree_rows(int64_t T, int64_t start, int64_t half, const float* cos, const float* sin, const bool* visible);

}  // namespace llama_offload
