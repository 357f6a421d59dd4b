// Ragged paged attention on a cache of f32 pages: one translation unit per element type
// (ragged_paged_attention_kernels.h), so the types compile in parallel.
#include "ragged_paged_attention_kernels.h"

namespace jaxpaged::rpa {

void run_f32(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items) {
  run_items<float>(pool, p, items);
}

}  // namespace jaxpaged::rpa
