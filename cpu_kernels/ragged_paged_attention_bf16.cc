// Ragged paged attention on a cache of bf16 pages (their uint16 bit patterns): one translation unit per element type
// (ragged_paged_attention_kernels.h), so the types compile in parallel.
#include "ragged_paged_attention_kernels.h"

namespace jaxpaged::rpa {

void run_bf16(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items) {
  run_items<uint16_t>(pool, p, items);
}

}  // namespace jaxpaged::rpa
