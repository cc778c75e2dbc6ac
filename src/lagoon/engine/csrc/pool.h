// Lagoon's work-sharing thread pool for its own kernels (pool.cpp), used instead of torch's OpenMP
// pool (at::parallel_for) so that a worker thread the OS has descheduled costs little.
//
// Why: libgomp ends every parallel region at a barrier where each thread waits for all the others.
// A decode step runs ~150 regions; on a 2-core machine next to one busy process, one of the two
// threads is off its core for a time slice at a time and every region waits for it (57-60 tok/s ->
// 1-3 tok/s, docs/architecture.md "Under load"). Here the caller publishes a job as an atomic chunk
// counter; the caller and the awake workers claim chunks until none are left, and the caller waits
// only for chunks already claimed, never for a worker that has not claimed one.
#pragma once
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace lagoon {

// fn(b, e) over [begin, end) in disjoint ranges covering it, each at least `grain` items long (but
// the last), on the calling thread and the pool's workers: at::get_num_threads() threads in all.
// at::parallel_for's contract: a range shorter than `grain`, one thread, or a call from inside a
// job runs fn(begin, end) inline. With the pool switched off (LAGOON_KERNEL_POOL=0, or
// `lagoon::kernel_pool(False)`) this *is* at::parallel_for. An exception in any range is rethrown
// here once every claimed range has finished.
void parallel_for(int64_t begin, int64_t end, int64_t grain, c10::function_ref<void(int64_t, int64_t)> fn);

}  // namespace lagoon
