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

// Runs fn(begin, end) over consecutive ranges covering [0, units) on the calling thread
// and the pool's workers; returns when all are done. The job is one range when all
// `units` (~`unit_cost` bytes of work each) are too little to be worth a hand-off, else
// ~4 ranges per thread. fn must not call parallel_ranges itself.
void parallel_ranges(long units, long unit_cost, const std::function<void(long, long)>& fn);

// Threads a parallel_ranges uses (the caller included); MLXLLM_CPU_THREADS sets the
// default, else the machine's hardware threads.
int num_threads();
void set_num_threads(int n);

} // namespace mlxllm_cpu
