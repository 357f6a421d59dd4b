// Weight-only int8 matmul for XLA:CPU against pre-packed weights, as an XLA FFI custom call:
//   out[M, N] (f32) = (x[M, K] @ q[K, N]) * scale[N], q int8, one layer of a stacked, packed weight
// (quantization="int8": jaxpaged/quantization.py, symmetric per output channel).
//
// Why native: XLA's dot widens the int8 weight to f32 (fused, but at ~6-10 GB/s of f32 for the few
// rows of a decode step), so with the packed f32 matmuls (matmul.cc) int8 lost its point: a decode
// step is memory-bound and int8 is a quarter of f32's bytes. Here the int8 panels stream once per
// step and are widened to f32 in registers (exact: every int8 value is an f32); x stays f32 and the
// FMAs accumulate in f32; each output is scaled once, at the end.
//
// Packed layout (cpu_kernels/int8_matmul.py packs it; N padded to Np, a multiple of 32, with zero
// columns of scale 1):
//   w int8 [L, Np/32, 32 K + 128]   panel j = columns [32j, 32j + 32): its K x 32 int8 weights,
//                                   row-major in k (byte 32 k + c = q[k, 32j + c]), then the 32
//                                   columns' f32 scales (128 bytes, little-endian).
// x: f32 [M, K], or bf16 (its uint16 bits) [M, K], widened to f32 first.
// layer: s32 [1], the layer of w (clamped to [0, L)); rows: s32 [1], x's real rows (clamped to
// [0, M]); the rest are bucket padding: not computed, output 0.
//
// Paths (AVX2 + FMA; the portable loops elsewhere or with JAXPAGED_NATIVE_PORTABLE=1):
//   one row (decode): the whole panel, all of K in one pass, 32 bytes per k streamed once;
//   more rows: 6-row x 16-column register tiles (12 accumulators), K in chunks of 256 (8 KB of
//   panel in L1 while the row tiles go by), each widened weight vector used by 6 rows.
// Work units (a block of rows x one panel) are shared by the calling thread and XLA's intra-op
// pool (work_queue.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;           // output columns per panel (and per work unit)
constexpr int64_t kScaleBytes = kPanel * sizeof(float);
constexpr int64_t kRowBlock = 96;        // rows per work unit: 16 tiles of 6
constexpr int64_t kChunk = 256;          // K per pass of the multi-row tiles (8 KB of int8 panel)

bool portable_only() {   // JAXPAGED_NATIVE_PORTABLE=1 (read once): tests run the portable loops
  static const bool on = [] {
    const char* v = std::getenv("JAXPAGED_NATIVE_PORTABLE");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

bool has_avx2() {
  static const bool ok = !portable_only() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

struct Problem {
  int64_t m = 0, k = 0, n = 0;     // real rows, K, N
  int64_t panels = 0;              // Np / 32
  int64_t panel_bytes = 0;         // 32 K + 128
  const float* x = nullptr;        // [M, K] f32
  const int8_t* w = nullptr;       // this layer's panels
  float* out = nullptr;            // [M, N]
};

// ---- AVX2 + FMA -----------------------------------------------------------------------------

__attribute__((target("avx2"))) inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 int8 at p -> 8 f32 (exact)
__attribute__((target("avx2"))) inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One x row against a whole panel (cols <= 32 real columns): y[0:cols] = (x @ q) * scale. Even and
// odd k accumulate apart (8 independent FMA chains, the FMA latency hidden behind the widening).
__attribute__((target("avx2,fma"))) void int8_row_avx2(const float* __restrict x, int64_t k,
                                                       const int8_t* __restrict panel, float* __restrict y,
                                                       int64_t cols) {
  __m256 e[4], o[4];
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) e[c] = o[c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 1 < k; i += 2) {
    const __m256 a = _mm256_broadcast_ss(x + i), b = _mm256_broadcast_ss(x + i + 1);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      e[c] = _mm256_fmadd_ps(a, widen8(panel + i * kPanel + 8 * c), e[c]);
      o[c] = _mm256_fmadd_ps(b, widen8(panel + (i + 1) * kPanel + 8 * c), o[c]);
    }
  }
  if (i < k) {   // odd K: the last k
    const __m256 a = _mm256_broadcast_ss(x + i);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) e[c] = _mm256_fmadd_ps(a, widen8(panel + i * kPanel + 8 * c), e[c]);
  }
  const float* scale = reinterpret_cast<const float*>(panel + k * kPanel);
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c)
    _mm256_maskstore_ps(y + 8 * c, lane_mask(cols - 8 * c),
                        _mm256_mul_ps(_mm256_add_ps(e[c], o[c]), _mm256_loadu_ps(scale + 8 * c)));
}

// y[r, 0:cols] (+)= x[r, 0:kc] @ half[0:kc] for r < MR, cols <= 16: `half` is 16 columns of a
// panel (rows kPanel bytes apart). accumulate: add to y (a later K chunk); scale (16 floats, the
// half's columns) non-null on the last chunk: the sums are scaled as they are stored. MR x 2
// accumulators (12 at MR = 6) + 2 widened weight vectors + 1 broadcast fit the 16 ymm registers.
template <int MR>
__attribute__((target("avx2,fma"))) void int8_tile_avx2(const float* __restrict x, int64_t ldx, int64_t kc,
                                                        const int8_t* __restrict half, float* __restrict y,
                                                        int64_t ldy, int64_t cols, bool accumulate,
                                                        const float* scale) {
  __m256 acc[MR][2];   // (every row loop unrolled: GCC otherwise keeps acc in memory)
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kc; ++i) {
    const __m256 b0 = widen8(half + i * kPanel), b1 = widen8(half + i * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
  const __m256 s0 = scale ? _mm256_loadu_ps(scale) : _mm256_set1_ps(1.f);
  const __m256 s1 = scale ? _mm256_loadu_ps(scale + 8) : _mm256_set1_ps(1.f);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    __m256 v0 = acc[r][0], v1 = acc[r][1];
    if (accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_maskload_ps(y + r * ldy, m0));
      v1 = _mm256_add_ps(v1, _mm256_maskload_ps(y + r * ldy + 8, m1));
    }
    _mm256_maskstore_ps(y + r * ldy, m0, _mm256_mul_ps(v0, s0));
    _mm256_maskstore_ps(y + r * ldy + 8, m1, _mm256_mul_ps(v1, s1));
  }
}

using Tile = void (*)(const float*, int64_t, int64_t, const int8_t*, float*, int64_t, int64_t, bool, const float*);
constexpr Tile kTiles[7] = {nullptr, int8_tile_avx2<1>, int8_tile_avx2<2>, int8_tile_avx2<3>,
                            int8_tile_avx2<4>, int8_tile_avx2<5>, int8_tile_avx2<6>};

// Rows [0, rows) of x (rows k apart) x one panel -> y (rows n apart), cols real columns.
void run_rows_avx2(const Problem& p, const float* x, int64_t rows, const int8_t* panel, float* y, int64_t cols) {
  if (rows == 1) return int8_row_avx2(x, p.k, panel, y, cols);
  const float* scale = reinterpret_cast<const float*>(panel + p.k * kPanel);
  for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, p.k - k0);
    const bool last = k0 + kc == p.k;
    for (int64_t r = 0; r < rows; r += 6) {
      const int64_t mr = std::min<int64_t>(6, rows - r);
      for (int64_t h = 0; h < 2 && 16 * h < cols; ++h)
        kTiles[mr](x + r * p.k + k0, p.k, kc, panel + k0 * kPanel + 16 * h, y + r * p.n + 16 * h, p.n,
                   std::min<int64_t>(16, cols - 16 * h), k0 > 0, last ? scale + 16 * h : nullptr);
    }
  }
}

// ---- portable -------------------------------------------------------------------------------

void run_rows_portable(const Problem& p, const float* x, int64_t rows, const int8_t* panel, float* y,
                       int64_t cols) {
  float scale[kPanel];
  std::memcpy(scale, panel + p.k * kPanel, kScaleBytes);
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    for (int64_t i = 0; i < p.k; ++i) {
      const float a = x[r * p.k + i];
      for (int64_t c = 0; c < kPanel; ++c) acc[c] += a * static_cast<float>(panel[i * kPanel + c]);
    }
    for (int64_t c = 0; c < cols; ++c) y[r * p.n + c] = acc[c] * scale[c];
  }
}

// ---- work units (shared through work_queue.h) -------------------------------------------------

// Unit u = (row block u / panels, panel u % panels): consecutive units share x rows.
void run_unit(const Problem& p, int64_t u) {
  const int64_t r0 = (u / p.panels) * kRowBlock, j = u % p.panels;
  const int64_t rows = std::min(kRowBlock, p.m - r0), cols = std::min(kPanel, p.n - j * kPanel);
  const int8_t* panel = p.w + j * p.panel_bytes;
  float* y = p.out + r0 * p.n + j * kPanel;
  const float* x = p.x + r0 * p.k;
  if (has_avx2()) run_rows_avx2(p, x, rows, panel, y, cols);
  else run_rows_portable(p, x, rows, panel, y, cols);
}

// x [M, K] bf16 bits -> f32 [M, K] (a per-thread buffer, grown to the largest x, then reused).
const float* widened(const uint16_t* x, int64_t m, int64_t k) {
  thread_local std::vector<float> buf;
  buf.resize(m * k);
  for (int64_t i = 0; i < m * k; ++i) {
    const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(&buf[i], &bits, 4);
  }
  return buf.data();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0])
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K] and out [M, N]");
  const auto xt = x.element_type();
  const bool bf16 = xt == ffi::DataType::BF16 || xt == ffi::DataType::U16;
  if (!bf16 && xt != ffi::DataType::F32) return ffi::Error::InvalidArgument("int8_matmul: x must be f32 or bf16");
  Problem p;
  p.k = xd[1];
  p.n = od[1];
  p.panel_bytes = p.k * kPanel + kScaleBytes;
  if (wd.size() != 3 || wd[2] != p.panel_bytes || wd[1] * kPanel < p.n || wd[1] * kPanel - p.n >= kPanel)
    return ffi::Error::InvalidArgument("int8_matmul: weight must be [L, Np/32, 32 K + 128] int8");
  p.panels = wd[1];
  p.out = out->typed_data();
  // padding rows [valid, M): zero output, no work
  p.m = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  std::fill(p.out + p.m * p.n, p.out + xd[0] * p.n, 0.f);
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, wd[0] - 1);
  p.w = w.typed_data() + l * p.panels * p.panel_bytes;
  p.x = bf16 ? widened(static_cast<const uint16_t*>(x.untyped_data()), p.m, p.k)
             : static_cast<const float*>(x.untyped_data());
  jaxpaged::run_units(pool, (p.m + kRowBlock - 1) / kRowBlock * p.panels, [&p](int64_t u) { run_unit(p, u); });
  return ffi::Error::Success();
}

}  // namespace

// Bit 2: the int8 path uses AVX2 + FMA (0: the portable loops). Same bit as jaxpaged_matmul_caps.
extern "C" int jaxpaged_int8_matmul_caps() { return has_avx2() ? 4 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x [M, K] f32 or bf16
                                  .Arg<ffi::Buffer<ffi::S8>>()    // packed int8 weight (stacked)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows (real rows of x)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [M, N]
