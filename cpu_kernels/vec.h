// Portable SIMD vectors for the native kernels: GCC vector extensions at the widest width the build
// targets (-march=native): a zmm register under AVX-512, ymm under AVX, xmm otherwise. Plain C++
// arithmetic on them lowers to that width; loads and stores through these views are unaligned and
// aliasing-safe (a memcpy into a vf would go through the stack).
#pragma once

#include <cstdint>

namespace jaxpaged {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));

inline vf loadu(const float* src) { return *reinterpret_cast<const vf_unaligned*>(src); }
inline void storeu(float* dst, vf x) { *reinterpret_cast<vf_unaligned*>(dst) = x; }
inline vf splat(float x) { return vf{} + x; }

}  // namespace jaxpaged
