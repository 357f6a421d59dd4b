// GGUF block matmul for XLA:CPU, as an XLA FFI custom call: y = x . W^T for one layer of a Linear
// weight held in llama.cpp's block format (jaxpaged/gguf_blocks.py, quantization="gguf").
//
// Why native: the jnp path dequantizes a whole layer's blocks with unfused XLA ops (nibble unpacking,
// f16 scales) into an f32 [N, K] temporary on every step, then runs the dot (BENCHMARKS.md: 1.2-1.4x
// the float32 model's decode step while holding 0.16x its weight bytes). Here a work item takes
// kRowsPerItem weight rows, dequantizes them into an L1 buffer and dots them with every real row of
// x: the blocks are read once per step, nothing of size N x K is written.
//
// Inputs:  x f32 [M, K]; w u8 [L, N, RB] (RB = K / 32 * block bytes); layer s32 [1]; rows s32 [1]
//          (x's real rows: the rest are bucket padding, output 0). Attribute qtype: 0 Q8_0, 1 Q4_0,
//          2 Q4_1. Output f32 [M, N].
// Blocks of 32 inputs: Q8_0 = d (f16), q[32] int8 -> d q; Q4_0 = d, 16 nibble bytes -> d (q - 8);
// Q4_1 = d, m (f16), 16 nibble bytes -> d q + m; byte j holds input j (low nibble) and j + 16 (high).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec.h"
#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;
constexpr int kBlockBytes[3] = {34, 18, 20};   // Q8_0, Q4_0, Q4_1
constexpr int kRowsPerItem = 8;                // weight rows dequantized together (one output column each)

// IEEE half (little-endian bytes) -> f32, subnormals included (GGUF scales can be tiny).
inline float half_at(const uint8_t* b) {
  const uint32_t h = static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 8);
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float mag;
  if (exp == 0) mag = static_cast<float>(mant) * (1.f / 16777216.f);                  // mant * 2^-24
  else if (exp == 31) mag = __builtin_bit_cast(float, 0x7f800000u | (mant << 13));    // inf / NaN
  else mag = __builtin_bit_cast(float, ((exp + 112u) << 23) | (mant << 13));
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, mag) | sign);
}

// One weight row (its K / 32 blocks) -> out[K] f32.
void dequantize_row(const uint8_t* row, int64_t blocks, int qtype, float* __restrict out) {
  const int bytes = kBlockBytes[qtype];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * bytes;
    float* o = out + b * kBlock;
    const float d = half_at(blk);
    if (qtype == 0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) o[j] = d * static_cast<float>(q[j]);
    } else {
      const float m = qtype == 2 ? half_at(blk + 2) : -8.f * d;   // Q4_0: d (q - 8) = d q - 8 d
      const uint8_t* qs = blk + (qtype == 2 ? 4 : 2);
#pragma omp simd
      for (int j = 0; j < kBlock / 2; ++j) {
        o[j] = d * static_cast<float>(qs[j] & 0x0f) + m;
        o[j + kBlock / 2] = d * static_cast<float>(qs[j] >> 4) + m;
      }
    }
  }
}

struct Problem {
  const float* x;
  const uint8_t* w;           // this layer's rows [N, RB]
  float* out;
  int64_t m, k, n, row_bytes;
  int qtype;
};

using jaxpaged::kLanes;
using jaxpaged::loadu;
using jaxpaged::vf;

// Work item i: output columns [i * kRowsPerItem, ...) for every real row of x. The item's weight rows
// are dequantized once into buf [kRowsPerItem, K]; each x row then runs kRowsPerItem dot products at
// once, one vector accumulator each (independent FMA chains; K is a multiple of 32, so of kLanes).
void run_item(const Problem& p, int64_t item) {
  thread_local std::vector<float> buf;                           // per thread, reused across items and calls
  const int64_t n0 = item * kRowsPerItem, cols = std::min<int64_t>(kRowsPerItem, p.n - n0);
  buf.assign(static_cast<size_t>(kRowsPerItem * p.k), 0.f);      // rows past N stay 0 (never stored)
  for (int64_t c = 0; c < cols; ++c)
    dequantize_row(p.w + (n0 + c) * p.row_bytes, p.k / kBlock, p.qtype, buf.data() + c * p.k);
  const float* w = buf.data();
  for (int64_t r = 0; r < p.m; ++r) {
    const float* xr = p.x + r * p.k;
    vf acc[kRowsPerItem] = {};
    for (int64_t e = 0; e < p.k; e += kLanes) {
      const vf xv = loadu(xr + e);
#pragma GCC unroll 8
      for (int c = 0; c < kRowsPerItem; ++c) acc[c] += xv * loadu(w + c * p.k + e);
    }
    for (int64_t c = 0; c < cols; ++c) {
      float sum = 0.f;
      for (int i = 0; i < kLanes; ++i) sum += acc[c][i];
      p.out[r * p.n + n0 + c] = sum;
    }
  }
}

ffi::Error GGUFMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, int32_t qtype,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (qtype < 0 || qtype > 2) return ffi::Error::InvalidArgument("gguf_matmul: qtype must be 0, 1 or 2");
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || od[0] != xd[0] || od[1] != wd[1] ||
      xd[1] % kBlock != 0 || wd[2] != xd[1] / kBlock * kBlockBytes[qtype])
    return ffi::Error::InvalidArgument("gguf_matmul: expected x [M, K], w [L, N, K / 32 * block bytes], out [M, N]");
  Problem p;
  p.m = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  p.k = xd[1];
  p.n = wd[1];
  p.row_bytes = wd[2];
  p.qtype = qtype;
  p.x = x.typed_data();
  p.out = out->typed_data();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, wd[0] - 1);
  p.w = w.typed_data() + l * p.n * p.row_bytes;
  std::fill(p.out + p.m * p.n, p.out + xd[0] * p.n, 0.f);      // padding rows: zero, no work
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  jaxpaged::run_units(pool, (p.n + kRowsPerItem - 1) / kRowsPerItem, [&p](int64_t i) { run_item(p, i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedGGUFMatmul, GGUFMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [L, N, RB]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows (real rows of x)
                                  .Attr<int32_t>("qtype")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [M, N]
