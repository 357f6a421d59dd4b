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
// Files: this one defines the FFI target for f32 / bf16 caches, ragged_paged_attention_8bit.cc the one
// for int8 / e4m3 caches (in the quant library: a first start does not compile the 8-bit kernels);
// both run the handler in ragged_paged_attention_call.h (checks, work items). The kernels are in
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

#include "ragged_paged_attention_call.h"

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedRaggedPagedAttention, jaxpaged::rpa::RaggedPagedAttention<false>,
                              jaxpaged::rpa::attention_binding());
