// Weight matmuls for XLA:CPU against pre-packed weights, as an XLA FFI custom call:
//   out[M, N] (f32) = x[M, K] @ W[K, N], W being one layer of a stacked, packed weight.
//
// Why native: XLA:CPU's dot packs the weight operand on every call (the weights are constants,
// so that work is wasted) and, for the few rows of a decode step, streams the weights at
// ~6-10 GB/s; its bf16 dot at 4-32 rows reaches a fraction of what the AMX units do. Here the
// weights are laid out once, at load time (cpu_kernels/matmul.py packs them), in the order the
// inner loops read them, and the stacked [L, ...] array is indexed by `layer` in place (a slice
// inside the layer scan would be copied before a custom call could read it).
//
// Packed layouts (N padded to a multiple of 32 with zero columns, Np; the output has N columns):
//   f32:  w [L, Np/32, K, 32]            panel j holds columns [32j, 32j+32), row-major in k.
//   bf16: w [L, Np/16, Kp/32, 16, 32]    (uint16 bit patterns; K padded to Kp, a multiple of 32)
//         tile (j, kb) is the AMX "VNNI" B tile of columns [16j, 16j+16) and rows
//         [32kb, 32kb+32): element [r][2c + e] = W[32kb + 2r + e][16j + c].
// x: f32 [M, K] with f32 weights; bf16 (or its uint16 bits) [M, K] with bf16 weights.
// layer: s32 [1], the layer of w to use (clamped to [0, L)).
// rows:  s32 [1], how many leading rows of x are real (clamped to [0, M]); the rest are bucket
//        padding: not computed, their output rows are zero. (A decode step padded from 20 to 32
//        sequences costs 20 rows of weight matmul, not 32.)
//
// Paths: f32 uses AVX-512 FMA register tiles of up to 8 rows x 32 columns when the CPU has
// AVX-512, else AVX2 + FMA tiles (6 x 16 over packed x micro-panels; 2-row whole-panel tiles for
// few rows). bf16 uses AMX tiles (32 x 32 outputs per block) when the CPU has AMX-BF16 and the
// kernel grants the tile state; without AMX it runs the f32 tiles on x widened to f32 and on each
// unit's panel widened as the unit starts (half the weight bytes from memory, f32 arithmetic).
// Without AVX2, portable loops over the same layouts (slow, correct).
// Work units (a block of rows x one 32-column panel) are shared by the calling thread and XLA's
// intra-op pool through an atomic cursor.

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "work_queue.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;      // output columns per work unit (one f32 panel, two bf16 tiles)
constexpr int64_t kRowBlockF32 = 128;   // rows per f32 work unit (x rows stay in L2 across panels);
                                        // AVX2 with packed micro-panels: micro_panel_row_block
constexpr int64_t kF32Chunk = 256;      // AVX-512: K per pass over a unit's rows: 32 KB of panel in L1
constexpr int64_t kMicroRows = 6;       // AVX2 f32: rows per register tile (and per packed micro-panel of x)
constexpr int64_t kRowBlockAvx2 = 126;  // AVX2 f32: most rows per unit (a multiple of kMicroRows)
constexpr int64_t kTileK = 768;         // AVX2 f32: most K per tile pass (6 x 768 floats of x: 18 KB of L1)
constexpr int64_t kWideRowsBelow = 18;  // AVX2 f32: units with fewer rows run the 2-row whole-panel tiles
constexpr int64_t kRowBlockBf16 = 32;   // rows per AMX block: two A tiles
constexpr int64_t kWidenRowsFrom = kWideRowsBelow;   // AVX2 bf16: units with fewer rows read the bf16 panel in place

// bf16 elements in one 16-column tile column of a packed bf16 weight of kp rows (kp / 32 tiles of 16 x 32);
// panel j is tile columns 2j and 2j + 1, adjacent.
constexpr int64_t tile_col_elems(int64_t kp) { return kp / 32 * 512; }

// ---- CPU features ---------------------------------------------------------------------------

// JAXPAGED_NATIVE_PORTABLE=1 (read once per process) forces the portable loops: tests run them on
// CPUs that have the fast paths.
bool portable_only() {
  static const bool on = [] {
    const char* v = std::getenv("JAXPAGED_NATIVE_PORTABLE");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

bool has_avx512() {
  static const bool ok = !portable_only() && __builtin_cpu_supports("avx512f");
  return ok;
}

// AVX2 + FMA (no AVX-512): the f32 path runs 6 x 16 register tiles, the bf16 path widens the
// packed bf16 tiles to f32 in registers (no AMX needed).
bool has_avx2() {
  static const bool ok = !portable_only() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AMX needs the CPU bits (CPUID.7.0:EDX bit 22 AMX-BF16, bit 24 AMX-TILE) and Linux's permission
// for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once.
bool has_amx() {
  static const bool ok = [] {
    if (portable_only()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// ---- f32: AVX-512 register tiles ------------------------------------------------------------

// y[r, 0:cols] (+)= x[r, 0:kc] @ panel[0:kc] for r < MR: x rows ldx apart; panel [kc][32];
// cols <= 32; `accumulate`: add to y (a later K chunk) instead of overwriting it. MR x 2 zmm
// accumulators (16 for MR = 8) stay in registers across the k loop.
template <int MR>
__attribute__((target("avx512f"))) void f32_tile(const float* __restrict x, int64_t ldx, int64_t kc,
                                                 const float* __restrict panel, float* __restrict y,
                                                 int64_t ldy, int64_t cols, bool accumulate) {
  const __mmask16 lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  __m512 acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = accumulate ? _mm512_maskz_loadu_ps(lo, y + r * ldy) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_maskz_loadu_ps(hi, y + r * ldy + 16) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < kc; ++i) {
    const __m512 b0 = _mm512_loadu_ps(panel + i * kPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + i * kPanel + 16);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, lo, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, hi, acc[r][1]);
  }
}

using F32Tile = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool);
using F32TileAvx2 = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, bool,
                             const char*, int64_t);
constexpr F32Tile kF32Tiles[9] = {nullptr, f32_tile<1>, f32_tile<2>, f32_tile<3>, f32_tile<4>,
                                  f32_tile<5>, f32_tile<6>, f32_tile<7>, f32_tile<8>};

// Portable twin of f32_tile (any row count).
void f32_tile_portable(const float* x, int64_t rows, int64_t k, const float* panel, float* y,
                       int64_t ldy, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < kPanel; ++c) acc[c] += x[r * k + i] * panel[i * kPanel + c];
    std::memcpy(y + r * ldy, acc, cols * sizeof(float));
  }
}

// ---- f32 and bf16: AVX2 + FMA register tiles --------------------------------------------------

// Lanes [0, 8) of a 256-bit mask that are < n (n clamped to [0, 8]): masked loads/stores of the
// last, partly filled column block.
__attribute__((target("avx2"))) inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Prefetch spread over a k loop of kc iterations: called once per iteration, it issues the next of
// `lines` 64-byte lines from `pf` whenever `owed` passes kc (so `lines` lines over the whole loop; a
// null `pf` issues nothing). The tiles use it for the next unit's panel, so that panel's trip from
// memory overlaps their FMAs instead of following them.
__attribute__((target("avx2"))) inline void prefetch_due(const char*& pf, int64_t lines, int64_t kc,
                                                         int64_t& owed) {
  if (pf == nullptr) return;
  for (owed += lines; owed >= kc; owed -= kc, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
}

// y[r, 0:cols] (+)= x[r, 0:kc] @ half[0:kc] for r < MR, cols <= 16: `xp` is a packed 6-row micro-panel
// of x (pack_micro_panel: element (r, i) at xp[6i + r], so each k's broadcasts read one 24-byte run),
// `half` 16 columns of an f32 panel (rows kPanel floats apart); `accumulate`: add to y (a later K chunk).
// The micro-panel's chunk (6 x kc floats, kc <= kTileK) stays in L1 for both halves while the panel
// half streams from L2. MR x 2 ymm accumulators (12 for MR = 6) + 2 panel vectors + 1 broadcast fit the
// 16 ymm registers; k is unrolled by 4 (the loop's own instructions cost ~20% of the FMA rate unrolled
// by 1). `pf` / `pf_lines`: prefetch_due's.
template <int MR>
__attribute__((target("avx2,fma"))) void f32_tile_avx2(const float* __restrict xp, int64_t kc,
                                                       const float* __restrict half, float* __restrict y,
                                                       int64_t ldy, int64_t cols, bool accumulate,
                                                       const char* pf, int64_t pf_lines) {
  // (every loop over the rows is unrolled: GCC 12 otherwise keeps the accumulator arrays in
  // memory and stores all of them on every k)
  __m256 acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t owed = 0;
  #pragma GCC unroll 4
  for (int64_t i = 0; i < kc; ++i) {
    prefetch_due(pf, pf_lines, kc, owed);
    const __m256 b0 = _mm256_loadu_ps(half + i * kPanel);
    const __m256 b1 = _mm256_loadu_ps(half + i * kPanel + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(xp + i * kMicroRows + r);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  if (cols >= 16) {   // plain loads and stores (AMD's masked 256-bit stores are slow)
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if (accumulate) {
        acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(y + r * ldy));
        acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(y + r * ldy + 8));
      }
      _mm256_storeu_ps(y + r * ldy, acc[r][0]);
      _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
    return;
  }
  const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_maskload_ps(y + r * ldy, m0));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_maskload_ps(y + r * ldy + 8, m1));
    }
    _mm256_maskstore_ps(y + r * ldy, m0, acc[r][0]);
    _mm256_maskstore_ps(y + r * ldy + 8, m1, acc[r][1]);
  }
}

// x [M, K] -> 6-row micro-panels for f32_tile_avx2: panel q holds rows [6q, 6q + 6) as xp[q][i][r]
// (= xp[6Kq + 6i + r]); rows past M are zero. Runs once per call, before the tiles, panel by panel.
void pack_micro_panel(const float* x, int64_t m, int64_t k, int64_t q, float* xp) {
  const int64_t r0 = q * kMicroRows, rows = std::min<int64_t>(kMicroRows, m - r0);
  float* out = xp + r0 * k;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t r = 0; r < kMicroRows; ++r) out[i * kMicroRows + r] = r < rows ? x[(r0 + r) * k + i] : 0.f;
}

// One row (a decode step's matmul) against a whole panel (cols <= 32), all of K in one pass: the
// panel streams once, 128 contiguous bytes per k; even and odd k accumulate apart (8 chains of one
// FMA per k pair, so the FMA latency stays hidden behind the loads).
__attribute__((target("avx2,fma"))) void f32_row_avx2(const float* __restrict x, int64_t k,
                                                      const float* __restrict panel, float* __restrict y,
                                                      int64_t cols) {
  __m256 e[4], o[4];
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) e[c] = o[c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 1 < k; i += 2) {
    const __m256 a = _mm256_broadcast_ss(x + i), b = _mm256_broadcast_ss(x + i + 1);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      e[c] = _mm256_fmadd_ps(a, _mm256_loadu_ps(panel + i * kPanel + 8 * c), e[c]);
      o[c] = _mm256_fmadd_ps(b, _mm256_loadu_ps(panel + (i + 1) * kPanel + 8 * c), o[c]);
    }
  }
  if (i < k) {   // odd K: the last k
    const __m256 a = _mm256_broadcast_ss(x + i);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) e[c] = _mm256_fmadd_ps(a, _mm256_loadu_ps(panel + i * kPanel + 8 * c), e[c]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) _mm256_maskstore_ps(y + 8 * c, lane_mask(cols - 8 * c), _mm256_add_ps(e[c], o[c]));
}

constexpr F32TileAvx2 kF32TilesAvx2[7] = {nullptr, f32_tile_avx2<1>, f32_tile_avx2<2>, f32_tile_avx2<3>,
                                      f32_tile_avx2<4>, f32_tile_avx2<5>, f32_tile_avx2<6>};

// y[r, 0:cols] (+)= x[r, 2q0 : 2(q0 + qc)] @ W for r < MR, cols <= 16, W one packed bf16 tile
// column (16 columns): as the AMX tiles lay it out, k-pair q (rows 2q, 2q + 1) is 32 uint16 at
// tc + 32q, element 2c + e = W[2q + e][c]. A 32-bit lane c of a 256-bit load holds column c's two
// rows: its high half (masked) is W[2q + 1][c] as f32, its low half shifted up is W[2q][c].
// x: f32 rows (ldx apart, zero-padded to Kp). Even and odd rows accumulate apart (4 x MR chains:
// one FMA each per k-pair, so the FMA latency is hidden at one row).
template <int MR>
__attribute__((target("avx2,fma"))) void bf16_tile_avx2(const float* __restrict x, int64_t ldx, int64_t q0,
                                                        int64_t qc, const uint16_t* __restrict tc,
                                                        float* __restrict y, int64_t ldy, int64_t cols,
                                                        bool accumulate) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 even[MR][2], odd[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm256_setzero_ps();
  for (int64_t q = q0; q < q0 + qc; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc + 32 * q));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc + 32 * q + 16));
    const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    const __m256 hi0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
    const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    const __m256 hi1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a0 = _mm256_broadcast_ss(x + r * ldx + 2 * q);
      const __m256 a1 = _mm256_broadcast_ss(x + r * ldx + 2 * q + 1);
      even[r][0] = _mm256_fmadd_ps(a0, lo0, even[r][0]);
      even[r][1] = _mm256_fmadd_ps(a0, lo1, even[r][1]);
      odd[r][0] = _mm256_fmadd_ps(a1, hi0, odd[r][0]);
      odd[r][1] = _mm256_fmadd_ps(a1, hi1, odd[r][1]);
    }
  }
  const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    __m256 s0 = _mm256_add_ps(even[r][0], odd[r][0]), s1 = _mm256_add_ps(even[r][1], odd[r][1]);
    if (accumulate) {
      s0 = _mm256_add_ps(s0, _mm256_maskload_ps(y + r * ldy, m0));
      s1 = _mm256_add_ps(s1, _mm256_maskload_ps(y + r * ldy + 8, m1));
    }
    _mm256_maskstore_ps(y + r * ldy, m0, s0);
    _mm256_maskstore_ps(y + r * ldy + 8, m1, s1);
  }
}

// One 32-column panel of a packed bf16 weight (tile columns t0 | t1, the AMX layout: k-pair q of a tile
// column is 32 uint16 at 32q, element 2c + e = W[2q + e][c]) widened to an f32 panel [Kp][32] (the f32
// layout's rows): 32-bit lane c of a 256-bit load holds column c's rows 2q (low half, shifted up) and
// 2q + 1 (high half, masked). The AVX2 bf16 path runs the f32
// tiles on it: a panel is widened once per unit and then read by every row of the unit.
__attribute__((target("avx2"))) void widen_panel(const uint16_t* __restrict t0, const uint16_t* __restrict t1,
                                                 int64_t kp, float* __restrict out) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t q = 0; q < kp / 2; ++q) {
    float* even = out + 2 * q * kPanel;   // panel row 2q; row 2q + 1 follows, kPanel floats on
    #pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const uint16_t* tc = (h ? t1 : t0) + 32 * q;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc + 16));
      _mm256_storeu_ps(even + 16 * h, _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)));
      _mm256_storeu_ps(even + 16 * h + 8, _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)));
      _mm256_storeu_ps(even + kPanel + 16 * h, _mm256_castsi256_ps(_mm256_and_si256(w0, high)));
      _mm256_storeu_ps(even + kPanel + 16 * h + 8, _mm256_castsi256_ps(_mm256_and_si256(w1, high)));
    }
  }
}

// ---- bf16: AMX tiles ------------------------------------------------------------------------

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0, tmm1: A (16 rows x 32 bf16 of x); tmm2, tmm3: B (two 16-column tiles); tmm4..7: C (f32).
__attribute__((target("amx-tile,amx-bf16"))) void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// c[ROWS][32] (rows ldc floats apart) = x[ROWS rows, Kp] @ (tiles w0 | w1). xs: the block's first
// x row, rows ld bf16 apart (>= Kp valid columns each); w0/w1 point at a tile column's first tile
// ([Kp/32][16][32] bf16, tiles 1 KB apart).
template <int ROWS>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const uint16_t* xs, int64_t ld, int64_t kp,
                                                             const uint16_t* w0, const uint16_t* w1,
                                                             float* c, int64_t ldc) {
  _tile_zero(4);
  _tile_zero(5);
  if (ROWS == 32) {
    _tile_zero(6);
    _tile_zero(7);
  }
  const uint16_t* xs1 = xs + 16 * ld;   // the second 16-row strip
  for (int64_t kb = 0; kb < kp / 32; ++kb) {
    _tile_loadd(2, w0 + kb * 512, 64);
    _tile_loadd(3, w1 + kb * 512, 64);
    _tile_loadd(0, xs + kb * 32, ld * 2);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if (ROWS == 32) {
      _tile_loadd(1, xs1 + kb * 32, ld * 2);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, c, ldc * 4);
  _tile_stored(5, c + 16, ldc * 4);
  if (ROWS == 32) {
    _tile_stored(6, c + 16 * ldc, ldc * 4);
    _tile_stored(7, c + 16 * ldc + 16, ldc * 4);
  }
}

inline float bf16_to_f32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Portable twin of amx_block (any row count), reading the same tile layout.
void bf16_block_portable(const uint16_t* xs, int64_t ld, int64_t rows, int64_t kp, const uint16_t* w0,
                         const uint16_t* w1, float* c) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    for (int64_t kk = 0; kk < kp; ++kk) {
      const float a = bf16_to_f32(xs[r * ld + kk]);
      // row kk of W sits in tile kk / 32, tile row (kk % 32) / 2, element parity kk % 2
      const int64_t off = (kk / 32) * 512 + ((kk % 32) / 2) * 32 + (kk % 2);
      for (int64_t cc = 0; cc < 16; ++cc) {
        acc[cc] += a * bf16_to_f32(w0[off + 2 * cc]);
        acc[16 + cc] += a * bf16_to_f32(w1[off + 2 * cc]);
      }
    }
    std::memcpy(c + r * kPanel, acc, sizeof(acc));
  }
}

// ---- work sharing ---------------------------------------------------------------------------

struct Problem {
  bool bf16 = false;
  int64_t m = 0, n = 0, k = 0;     // true sizes
  int64_t kp = 0;                  // bf16: padded K (a multiple of 32)
  int64_t row_block = 0;           // rows per unit
  int64_t panels = 0;              // Np / 32
  const float* x = nullptr;        // f32 path: [M, K]
  const float* xp = nullptr;       //   AVX2 with >= kWideRowsBelow rows: x in 6-row micro-panels (row_block
                                   //   is then a multiple of kMicroRows, so a unit's rows start a panel)
  const uint16_t* xb = nullptr;    // bf16 path: x [M, K]; rows below `direct` are read in place
  int64_t direct = 0;              //   (whole 32-row blocks, and only when K == Kp)
  const uint16_t* tail = nullptr;  //   rows [direct, M): a zero-padded copy, Kp wide, whole blocks
  const void* w = nullptr;         // this layer's packed weight
  const uint16_t* wb = nullptr;    // bf16 weights without AMX: this layer's packed bf16 weight, run on the
                                   //   f32 path (x widened to f32 [M, Kp], k = Kp) a panel widened per unit
  float* out = nullptr;            // [M, N]
};

// A panel's bytes as stored (an f32 panel, or a bf16 weight's two tile columns, contiguous): what the
// AVX2 tiles prefetch for the next unit. `at` nullptr: nothing to prefetch.
struct PanelBytes {
  const char* at = nullptr;
  int64_t lines = 0;   // 64-byte lines
};

// Panel j of a bf16 weight on the widened path: its first tile column (k == Kp).
const uint16_t* bf16_panel(const Problem& p, int64_t j) { return p.wb + 2 * j * tile_col_elems(p.k); }

PanelBytes stored_panel(const Problem& p, int64_t j) {
  if (p.wb != nullptr)   // two tile columns of 2-byte elements
    return {reinterpret_cast<const char*>(bf16_panel(p, j)), 2 * tile_col_elems(p.k) * 2 / 64};
  return {reinterpret_cast<const char*>(static_cast<const float*>(p.w) + j * p.k * kPanel),
          p.k * kPanel * static_cast<int64_t>(sizeof(float)) / 64};
}

// Panel j as f32 [K][32]: the packed f32 panel in place, or (bf16 weights) widened into a per-thread
// buffer.
const float* f32_panel(const Problem& p, int64_t j) {
  if (p.wb == nullptr) return static_cast<const float*>(p.w) + j * p.k * kPanel;
  thread_local std::vector<float> buf;   // grows to the largest panel, then reused
  buf.resize(p.k * kPanel);
  const uint16_t* t0 = bf16_panel(p, j);
  widen_panel(t0, t0 + tile_col_elems(p.k), p.k, buf.data());
  return buf.data();
}

// y[r, 0:cols] (+)= x[r, 0:kc] @ panel[0:kc] for r < MR (MR <= 2), cols <= 32: the whole panel row
// (128 contiguous bytes per k) against MR rows, 4 x MR ymm accumulators. Fewer FMAs per panel byte than
// the 6 x 16 tiles, but the panel streams in order and the whole K goes in one pass: with few rows
// (small decode steps) the panel's trip from memory dominates and this wins below ~16 rows (in-process
// A/B against the packed 6 x 16 tiles, layer weights of SmolLM2: 0.80-0.92x of their time at 8-12 rows,
// even at 16, 1.07-1.29x theirs at 24; hence kWideRowsBelow).
// `pf` / `pf_lines`: prefetch_due's.
template <int MR>
__attribute__((target("avx2,fma"))) void f32_wide_avx2(const float* __restrict x, int64_t ldx, int64_t kc,
                                                       const float* __restrict panel, float* __restrict y,
                                                       int64_t ldy, int64_t cols, const char* pf,
                                                       int64_t pf_lines) {
  __m256 acc[MR][4];
  #pragma GCC unroll 2
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
  int64_t owed = 0;
  for (int64_t i = 0; i < kc; ++i) {
    prefetch_due(pf, pf_lines, kc, owed);
    __m256 b[4];
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) b[c] = _mm256_loadu_ps(panel + i * kPanel + 8 * c);
    #pragma GCC unroll 2
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  #pragma GCC unroll 2
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm256_maskstore_ps(y + r * ldy + 8 * c, lane_mask(cols - 8 * c), acc[r][c]);
}

// AVX2: rows [0, rows) of x (rows ldx = K apart) x one panel in 2-row whole-panel tiles over all of K.
// The next unit's panel `next` is prefetched, each row pair issuing its share of its lines.
void run_f32_wide_rows_avx2(const Problem& p, const float* x, int64_t rows, const float* panel, float* y,
                            int64_t cols, PanelBytes next) {
  const int64_t pairs = (rows + 1) / 2, lines = next.lines;
  for (int64_t r = 0; r < rows; r += 2) {
    const int64_t from = r / 2 * lines / pairs, to = (r / 2 + 1) * lines / pairs;   // this pair's share
    const char* pf = next.at ? next.at + 64 * from : nullptr;
    if (rows - r >= 2) f32_wide_avx2<2>(x + r * p.k, p.k, p.k, panel, y + r * p.n, p.n, cols, pf, to - from);
    else f32_wide_avx2<1>(x + r * p.k, p.k, p.k, panel, y + r * p.n, p.n, cols, pf, to - from);
  }
}

// AVX2: a unit's rows [0, rows) x one panel (cols <= 32 real columns). One row: the streaming row
// kernel; fewer than kWideRowsBelow rows: 2-row whole-panel tiles over all of K; more: 6-row tiles over
// each 16-column half of the panel, K in as few chunks of at most kTileK as cover it (each chunk adds
// to y after the first), x read from its packed micro-panels `xp` (the unit's first row's).
// `next`: the stored panel of the unit this thread runs next (at nullptr: none, or the same panel), which
// the tiles prefetch while they compute, its lines spread evenly over the tile calls (next-unit
// prefetch, same process on / off: 576 x 1536 at 8-32 rows 1.15-1.3x, at 64-256 rows 1.05-1.4x).
void run_f32_rows_avx2(const Problem& p, const float* x, const float* xp, int64_t rows, const float* panel,
                       float* y, int64_t cols, PanelBytes next) {
  if (rows == 1) return f32_row_avx2(x, p.k, panel, y, cols);
  if (rows < kWideRowsBelow || xp == nullptr) return run_f32_wide_rows_avx2(p, x, rows, panel, y, cols, next);
  // A last 1 or 2 rows (rows % 6) run one 2-row whole-panel tile: as two 6 x 16 tiles they would have 2-4
  // accumulator chains each, too few to hide the FMA latency (32 rows: 5 tiles of 6 + 2 rows).
  const int64_t tail = rows % kMicroRows <= 2 ? rows % kMicroRows : 0;
  rows -= tail;
  if (tail > 0) run_f32_wide_rows_avx2(p, x + rows * p.k, tail, panel, y + rows * p.n, cols, PanelBytes{});
  const int64_t chunks = (p.k + kTileK - 1) / kTileK, chunk = (p.k + chunks - 1) / chunks;
  // the next panel's lines, spread over the tile calls (chunks x row tiles x 2 halves)
  const int64_t calls = chunks * ((rows + kMicroRows - 1) / kMicroRows) * 2;
  const int64_t lines = next.at ? next.lines : 0;   // the next panel's 64-byte lines
  const int64_t per_call = (lines + calls - 1) / calls;
  const char* pf = next.at;
  int64_t done = 0;
  for (int64_t k0 = 0; k0 < p.k; k0 += chunk) {
    const int64_t kc = std::min(chunk, p.k - k0);
    for (int64_t r = 0; r < rows; r += kMicroRows) {
      const int64_t mr = std::min(kMicroRows, rows - r);
      // micro-panel r / 6 starts at xp + 6K (r / 6) = xp + rK; its k0-th k at + 6 k0
      const float* a = xp + r * p.k + k0 * kMicroRows;
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t n_pf = std::min(per_call, lines - done);
        if (16 * h < cols)
          kF32TilesAvx2[mr](a, kc, panel + k0 * kPanel + 16 * h, y + r * p.n + 16 * h, p.n,
                            std::min<int64_t>(16, cols - 16 * h), k0 > 0, n_pf > 0 ? pf + 64 * done : nullptr,
                            n_pf);
        done += n_pf;                               // n_pf >= 0: done never passes lines
      }
    }
  }
}

// AVX2, bf16 weights, fewer than kWidenRowsFrom rows: rows [0, rows) of x (f32, Kp wide) against panel j's
// stored tile columns, k-pairs in chunks of 128 (8 KB of each tile column in L1). With so few rows the
// pass that widens a panel costs more than the rows save by reading f32.
void run_bf16_rows_avx2(const Problem& p, const float* x, int64_t rows, int64_t j, float* y, int64_t cols) {
  constexpr int64_t kPairChunk = 128;
  const uint16_t* w0 = bf16_panel(p, j);
  const uint16_t* w1 = w0 + tile_col_elems(p.k);
  for (int64_t q0 = 0; q0 < p.k / 2; q0 += kPairChunk) {
    const int64_t qc = std::min(kPairChunk, p.k / 2 - q0);
    for (int64_t r = 0; r < rows; r += 2) {
      for (int64_t h = 0; h < 2 && 16 * h < cols; ++h) {
        const int64_t c = std::min<int64_t>(16, cols - 16 * h);
        if (rows - r >= 2) bf16_tile_avx2<2>(x + r * p.k, p.k, q0, qc, h ? w1 : w0, y + r * p.n + 16 * h, p.n, c, q0 > 0);
        else bf16_tile_avx2<1>(x + r * p.k, p.k, q0, qc, h ? w1 : w0, y + r * p.n + 16 * h, p.n, c, q0 > 0);
      }
    }
  }
}

// Unit u = (row block u / panels, panel u % panels): consecutive units share x rows. `next`: the unit
// this thread runs next (-1: none), whose panel the AVX2 path prefetches.
void run_f32_unit(const Problem& p, int64_t u, int64_t next) {
  const int64_t r0 = (u / p.panels) * p.row_block, j = u % p.panels;
  const int64_t rows = std::min(p.row_block, p.m - r0), cols = std::min(kPanel, p.n - j * kPanel);
  float* y = p.out + r0 * p.n + j * kPanel;
  const float* x = p.x + r0 * p.k;
  if (p.wb != nullptr && rows < kWidenRowsFrom && !has_avx512()) return run_bf16_rows_avx2(p, x, rows, j, y, cols);
  const float* panel = f32_panel(p, j);
  if (!has_avx512() && has_avx2()) {
    const int64_t nj = next < 0 ? j : next % p.panels;
    const PanelBytes next_panel = nj == j ? PanelBytes{} : stored_panel(p, nj);
    return run_f32_rows_avx2(p, x, p.xp ? p.xp + r0 * p.k : nullptr, rows, panel, y, cols, next_panel);
  }
  if (!has_avx512()) return f32_tile_portable(x, rows, p.k, panel, y, p.n, cols);
  // K in chunks: a chunk of the panel (kF32Chunk x 32) and of 8 x rows stay in L1 while the
  // row tiles go by; each later chunk adds to the tile's output.
  for (int64_t k0 = 0; k0 < p.k; k0 += kF32Chunk) {
    const int64_t kc = std::min(kF32Chunk, p.k - k0);
    for (int64_t r = 0; r < rows; r += 8) {
      const int64_t mr = std::min<int64_t>(8, rows - r);
      kF32Tiles[mr](x + r * p.k + k0, p.k, kc, panel + k0 * kPanel, y + r * p.n, p.n, cols, k0 > 0);
    }
  }
}

void run_bf16_unit(const Problem& p, int64_t u, bool amx) {
  // panel-major: a panel's tiles stay in L1 while the row blocks (x, from L2) go by
  const int64_t row_blocks = (p.m + p.row_block - 1) / p.row_block;
  const int64_t r0 = (u % row_blocks) * p.row_block, j = u / row_blocks;
  const int64_t rows = std::min(p.row_block, p.m - r0), cols = std::min(kPanel, p.n - j * kPanel);
  const int64_t tile_col = tile_col_elems(p.kp);
  const uint16_t* w0 = static_cast<const uint16_t*>(p.w) + (2 * j) * tile_col;
  const bool in_place = r0 < p.direct;
  const uint16_t* xs = in_place ? p.xb + r0 * p.k : p.tail + (r0 - p.direct) * p.kp;
  const int64_t ld = in_place ? p.k : p.kp;
  float* y = p.out + r0 * p.n + j * kPanel;
  if (amx && cols == kPanel && (rows == 32 || rows == 16)) {   // whole block: tiles straight out
    if (rows == 32) amx_block<32>(xs, ld, p.kp, w0, w0 + tile_col, y, p.n);
    else amx_block<16>(xs, ld, p.kp, w0, w0 + tile_col, y, p.n);
    return;
  }
  alignas(64) float c[kRowBlockBf16 * kPanel];
  if (!amx) bf16_block_portable(xs, ld, rows, p.kp, w0, w0 + tile_col, c);
  else if (rows > 16) amx_block<32>(xs, ld, p.kp, w0, w0 + tile_col, c, kPanel);
  else amx_block<16>(xs, ld, p.kp, w0, w0 + tile_col, c, kPanel);   // the tail has zero rows to the block's end
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(p.out + (r0 + r) * p.n + j * kPanel, c + r * kPanel, cols * sizeof(float));
}

// Rows [from, m) of x [M, K] -> a zero-padded copy [rows rounded up to 32, Kp] (AMX tiles read
// whole 16-row strips and 32-column steps).
const uint16_t* padded_tail(const uint16_t* x, int64_t from, int64_t m, int64_t k, int64_t kp) {
  thread_local std::vector<uint16_t> buf;   // grows to the largest tail, then reused
  const int64_t rows = (m - from + kRowBlockBf16 - 1) / kRowBlockBf16 * kRowBlockBf16;
  buf.assign(rows * kp, 0);
  for (int64_t r = from; r < m; ++r) std::memcpy(buf.data() + (r - from) * kp, x + r * k, k * sizeof(uint16_t));
  return buf.data();
}

// x [M, K] bf16 bits -> f32 [M, Kp], zero past K (the f32 tiles then run on K = Kp), in parallel by
// blocks of 16 rows.
const float* widened(ffi::ThreadPool& pool, const uint16_t* x, int64_t m, int64_t k, int64_t kp) {
  constexpr int64_t kRows = 16;
  thread_local std::vector<float> buf;   // grows to the largest x, then reused
  buf.resize(m * kp);
  float* out = buf.data();
  jaxpaged::run_units(pool, (m + kRows - 1) / kRows, [=](int64_t b) {
    for (int64_t r = b * kRows; r < std::min(m, (b + 1) * kRows); ++r) {
      for (int64_t i = 0; i < k; ++i) out[r * kp + i] = bf16_to_f32(x[r * k + i]);
      std::fill(out + r * kp + k, out + (r + 1) * kp, 0.f);
    }
  });
  return out;
}

// AVX2 f32 with >= kWideRowsBelow rows: x packed into 6-row micro-panels, shared by the threads (packed
// in parallel before any tile reads it).
const float* packed_micro_panels(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k) {
  thread_local std::vector<float> buf;   // grows to the largest x, then reused
  const int64_t micro = (m + kMicroRows - 1) / kMicroRows;
  buf.resize(micro * kMicroRows * k);
  float* xp = buf.data();
  jaxpaged::run_units(pool, micro, [=](int64_t q) { pack_micro_panel(x, m, k, q, xp); });
  return xp;
}

// Rows per unit for the packed micro-panels: M split evenly into blocks of at most kRowBlockAvx2, each
// a whole number of micro-panels (M = 512: 5 blocks of 108 rows, the last 80).
int64_t micro_panel_row_block(int64_t m) {
  const int64_t blocks = (m + kRowBlockAvx2 - 1) / kRowBlockAvx2;
  return ((m + blocks - 1) / blocks + kMicroRows - 1) / kMicroRows * kMicroRows;
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                  ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0])
    return ffi::Error::InvalidArgument("matmul: expected x [M, K] and out [M, N]");
  const auto wt = w.element_type(), xt = x.element_type();
  const bool bf16 = wt == ffi::DataType::U16 || wt == ffi::DataType::BF16;
  Problem p;
  p.bf16 = bf16;
  p.m = xd[0];
  p.k = xd[1];
  p.n = od[1];
  p.out = out->typed_data();
  if (bf16) {
    if (wd.size() != 5 || wd[3] != 16 || wd[4] != 32 || wd[1] * 16 < p.n || wd[2] * 32 < p.k ||
        wd[2] * 32 - p.k >= 32 || wd[1] % 2 != 0)
      return ffi::Error::InvalidArgument("matmul: bf16 weight must be [L, Np/16, Kp/32, 16, 32]");
    if (xt != ffi::DataType::BF16 && xt != ffi::DataType::U16)
      return ffi::Error::InvalidArgument("matmul: bf16 weights take bf16 x");
    p.kp = wd[2] * 32;
    p.panels = wd[1] / 2;
    p.row_block = kRowBlockBf16;
  } else {
    if (wt != ffi::DataType::F32 || xt != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("matmul: expected f32 x and weights, or bf16 ones");
    if (wd.size() != 4 || wd[2] != p.k || wd[3] != kPanel || wd[1] * kPanel < p.n)
      return ffi::Error::InvalidArgument("matmul: f32 weight must be [L, Np/32, K, 32]");
    p.panels = wd[1];
    p.row_block = kRowBlockF32;
  }
  // padding rows [valid, M): zero output, no work
  const int64_t valid = std::clamp<int64_t>(rows.typed_data()[0], 0, p.m);
  std::fill(p.out + valid * p.n, p.out + p.m * p.n, 0.f);
  p.m = valid;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, wd[0] - 1);
  const int64_t layer_elems = w.element_count() / wd[0];
  if (bf16) {
    p.w = static_cast<const uint16_t*>(w.untyped_data()) + l * layer_elems;
    p.xb = static_cast<const uint16_t*>(x.untyped_data());
    if (!has_amx() && has_avx2()) {   // the f32 path on widened x and panels
      p.bf16 = false;
      p.x = widened(pool, p.xb, p.m, p.k, p.kp);
      p.k = p.kp;
      p.wb = static_cast<const uint16_t*>(p.w);
      p.w = nullptr;
      p.row_block = kRowBlockF32;
    } else {
      p.direct = p.k == p.kp ? p.m / kRowBlockBf16 * kRowBlockBf16 : 0;
      if (p.direct < p.m) p.tail = padded_tail(p.xb, p.direct, p.m, p.k, p.kp);
    }
  } else {
    p.w = static_cast<const float*>(w.untyped_data()) + l * layer_elems;
    p.x = static_cast<const float*>(x.untyped_data());
  }
  if (!p.bf16 && !has_avx512() && has_avx2() && p.m >= kWideRowsBelow) {
    p.xp = packed_micro_panels(pool, p.x, p.m, p.k);
    p.row_block = micro_panel_row_block(p.m);
  }
  const int64_t row_blocks = (p.m + p.row_block - 1) / p.row_block;
  const bool amx = p.bf16 && has_amx();   // the tile configuration is per thread
  jaxpaged::run_units(
      pool, row_blocks * p.panels,
      [&p, amx](int64_t u, int64_t next) { p.bf16 ? run_bf16_unit(p, u, amx) : run_f32_unit(p, u, next); },
      [amx] { if (amx) amx_configure(); }, [amx] { if (amx) amx_release(); });
  return ffi::Error::Success();
}

}  // namespace

// Bit 0: the f32 path uses AVX-512; bit 1: the bf16 path uses AMX; bit 2: without those, both
// paths use AVX2 + FMA. (matmul.py reads this to decide whether packed matmuls beat XLA's dot.)
extern "C" int jaxpaged_matmul_caps() {
  return (has_avx512() ? 1 : 0) | (has_amx() ? 2 : 0) | (has_avx2() ? 4 : 0);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()          // packed weight (stacked)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows (real rows of x)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [M, N]
