// Multi-LoRA delta for XLA:CPU, as an XLA FFI custom call: each row adds its own adapter's
// low-rank product to the base matmul's output, for one layer of one LoRA target:
//
//   out[t] = y[t] + (x[t] @ A[slot[t]][:, :r]) @ B[slot[t]][:r, :]      r = ranks[slot[t] - 1]
//
// Why native: the jnp reference (jaxpaged/lora/weight.py) multiplies every row by every slot's
// A and B padded to max_lora_rank and masks afterwards, so a step costs max_loras x max_lora_rank
// whatever its rows use (16 slots at rank 64: ~3x the base matmul's FLOPs), and slicing the layer
// out of the stacks inside the layer scan copies them. Here the rows are grouped by slot, each
// group reads its slot's A and B once per tile of kTile rows, only the slot's own rank is computed
// (zero padding beyond it adds nothing), and the stacked [L, ...] arrays are read in place.
//
// Inputs:  y f32 [M, N] (aliased to the output); x f32 [M, K]; a f32 [L, S, K, R]; b f32 [L, S, R, N];
//          slots s32 [M] (0: a base row, s in 1..S: stack index s - 1); ranks s32 [S] (a slot's
//          rank for this target, 0: empty or not targeted; clamped to R); layer s32 [1];
//          rows s32 [1] (x's real rows; the rest are bucket padding and are left as y).
// Output:  f32 [M, N].
// Work items: (slot, up to kTile of its rows), shared by the calling thread and XLA's intra-op pool.
// An item computes xa = x_rows @ A_s [tile, r] in a local buffer, then adds xa @ B_s to its rows:
// items touch disjoint output rows, so there is no reduction between threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "vec.h"
#include "work_queue.h"

namespace ffi = xla::ffi;

namespace {

using jaxpaged::kLanes;
using jaxpaged::loadu;
using jaxpaged::storeu;
using jaxpaged::vf;
constexpr int kTile = 6;   // rows per item (a register tile of 6 rows x 2 vectors: 12 accumulators)

struct Problem {
  const float* x;
  const float* a;             // this layer's [S, K, R]
  const float* b;             // this layer's [S, R, N]
  float* out;                 // [M, N], holds y
  int64_t k, n, r_max;
  std::vector<int32_t> order; // real adapter rows grouped by slot
  struct Item { int32_t slot, rank, begin, count; };   // rows order[begin, begin + count)
  std::vector<Item> items;
};

// Register tiles: T rows x V vectors of kLanes outputs, T * V = 8 to 12 independent accumulators (a
// decode step with one or two rows per adapter would otherwise wait on a single FMA chain; a full
// tile does 12 FMAs per 2 weight loads + 6 broadcasts, within AVX2's 16 registers).
template <int T>
constexpr int kVectors = T == 1 ? 8 : T == 2 ? 4 : 2;

// xa[:, j..] = x rows @ A_s[:, j..] in chunks of V vectors while whole chunks fit in rp; returns the
// first rank column not done.
template <int T, int V>
int64_t down_chunks(const Problem& p, const float* const* xr, const float* a, int64_t rp, float* xa, int64_t j) {
  for (; j + V * kLanes <= rp; j += V * kLanes) {
    vf acc[T][V] = {};
    for (int64_t e = 0; e < p.k; ++e) {
      const float* arow = a + e * p.r_max + j;
      vf av[V];
      for (int v = 0; v < V; ++v) av[v] = loadu(arow + v * kLanes);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < V; ++v) acc[t][v] += xr[t][e] * av[v];
    }
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v) storeu(xa + t * rp + j + v * kLanes, acc[t][v]);
  }
  return j;
}

// xa [T, rp] = x rows @ A_s[:, :rp] (rp: the rank rounded up to whole vectors where R allows).
template <int T>
void down(const Problem& p, const int32_t* rows, const float* a, int64_t rp, float* xa) {
  const float* xr[T];
  for (int t = 0; t < T; ++t) xr[t] = p.x + rows[t] * p.k;
  int64_t j = down_chunks<T, kVectors<T>>(p, xr, a, rp, xa, 0);
  if (kVectors<T> > 1) j = down_chunks<T, 1>(p, xr, a, rp, xa, j);
  for (; j < rp; ++j)                       // ranks past the last whole vector (R not a multiple)
    for (int t = 0; t < T; ++t) {
      float s = 0.f;
      for (int64_t e = 0; e < p.k; ++e) s += xr[t][e] * a[e * p.r_max + j];
      xa[t * rp + j] = s;
    }
}

// out rows[:, c..] += xa @ B_s[:rp, c..] in chunks of V vectors of columns; returns the first column not done.
template <int T, int V>
int64_t up_chunks(const Problem& p, float* const* orow, const float* b, int64_t rp, const float* xa, int64_t c) {
  for (; c + V * kLanes <= p.n; c += V * kLanes) {
    vf acc[T][V];
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v) acc[t][v] = loadu(orow[t] + c + v * kLanes);
    for (int64_t j = 0; j < rp; ++j) {
      const float* brow = b + j * p.n + c;
      vf bv[V];
      for (int v = 0; v < V; ++v) bv[v] = loadu(brow + v * kLanes);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < V; ++v) acc[t][v] += xa[t * rp + j] * bv[v];
    }
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v) storeu(orow[t] + c + v * kLanes, acc[t][v]);
  }
  return c;
}

// out rows += xa [T, rp] @ B_s[:rp, :].
template <int T>
void up(const Problem& p, const int32_t* rows, const float* b, int64_t rp, const float* xa) {
  float* orow[T];
  for (int t = 0; t < T; ++t) orow[t] = p.out + rows[t] * p.n;
  int64_t c = up_chunks<T, kVectors<T>>(p, orow, b, rp, xa, 0);
  if (kVectors<T> > 1) c = up_chunks<T, 1>(p, orow, b, rp, xa, c);
  for (; c < p.n; ++c)                      // columns past the last whole vector
    for (int t = 0; t < T; ++t) {
      float s = orow[t][c];
      for (int64_t j = 0; j < rp; ++j) s += xa[t * rp + j] * b[j * p.n + c];
      orow[t][c] = s;
    }
}

template <int T>
void run_tile(const Problem& p, const Problem::Item& it, std::vector<float>& xa) {
  // rp: the rank rounded up to whole vectors (the stacks are zero past a slot's rank) within R
  const int64_t rounded = (static_cast<int64_t>(it.rank) + kLanes - 1) / kLanes * kLanes;
  const int64_t rp = rounded <= p.r_max ? rounded : it.rank;
  xa.resize(static_cast<size_t>(kTile * rp));
  const int32_t* rows = p.order.data() + it.begin;
  down<T>(p, rows, p.a + static_cast<int64_t>(it.slot) * p.k * p.r_max, rp, xa.data());
  up<T>(p, rows, p.b + static_cast<int64_t>(it.slot) * p.r_max * p.n, rp, xa.data());
}

void run_item(const Problem& p, const Problem::Item& it, std::vector<float>& xa) {
  switch (it.count) {
    case 1: return run_tile<1>(p, it, xa);
    case 2: return run_tile<2>(p, it, xa);
    case 3: return run_tile<3>(p, it, xa);
    case 4: return run_tile<4>(p, it, xa);
    case 5: return run_tile<5>(p, it, xa);
    default: return run_tile<kTile>(p, it, xa);
  }
}

// Groups the real rows by slot (a counting sort) and cuts each group into items of <= kTile rows.
void plan(Problem& p, const int32_t* slots, const int32_t* ranks, int64_t m, int64_t s) {
  std::vector<int32_t> count(s + 1, 0), start(s + 1, 0);
  auto rank_of = [&](int32_t slot) { return std::clamp<int64_t>(ranks[slot - 1], 0, p.r_max); };
  for (int64_t t = 0; t < m; ++t)
    if (slots[t] >= 1 && slots[t] <= s && rank_of(slots[t]) > 0) ++count[slots[t]];
  for (int64_t i = 1; i <= s; ++i) start[i] = (i > 1 ? start[i - 1] + count[i - 1] : 0);
  p.order.resize(start[s] + count[s]);
  std::vector<int32_t> fill(start);
  for (int64_t t = 0; t < m; ++t)
    if (slots[t] >= 1 && slots[t] <= s && rank_of(slots[t]) > 0) p.order[fill[slots[t]]++] = static_cast<int32_t>(t);
  for (int64_t i = 1; i <= s; ++i)
    for (int32_t off = 0; off < count[i]; off += kTile)
      p.items.push_back({static_cast<int32_t>(i - 1), static_cast<int32_t>(rank_of(i)), start[i] + off,
                         std::min<int32_t>(kTile, count[i] - off)});
}

ffi::Error LoRAMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> slots,
                      ffi::Buffer<ffi::S32> ranks, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto yd = y.dimensions(), xd = x.dimensions(), ad = a.dimensions(), bd = b.dimensions();
  if (yd.size() != 2 || xd.size() != 2 || ad.size() != 4 || bd.size() != 4 || yd[0] != xd[0] ||
      ad[0] != bd[0] || ad[1] != bd[1] || ad[2] != xd[1] || ad[3] != bd[2] || bd[3] != yd[1] ||
      slots.element_count() != static_cast<size_t>(xd[0]) || ranks.element_count() != static_cast<size_t>(ad[1]))
    return ffi::Error::InvalidArgument("lora_matmul: expected y [M, N], x [M, K], a [L, S, K, R], "
                                       "b [L, S, R, N], slots [M], ranks [S]");
  Problem p;
  const int64_t m = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, ad[0] - 1);
  const int64_t s = ad[1];
  p.k = xd[1];
  p.n = yd[1];
  p.r_max = ad[3];
  p.x = x.typed_data();
  p.a = a.typed_data() + l * s * p.k * p.r_max;
  p.b = b.typed_data() + l * s * p.r_max * p.n;
  p.out = out->typed_data();
  if (p.out != y.typed_data()) std::copy(y.typed_data(), y.typed_data() + xd[0] * p.n, p.out);
  plan(p, slots.typed_data(), ranks.typed_data(), m, s);
  jaxpaged::run_units(pool, static_cast<int64_t>(p.items.size()), [&p](int64_t i) {
    thread_local std::vector<float> xa;   // x rows @ A of one item, per thread
    run_item(p, p.items[i], xa);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedLoRAMatmul, LoRAMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // y [M, N] (aliased to out)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a [L, S, K, R]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b [L, S, R, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots [M]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ranks [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows (real rows of x)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [M, N]