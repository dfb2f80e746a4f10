// How the decode kernels spread work over threads, made for machines where other processes run too.
//
// at::parallel_for splits a range evenly: a thread that starts late (another process held its core) then
// still has its whole share to do, and everyone waits for it. Here each of torch's threads claims small
// chunks from one counter, so a late thread finds less left to do, and the threads that run do the rest.
// It runs on torch's own threads (at::get_num_threads(), what --threads sets): a second pool of ours would
// contend with torch's threads, which spin for milliseconds after each torch operator of a decode step.
#pragma once

#include <cstdint>
#include <functional>

namespace llama_offload {

// fn(c) for every c in [0, n_chunks), each exactly once; returns when all are done.
void share_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn);

}  // namespace llama_offload
