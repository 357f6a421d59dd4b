// The ragged paged attention's FFI handler (checks, work items, dispatch to the kernel units), shared
// by its two targets: ragged_paged_attention.cc (f32 / bf16 caches) and ragged_paged_attention_8bit.cc
// (int8 / e4m3, in the library that builds at first use). See ragged_paged_attention.cc for the contract.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ragged_paged_attention.h"
#include "xla/ffi/api/ffi.h"

namespace jaxpaged::rpa {
namespace {

namespace ffi = xla::ffi;

// The cache's element type (pages as f32, bf16 bits, int8, or e4m3 bits): which kernel unit runs.
enum class CacheType { kF32, kBF16, kInt8, kE4M3 };

// The handler of both FFI targets: EightBit = false takes f32 / bf16 caches (the core library), true
// int8 / e4m3 ones (the quant library, built at the first 8-bit cache); each references only its own
// kernel units.
template <bool EightBit>
ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::Buffer<ffi::S32> bt,
                                ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::S32> qs,
                                ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> ks,
                                ffi::Buffer<ffi::F32> vs, float sm_scale, float soft_cap,
                                int32_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto bd = bt.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || bd.size() != 2)
    return ffi::Error::InvalidArgument("ragged_paged_attention: expected q [T, NH, D], "
                                       "k/v [L, KVH, NB, BS, D], block_tables [B, W]");
  // bf16 pages may arrive typed as u16 (their bit patterns): read the same way; u8 pages are e4m3 bits
  CacheType type;
  switch (k.element_type()) {
    case ffi::DataType::F32: type = CacheType::kF32; break;
    case ffi::DataType::BF16: case ffi::DataType::U16: type = CacheType::kBF16; break;
    case ffi::DataType::S8: type = CacheType::kInt8; break;
    case ffi::DataType::U8: type = CacheType::kE4M3; break;
    default: return ffi::Error::InvalidArgument("ragged_paged_attention: cache must be f32, bf16, int8 or u8 (e4m3)");
  }
  const bool quantized = type == CacheType::kInt8 || type == CacheType::kE4M3;
  if (quantized != EightBit)
    return ffi::Error::InvalidArgument(EightBit ? "ragged_paged_attention_8bit: cache must be int8 or u8 (e4m3)"
                                                : "ragged_paged_attention: an 8-bit cache goes through "
                                                  "jaxpaged_ragged_paged_attention_8bit");
  const auto sd = ks.dimensions();
  if (quantized && (sd.size() != 4 || sd[0] != kd[0] || sd[1] != kd[1] || sd[2] != kd[2] || sd[3] != kd[3] ||
                    vs.dimensions().size() != 4))
    return ffi::Error::InvalidArgument("ragged_paged_attention: an 8-bit cache needs scales [L, KVH, NB, BS]");
  if (v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("ragged_paged_attention: k and v dtypes differ");
  const int64_t bs = kd[3];
  if (bs != 8 && bs != 16 && bs != 32 && bs != 64)
    return ffi::Error::InvalidArgument("ragged_paged_attention: block_size must be 8, 16, 32 or 64");

  Problem p;
  std::vector<WorkItem> items;
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.k_scale = ks.typed_data();
  p.v_scale = vs.typed_data();
  p.bt = bt.typed_data();
  p.lens = lens.typed_data();
  p.qs = qs.typed_data();
  p.out = out->typed_data();
  p.num_heads = qd[1];
  p.head_dim = qd[2];
  p.num_kv_heads = kd[1];
  p.num_blocks = kd[2];
  p.block_size = bs;
  p.table_width = bd[1];
  p.layer = std::clamp<int64_t>(layer.typed_data()[0], 0, kd[0] - 1);
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = window;

  const int64_t num_tokens = qd[0], num_seqs = bd[0];
  const int64_t row = p.num_heads * p.head_dim;
  // Zero first: rows nobody owns (at/after qs[B]) and rows of malformed sequences stay zero.
  std::fill(p.out, p.out + num_tokens * row, 0.f);

  // A sequence has q_len * G rows per KV head (G = NH / KVH), cut into items of kTileRows rows.
  // One (sequence, KV head)'s items run back to back, last rows first: each reads a prefix of the
  // pages the one before read, still in cache. Longest sequences first: the last items to run are
  // short, so the threads finish together.
  const int64_t group = p.num_heads / p.num_kv_heads;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = p.qs[b + 1] - p.qs[b];
    if (q_len <= 0 || p.lens[b] < q_len || p.qs[b] < 0 || p.qs[b + 1] > num_tokens) continue;
    const int64_t rows = q_len * group;
    for (int64_t h = 0; h < p.num_kv_heads; ++h)
      for (int64_t r0 = (rows - 1) / kTileRows * kTileRows; r0 >= 0; r0 -= kTileRows)
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(r0),
                                 static_cast<int32_t>(std::min<int64_t>(kTileRows, rows - r0))});
  }
  std::stable_sort(items.begin(), items.end(),
                   [&](const WorkItem& a, const WorkItem& b) { return p.lens[a.seq] > p.lens[b.seq]; });

  if constexpr (EightBit) {
    if (type == CacheType::kInt8) run_int8(pool, p, items);
    else run_e4m3(pool, p, items);
  } else {
    if (type == CacheType::kBF16) run_bf16(pool, p, items);
    else run_f32(pool, p, items);
  }
  return ffi::Error::Success();
}

// Both targets' operands and attributes.
inline auto attention_binding() {
  return ffi::Ffi::Bind()
             .Ctx<ffi::ThreadPool>()
             .Arg<ffi::Buffer<ffi::F32>>()   // q
             .Arg<ffi::AnyBuffer>()          // k pages
             .Arg<ffi::AnyBuffer>()          // v pages
             .Arg<ffi::Buffer<ffi::S32>>()   // block tables
             .Arg<ffi::Buffer<ffi::S32>>()   // seq lens
             .Arg<ffi::Buffer<ffi::S32>>()   // query start
             .Arg<ffi::Buffer<ffi::S32>>()   // layer
             .Arg<ffi::Buffer<ffi::F32>>()   // k scales (8-bit cache)
             .Arg<ffi::Buffer<ffi::F32>>()   // v scales
             .Attr<float>("sm_scale")
             .Attr<float>("soft_cap")
             .Attr<int32_t>("window")
             .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace
}  // namespace jaxpaged::rpa
