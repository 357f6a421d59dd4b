// Ragged paged attention for XLA:CPU, as an XLA FFI custom call (the CPU twin of
// pallas_kernels/ragged_paged_attention.py: same contract, same cache layout).
//
// Why native: under XLA:CPU every formulation of paged attention we measured (the Pallas
// kernel in interpret mode, per-page gathers + batched einsums, flat page lists) ran at
// 2-5 GB/s of K/V, because each op touches tiny [G, D] x [D, BS] tiles and pays a per-op
// cost. Here one work item is (sequence, KV head, up to 64 of its (query token, query head)
// rows) and its loop over pages runs in registers and L1. Items of a few rows (decodes) hold each
// query row in registers and take a page's dot products a row at a time, reducing kLanes keys' partial
// sums together into one vector of scores (attend_vec; attend_direct, plain dot products, for head
// dims other than 64, 128, 256); larger ones (prefill) hold the rows in SIMD lanes and
// run register-blocked outer products for the scores and P.V, K and V read row-wise, the
// softmax vectorized across rows (attend_lanes). Plain C++ with GCC vector extensions: no
// ISA-specific intrinsics, so it builds for any x86 (or other) -march.
//
// Files: this one is the FFI handler (checks, work items); the kernels are in
// ragged_paged_attention_kernels.h, compiled once per cache element type in
// ragged_paged_attention_{f32,bf16,int8,e4m3}.cc, which build in parallel; ragged_paged_attention.h
// holds what they share.
//
// Inputs (row-major):
//   q      f32  [T, NH, D]              the flat batch's queries (already RoPE'd, unscaled)
//   k, v   f32 or bf16 (or u16 bf16 bits) [L, KVH, NB, BS, D]  the paged cache (head-major pages),
//          or 8-bit: s8 (int8) or u8 (fp8 e4m3 bit patterns), each row times its scale
//   bt     s32  [B, W]                  block table; entries past a sequence's pages are never read
//   lens   s32  [B]                     context length incl. this step's tokens (0: padding)
//   qs     s32  [B + 1]                 sequence b's queries are rows [qs[b], qs[b+1])
//   layer  s32  [1]                     layer of the cache to read
//   ks, vs f32  [L, KVH, NB, BS]        an 8-bit cache's row scales (any f32 array otherwise: unread)
// Attributes: sm_scale, soft_cap (0: none), window (0: none).
// Output: f32 [T, NH, D]; rows at/after qs[B] are zero.
//
// Query i of sequence b sits at position lens[b] - q_len + i and sees keys at positions
// p with p <= its position, p < lens[b], and (window > 0) p > its position - window.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ragged_paged_attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxpaged::rpa;

// The cache's element type (pages as f32, bf16 bits, int8, or e4m3 bits): which kernel unit runs.
enum class CacheType { kF32, kBF16, kInt8, kE4M3 };

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

  switch (type) {
    case CacheType::kBF16: run_bf16(pool, p, items); break;
    case CacheType::kInt8: run_int8(pool, p, items); break;
    case CacheType::kE4M3: run_e4m3(pool, p, items); break;
    default: run_f32(pool, p, items);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedRaggedPagedAttention, RaggedPagedAttention,
                              ffi::Ffi::Bind()
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
