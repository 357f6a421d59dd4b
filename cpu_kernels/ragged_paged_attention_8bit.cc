// Ragged paged attention on an 8-bit cache (int8, or fp8 e4m3 bit patterns, with row scales): its own
// FFI target, built with the quantized-weight kernels at their first use (cpu_kernels/build.py), so
// a first start with a float cache does not compile the 8-bit kernel units. Contract and checks: see
// ragged_paged_attention.cc and ragged_paged_attention_call.h.
#include "ragged_paged_attention_call.h"

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpagedRaggedPagedAttention8Bit, jaxpaged::rpa::RaggedPagedAttention<true>,
                              jaxpaged::rpa::attention_binding());
