// How the decode kernels spread work over threads, made for machines where other processes run too.
//
// A fork-join region (OpenMP, at::parallel_for) splits the work evenly and then waits for every thread:
// when another process holds a core, each of the ~150 regions of a decode step waits for the thread
// queued behind it (on a shared 2-core machine, decode ran 5-10x slower). Here the calling thread and
// helper threads claim small chunks from one counter, and the call waits only for chunks a helper has
// already claimed; a helper that has not been scheduled claims nothing, so the call finishes at the speed
// of the threads that do run. Helpers spin briefly between calls (decode issues one every ~100 us), then
// sleep. The thread count is at::get_num_threads() (what --threads sets), read at every call.
#pragma once

#include <cstdint>
#include <functional>

namespace llama_offload {

// fn(c) for every c in [0, n_chunks), each exactly once, on up to at::get_num_threads() threads; returns
// when all are done.
void share_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn);

}  // namespace llama_offload
