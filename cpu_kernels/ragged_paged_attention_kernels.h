// The ragged paged attention kernels (the design is described in ragged_paged_attention.cc), for one
// cache element type T at a time: each ragged_paged_attention_<type>.cc includes this header and
// instantiates run_items<T> for its own T only. Everything here has internal linkage (one copy per
// translation unit); the types the units share live in ragged_paged_attention.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "ragged_paged_attention.h"
#include "vec.h"
#include "work_queue.h"

namespace jaxpaged::rpa {
namespace {


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

// A whole page as f32: read in place (f32 cache) or converted into `buf` (bf16).
inline const float* page_f32(const float* src, int /*n*/, float* /*buf*/) { return src; }
inline const float* page_f32(const uint16_t* src, int n, float* buf) { return row_f32(src, n, buf); }

// 8-bit caches (pallas_kernels/kv_quant.py): int8 values, or fp8 e4m3 held as its bit patterns (u8).
// Their pages are dequantized into an f32 buffer (row j times scale[j]) as they are read, and the f32
// code runs on the buffer: the page costs D + 4 bytes a row of memory traffic instead of 4D / 2D.
template <typename T>
constexpr bool kQuantized = std::is_same_v<T, int8_t> || std::is_same_v<T, uint8_t>;
// The element type a page is read as: f32 for an 8-bit cache (its dequantized buffer), else T itself.
template <typename T>
using ReadT = std::conditional_t<kQuantized<T>, float, T>;

inline float to_f32(int8_t x) { return static_cast<float>(x); }
// e4m3 (bias 7, no infinities; the writer never stores NaN): normal values put their exponent and
// mantissa in an f32's bits with the bias moved by 120; subnormals (exponent 0) are m * 2^-9.
// Branch-free: it vectorizes.
inline float to_f32(uint8_t x) {
  const uint32_t em = x & 0x7fu;
  const float normal = __builtin_bit_cast(float, (em << 20) + (120u << 23));
  const float mag = em >= 8u ? normal : static_cast<float>(em) * (1.f / 512);
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, mag) | (static_cast<uint32_t>(x & 0x80u) << 24));
}

// The K or V page at element offset `off` of `base`, readable as ReadT<T>: in place, or (8-bit) row j
// dequantized with scales[off / d + j] into buf [BS, D].
template <typename T>
inline const ReadT<T>* read_page(const void* base, const float* scales, int64_t off, int bs, int d, float* buf) {
  if constexpr (kQuantized<T>) {
    const T* src = static_cast<const T*>(base) + off;
    const float* sc = scales + off / d;
    for (int j = 0; j < bs; ++j) {
      const float sj = sc[j];
#pragma omp simd
      for (int c = 0; c < d; ++c) buf[j * d + c] = to_f32(src[j * d + c]) * sj;
    }
    return buf;
  } else {
    return static_cast<const T*>(base) + off;
  }
}

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


// Where an item's rows come from: row r (0-based within the item) in q / out and its position.
struct Rows {
  int64_t q_start;      // flat index of the sequence's first query token
  int64_t seq_len;
  int64_t ctx;          // position of the sequence's first query (seq_len - q_len)
  int64_t num_heads, head_dim;
  int32_t head, row0, group;

  Rows(const Problem& p, const WorkItem& item)
      : q_start(p.qs[item.seq]),
        seq_len(p.lens[item.seq]),
        ctx(p.lens[item.seq] - (p.qs[item.seq + 1] - p.qs[item.seq])),
        num_heads(p.num_heads),
        head_dim(p.head_dim),
        head(item.head),
        row0(item.row0),
        group(static_cast<int32_t>(p.num_heads / p.num_kv_heads)) {}

  int64_t token(int r) const { return (row0 + r) / group; }      // sequence-relative
  int64_t pos(int r) const { return ctx + token(r); }
  // element offset of the row's [D] vector in q and in out
  int64_t offset(int r) const {
    return ((q_start + token(r)) * num_heads + head * group + (row0 + r) % group) * head_dim;
  }
};

// Calls body(pg, off) for each page that rows [0, nrows) may see, in order: pg is the page's index
// in the sequence, off the element offset of its K (and V) page in the cache. Rows are in position
// order, so the first row bounds the window and the last one causality. The next page's first
// PrefetchLines cache lines of K and of V (0: all) are hinted before the body runs.
template <int BS, typename T, int PrefetchLines = 0, typename Body>
inline void for_each_page(const Problem& p, const Rows& rows, int nrows, int head, int seq, Body&& body) {
  const int64_t first_pos = rows.pos(0), last_pos = rows.pos(nrows - 1);   // last_pos < seq_len
  int64_t lo = 0;
  if (p.window > 0) lo = std::max<int64_t>(first_pos - p.window + 1, 0);
  const int64_t page_lo = lo / BS, page_hi = last_pos / BS;  // inclusive page range
  const int64_t page_elems = static_cast<int64_t>(BS) * p.head_dim;
  const int64_t prefetch_elems =
      PrefetchLines > 0 ? std::min<int64_t>(page_elems, PrefetchLines * 64 / sizeof(T)) : page_elems;
  const int64_t head_base = (p.layer * p.num_kv_heads + head) * p.num_blocks;
  const int32_t* table = p.bt + seq * p.table_width;
  auto block = [&](int64_t pg) -> int64_t {                  // never follow a garbage entry
    const int64_t b = table[pg];
    return b < 0 || b >= p.num_blocks ? 0 : b;
  };
  for (int64_t pg = page_lo; pg <= page_hi && pg < p.table_width; ++pg) {
    if (pg < page_hi && pg + 1 < p.table_width) {
      const int64_t next = (head_base + block(pg + 1)) * page_elems;
      prefetch_page(static_cast<const T*>(p.k) + next, prefetch_elems);
      prefetch_page(static_cast<const T*>(p.v) + next, prefetch_elems);
      if constexpr (kQuantized<T>) {                // the page's BS scales: one or two lines
        __builtin_prefetch(p.k_scale + next / p.head_dim);
        __builtin_prefetch(p.v_scale + next / p.head_dim);
      }
    }
    body(pg, (head_base + block(pg)) * page_elems);
  }
}

// Scores for few rows (decodes): one dot product per (row, key), K read in place.
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

constexpr int kDirectRows = 8;          // items of up to this many rows take attend_direct

// ---- Lanes path (many rows: prefill): query rows in SIMD lanes -------------------------------------
// Every per-row quantity is a vector over kLanes rows, so the softmax needs no horizontal reductions;
// scores and P.V are register-blocked outer products that broadcast K / V elements (K is read
// row-wise, never transposed). GCC vector extensions keep this plain C++: they lower to zmm under
// AVX-512 and to narrower registers elsewhere.
using jaxpaged::kLanes;   // vec.h: 16 lanes (zmm) under AVX-512, 8 (ymm) under AVX, else 4
using jaxpaged::loadu;
using jaxpaged::splat;
using jaxpaged::storeu;
using jaxpaged::vf;
using jaxpaged::vi;
#if defined(__AVX512F__)
constexpr int kAccRegs = 16;            // accumulators per register block (of 32 registers)
#else
constexpr int kAccRegs = 8;             // (of 16 registers)
#endif

inline vi splat_i(int32_t x) { return vi{} + x; }

// Largest power of two <= n (n >= 1): register-block sizes that divide the power-of-two page size.
constexpr int pow2_floor(int n) { return n >= 2 ? 2 * pow2_floor(n / 2) : 1; }

// e^x = 2^n e^r for n = round(x / ln2), which the caller computed (x >= -86, so n >= -125 keeps the
// result normal): r = x - n ln2, |r| <= ln2 / 2; e^r by its degree-6 Taylor polynomial; 2^n is
// added to the exponent bits.
inline vf exp_split(vf x, vi n) {
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693145752f - nf * 1.42860677e-6f;           // ln 2 split in two parts
  vf e = splat(1.f / 720);
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  return reinterpret_cast<vf>(reinterpret_cast<vi>(e) + (n << 23));
}

// e^x for x <= 0 (relative error ~1e-7). Inputs below -86 give ~e^-86, not 0: callers that need exact
// zeros select them.
inline vf exp_le0(vf x) {
  x = x > splat(-86.f) ? x : splat(-86.f);
  // round to nearest: truncation of a value <= 0.5 goes up
  return exp_split(x, __builtin_convertvector(x * 1.44269504f - 0.5f, vi));
}

// cap * tanh(s / cap), through e^(-2|y|) so exp_le0 serves.
inline vf soft_cap_v(vf s, float cap) {
  const vf y = s * (1.f / cap);
  const vf e = exp_le0(-2.f * (y < 0 ? -y : y));
  const vf t = cap * (1.f - e) / (1.f + e);
  return y < 0 ? -t : t;
}

// Scores of one page: st[j * NV + v] = sum_c qt[c * NV + v] * k[j * d + c] (row vector v, key j).
// A block of KB keys x NV row vectors stays in registers across c; each K element is broadcast once.
template <int BS, int NV>
inline void scores_lanes(const vf* __restrict qt, const float* __restrict k, int d, vf* __restrict st) {
  constexpr int KB = std::min(BS, pow2_floor(kAccRegs / NV));
  for (int j0 = 0; j0 < BS; j0 += KB) {
    vf a[KB][NV] = {};
    const float* kb = k + j0 * d;
    for (int c = 0; c < d; ++c) {
      vf q[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) q[v] = qt[c * NV + v];
#pragma GCC unroll 16
      for (int i = 0; i < KB; ++i) {
        const float x = kb[i * d + c];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[i][v] += q[v] * x;
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) st[(j0 + i) * NV + v] = a[i][v];
  }
}

// Online-softmax step over one page: st (scores) becomes the page's probabilities, exactly 0 where a
// key is not visible; m, l (running max, running sum) are updated and alpha = e^(m_old - m_new), the
// factor the accumulators still have to be scaled by. Row lanes see keys j with kmin <= j < kend
// (page-relative). Partial = false: every lane sees all BS keys (kmin, kend are not read).
template <int BS, int NV, bool Partial>
inline void softmax_lanes(vf* __restrict st, vf* __restrict m, vf* __restrict l, vf* __restrict alpha,
                          const vi* kmin, const vi* kend) {
  const vf masked = splat(kMaskValue);
  for (int v = 0; v < NV; ++v) {
    vf page_max = masked;
    for (int j = 0; j < BS; ++j) {
      vf s = st[j * NV + v];
      if constexpr (Partial) {
        const vi visible = (splat_i(j) >= kmin[v]) & (splat_i(j) < kend[v]);
        s = visible ? s : masked;             // also drops NaN from garbage K rows
        st[j * NV + v] = s;
      }
      page_max = page_max > s ? page_max : s;
    }
    const vf m_new = m[v] > page_max ? m[v] : page_max;
    vf sum = {};
    for (int j = 0; j < BS; ++j) {
      const vf s = st[j * NV + v];
      vf pj = exp_le0(s - m_new);
      if constexpr (Partial) pj = s > masked ? pj : vf{};
      st[j * NV + v] = pj;
      sum += pj;
    }
    alpha[v] = exp_le0(m[v] - m_new);
    l[v] = alpha[v] * l[v] + sum;
    m[v] = m_new;
  }
}

// acc[c] = alpha * acc[c] + sum_{j < n} v[j * d + c] * pt[j] for head dims [c0, c0 + CB) (each an NV
// row-vector row of acc): CB x NV accumulators in registers, V elements broadcast.
template <int NV, int CB>
inline void pv_block(vf* __restrict acc, const vf* __restrict alpha, const vf* __restrict pt,
                     const float* __restrict v, int d, int n, int c0) {
  vf a[CB][NV];
#pragma GCC unroll 16
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) a[i][u] = acc[(c0 + i) * NV + u] * alpha[u];
  for (int j = 0; j < n; ++j) {
    vf pj[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) pj[u] = pt[j * NV + u];
    const float* vj = v + j * d + c0;
#pragma GCC unroll 16
    for (int i = 0; i < CB; ++i) {
      const float x = vj[i];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) a[i][u] += pj[u] * x;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[(c0 + i) * NV + u] = a[i][u];
}

// P.V over the page's first n keys, the ones inside the sequence: V rows past its end may hold
// anything, NaN included, and 0 * NaN is NaN.
template <int NV>
inline void pv_lanes(vf* acc, const vf* alpha, const vf* pt, const float* v, int d, int n) {
  constexpr int CB = pow2_floor(kAccRegs / NV);
  int c0 = 0;
  for (; c0 + CB <= d; c0 += CB) pv_block<NV, CB>(acc, alpha, pt, v, d, n, c0);
  for (; c0 < d; ++c0) pv_block<NV, 1>(acc, alpha, pt, v, d, n, c0);
}

// One stage of an in-register kLanes x kLanes transpose: swaps the off-diagonal B x B sub-blocks of
// every 2B x 2B block, x[i][k + B] <-> x[i + B][k] for i, k with bit B clear.
template <int B>
inline void transpose_stage(vf* x) {
  vi lo, hi;                                   // shuffle indices; >= kLanes picks the second operand
  for (int k = 0; k < kLanes; ++k) {
    lo[k] = (k & B) ? kLanes + k - B : k;
    hi[k] = (k & B) ? kLanes + k : k + B;
  }
  for (int i = 0; i < kLanes; ++i) {
    if (i & B) continue;
    const vf a = x[i], b = x[i + B];
    x[i] = __builtin_shuffle(a, b, lo);
    x[i + B] = __builtin_shuffle(a, b, hi);
  }
  if constexpr (B > 1) transpose_stage<B / 2>(x);
}

// x[i][k] -> x[k][i] for a kLanes x kLanes block held in kLanes vectors.
inline void transpose_block(vf* x) { transpose_stage<kLanes / 2>(x); }

// qt[c * NV + v] lane i = sm_scale * q of row v * kLanes + i, element c (0 for lanes past nrows):
// kLanes x kLanes blocks transposed in registers, a scalar loop for head dims past the last block.
template <int NV>
void load_queries(const Problem& p, const Rows& rows, int nrows, vf* qt) {
  const int d = static_cast<int>(p.head_dim);
  const int dv = d / kLanes * kLanes;
  for (int v = 0; v < NV; ++v) {
    for (int c0 = 0; c0 < dv; c0 += kLanes) {
      vf x[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        const int r = v * kLanes + i;
        x[i] = r < nrows ? loadu(p.q + rows.offset(r) + c0) * p.sm_scale : vf{};
      }
      transpose_block(x);
      for (int k = 0; k < kLanes; ++k) qt[(c0 + k) * NV + v] = x[k];
    }
    for (int i = 0; i < kLanes; ++i) {
      const int r = v * kLanes + i;
      const float* src = r < nrows ? p.q + rows.offset(r) : nullptr;
      for (int c = dv; c < d; ++c) qt[c * NV + v][i] = src ? src[c] * p.sm_scale : 0.f;
    }
  }
}

// out row r = acc (transposed, as qt) / l, for rows [0, nrows); the same blocking as load_queries.
template <int NV>
void store_outputs(const Problem& p, const Rows& rows, int nrows, const vf* acc, const vf* l) {
  const int d = static_cast<int>(p.head_dim);
  const int dv = d / kLanes * kLanes;
  for (int v = 0; v < NV && v * kLanes < nrows; ++v) {
    const vf inv = l[v] > 0.f ? 1.f / l[v] : vf{};   // l > 0: every row sees its own key
    for (int c0 = 0; c0 < dv; c0 += kLanes) {
      vf x[kLanes];
      for (int k = 0; k < kLanes; ++k) x[k] = acc[(c0 + k) * NV + v] * inv;
      transpose_block(x);
      for (int i = 0; i < kLanes && v * kLanes + i < nrows; ++i)
        storeu(p.out + rows.offset(v * kLanes + i) + c0, x[i]);
    }
    for (int i = 0; i < kLanes && v * kLanes + i < nrows; ++i) {
      float* dst = p.out + rows.offset(v * kLanes + i);
      for (int c = dv; c < d; ++c) dst[c] = acc[c * NV + v][i] * inv[i];
    }
  }
}

struct Scratch {
  std::vector<float> f;
  std::vector<vf> v;
};

// A work item of up to NV * kLanes rows; row r lives in lane r % kLanes of row vector r / kLanes.
// Lanes past nrows repeat the last row's position with a zero query, and are never written out.
template <int BS, typename T, int NV>
void attend_lanes(const Problem& p, const WorkItem& item, Scratch& scratch) {
  const Rows rows(p, item);
  const int d = static_cast<int>(p.head_dim);
  scratch.v.resize(static_cast<size_t>(2 * d + BS) * NV);
  vf* qt = scratch.v.data();          // [D][NV] scaled queries, transposed (lanes = rows)
  vf* acc = qt + d * NV;              // [D][NV] unnormalized outputs, transposed
  vf* st = acc + d * NV;              // [BS][NV] one page's scores, then probabilities
  scratch.f.resize(2 * BS * d);
  float* kbuf = scratch.f.data();     // a bf16 page converted (K, V)
  float* vbuf = kbuf + BS * d;
  vf m[NV], l[NV], alpha[NV];
  vi kmin[NV], kend[NV];              // visible keys [kmin, kend) as sequence positions

  for (int r = 0; r < NV * kLanes; ++r) {
    const int64_t qpos = rows.pos(std::min(r, item.nrows - 1));
    kend[r / kLanes][r % kLanes] = static_cast<int32_t>(std::min<int64_t>(qpos + 1, rows.seq_len));
    kmin[r / kLanes][r % kLanes] = static_cast<int32_t>(p.window > 0 ? qpos - p.window + 1 : 0);
  }
  load_queries<NV>(p, rows, item.nrows, qt);
  // keys [all_see_begin, all_see_end) are visible to every lane (rows are in position order)
  const int64_t all_see_end = std::min<int64_t>(rows.pos(0) + 1, rows.seq_len);
  const int64_t all_see_begin = p.window > 0 ? rows.pos(item.nrows - 1) - p.window + 1 : 0;
  for (int v = 0; v < NV; ++v) {
    m[v] = splat(kMaskValue);
    l[v] = vf{};
  }
  std::fill(acc, acc + d * NV, vf{});

  for_each_page<BS, T>(p, rows, item.nrows, item.head, item.seq, [&](int64_t pg, int64_t off) {
    const int32_t page_pos = static_cast<int32_t>(pg * BS);
    const float* kp = page_f32(read_page<T>(p.k, p.k_scale, off, BS, d, kbuf), BS * d, kbuf);
    scores_lanes<BS, NV>(qt, kp, d, st);
    if (p.soft_cap > 0.f)
      for (int i = 0; i < BS * NV; ++i) st[i] = soft_cap_v(st[i], p.soft_cap);
    vi kmin_pg[NV], kend_pg[NV];      // page-relative
    for (int v = 0; v < NV; ++v) {
      kmin_pg[v] = kmin[v] - page_pos;
      kend_pg[v] = kend[v] - page_pos;
    }
    if (page_pos + BS <= all_see_end && page_pos >= all_see_begin)
      softmax_lanes<BS, NV, false>(st, m, l, alpha, kmin_pg, kend_pg);
    else
      softmax_lanes<BS, NV, true>(st, m, l, alpha, kmin_pg, kend_pg);
    const float* vp = page_f32(read_page<T>(p.v, p.v_scale, off, BS, d, vbuf), BS * d, vbuf);
    const int n = static_cast<int>(std::min<int64_t>(BS, rows.seq_len - page_pos));
    pv_lanes<NV>(acc, alpha, st, vp, d, n);
  });

  store_outputs<NV>(p, rows, item.nrows, acc, l);
}

// ---- Vector path (few rows: decodes, head dims of 64, 128 or 256) ------------------------------------
// Each row's query is DV = D / kLanes vectors held in registers. A page's scores come out of the dot
// products as vectors over keys (lanes = keys): kLanes keys' partial-sum vectors are reduced together
// by a butterfly (hsum_transpose), so there is no horizontal sum per key and the softmax runs over
// whole vectors, one horizontal max per (row, page), which the exponentials do not wait for (a stale
// running max, softmax_row). P.V keeps a block of rows' accumulators in registers while each V row is
// read once per block and the probabilities are broadcast from memory.

// Lane i of the result = the sum of x[i]'s lanes, for kLanes vectors x (clobbered). Stage H folds
// vectors i and i + H (i < H) into one: lanes k with bit H clear hold x[i][k] + x[i][k + H], lanes with
// it set x[i + H][k - H] + x[i + H][k]. After the stages H = kLanes / 2 .. 1, x[0] lane k has summed
// all lanes of vector k (its bits say which vector each stage kept).
template <int H>
__attribute__((always_inline)) inline void hsum_stage(vf* x) {
  vi lo, hi;                                   // as transpose_stage: >= kLanes picks the second operand
  for (int k = 0; k < kLanes; ++k) {
    lo[k] = (k & H) ? kLanes + k - H : k;
    hi[k] = (k & H) ? kLanes + k : k + H;
  }
  for (int i = 0; i < H; ++i) x[i] = __builtin_shuffle(x[i], x[i + H], lo) + __builtin_shuffle(x[i], x[i + H], hi);
  if constexpr (H > 1) hsum_stage<H / 2>(x);
}
__attribute__((always_inline)) inline vf hsum_transpose(vf* x) {
  hsum_stage<kLanes / 2>(x);
  return x[0];
}

// Maximum of x's lanes: stage H takes the max with the lanes H away, so every lane ends up holding
// it. (One template per stage: the shuffle indices fold to constants.)
template <int H>
__attribute__((always_inline)) inline vf hmax_stage(vf x) {
  vi idx;
  for (int k = 0; k < kLanes; ++k) idx[k] = k ^ H;
  const vf y = __builtin_shuffle(x, idx);
  x = x > y ? x : y;
  if constexpr (H > 1) return hmax_stage<H / 2>(x);
  return x;
}
inline float hmax(vf x) { return hmax_stage<kLanes / 2>(x)[0]; }

inline float hsum(vf x) {
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += x[k];
  return s;
}

// Key vectors per page: key j of the page is lane j % kLanes of vector j / kLanes; lanes past BS
// (BS < kLanes) are padding and always masked.
template <int BS>
constexpr int key_vecs() { return (BS + kLanes - 1) / kLanes; }

// A page row of D = DV * kLanes elements as DV vectors, read in place. f32: in order. bf16: each chunk
// of 2 * kLanes elements, read as kLanes 32-bit words, becomes its even elements (word << 16) then its
// odd ones (word & 0xffff0000): no shuffles. Queries and accumulators are kept in the same "row order"
// (to_row_order / from_row_order), which dot products and P.V do not see.
typedef int32_t vi_unaligned __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(2), may_alias));

template <int DV>
inline void load_row(const float* src, vf* x) {
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c) x[c] = loadu(src + c * kLanes);
}
template <int DV>
inline void load_row(const uint16_t* src, vf* x) {
  static_assert(DV % 2 == 0, "bf16 rows are read in chunks of two vectors");
#pragma GCC unroll 16
  for (int c = 0; c < DV; c += 2) {
    const vi w = *reinterpret_cast<const vi_unaligned*>(src + c * kLanes);   // little-endian pairs
    x[c] = reinterpret_cast<vf>(w << 16);
    x[c + 1] = reinterpret_cast<vf>(w & splat_i(static_cast<int32_t>(0xffff0000u)));
  }
}

// 8-bit rows (the decode path reads them in place, unscaled: the scales multiply the page's scores
// and probabilities, scale_keys): kLanes bytes widened to one f32 vector. int8: a sign-extending
// convert; e4m3 bits: as to_f32, lane-wise.
typedef int8_t vs8_unaligned __attribute__((vector_size(kLanes), aligned(1), may_alias));
typedef uint8_t vu8_unaligned __attribute__((vector_size(kLanes), aligned(1), may_alias));
template <int DV>
inline void load_row(const int8_t* src, vf* x) {
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c)
    x[c] = __builtin_convertvector(*reinterpret_cast<const vs8_unaligned*>(src + c * kLanes), vf);
}
template <int DV>
inline void load_row(const uint8_t* src, vf* x) {
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c) {
    const vi b = __builtin_convertvector(*reinterpret_cast<const vu8_unaligned*>(src + c * kLanes), vi);
    const vi em = b & 0x7f;
    const vf normal = reinterpret_cast<vf>((em << 20) + (120 << 23));
    const vf mag = em >= 8 ? normal : __builtin_convertvector(em, vf) * (1.f / 512);
    x[c] = reinterpret_cast<vf>(reinterpret_cast<vi>(mag) | ((b & 0x80) << 24));
  }
}

// s[kv] lane i *= scale[kv * kLanes + i] for the page's BS keys (padding lanes past BS: 0).
template <int BS>
inline void scale_keys(vf* s, const float* scale) {
  for (int kv = 0; kv < key_vecs<BS>(); ++kv) {
    if constexpr (BS % kLanes == 0) {
      s[kv] *= loadu(scale + kv * kLanes);
    } else {
      vf x = {};
      for (int i = 0; i < kLanes && kv * kLanes + i < BS; ++i) x[i] = scale[kv * kLanes + i];
      s[kv] *= x;
    }
  }
}

// x (DV vectors in element order) -> row order of T's load_row, and back.
template <typename T, int DV>
inline void to_row_order(vf* x) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    vi even, odd;                              // lane i of chunk (a, b): element 2i / 2i + 1
    for (int i = 0; i < kLanes; ++i) {
      even[i] = 2 * i;
      odd[i] = 2 * i + 1;
    }
    for (int c = 0; c < DV; c += 2) {
      const vf a = x[c], b = x[c + 1];
      x[c] = __builtin_shuffle(a, b, even);
      x[c + 1] = __builtin_shuffle(a, b, odd);
    }
  }
}
template <typename T, int DV>
inline void from_row_order(vf* x) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    vi lo, hi;                                 // element e of the chunk sits at lane e / 2 of part e % 2
    for (int i = 0; i < kLanes; ++i) {
      lo[i] = (i % 2) * kLanes + i / 2;
      hi[i] = (i % 2) * kLanes + (kLanes + i) / 2;
    }
    for (int c = 0; c < DV; c += 2) {
      const vf e = x[c], o = x[c + 1];
      x[c] = __builtin_shuffle(e, o, lo);
      x[c + 1] = __builtin_shuffle(e, o, hi);
    }
  }
}

// s[kv] lane i = q . k[kv * kLanes + i] for one row (q: DV vectors in row order), k a page [BS, D].
template <int BS, int DV, typename T>
inline void row_scores(const vf* __restrict q, const T* __restrict k, vf* __restrict s) {
  constexpr int D = DV * kLanes;
  for (int kv = 0; kv < key_vecs<BS>(); ++kv) {
    vf x[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) {
      const int j = kv * kLanes + i;
      vf a = {};
      if (j < BS) {
        vf kj[DV];
        load_row<DV>(k + j * D, kj);
#pragma GCC unroll 16
        for (int c = 0; c < DV; ++c) a += q[c] * kj[c];
      }
      x[i] = a;
    }
    s[kv] = hsum_transpose(x);
  }
}

// e^x for x <= kStaleMax (below -86: ~e^-86, as exp_le0): exp_le0 with n rounded for either sign.
constexpr float kStaleMax = 16.f;
inline vf exp_small(vf x) {
  x = x > splat(-86.f) ? x : splat(-86.f);
  // floor(y + 0.5), y = x / ln2: y + 128.5 > 0, so truncation is the floor
  return exp_split(x, __builtin_convertvector(x * 1.44269504f + 128.5f, vi) - 128);
}

// Online-softmax step of one row over one page: s (scores) becomes the probabilities e^(s - m),
// exactly 0 where a key is not visible; m and l (running sum, a vector of per-lane partial sums) are
// updated and alpha = e^(m_old - m_new) returned, the factor the row's accumulator still needs.
// m is a stale maximum: it moves only when a page's maximum exceeds it by more than kStaleMax (or on
// the first visible key), so probabilities stay <= e^kStaleMax (no overflow: l, acc are f32) and the
// exponentials need not wait for this page's maximum (a horizontal reduction). The normalization by
// l cancels whichever m was used.
// Visible keys are kmin <= j < kend (page-relative). Partial = false: all BS keys are visible and
// BS is a multiple of kLanes (no padding lanes).
template <int BS, bool Partial>
inline float softmax_row(vf* __restrict s, float& m, vf& l, int kmin, int kend) {
  constexpr int KV = key_vecs<BS>();
  const vf masked = splat(kMaskValue);
  vi lane;
  for (int k = 0; k < kLanes; ++k) lane[k] = k;
  vf page_max = masked;
  for (int kv = 0; kv < KV; ++kv) {
    if constexpr (Partial) {
      const vi j = lane + kv * kLanes;
      const vi visible = (j >= splat_i(kmin)) & (j < splat_i(std::min(kend, BS)));
      s[kv] = visible ? s[kv] : masked;        // also drops NaN from garbage K rows
    }
    page_max = page_max > s[kv] ? page_max : s[kv];
  }
  float alpha = 1.f;
  const float pm = hmax(page_max);
  if (pm > m + kStaleMax) {                    // rare after the first page; m = -1e30 before it
    alpha = exp_le0(splat(m - pm))[0];
    l = alpha * l;
    m = pm;
  }
  vf sum = {};
  for (int kv = 0; kv < KV; ++kv) {
    vf pj = exp_small(s[kv] - m);
    if constexpr (Partial) pj = s[kv] > masked ? pj : vf{};
    s[kv] = pj;
    sum += pj;
  }
  l += sum;
  return alpha;
}

// acc[r] = alpha[r] * acc[r] + sum_{j < n} p[r * ps + j] * v[j] for R rows (acc[r]: DV vectors):
// R x DV accumulators in registers, each V row read once, the probabilities broadcast.
template <int R, int DV, typename T>
inline void pv_rows(vf* __restrict acc, const float* __restrict alpha, const float* __restrict p, int ps,
                    const T* __restrict v, int n) {
  constexpr int D = DV * kLanes;
  vf a[R][DV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < DV; ++c) a[r][c] = acc[r * DV + c] * alpha[r];
  for (int j = 0; j < n; ++j) {
    vf x[DV];
    load_row<DV>(v + j * D, x);
#pragma GCC unroll 16
    for (int c = 0; c < DV; ++c)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][c] += p[r * ps + j] * x[c];
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < DV; ++c) acc[r * DV + c] = a[r][c];
}

// Rows per pv_rows block: their accumulators fill at most kAccRegs registers.
template <int DV>
constexpr int pv_block_rows() { return std::clamp(kAccRegs / DV, 1, 4); }

// pv_rows over rows [0, nrows) in blocks of up to pv_block_rows (acc: [nrows][DV], p: [nrows][ps]).
template <int DV, typename T>
inline void pv_all_rows(vf* acc, const float* alpha, const float* p, int ps, const T* v, int n, int nrows) {
  constexpr int RB = pv_block_rows<DV>();
  static_assert(RB >= 1 && RB <= 4, "pv_all_rows dispatches blocks of 1 .. 4 rows");
  for (int r0 = 0; r0 < nrows; r0 += RB) {
    vf* a = acc + r0 * DV;
    const float* al = alpha + r0;
    const float* pr = p + r0 * ps;
    switch (std::min(RB, nrows - r0)) {
      case 1: pv_rows<1, DV, T>(a, al, pr, ps, v, n); break;
      case 2: if constexpr (RB >= 2) pv_rows<2, DV, T>(a, al, pr, ps, v, n); break;
      case 3: if constexpr (RB >= 3) pv_rows<3, DV, T>(a, al, pr, ps, v, n); break;
      default: if constexpr (RB >= 4) pv_rows<4, DV, T>(a, al, pr, ps, v, n); break;
    }
  }
}

// A work item of up to kDirectRows rows, D = DV * kLanes. Rows are in position order (rows of one
// query token are consecutive), so the keys every row sees are [pos(last) - window + 1, pos(0) + 1).
template <int BS, typename T, int DV>
void attend_vec(const Problem& p, const WorkItem& item, Scratch& scratch) {
  constexpr int D = DV * kLanes, KV = key_vecs<BS>();
  const Rows rows(p, item);
  const int nrows = item.nrows;
  scratch.v.resize(static_cast<size_t>(nrows) * (2 * DV + KV + 1));
  vf* q = scratch.v.data();            // [nrows][DV] scaled queries
  vf* acc = q + nrows * DV;            // [nrows][DV] unnormalized outputs
  vf* s = acc + nrows * DV;            // [nrows][KV] one page's scores, then probabilities
  vf* l = s + nrows * KV;              // [nrows] running sums, per lane
  float m[kDirectRows], alpha[kDirectRows];
  int64_t kmin[kDirectRows], kend[kDirectRows];   // visible keys [kmin, kend) as sequence positions

  for (int r = 0; r < nrows; ++r) {
    const float* src = p.q + rows.offset(r);
    for (int c = 0; c < DV; ++c) q[r * DV + c] = loadu(src + c * kLanes) * p.sm_scale;
    to_row_order<T, DV>(q + r * DV);
    for (int c = 0; c < DV; ++c) acc[r * DV + c] = vf{};
    l[r] = vf{};
    m[r] = kMaskValue;
    const int64_t qpos = rows.pos(r);
    kend[r] = std::min<int64_t>(qpos + 1, rows.seq_len);
    kmin[r] = p.window > 0 ? qpos - p.window + 1 : 0;
  }
  const int64_t all_see_end = kend[0], all_see_begin = kmin[nrows - 1];

  // decode pages are consumed fast: hinting the next page's first 1 KB of K and of V (the hardware
  // streams the rest) measured faster than the whole page for f32 (-10% CPU time per call); bf16 takes
  // 2 KB (a whole 16-row page: 0.91-0.94x the time of 1 KB, in-process A/B at B = 8-32)
  constexpr int kPrefetchLines = std::is_same_v<T, uint16_t> ? 32 : 16;
  for_each_page<BS, T, kPrefetchLines>(p, rows, nrows, item.head, item.seq, [&](int64_t pg, int64_t off) {
    const int64_t page_pos = pg * BS;
    const T* kp = static_cast<const T*>(p.k) + off;
    const bool full = BS % kLanes == 0 && page_pos >= all_see_begin && page_pos + BS <= all_see_end;
    for (int r = 0; r < nrows; ++r) {
      vf* sr = s + r * KV;
      row_scores<BS, DV, T>(q + r * DV, kp, sr);
      if constexpr (kQuantized<T>) scale_keys<BS>(sr, p.k_scale + off / D);   // key j's score * its scale
      if (p.soft_cap > 0.f)
        for (int kv = 0; kv < KV; ++kv) sr[kv] = soft_cap_v(sr[kv], p.soft_cap);
      // page-relative bounds, clamped to [-1, BS] so that they fit an int
      const int lo = static_cast<int>(std::clamp<int64_t>(kmin[r] - page_pos, -1, BS));
      const int hi = static_cast<int>(std::clamp<int64_t>(kend[r] - page_pos, -1, BS));
      alpha[r] = full ? softmax_row<BS, false>(sr, m[r], l[r], lo, hi)
                      : softmax_row<BS, true>(sr, m[r], l[r], lo, hi);
      // P.V of an 8-bit page: p_j * (scale_j * v_j) = (p_j * scale_j) * v_j (l is already summed)
      if constexpr (kQuantized<T>) scale_keys<BS>(sr, p.v_scale + off / D);
    }
    // V rows past the sequence's end may hold anything, NaN included, and 0 * NaN is NaN
    const T* vp = static_cast<const T*>(p.v) + off;
    const int n = static_cast<int>(std::min<int64_t>(BS, rows.seq_len - page_pos));
    pv_all_rows<DV, T>(acc, alpha, reinterpret_cast<const float*>(s), KV * kLanes, vp, n, nrows);
  });

  for (int r = 0; r < nrows; ++r) {
    const float sum = hsum(l[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;     // sum > 0: every row sees its own key
    float* dst = p.out + rows.offset(r);
    vf x[DV];
    for (int c = 0; c < DV; ++c) x[c] = acc[r * DV + c] * inv;
    from_row_order<T, DV>(x);
    for (int c = 0; c < DV; ++c) storeu(dst + c * kLanes, x[c]);
  }
}

// ---- Direct path (few rows, other head dims) ---------------------------------------------------------
// Decode items whose head dim attend_vec does not take. Rows in memory, one per query head: online
// softmax per row over the pages, a dot product per (row, key), K and V read in place.
template <int BS, typename T>
void attend_direct(const Problem& p, const WorkItem& item, Scratch& scratch) {
  const Rows rows(p, item);
  const int d = static_cast<int>(p.head_dim);
  const int nrows = item.nrows;
  scratch.f.resize(static_cast<size_t>(nrows) * (2 * d + BS + 2) + 2 * BS * d + d);
  float* qrows = scratch.f.data();             // [rows, D] scaled queries
  float* acc = qrows + nrows * d;              // [rows, D]
  float* s = acc + nrows * d;                  // [rows, BS]
  float* m = s + nrows * BS;                   // [rows]
  float* l = m + nrows;                        // [rows]
  float* buf = l + nrows;                      // [D] one bf16 row converted
  float* vbuf = buf + d;                       // [BS, D] a bf16 V page converted (8-bit: dequantized)
  float* kbuf = vbuf + BS * d;                 // [BS, D] an 8-bit K page dequantized

  for (int r = 0; r < nrows; ++r) {
    const float* src = p.q + rows.offset(r);
    for (int c = 0; c < d; ++c) qrows[r * d + c] = src[c] * p.sm_scale;
    m[r] = kMaskValue;
    l[r] = 0.f;
  }
  std::fill(acc, acc + nrows * d, 0.f);

  for_each_page<BS, T>(p, rows, nrows, item.head, item.seq, [&](int64_t pg, int64_t off) {
    page_scores_direct<BS, ReadT<T>>(qrows, nrows, d, read_page<T>(p.k, p.k_scale, off, BS, d, kbuf), buf, s);
    // softmax statistics per row; s becomes the page's probabilities (0 where not seen)
    // (branch-free loops over the page's keys: they vectorize, exp included)
    const int64_t page_pos = pg * BS;
    for (int r = 0; r < nrows; ++r) {
      const int64_t qpos = rows.pos(r);
      // keys [kmin, kend) are visible to this row (causal, in the sequence, inside the window)
      const int64_t kend = std::min<int64_t>(qpos + 1, rows.seq_len) - page_pos;
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
    const float* vpage = page_f32(read_page<T>(p.v, p.v_scale, off, BS, d, vbuf), BS * d, vbuf);
    for (int r = 0; r < nrows; ++r) pv_row(acc + r * d, s + r * BS, vpage, BS, d);
  });

  for (int r = 0; r < nrows; ++r) {
    float* dst = p.out + rows.offset(r);
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int c = 0; c < d; ++c) dst[c] = acc[r * d + c] * inv;
  }
}

template <int BS, typename T>
void attend_item(const Problem& p, const WorkItem& item, Scratch& scratch) {
  if (item.nrows <= kDirectRows) {
    if (p.head_dim == 64) return attend_vec<BS, T, 64 / kLanes>(p, item, scratch);
    if (p.head_dim == 128) return attend_vec<BS, T, 128 / kLanes>(p, item, scratch);
    if (p.head_dim == 256) return attend_vec<BS, T, 256 / kLanes>(p, item, scratch);
    return attend_direct<BS, T>(p, item, scratch);
  }
  switch ((item.nrows + kLanes - 1) / kLanes) {       // row vectors: 1 .. kTileVecs
    case 1: return attend_lanes<BS, T, 1>(p, item, scratch);
    case 2: return attend_lanes<BS, T, 2>(p, item, scratch);
    case 3: return attend_lanes<BS, T, 3>(p, item, scratch);
    default: return attend_lanes<BS, T, 4>(p, item, scratch);
  }
}
static_assert(kTileVecs == 4, "attend_item dispatches 1 .. 4 row vectors");

template <typename T>
void run_item(const Problem& p, const WorkItem& item, Scratch& scratch) {
  switch (p.block_size) {
    case 8: return attend_item<8, T>(p, item, scratch);
    case 16: return attend_item<16, T>(p, item, scratch);
    case 32: return attend_item<32, T>(p, item, scratch);
    default: return attend_item<64, T>(p, item, scratch);   // only reached for block_size 64
  }
}

// Every item on a cache of element type T, shared by the calling thread and XLA's pool.
template <typename T>
void run_items(xla::ffi::ThreadPool& pool, const Problem& p, const std::vector<WorkItem>& items) {
  jaxpaged::run_units(pool, static_cast<int64_t>(items.size()), [&p, &items](int64_t i) {
    thread_local Scratch scratch;   // grows to the largest item, then reused
    run_item<T>(p, items[i], scratch);
  });
}

}  // namespace
}  // namespace jaxpaged::rpa
