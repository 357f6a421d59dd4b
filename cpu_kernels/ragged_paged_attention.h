// What the ragged paged attention's FFI handler (ragged_paged_attention.cc) shares with the kernels,
// which are built as one translation unit per cache element type (ragged_paged_attention_<type>.cc,
// compiled in parallel: as one file their 128 template instantiations took ~50 s of g++ on the
// critical path of a first start).
#pragma once

#include <cstdint>
#include <vector>

#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace jaxpaged::rpa {

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  const float* k_scale;   // [L, KVH, NB, BS] an 8-bit cache's row scales (unread otherwise)
  const float* v_scale;
  const int32_t* bt;
  const int32_t* lens;
  const int32_t* qs;
  float* out;
  int64_t num_heads, num_kv_heads, num_blocks, block_size, head_dim, table_width;
  int64_t layer;
  float sm_scale, soft_cap;
  int32_t window;
};

// One work item: rows [row0, row0 + nrows) of a sequence's rows for one KV head. The sequence's
// flat row i is query token i / G and query head head * G + i % G (G = NH / KVH): the query heads
// that share a KV head are consecutive rows, so one K/V page read serves all of them.
struct WorkItem {
  int32_t seq, head, row0, nrows;
};

constexpr int kTileVecs = 4;                                // row vectors per item, at most
constexpr int kTileRows = kTileVecs * jaxpaged::kLanes;     // rows per work item

// Runs every item (the calling thread and XLA's pool, work_queue.h) on a cache of one element type:
// f32 pages, bf16 bits, int8, or e4m3 bits.
void run_f32(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items);
void run_bf16(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items);
void run_int8(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items);
void run_e4m3(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items);

}  // namespace jaxpaged::rpa
