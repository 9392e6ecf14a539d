// lowbit's parallel regions: one OpenMP region where it pays, none at all otherwise.
#pragma once
#include <omp.h>
#include <stdint.h>

// True while a body runs on its calling thread alone (lb_parallel's direct path), perhaps inside another region:
// lb_team_size / lb_team_rank then say 1 / 0, as a region of one thread would, not the enclosing team's numbers.
// (hidden: one flag inside this library, not a process-wide unique symbol, and a cheaper TLS access)
__attribute__((visibility("hidden"))) inline thread_local bool lb_alone = false;

static inline int lb_team_size() { return lb_alone ? 1 : omp_get_num_threads(); }
static inline int lb_team_rank() { return lb_alone ? 0 : omp_get_thread_num(); }

// Run body() on nth threads in one OpenMP region when nth > 1 and worth, else directly on the calling thread.
// libgomp ends every region -- a team of one included -- with a futex wake on its barrier: a system call of about a
// microsecond, longer than a small layer's whole kernel (strace: two per call of a 10 x 128 W8A8 layer). Bodies
// split their work with lb_team_size / lb_team_rank (my_rows, lb_my_range), which are 1 / 0 on the direct path.
template <class F>
static inline void lb_parallel(int nth, bool worth, F&& body) {
    const bool was = lb_alone;
    if (nth > 1 && worth) {
#pragma omp parallel num_threads(nth)
        {
            lb_alone = false;  // (each thread of the new team)
            body();
        }
        lb_alone = was;  // (the calling thread was one of the team)
    } else {
        lb_alone = true;
        body();
        lb_alone = was;
    }
}

// Indices [0, n) split into one contiguous range per thread of the current team, [*lo, *hi) this thread's (what
// `omp for schedule(static)` does, without its barrier).
static inline void lb_my_range(int64_t n, int64_t* lo, int64_t* hi) {
    const int64_t nth = lb_team_size(), tid = lb_team_rank();
    const int64_t per = n / nth, rem = n % nth;
    *lo = tid * per + (tid < rem ? tid : rem);
    *hi = *lo + per + (tid < rem ? 1 : 0);
}
