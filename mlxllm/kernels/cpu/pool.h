// The worker threads every kernel here shares.
//
// MLX evaluates a CPU graph on one stream thread, one op at a time; our kernels split
// their rows across that thread plus N-1 persistent workers. Work is handed out in chunks
// claimed from one atomic counter, so a descheduled worker (2 cores shared with other
// processes) costs nothing: the caller claims every chunk itself, and the worst case is
// the single-threaded time, never a stall on a sleeping thread's share.
#pragma once

#include <functional>

namespace mlxllm_cpu {

// Runs fn(chunk) for chunk in [0, nchunks) on the calling thread and the pool's workers;
// returns when all are done. fn must not call parallel_for itself.
void parallel_for(int nchunks, const std::function<void(int)>& fn);

// Threads a parallel_for uses (the caller included); MLXLLM_CPU_THREADS sets the
// default, else the machine's hardware threads.
int num_threads();
void set_num_threads(int n);

// Chunks for `units` independent units of work costing ~`unit_cost` bytes each: one
// chunk when the whole job is too small to be worth a hand-off, else ~4 per thread.
int chunks_for(long units, long unit_cost);

} // namespace mlxllm_cpu
