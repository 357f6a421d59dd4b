// Work fan-out for the native kernels: units [0, units) shared by the calling thread and helpers
// from XLA's intra-op pool through an atomic cursor; returns once every unit has run.
//
// Lifetime: a helper the pool starts late (after the last unit was taken) finds the cursor past the
// end and returns without calling `fn`; the cursor and the counter live in a shared_ptr it holds, so
// the caller may return before such a helper has run. `fn` is copied into each helper: whatever it
// refers to by reference is only touched while units remain, i.e. before the caller returns.
// Per-thread scratch (a dequantization buffer) belongs in a thread_local inside `fn`.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace jaxpaged {

// `enter()` / `leave()` run on each thread that drains, around its units (per-thread state such as
// the AMX tile configuration); the plain overload has none. `fn` takes the unit, or the unit and the
// one this thread runs next (-1 if none: a prefetch hint).
template <typename Fn, typename Enter, typename Leave>
void run_units(xla::ffi::ThreadPool& pool, int64_t units, Fn fn, Enter enter, Leave leave) {
  struct Cursor {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  if (units <= 0) return;
  auto cursor = std::make_shared<Cursor>();
  auto drain = [cursor, units, fn, enter, leave] {
    int64_t u = cursor->next.fetch_add(1);
    if (u >= units) return;   // a late helper: nothing left, and the caller may be gone
    enter();
    int64_t taken = 0;
    if constexpr (std::is_invocable_v<Fn&, int64_t, int64_t>) {
      // fn(u, next): the thread claims its next unit before running this one (-1: none left), so fn
      // can prefetch that unit's data while it computes
      while (u < units) {
        const int64_t next = cursor->next.fetch_add(1);
        fn(u, next < units ? next : int64_t{-1});
        ++taken;
        u = next;
      }
    } else {
      for (; u < units; u = cursor->next.fetch_add(1), ++taken) fn(u);
    }
    leave();
    cursor->done.fetch_add(taken, std::memory_order_release);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([drain] { drain(); });   // a copy each (Schedule takes F&&)
  drain();
  while (cursor->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

template <typename Fn>
void run_units(xla::ffi::ThreadPool& pool, int64_t units, Fn fn) {
  run_units(pool, units, fn, [] {}, [] {});
}

}  // namespace jaxpaged
