// Lagoon's kernel thread pool (see pool.h for why). N - 1 persistent workers plus the calling thread.
//
// A job is published as one 64-bit word, `ticket` = epoch (32 bits) | chunks (16) | next chunk (16);
// a thread claims chunk i by a compare-and-swap of (epoch, n, i) -> (epoch, n, i + 1), so a claim
// can never land on another job, and the job's other fields (fn, range, chunk size) are read only
// after a successful claim, when the caller cannot have moved on (it waits for every claimed chunk).
// The caller claims chunks like any worker; when none are left it waits for the chunks in flight
// (`done` counts finished ones): it spins ~tune_caller_spin_us, then sleeps on a futex that the finishing
// worker wakes. It sleeps rather than sched_yield()s: next to a busy process a yield hands the core
// to that process for a whole time slice (ms), while a sleep frees the core for the late worker.
// Workers spin ~tune_worker_spin_us after their last chunk (a decode step's next kernel is usually that
// close), then sleep on the `wake` futex until the next job.
//
// Chunks: up to tune_chunks a thread, so a worker caught mid-chunk by the scheduler holds back a
// small part of the job (the caller takes every chunk it had not claimed yet).
//
// Lifetime: the pool is never destroyed and its workers are detached: at process exit they are
// simply ended (a joinable std::thread destroyed at exit would std::terminate(): the "terminate
// called without an active exception" abort, status 134). After fork() the child has no workers and
// starts a fresh crew on first use. A thread-count change (at::get_num_threads() at the call) retires
// the crew and starts another. Re-entrancy: a call from inside a job, or from a second thread while
// a job runs, runs its range inline on that thread.
#include "pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __linux__
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kMaxChunks = 0xffff;
// tunables (lagoon::pool_tune, for benchmarks); the defaults are what ships
std::atomic<int64_t> tune_chunks{8};
std::atomic<int64_t> tune_caller_spin_us{50};
std::atomic<int64_t> tune_worker_spin_us{100};

using Clock = std::chrono::steady_clock;
using Fn = c10::function_ref<void(int64_t, int64_t)>;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "a futex word is a plain uint32");

// wait while *w == expected (or until woken / `timeout_us` > 0 passes); spurious returns are fine
void futex_wait(std::atomic<uint32_t>& w, uint32_t expected, int64_t timeout_us = 0) {
#ifdef __linux__
  timespec ts{static_cast<time_t>(timeout_us / 1000000), static_cast<long>(timeout_us % 1000000) * 1000};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&w), FUTEX_WAIT_PRIVATE, expected, timeout_us > 0 ? &ts : nullptr,
          nullptr, 0);
#else
  if (timeout_us > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(timeout_us, 1000)));
  else
    w.wait(expected);
#endif
}

void futex_wake(std::atomic<uint32_t>& w, int n) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&w), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
#else
  if (n == 1)
    w.notify_one();
  else
    w.notify_all();
#endif
}

bool env_enabled() {
  const char* v = std::getenv("LAGOON_KERNEL_POOL");
  if (v == nullptr) return true;
  const std::string s(v);
  return !(s == "0" || s == "false" || s == "no" || s == "off");
}

struct Ticket {
  uint32_t epoch, n, next;
  static Ticket of(uint64_t t) { return {uint32_t(t >> 32), uint32_t((t >> 16) & 0xffff), uint32_t(t & 0xffff)}; }
  uint64_t word() const { return (uint64_t(epoch) << 32) | (uint64_t(n) << 16) | next; }
};

thread_local bool tls_in_job = false;

struct Pool {
  std::atomic<bool> enabled{env_enabled()};
  // the job (written by the caller before `ticket` is released, read after a claim)
  std::atomic<const Fn*> fn{nullptr};
  std::atomic<int64_t> begin{0}, end{0}, chunk{1};
  alignas(64) std::atomic<uint64_t> ticket{0};
  alignas(64) std::atomic<uint32_t> done{0};  // chunks of the current job finished (futex of a waiting caller)
  std::atomic<uint32_t> caller_asleep{0};
  alignas(64) std::atomic<uint32_t> wake{0};  // bumped once a job: sleeping workers wait on it
  std::atomic<uint32_t> sleepers{0};
  alignas(64) std::atomic<bool> busy{false};  // a job is in progress (one caller at a time)
  std::atomic<uint32_t> crew{0};              // workers of an older crew retire
  std::atomic<uint32_t> alive{0};
  int nworkers = 0, wanted = 0;  // of the current crew (only the caller holding `busy` touches these)
  uint32_t epoch = 0;
  std::mutex error_mu;
  std::exception_ptr error;
  // statistics and the test hook (lagoon::pool_stats / lagoon::pool_hold)
  std::atomic<int64_t> jobs{0}, last_chunks{0}, last_caller_chunks{0};
  std::atomic<int64_t> crowded{0};  // calls that found another thread's job running and ran inline
  std::atomic<int> hold_mode{0};  // 1: the next worker to see a job stalls before claiming; 2: after its first claim
  std::atomic<int64_t> hold_us{0};
  std::atomic<uint32_t> held{0}, gate{0};
  std::atomic<int64_t> stalls{0};  // how often the hook has stalled a worker
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached workers may still read it at exit
  return *p;
}

void stall_if_held(Pool& P, int mode) {
  int armed = mode;
  if (P.hold_mode.load(std::memory_order_relaxed) != mode || !P.hold_mode.compare_exchange_strong(armed, 0)) return;
  P.held.store(1);
  P.stalls.fetch_add(1);
  const auto until = Clock::now() + std::chrono::microseconds(P.hold_us.load());
  while (P.gate.load() == 0) {
    const int64_t left = std::chrono::duration_cast<std::chrono::microseconds>(until - Clock::now()).count();
    if (left <= 0) break;
    futex_wait(P.gate, 0, left);
  }
  P.held.store(0);
}

void run_chunk(Pool& P, uint32_t i) {
  const int64_t b = P.begin.load(std::memory_order_relaxed) + int64_t(i) * P.chunk.load(std::memory_order_relaxed);
  const int64_t e = std::min(P.end.load(std::memory_order_relaxed), b + P.chunk.load(std::memory_order_relaxed));
  try {
    (*P.fn.load(std::memory_order_relaxed))(b, e);
  } catch (...) {
    std::lock_guard<std::mutex> g(P.error_mu);
    if (!P.error) P.error = std::current_exception();
  }
}

// claim the next chunk of job `epoch` (any epoch when epoch == ~0u: a worker takes the job it sees)
bool claim(Pool& P, uint32_t& epoch, uint32_t& i) {
  uint64_t t = P.ticket.load(std::memory_order_acquire);
  while (true) {
    const Ticket k = Ticket::of(t);
    if ((epoch != ~0u && k.epoch != epoch) || k.next >= k.n) return false;
    if (P.ticket.compare_exchange_weak(t, Ticket{k.epoch, k.n, k.next + 1}.word(), std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
      epoch = k.epoch;
      i = k.next;
      return true;
    }
  }
}

void worker_loop(Pool* pp, uint32_t crew) {
  Pool& P = *pp;
  tls_in_job = true;  // a kernel a chunk calls runs its own ranges inline
  uint32_t seen = P.wake.load();
  while (P.crew.load(std::memory_order_relaxed) == crew) {
    // work on whatever job is open
    uint32_t epoch = ~0u, i;
    bool first = true;
    const Ticket open = Ticket::of(P.ticket.load(std::memory_order_acquire));
    if (open.next < open.n) {
      stall_if_held(P, 1);
      while (claim(P, epoch, i)) {
        if (first) stall_if_held(P, 2);
        first = false;
        run_chunk(P, i);
        P.done.fetch_add(1);
        if (P.caller_asleep.load()) futex_wake(P.done, 1);
      }
    }
    // idle: spin a little for the next job, then sleep until one is published
    const auto until = Clock::now() + std::chrono::microseconds(tune_worker_spin_us.load(std::memory_order_relaxed));
    int spins = 0;
    while (P.wake.load(std::memory_order_acquire) == seen && P.crew.load(std::memory_order_relaxed) == crew) {
      cpu_relax();
      if (++spins % 64 == 0 && Clock::now() > until) {
        P.sleepers.fetch_add(1);
        if (P.wake.load() == seen && P.crew.load() == crew) futex_wait(P.wake, seen);
        P.sleepers.fetch_sub(1);
      }
    }
    seen = P.wake.load(std::memory_order_acquire);
  }
  P.alive.fetch_sub(1);
}

void retire_crew(Pool& P) {
  P.crew.fetch_add(1);
  P.gate.store(1);
  futex_wake(P.gate, INT_MAX);
  P.wake.fetch_add(1);
  futex_wake(P.wake, INT_MAX);
  while (P.alive.load() != 0) std::this_thread::yield();
  P.nworkers = 0;
}

void ensure_workers(Pool& P, int n) {
  if (P.wanted == n) return;
  retire_crew(P);
  P.wanted = n;
  const uint32_t crew = P.crew.load();
  for (int w = 0; w < n; ++w) {
    P.alive.fetch_add(1);
    try {
      std::thread(worker_loop, &P, crew).detach();
    } catch (const std::system_error&) {  // no more threads: the caller and those started do the work
      P.alive.fetch_sub(1);
      break;
    }
    ++P.nworkers;
  }
}

#ifdef __linux__
void after_fork_in_child() {  // the workers did not come along
  Pool& P = pool();
  P.crew.fetch_add(1);
  P.alive.store(0);
  P.nworkers = P.wanted = 0;
  P.busy.store(false);
  P.sleepers.store(0);
  P.caller_asleep.store(0);
  tls_in_job = false;
}
const int kAtFork = pthread_atfork(nullptr, nullptr, after_fork_in_child);
#endif

void wait_for(Pool& P, uint32_t n) {
  const auto until = Clock::now() + std::chrono::microseconds(tune_caller_spin_us.load(std::memory_order_relaxed));
  int spins = 0;
  while (P.done.load(std::memory_order_acquire) != n) {
    cpu_relax();
    if (++spins % 64 == 0 && Clock::now() > until) {
      P.caller_asleep.store(1);
      const uint32_t d = P.done.load();
      if (d != n) futex_wait(P.done, d);
      P.caller_asleep.store(0);
    }
  }
}

}  // namespace

namespace lagoon {

void parallel_for(int64_t begin, int64_t end, int64_t grain, Fn fn) {
  if (begin >= end) return;
  Pool& P = pool();
  if (!P.enabled.load(std::memory_order_relaxed)) return at::parallel_for(begin, end, grain, fn);
  const int64_t range = end - begin, threads = at::get_num_threads();
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || range < grain || tls_in_job || range == 1) return fn(begin, end);
  if (P.busy.exchange(true, std::memory_order_acquire)) {  // another thread's job is running
    P.crowded.fetch_add(1, std::memory_order_relaxed);
    return fn(begin, end);
  }
  ensure_workers(P, static_cast<int>(threads - 1));
  int64_t n = std::min({(range + grain - 1) / grain, threads * tune_chunks.load(std::memory_order_relaxed), kMaxChunks});
  const int64_t chunk = (range + n - 1) / n;
  n = (range + chunk - 1) / chunk;
  P.fn.store(&fn, std::memory_order_relaxed);
  P.begin.store(begin, std::memory_order_relaxed);
  P.end.store(end, std::memory_order_relaxed);
  P.chunk.store(chunk, std::memory_order_relaxed);
  P.done.store(0, std::memory_order_relaxed);
  P.error = nullptr;
  uint32_t epoch = ++P.epoch;
  P.ticket.store(Ticket{epoch, uint32_t(n), 0}.word(), std::memory_order_release);
  P.wake.fetch_add(1);
  if (P.sleepers.load() > 0) futex_wake(P.wake, static_cast<int>(std::min<int64_t>(n - 1, P.nworkers)));

  tls_in_job = true;
  int64_t mine = 0;
  uint32_t i;
  while (claim(P, epoch, i)) {
    run_chunk(P, i);
    P.done.fetch_add(1, std::memory_order_release);
    ++mine;
  }
  wait_for(P, uint32_t(n));
  tls_in_job = false;
  P.jobs.fetch_add(1, std::memory_order_relaxed);
  P.last_chunks.store(n, std::memory_order_relaxed);
  P.last_caller_chunks.store(mine, std::memory_order_relaxed);
  std::exception_ptr error = P.error;
  P.error = nullptr;
  P.busy.store(false, std::memory_order_release);
  if (error) std::rethrow_exception(error);
}

}  // namespace lagoon

namespace {

// the switch: returns the previous setting (on < 0: only asks)
bool pool_set(int64_t on) {
  Pool& P = pool();
  return on < 0 ? P.enabled.load() : P.enabled.exchange(on != 0);
}

// [workers alive, jobs run, chunks of the last job, of which the caller ran, a worker held by
// pool_hold now, stalls by pool_hold so far, calls run inline beside another thread's job]
std::vector<int64_t> pool_stats() {
  Pool& P = pool();
  return {int64_t(P.alive.load()), P.jobs.load(), P.last_chunks.load(), P.last_caller_chunks.load(),
          int64_t(P.held.load()), P.stalls.load(), P.crowded.load()};
}

// Test hook: the next worker to see a job stalls (mode 1: before claiming a chunk; 2: holding its
// first chunk) until `pool_release()` or `timeout_us` passes. mode 0 disarms.
void pool_hold(int64_t mode, int64_t timeout_us) {
  Pool& P = pool();
  P.gate.store(0);
  P.hold_us.store(timeout_us);
  P.hold_mode.store(static_cast<int>(mode));
}

// Benchmarks: chunks a thread, the caller's and the workers' spin before sleeping (us); a value < 0
// keeps the setting. Returns the settings now.
std::vector<int64_t> pool_tune(int64_t chunks_per_thread, int64_t caller_spin_us, int64_t worker_spin_us) {
  if (chunks_per_thread > 0) tune_chunks.store(chunks_per_thread);
  if (caller_spin_us >= 0) tune_caller_spin_us.store(caller_spin_us);
  if (worker_spin_us >= 0) tune_worker_spin_us.store(worker_spin_us);
  return {tune_chunks.load(), tune_caller_spin_us.load(), tune_worker_spin_us.load()};
}

void pool_release() {
  Pool& P = pool();
  P.hold_mode.store(0);
  P.gate.store(1);
  futex_wake(P.gate, INT_MAX);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lagoon, m) {
  m.def("pool_set(int on) -> bool", pool_set);
  m.def("pool_stats() -> int[]", pool_stats);
  m.def("pool_hold(int mode, int timeout_us) -> ()", pool_hold);
  m.def("pool_release() -> ()", pool_release);
  m.def("pool_tune(int chunks_per_thread, int caller_spin_us, int worker_spin_us) -> int[]", pool_tune);
}
