// Ragged paged attention on a cache of fp8 e4m3 pages (bit patterns) times their row scales: one translation unit per element type
// (ragged_paged_attention_kernels.h), so the types compile in parallel.
#include "ragged_paged_attention_kernels.h"

namespace jaxpaged::rpa {

void run_e4m3(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items) {
  run_items<uint8_t>(pool, p, items);
}

}  // namespace jaxpaged::rpa
