"""ModelRunner: owns the params, the paged KV cache and the jitted step; the ONLY place host data
becomes device arrays.

execute(scheduler_output):
  1. copy-on-write block copies (a small jitted scatter, cache donated)
  2. build flat ragged inputs on the host (step_inputs.py), padded to a (T, B) bucket
  3. forward(state, kv_cache, inputs) — jitted per (T, B), kv_cache donated:
       model.forward over [T] tokens -> hidden [T, H] -> rows of each sequence's last token [B, H]
       -> logits [B, V];  then sample(logits, sampling) — jitted per B, on the device
       -> tokens [B] (+ logprobs)
  4. one device->host transfer of the sampled ids (and requested logprobs)
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpu_kernels.matmul import packed_matmul
from jaxpaged.buckets import BucketError, BucketTable
from jaxpaged.config import ModelConfig
from jaxpaged.engine_config import EngineConfig
from jaxpaged.models import jnp_dtype
from jaxpaged.models.layers import AttentionMetadata, AttentionOptions
from jaxpaged.sampler import SamplingTensors, needs_penalties, sample, token_logprobs
from jaxpaged.sharding import constrain_kv, constrain_step_outputs, zeros_kv_cache
from jaxpaged.step_inputs import StepInputs, build_step_inputs

logger = logging.getLogger(__name__)

COPY_BUCKETS = (8, 64, 512)   # padded sizes of the copy-on-write list (pairs (0, 0) copy the null block)


@dataclass
class StepResult:
    """Host-side results of one step, rows in scheduled order (padding rows dropped)."""
    tokens: np.ndarray         # [n] int32
    logprob: np.ndarray        # [n] f32  raw log-prob of each sampled token
    rank: np.ndarray           # [n] int32
    top_ids: np.ndarray | None        # [n, K] int32 when logprobs were requested
    top_logprobs: np.ndarray | None   # [n, K] f32
    # prompt logprobs variant only: per flat row (row r scores the token after row r's position)
    prompt_logprob: np.ndarray | None = None    # [num_tokens] f32
    prompt_rank: np.ndarray | None = None       # [num_tokens] int32
    prompt_top_ids: np.ndarray | None = None    # [num_tokens, K] int32
    prompt_top_logprobs: np.ndarray | None = None  # [num_tokens, K] f32


def resolve_kv_cache_dtype(config: EngineConfig) -> str:
    """The KV cache's dtype name: explicit, or "auto" = the model's dtype, except float32 under the
    Pallas/jnp backends on CPU (XLA CPU widens a 16-bit cache around every slice and scatter; the
    native kernel reads bf16 pages as is)."""
    if config.kv_cache_dtype != "auto":
        return config.kv_cache_dtype
    if jax.default_backend() == "cpu" and resolve_attention_backend(config.attention_backend) != "native":
        return "float32"
    return config.dtype


def kv_storage_dtype(dtype_name: str, backend: str):
    """The cache arrays' dtype: a bf16 cache under the native backend is held as its uint16 bit
    patterns (XLA CPU scatters uint16 rows in place; a bf16 scatter is widened to f32 around the
    whole cache), which the native kernel reads as bf16."""
    if dtype_name == "bfloat16" and backend == "native":
        return jnp.uint16
    return jnp_dtype(dtype_name)


def resolve_attention_backend(name: str) -> str:
    """EngineConfig.attention_backend -> the one the runner uses ("auto": native on CPU when the
    C++ kernels build on this machine, Pallas otherwise)."""
    if name == "native" and jax.default_backend() != "cpu":
        raise ValueError(f"attention_backend: 'native' runs on CPU only, the backend is "
                         f"{jax.default_backend()}")
    if name != "auto":
        return name
    if jax.default_backend() == "cpu":
        from cpu_kernels import available
        if available():
            return "native"
    return "pallas"


def cpu_param_layout(state, vocab_size: int):
    """How bf16 params are held on XLA CPU (other backends keep bf16 as is):

    - vocabulary-sized tables (embedding, LM head) -> f32: XLA CPU's bf16 dot of a few rows against
      [H, V] ran at ~3 GB/s (SmolLM2's head: 32-43 ms at B=4..64), the f32 one in 8-18 ms;
    - every other bf16 leaf -> its uint16 bit patterns (models/layers.read bit-casts them back per
      layer): a bf16 array sliced inside the layer scan is upcast whole on every call, a uint16
      array is sliced as raw bits.
    """
    if jax.default_backend() != "cpu":
        return state

    def cast(x):
        if x.dtype != jnp.bfloat16:
            return x
        if x.ndim == 2 and vocab_size in x.shape:    # unstacked [V, H] or [H, V]
            return x.astype(jnp.float32)
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.tree_util.tree_map(cast, state)


def use_native_matmul(config: EngineConfig, backend: str, mesh) -> bool:
    """Pre-packed native weight matmuls (cpu_kernels/matmul.py): with the native CPU backend, on one
    device, for f32 weights on AVX-512 CPUs and bf16 weights on AMX CPUs (elsewhere XLA's dot is
    the better path); `native_matmul=False` in the EngineConfig turns them off."""
    if backend != "native" or mesh is not None or not config.native_matmul:
        return False
    from cpu_kernels.matmul import worthwhile
    return worthwhile(jnp_dtype(config.dtype))


def _path_names(path) -> tuple[str, ...]:
    """A state leaf's path as names, without the Variable's trailing "value": ('layers', 'q_proj', 'kernel')."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def pack_weights(state, cfg: ModelConfig):
    """Packs every stacked Linear kernel [L, K, N] for the native matmul, and the LM head [H, V]
    (the embedding table transposed when tied, else lm_head's kernel): returns (state, head).
    The embedding table itself stays for the token lookup; an untied lm_head kernel stays unused."""
    from cpu_kernels.matmul import pack

    def leaf(path, x):
        names = _path_names(path)
        return pack(x, stacked=True) if names[-1] == "kernel" and x.ndim == 3 else x

    head = None
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        names = _path_names(path)
        if cfg.tie_word_embeddings and names[-1] == "embedding" and x.shape == (cfg.vocab_size, cfg.hidden_size):
            head = pack(np.asarray(x).T, stacked=False)
        elif not cfg.tie_word_embeddings and names[-2:] == ("lm_head", "kernel"):
            head = pack(x, stacked=False)
    return jax.tree_util.tree_map_with_path(leaf, state), head


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: str) -> int:
    """dtype: the KV cache's dtype name."""
    itemsize = 2 if dtype == "bfloat16" else 4
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * itemsize


def _forward_impl(graphdef, opts, prompt_logprobs, params, kv_cache, inputs):
    """The model part of a step (jitted per (T, B) bucket): forward over the flat batch, logits of each
    sequence's last row. params = (state, packed LM head or None). Static: prompt_logprobs (None / K:
    also score next_token_ids at every flat row, for requests that asked for prompt logprobs).
    Returns (kv_cache, logits [B, V] f32, prompt_out)."""
    state, head = params
    model = nnx.merge(graphdef, state)
    def logits_of(h, real_rows):
        """h [N, H] -> [N, V] f32; under a packed head only the first real_rows rows are computed."""
        return model.logits(h) if head is None else packed_matmul(h, head.with_rows(real_rows))
    meta = AttentionMetadata(inputs["slot_mapping"], inputs["block_tables"], inputs["seq_lens"],
                             inputs["query_start"])
    hidden, kv_cache = model.forward(inputs["token_ids"], inputs["positions"], kv_cache, meta, opts)
    last = jnp.take(hidden, inputs["logits_indices"], axis=0)      # [B, H]
    # real sequences come first; padding ones have seq_len 0
    logits = logits_of(last, jnp.sum(inputs["seq_lens"] > 0))      # [B, V] f32
    prompt_out = None
    if prompt_logprobs is not None:
        # logits of every row [T, V]: only in this variant (a [T, H] x [H, V] matmul is costly)
        prompt_out = token_logprobs(logits_of(hidden, inputs["query_start"][-1]), inputs["next_token_ids"],
                                    prompt_logprobs)
    return kv_cache, logits, prompt_out


def _sample_impl(num_logprobs, use_penalties, logits, sampling):
    """The sampling part of a step (jitted per B bucket only): logits [B, V] never leave the device."""
    return sample(logits, sampling, num_logprobs=num_logprobs, use_penalties=use_penalties)


def _copy_blocks_impl(kv_cache, src, dst):
    """kv_cache pages [L, KVH, NB, BS, D]: block dst[i] <- block src[i] in every layer and head."""
    k, v = kv_cache
    return k.at[:, :, dst].set(k[:, :, src]), v.at[:, :, dst].set(v[:, :, src])


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, graphdef, state,
                 num_blocks: int, max_model_len: int, mesh=None):
        self.config, self.model_config = config, model_config
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.table_width = -(-max_model_len // self.block_size)   # ceil: blocks of the longest sequence
        self.buckets = BucketTable.build(config.max_num_batched_tokens, config.max_num_seqs)
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        self.generator = np.random.default_rng(config.seed)
        self.attention_backend = resolve_attention_backend(config.attention_backend)
        self.native_matmul = use_native_matmul(config, self.attention_backend, mesh)
        self.lm_head = None        # the packed LM head under native matmuls (the model's own otherwise)
        if self.native_matmul:
            state, self.lm_head = pack_weights(state, model_config)
        self.state = cpu_param_layout(state, model_config.vocab_size)
        # the KV cache arrays' dtype (uint16: bf16 bit patterns, see kv_storage_dtype)
        self.dtype = kv_storage_dtype(resolve_kv_cache_dtype(config), self.attention_backend)
        shape = (model_config.num_layers, model_config.num_kv_heads, num_blocks, self.block_size,
                 model_config.head_dim)
        self.kv_cache = zeros_kv_cache(shape, self.dtype, mesh)   # sharded on KVH under a mesh
        opts = AttentionOptions(sm_scale=model_config.head_dim ** -0.5,
                                sliding_window=model_config.sliding_window, backend=self.attention_backend,
                                mesh=mesh)
        # A step is two jitted calls chained on the device (no host round trip between them): the model
        # keyed by (T, B) and the sampler keyed by B alone, so the sampler compiles once per sequence
        # bucket instead of once per (T, B) pair (it is ~half of a step's compile time on CPU).
        self._forward = jax.jit(constrain_step_outputs(functools.partial(_forward_impl, graphdef, opts), mesh),
                                static_argnums=(0,), donate_argnums=(2,))
        # a fresh partial per runner: jit caches are per callable, so this runner's count is its own
        self._sample = jax.jit(functools.partial(_sample_impl), static_argnums=(0, 1))
        self._copy = jax.jit(constrain_kv(_copy_blocks_impl, mesh), donate_argnums=(0,))

    # ---- compile discipline -------------------------------------------------------------------
    def num_compiled(self) -> int:
        """Executables compiled so far: forward (one per (T, B) pair and variant) + sampler (one per B
        and variant). After warmup: len(buckets.pairs()) + len(buckets.seq_buckets)."""
        return self._forward._cache_size() + self._sample._cache_size()

    def warmup(self, progress: bool = True) -> None:
        """Compiles the step for every (T, B) in the bucket table (default sampling variant)."""
        from tqdm.auto import tqdm
        pairs = self.buckets.pairs()
        for t, b in tqdm(pairs, desc="Compiling step buckets", disable=not progress):
            inputs = build_step_inputs([], block_size=self.block_size, table_width=self.table_width,
                                       num_tokens_padded=t, num_seqs_padded=b)
            self._run(inputs, self._sampling([], b), num_logprobs=None, use_penalties=False, prompt_logprobs=None)
        # Dispatch is asynchronous: wait for the warmup steps to finish here, or the first real step
        # waits for all of them (measured: a 3.4 s first step after an f32 SmolLM2 warmup).
        jax.block_until_ready(self.kv_cache)

    # ---- one step -------------------------------------------------------------------------------
    def execute(self, scheduled, block_copies, sampling_rows, prompt_logprobs: bool = False) -> StepResult:
        """Runs one step over `scheduled` (list of ScheduledRequest); returns rows for all of them.

        sampling_rows: one SamplingRow per scheduled sequence (None where no token is sampled).
        Variants (static): logprobs are computed with K = max_logprobs when any row asks for them
        (None: no logprob work at all); the penalty path only when a row uses penalties; prompt
        logprobs (K = max_logprobs) for every flat row when `prompt_logprobs`.
        """
        want_lp = any(r is not None and r.params.logprobs is not None for r in sampling_rows)
        num_logprobs = self.config.max_logprobs if want_lp else None
        use_penalties = needs_penalties(sampling_rows)
        if block_copies:
            self._copy_blocks(block_copies)
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        t, b = self.buckets.lookup(num_tokens, len(scheduled))
        inputs = build_step_inputs(scheduled, block_size=self.block_size, table_width=self.table_width,
                                   num_tokens_padded=t, num_seqs_padded=b, with_next_tokens=prompt_logprobs)
        out, prompt_out = self._run(inputs, self._sampling(sampling_rows, b, use_penalties),
                                    num_logprobs=num_logprobs, use_penalties=use_penalties,
                                    prompt_logprobs=self.config.max_logprobs if prompt_logprobs else None)
        n = len(scheduled)
        host, prompt_host = jax.device_get((out, prompt_out))
        top_ids = host.top_ids[:n] if want_lp else None
        top_lp = host.top_logprobs[:n] if want_lp else None
        result = StepResult(host.tokens[:n], host.logprob[:n], host.rank[:n], top_ids, top_lp)
        if prompt_host is not None:
            (result.prompt_logprob, result.prompt_rank, result.prompt_top_ids,
             result.prompt_top_logprobs) = (a[:num_tokens] for a in prompt_host)
        return result

    def _sampling(self, rows, pad_to: int, use_penalties: bool = False) -> SamplingTensors:
        # Fixed widths keep the compiled shapes inside the table: the token history spans
        # max_model_len (penalty variant only), banned ids 16 (more only for unusual stop lists).
        banned = max(16, max((len(r.params.all_stop_token_ids(self.eos_token_ids)) for r in rows
                              if r is not None), default=0))
        return SamplingTensors.build(
            rows, pad_to=pad_to, vocab_size=self.model_config.vocab_size, generator=self.generator,
            eos_token_ids=self.eos_token_ids, history_len=self.table_width * self.block_size if use_penalties else 0,
            banned_width=1 << (banned - 1).bit_length())

    def _run(self, inputs: StepInputs, sampling, *, num_logprobs, use_penalties: bool, prompt_logprobs):
        names = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start",
                 "logits_indices") + (("next_token_ids",) if prompt_logprobs is not None else ())
        arrays = {k: getattr(inputs, k) for k in names}
        self.kv_cache, logits, prompt_out = self._forward(prompt_logprobs, (self.state, self.lm_head),
                                                          self.kv_cache, arrays)
        return self._sample(num_logprobs, use_penalties, logits, sampling), prompt_out

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        size = next((c for c in COPY_BUCKETS if c >= len(copies)), None)
        if size is None:
            raise BucketError(f"{len(copies)} block copies in one step exceed {COPY_BUCKETS[-1]}")
        src = np.zeros(size, np.int32)
        dst = np.zeros(size, np.int32)
        src[: len(copies)], dst[: len(copies)] = zip(*copies)
        self.kv_cache = self._copy(self.kv_cache, src, dst)
