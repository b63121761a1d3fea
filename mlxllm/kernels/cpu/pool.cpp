#include "pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mlxllm_cpu {
namespace {

constexpr int kMaxThreads = 1024; // a thread per core of the largest machines, not a typo's 10^9

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  explicit Pool(int n) {
    resize(n);
  }

  int size() const {
    return nthreads_;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    stop_workers();
    nthreads_ = std::max(1, n);
    stop_.store(false);
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    for (int t = 1; t < nthreads_; ++t) {
      workers_.emplace_back([this, generation] { worker_loop(generation); });
    }
  }

  void run(int nchunks, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    if (nthreads_ == 1 || nchunks <= 1) {
      for (int c = 0; c < nchunks; ++c) {
        fn(c);
      }
      return;
    }
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    // One word holds (total << 32 | next): claiming a chunk and seeing the job's size
    // are one atomic read, so a late worker can never run a chunk of a finished job.
    state_.store(static_cast<uint64_t>(nchunks) << 32, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    work();
    int spins = 0, d;
    while ((d = done_.load(std::memory_order_acquire)) != nchunks) {
      if (++spins < 4096) {
        cpu_relax();
      } else {
        done_.wait(d, std::memory_order_acquire);
      }
    }
  }

 private:
  void work() {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint32_t total = static_cast<uint32_t>(s >> 32);
      const uint32_t next = static_cast<uint32_t>(s);
      if (next >= total) {
        return;
      }
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        // A successful claim proves the caller still waits for this chunk, so fn_ is
        // its job's function.
        (*fn_)(static_cast<int>(next));
        if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<int>(total)) {
          done_.notify_all();
        }
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void worker_loop(uint32_t seen) {
    for (;;) {
      // Wait briefly before sleeping: a decoded token's kernels arrive tens of
      // microseconds apart and a futex wake-up costs about as much. Waiting yields the
      // core, never spins on it: while MLX's stream thread runs the ops between our
      // kernels, Python builds the next token's graph, so with a worker per core one
      // thread more than the cores wants to run, and a spinning worker took its core
      // (SmolLM2 decode on 2 cores: 93 tokens/s yielding, 84 spinning, same runs).
      // Not longer: a waiting worker still takes a core from BLAS's own threads.
      const auto start = std::chrono::steady_clock::now();
      uint32_t g;
      int spins = 0;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) {
        std::this_thread::yield();
        if ((++spins & 15) == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(100)) {
          generation_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) {
        return;
      }
      work();
    }
  }

  void stop_workers() {
    if (workers_.empty()) {
      return;
    }
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
    workers_.clear();
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* fn_ = nullptr;
  std::mutex run_mutex_;
};

int default_threads() {
  if (const char* env = std::getenv("MLXLLM_CPU_THREADS")) {
    // strtol, not atoi: an out-of-range value is clamped, never undefined
    return static_cast<int>(std::clamp(std::strtol(env, nullptr, 10), 1L, static_cast<long>(kMaxThreads)));
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

Pool& pool() {
  // Never destroyed: joining threads from a static destructor at interpreter exit is
  // a classic hang.
  static Pool* p = new Pool(default_threads());
  return *p;
}

int chunks_for(long units, long unit_cost) {
  constexpr long kMinParallelBytes = 64 << 10;
  if (units <= 1 || units * unit_cost < kMinParallelBytes || pool().size() == 1) {
    return 1;
  }
  return static_cast<int>(std::min<long>(units, 4L * pool().size()));
}

} // namespace

void parallel_ranges(long units, long unit_cost, const std::function<void(long, long)>& fn) {
  const int chunks = chunks_for(units, unit_cost);
  const long per = (units + chunks - 1) / chunks;
  const std::function<void(int)> chunk = [&](int c) {
    const long begin = c * per, end = std::min(units, begin + per);
    if (begin < end) {
      fn(begin, end);
    }
  };
  pool().run(chunks, chunk);
}

int num_threads() {
  return pool().size();
}

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads) {
    throw std::invalid_argument("[set_num_threads] n must be 1 to " + std::to_string(kMaxThreads));
  }
  pool().resize(n);
}

} // namespace mlxllm_cpu
