// Ragged paged attention for XLA:CPU, as an XLA FFI custom call (the CPU twin of
// pallas_kernels/ragged_paged_attention.py: same contract, same cache layout).
//
// Why native: under XLA:CPU every formulation of paged attention we measured (the Pallas
// kernel in interpret mode, per-page gathers + batched einsums, flat page lists) ran at
// 2-5 GB/s of K/V, because each op touches tiny [G, D] x [D, BS] tiles and pays a per-op
// cost. Here one work item is (sequence, KV head, query tile) and its loop over pages runs
// in registers and L1.
//
// Inputs (row-major):
//   q      f32  [T, NH, D]              the flat batch's queries (already RoPE'd, unscaled)
//   k, v   f32 or bf16 (or u16 bf16 bits) [L, KVH, NB, BS, D]  the paged cache (head-major pages)
//   bt     s32  [B, W]                  block table; entries past a sequence's pages are never read
//   lens   s32  [B]                     context length incl. this step's tokens (0: padding)
//   qs     s32  [B + 1]                 sequence b's queries are rows [qs[b], qs[b+1])
//   layer  s32  [1]                     layer of the cache to read
// Attributes: sm_scale, soft_cap (0: none), window (0: none).
// Output: f32 [T, NH, D]; rows at/after qs[B] are zero.
//
// Query i of sequence b sits at position lens[b] - q_len + i and sees keys at positions
// p with p <= its position, p < lens[b], and (window > 0) p > its position - window.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kQueryTile = 16;          // query tokens per work item (prefill); decodes take 1
constexpr float kMaskValue = -1e30f;    // finite: exp(m_old - m_new) stays NaN-free

inline float bf16_to_f32(uint16_t x) {   // a shift: vectorizes inside simd loops
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

// Page rows as f32. A f32 cache is read in place; a bf16 one is converted into `buf`.
inline const float* row_f32(const float* src, int /*d*/, float* /*buf*/) { return src; }
inline const float* row_f32(const uint16_t* src, int d, float* buf) {
#pragma omp simd
  for (int c = 0; c < d; ++c) buf[c] = bf16_to_f32(src[c]);
  return buf;
}

// K page [BS, D] -> kt [D, BS] f32 (transposed: the many-row score loop runs over keys in SIMD lanes).
template <typename T>
void load_page_transposed(const T* src, int bs, int d, float* dst, float* buf) {
  for (int j = 0; j < bs; ++j) {
    const float* row = row_f32(src + j * d, d, buf);
    for (int c = 0; c < d; ++c) dst[c * bs + j] = row[c];
  }
}

// A whole page as f32: read in place (f32 cache) or converted into `buf` (bf16).
inline const float* page_f32(const float* src, int /*n*/, float* /*buf*/) { return src; }
inline const float* page_f32(const uint16_t* src, int n, float* buf) { return row_f32(src, n, buf); }

// acc_row[D] += sum_j p[j] * v[j, :] over one page. Keys with p == 0 (not visible) are skipped, which
// also keeps their V rows (possibly NaN garbage past the sequence) out. With D known at compile time
// the accumulator row stays in registers across the page's keys.
template <int D>
inline void pv_row_fixed(float* __restrict acc_row, const float* __restrict p, const float* __restrict v,
                         int bs) {
  float a[D];
  for (int c = 0; c < D; ++c) a[c] = acc_row[c];
  for (int j = 0; j < bs; ++j) {
    const float pj = p[j];
    if (pj == 0.f) continue;
    const float* vj = v + j * D;
#pragma omp simd
    for (int c = 0; c < D; ++c) a[c] += pj * vj[c];
  }
  for (int c = 0; c < D; ++c) acc_row[c] = a[c];
}

inline void pv_row(float* __restrict acc_row, const float* __restrict p, const float* __restrict v, int bs,
                   int d) {
  if (d == 64) return pv_row_fixed<64>(acc_row, p, v, bs);
  if (d == 128) return pv_row_fixed<128>(acc_row, p, v, bs);
  for (int j = 0; j < bs; ++j) {
    const float pj = p[j];
    if (pj == 0.f) continue;
    const float* vj = v + j * d;
#pragma omp simd
    for (int c = 0; c < d; ++c) acc_row[c] += pj * vj[c];
  }
}

// Hint the page's cache lines into cache while the current page is computed (pages are scattered,
// so the hardware prefetcher cannot guess the next one).
template <typename T>
inline void prefetch_page(const T* src, int64_t elems) {
  const char* p = reinterpret_cast<const char*>(src);
  for (int64_t b = 0; b < elems * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  const int32_t* bt;
  const int32_t* lens;
  const int32_t* qs;
  float* out;
  int64_t num_heads, num_kv_heads, num_blocks, block_size, head_dim, table_width;
  int64_t layer;
  float sm_scale, soft_cap;
  int32_t window;
};

struct WorkItem {
  int32_t seq, head, tok0, ntok;  // query tokens [tok0, tok0 + ntok) of sequence seq (sequence-relative)
};

// Scores of `rows` query rows against one page: s[r * BS + j] = q[r] . k[j] (kt transposed).
template <int BS>
inline void page_scores_transposed(const float* qrows, int rows, int d, const float* kt, float* s) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {              // 4 rows share each kt[c] load
    float a0[BS] = {}, a1[BS] = {}, a2[BS] = {}, a3[BS] = {};
    const float* q0 = qrows + r * d;
    for (int c = 0; c < d; ++c) {
      const float* kc = kt + c * BS;
      const float x0 = q0[c], x1 = q0[d + c], x2 = q0[2 * d + c], x3 = q0[3 * d + c];
#pragma omp simd
      for (int j = 0; j < BS; ++j) {
        a0[j] += x0 * kc[j];
        a1[j] += x1 * kc[j];
        a2[j] += x2 * kc[j];
        a3[j] += x3 * kc[j];
      }
    }
    std::memcpy(s + r * BS, a0, sizeof a0);
    std::memcpy(s + (r + 1) * BS, a1, sizeof a1);
    std::memcpy(s + (r + 2) * BS, a2, sizeof a2);
    std::memcpy(s + (r + 3) * BS, a3, sizeof a3);
  }
  for (; r < rows; ++r) {
    float a[BS] = {};
    const float* qr = qrows + r * d;
    for (int c = 0; c < d; ++c) {
      const float* kc = kt + c * BS;
      const float x = qr[c];
#pragma omp simd
      for (int j = 0; j < BS; ++j) a[j] += x * kc[j];
    }
    std::memcpy(s + r * BS, a, sizeof a);
  }
}

// Same scores for few rows (decodes): one dot product per (row, key), K read in place.
template <int BS, typename T>
inline void page_scores_direct(const float* qrows, int rows, int d, const T* kpage, float* buf, float* s) {
  for (int j = 0; j < BS; ++j) {
    const float* kj = row_f32(kpage + j * d, d, buf);
    for (int r = 0; r < rows; ++r) {
      const float* qr = qrows + r * d;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int c = 0; c < d; ++c) acc += qr[c] * kj[c];
      s[r * BS + j] = acc;
    }
  }
}

constexpr int kDirectRows = 8;          // up to this many rows per item: scores without transposing K

// One work item: online softmax over the pages its tile can see.
template <int BS, typename T>
void attend_item(const Problem& p, const WorkItem& item, std::vector<float>& scratch) {
  const int d = static_cast<int>(p.head_dim);
  const int group = static_cast<int>(p.num_heads / p.num_kv_heads);
  const int rows = item.ntok * group;          // row r = token (r / group), query head h * group + r % group
  const int64_t q_start = p.qs[item.seq];
  const int64_t q_len = p.qs[item.seq + 1] - q_start;
  const int64_t seq_len = p.lens[item.seq];
  const int64_t ctx = seq_len - q_len;         // position of the sequence's first query

  scratch.resize(static_cast<size_t>(rows) * (2 * d + BS + 2) + 2 * BS * d + d);
  float* qrows = scratch.data();               // [rows, D] scaled queries
  float* acc = qrows + rows * d;               // [rows, D]
  float* s = acc + rows * d;                   // [rows, BS]
  float* m = s + rows * BS;                    // [rows]
  float* l = m + rows;                         // [rows]
  float* kt = l + rows;                        // [D, BS] (transposed path only)
  float* buf = kt + BS * d;                    // [D] one bf16 row converted
  float* vbuf = buf + d;                       // [BS, D] a bf16 V page converted

  for (int r = 0; r < rows; ++r) {
    const int64_t tok = q_start + item.tok0 + r / group;
    const float* src = p.q + (tok * p.num_heads + item.head * group + r % group) * d;
    for (int c = 0; c < d; ++c) qrows[r * d + c] = src[c] * p.sm_scale;
    m[r] = kMaskValue;
    l[r] = 0.f;
  }
  std::fill(acc, acc + rows * d, 0.f);

  const int64_t first_pos = ctx + item.tok0;                 // the tile's first query position
  const int64_t last_pos = first_pos + item.ntok - 1;        // ... and last (< seq_len)
  int64_t lo = 0;
  if (p.window > 0) lo = std::max<int64_t>(first_pos - p.window + 1, 0);
  const int64_t page_lo = lo / BS, page_hi = last_pos / BS;  // inclusive page range
  const int64_t page_elems = static_cast<int64_t>(BS) * d;
  const int64_t head_base = (p.layer * p.num_kv_heads + item.head) * p.num_blocks;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);

  for (int64_t pg = page_lo; pg <= page_hi && pg < p.table_width; ++pg) {
    int64_t page = p.bt[item.seq * p.table_width + pg];
    if (page < 0 || page >= p.num_blocks) page = 0;          // never follow a garbage entry
    const int64_t off = (head_base + page) * page_elems;
    if (pg < page_hi && pg + 1 < p.table_width) {
      int64_t next = p.bt[item.seq * p.table_width + pg + 1];
      if (next < 0 || next >= p.num_blocks) next = 0;
      prefetch_page(kbase + (head_base + next) * page_elems, page_elems);
      prefetch_page(vbase + (head_base + next) * page_elems, page_elems);
    }
    if (rows <= kDirectRows) {
      page_scores_direct<BS, T>(qrows, rows, d, kbase + off, buf, s);
    } else {
      load_page_transposed<T>(kbase + off, BS, d, kt, buf);
      page_scores_transposed<BS>(qrows, rows, d, kt, s);
    }
    // softmax statistics per row; s becomes the page's probabilities (0 where not seen)
    // (branch-free loops over the page's keys: they vectorize, exp included)
    const int64_t page_pos = pg * BS;
    for (int r = 0; r < rows; ++r) {
      const int64_t qpos = first_pos + r / group;
      // keys [kmin, kend) are visible to this row (causal, in the sequence, inside the window)
      const int64_t kend = std::min<int64_t>(qpos + 1, seq_len) - page_pos;
      const int64_t kmin = (p.window > 0 ? qpos - p.window + 1 : 0) - page_pos;
      float* sr = s + r * BS;
      if (kend <= 0 || kmin >= BS) {             // nothing visible in this page
        std::fill(sr, sr + BS, 0.f);
        continue;
      }
      if (p.soft_cap > 0.f) {
        const float cap = p.soft_cap, inv_cap = 1.f / p.soft_cap;
#pragma omp simd
        for (int j = 0; j < BS; ++j) sr[j] = cap * std::tanh(sr[j] * inv_cap);
      }
      float page_max = kMaskValue;
#pragma omp simd reduction(max : page_max)
      for (int j = 0; j < BS; ++j) {
        sr[j] = (j >= kmin && j < kend) ? sr[j] : kMaskValue;
        page_max = std::max(page_max, sr[j]);
      }
      const float m_new = std::max(m[r], page_max);   // a real score: this page has a visible key
      const float alpha = std::exp(m[r] - m_new);
      float psum = 0.f;
#pragma omp simd reduction(+ : psum)
      for (int j = 0; j < BS; ++j) {
        const float pj = std::exp(sr[j] - m_new);        // masked: exp(-1e30 - m) == 0
        sr[j] = pj;
        psum += pj;
      }
      if (alpha != 1.f) {
        float* ar = acc + r * d;
#pragma omp simd
        for (int c = 0; c < d; ++c) ar[c] *= alpha;
      }
      l[r] = alpha * l[r] + psum;
      m[r] = m_new;
    }
    // acc[r] += sum_j p[r, j] * v[j], row by row with the accumulator row held in registers
    const float* vpage = page_f32(vbase + off, BS * d, vbuf);
    for (int r = 0; r < rows; ++r) pv_row(acc + r * d, s + r * BS, vpage, BS, d);
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t tok = q_start + item.tok0 + r / group;
    float* dst = p.out + (tok * p.num_heads + item.head * group + r % group) * d;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int c = 0; c < d; ++c) dst[c] = acc[r * d + c] * inv;
  }
}

template <typename T>
void run_item(const Problem& p, const WorkItem& item, std::vector<float>& scratch) {
  switch (p.block_size) {
    case 8: return attend_item<8, T>(p, item, scratch);
    case 16: return attend_item<16, T>(p, item, scratch);
    case 32: return attend_item<32, T>(p, item, scratch);
    default: return attend_item<64, T>(p, item, scratch);   // only reached for block_size 64
  }
}

// Work shared by the calling thread and pool tasks through an atomic cursor. Tasks that start
// after the work is gone find nothing to do; the caller waits only for items taken.
struct Shared {
  Problem problem;
  bool bf16 = false;
  std::vector<WorkItem> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void drain() {
    std::vector<float> scratch;
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (bf16) run_item<uint16_t>(problem, items[i], scratch);
      else run_item<float>(problem, items[i], scratch);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::Buffer<ffi::S32> bt,
                                ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::S32> qs,
                                ffi::Buffer<ffi::S32> layer, float sm_scale, float soft_cap,
                                int32_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto bd = bt.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || bd.size() != 2)
    return ffi::Error::InvalidArgument("ragged_paged_attention: expected q [T, NH, D], "
                                       "k/v [L, KVH, NB, BS, D], block_tables [B, W]");
  // bf16 pages may arrive typed as u16 (their bit patterns): read the same way
  const bool bf16 = k.element_type() == ffi::DataType::BF16 || k.element_type() == ffi::DataType::U16;
  if (!bf16 && k.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("ragged_paged_attention: cache must be f32 or bf16");
  if (v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("ragged_paged_attention: k and v dtypes differ");
  const int64_t bs = kd[3];
  if (bs != 8 && bs != 16 && bs != 32 && bs != 64)
    return ffi::Error::InvalidArgument("ragged_paged_attention: block_size must be 8, 16, 32 or 64");

  auto shared = std::make_shared<Shared>();
  Problem& p = shared->problem;
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
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
  shared->bf16 = bf16;

  const int64_t num_tokens = qd[0], num_seqs = bd[0];
  const int64_t row = p.num_heads * p.head_dim;
  // Zero first: rows nobody owns (at/after qs[B]) and rows of malformed sequences stay zero.
  std::fill(p.out, p.out + num_tokens * row, 0.f);

  // Long tiles first: the last items to run are short, so the threads finish together.
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = p.qs[b + 1] - p.qs[b];
    if (q_len <= 0 || p.lens[b] < q_len || p.qs[b] < 0 || p.qs[b + 1] > num_tokens) continue;
    for (int64_t t0 = 0; t0 < q_len; t0 += kQueryTile)
      for (int64_t h = 0; h < p.num_kv_heads; ++h)
        shared->items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h),
                                 static_cast<int32_t>(t0),
                                 static_cast<int32_t>(std::min<int64_t>(kQueryTile, q_len - t0))});
  }
  std::stable_sort(shared->items.begin(), shared->items.end(),
                   [&](const WorkItem& a, const WorkItem& b) {
                     return p.lens[a.seq] - p.qs[a.seq + 1] + p.qs[a.seq] + a.tok0 + a.ntok >
                            p.lens[b.seq] - p.qs[b.seq + 1] + p.qs[b.seq] + b.tok0 + b.ntok;
                   });

  const int64_t n = static_cast<int64_t>(shared->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->drain(); });
  shared->drain();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
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
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
