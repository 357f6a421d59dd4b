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

Speculative decoding (EngineConfig.speculative_config, k drafts): a step where some sequence carries
drafts is a verification step: the forward takes R = min(T, B * (1 + k)) logits rows (step_inputs.py's
verification layout; real rows first; every sampled row is a real token, so R rows always suffice) and the sampler samples each of them with its own SamplingRow
(the position's penalties, min_tokens bans, seed offset), so the target's sample at every drafted
position comes back. Its own compiled variant per (T, B) pair and per R, warmed up with the rest;
steps without drafts run the plain variant unchanged.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.attention import AttentionMetadata, AttentionOptions
from jaxpaged.backends import get_backend, resolve_backend
from jaxpaged.backends.layout import lay_out_params
from jaxpaged.buckets import BucketError, BucketTable
from jaxpaged.config import ModelConfig
from jaxpaged.engine_config import EngineConfig
from jaxpaged.lora.device import LoRADeviceSlots, stack_dtype
from jaxpaged.lora.weight import attach_lora
from jaxpaged.sampler import SamplingTensors, needs_penalties, sample, token_logprobs
from jaxpaged.sharding import constrain_kv, constrain_step_outputs, zeros_kv_cache
from jaxpaged.step_hooks import StepHooks
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


def _forward_impl(graphdef, opts, prompt_logprobs, state, kv_cache, inputs, lora=None):
    """The model part of a step (jitted per (T, B) bucket): forward over the flat batch, logits of each
    sequence's last row. Static: prompt_logprobs (None / K: also score next_token_ids at every flat
    row, for requests that asked for prompt logprobs). lora: the adapter slot stacks (LoRA enabled;
    the LoRA targets' kernels then add each row's adapter delta, lora/weight.py).
    Returns (kv_cache, logits [B, V] f32, prompt_out)."""
    model = nnx.merge(graphdef, state)
    if lora is not None:
        # the backend's multi-LoRA matmul; under tensor parallelism the reference (sharded like the kernels)
        model = attach_lora(model, lora, inputs["lora_slots"], get_backend(opts.backend if opts.mesh is None else "jnp"))
    meta = AttentionMetadata(inputs["slot_mapping"], inputs["block_tables"], inputs["seq_lens"],
                             inputs["query_start"])
    hidden, kv_cache = model.forward(inputs["token_ids"], inputs["positions"], kv_cache, meta, opts)
    if "num_logits_rows" in inputs:
        # verification layout: logits_indices [R], real rows first, -1 padding (row 0 stands in)
        last = jnp.take(hidden, jnp.maximum(inputs["logits_indices"], 0), axis=0)   # [R, H]
        logits = model.logits(last, inputs["num_logits_rows"])                    # [R, V] f32
    else:
        last = jnp.take(hidden, inputs["logits_indices"], axis=0)      # [B, H]
        # real sequences come first; padding ones have seq_len 0
        logits = model.logits(last, jnp.sum(inputs["seq_lens"] > 0))   # [B, V] f32
    prompt_out = None
    if prompt_logprobs is not None:
        # logits of every row [T, V]: only in this variant (a [T, H] x [H, V] matmul is costly)
        prompt_out = token_logprobs(model.logits(hidden, inputs["query_start"][-1]), inputs["next_token_ids"],
                                    prompt_logprobs)
    return kv_cache, logits, prompt_out


def _sample_impl(num_logprobs, use_penalties, logits, sampling):
    """The sampling part of a step (jitted per B bucket only): logits [B, V] never leave the device."""
    return sample(logits, sampling, num_logprobs=num_logprobs, use_penalties=use_penalties)


def _signature(tree) -> tuple:
    """Shapes and dtypes of a pytree's leaves: with the static arguments, what selects an executable."""
    return tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in jax.tree_util.tree_leaves(tree))


def _copy_blocks_impl(kv_cache, src, dst):
    """Every leaf of kv_cache (pages [L, KVH, NB, BS, D]; an 8-bit cache's scales [L, KVH, NB, BS]):
    block dst[i] <- block src[i] in every layer and head."""
    return jax.tree_util.tree_map(lambda x: x.at[:, :, dst].set(x[:, :, src]), kv_cache)


def ready_backend(requested: str):
    """The backend object for EngineConfig.attention_backend, its kernels built/loaded (first use).
    "auto" falls back to Pallas, with a warning, when the native kernels cannot be built here."""
    backend = get_backend(resolve_backend(requested))
    try:
        backend.ready()
    except Exception as e:      # cpu_kernels.NativeBuildError, or a toolchain that breaks otherwise
        if requested != "auto":
            raise
        logger.warning("native CPU kernels unavailable, falling back to Pallas: %s", e)
        backend = get_backend("pallas")
    return backend


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, graphdef, state,
                 num_blocks: int, max_model_len: int, kv_dtype: str, mesh=None, hooks: StepHooks | None = None,
                 params_cache_entry: str | None = None):
        """kv_dtype: the KV cache's dtype name (backends.kv_cache_dtype; the pool was sized by it).
        hooks: the engine's step observers (step_hooks.py), told about each part of execute().
        params_cache_entry: the converted-params cache entry the params came from; packed weights are
        kept beside them there (convert/packed_cache.py), so a warm start does not repack."""
        self.hooks = hooks if hooks is not None else StepHooks()
        self.config, self.model_config = config, model_config
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.table_width = -(-max_model_len // self.block_size)   # ceil: blocks of the longest sequence
        self.buckets = BucketTable.build(config.max_num_batched_tokens, config.max_num_seqs)
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        self.generator = np.random.default_rng(config.seed)
        spec = config.speculative_config
        # rows per sequence in a verification step (1 + k); 0 without speculative decoding
        self.spec_rows = 1 + spec.num_speculative_tokens if spec is not None else 0
        self.backend = ready_backend(config.attention_backend)
        # weight matmuls on the backend's own packed weights (native CPU: AVX-512 / AVX2 f32, AMX bf16;
        # int8 weights in the int8 kernel's panels); GGUF blocks multiply through their own type. Pallas on
        # GPU: int8 weights and GGUF blocks go to its Triton kernels (backends/pallas.py)
        self.native_matmul = (config.native_matmul and config.quantization in (None, "int8")
                              and self.backend.packs_weights(config.dtype, mesh))
        # params in the backend's storage forms (backends/layout.py), decided once here
        packed_cache = None
        if self.native_matmul and params_cache_entry:
            from jaxpaged.convert.packed_cache import PackedCache
            packed_cache = PackedCache(params_cache_entry, self.backend.pack_flavour(config.dtype, config.quantization))
        graphdef, self.state = lay_out_params(graphdef, state, self.backend, platform=jax.default_backend(),
                                              pack=self.native_matmul, packed_cache=packed_cache,
                                              native_blocks=(config.native_matmul and config.quantization == "gguf"
                                                             and self.backend.reads_blocks(mesh)),
                                              int8_kernel=(config.native_matmul and config.quantization == "int8"
                                                           and not self.native_matmul and self.backend.int8_kernel(mesh)))
        self.packed_cache = packed_cache        # its hits / misses: what this start read / packed
        self.dtype = self.backend.kv_storage_dtype(kv_dtype)   # the cache pages' dtype
        shape = (model_config.num_layers, model_config.num_kv_heads, num_blocks, self.block_size,
                 model_config.head_dim)
        # (k, v): arrays, or pages + scales of an int8 / fp8 cache; sharded on KVH under a mesh
        self.kv_cache = zeros_kv_cache(self.backend.kv_cache_shapes(shape, kv_dtype), mesh)
        self.graphdef = graphdef
        # LoRA: fixed-shape adapter slot stacks, filled on demand (lora/device.py); None: no LoRA work at all
        self.lora = None
        if config.enable_lora:
            self.lora = LoRADeviceSlots(model_config, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                                        dtype=stack_dtype(config.dtype, jax.default_backend()), mesh=mesh)
        self.attention_options = AttentionOptions(sm_scale=model_config.head_dim ** -0.5,
                                                  sliding_window=model_config.sliding_window,
                                                  backend=self.backend.name, mesh=mesh)
        opts = self.attention_options
        # A step is two jitted calls chained on the device (no host round trip between them): the model
        # keyed by (T, B) and the sampler keyed by B alone, so the sampler compiles once per sequence
        # bucket instead of once per (T, B) pair (it is ~half of a step's compile time on CPU).
        self._forward = jax.jit(constrain_step_outputs(functools.partial(_forward_impl, graphdef, opts), mesh),
                                static_argnums=(0,), donate_argnums=(2,))
        # a fresh partial per runner: jit caches are per callable, so this runner's count is its own
        self._sample = jax.jit(functools.partial(_sample_impl), static_argnums=(0, 1))
        self._copy = jax.jit(constrain_kv(_copy_blocks_impl, mesh), donate_argnums=(0,))
        self._executables: set[tuple] = set()     # (kind, static args, input shapes) compiled so far
        self._mesh = mesh

    @property
    def attention_backend(self) -> str:
        return self.backend.name

    # ---- compile discipline -------------------------------------------------------------------
    def num_compiled(self) -> int:
        """Executables compiled so far: forward (one per (T, B) pair and variant) + sampler (one per B
        and variant). After warmup: len(buckets.pairs()) + len(buckets.seq_buckets), plus with
        speculative decoding the verification variant: len(pairs) more forwards and a sampler per
        row count min(T, B * (1 + k)) that is not already a B bucket."""
        return len(self._executables)

    def warmup(self, progress: bool = True, pairs: list[tuple[int, int]] | None = None,
               stop: threading.Event | None = None) -> bool:
        """Compiles the step for every (T, B) in `pairs` (default: the whole bucket table; default
        sampling variant), ahead of time: `jit(...).lower(...).compile()` fills the jitted functions'
        caches (the first real call of a shape compiles nothing) without running a step, and reads the
        persistent compilation cache when it has the executable (a warm start). Running each bucket
        once, as warmup did before, cost the padded rows' matmuls of 27 steps (~10 full 512-token steps).

        stop: a background warmup (LLMEngine's background_warmup) while steps run on another thread:
        it ends between pairs once set, draws its dummy sampling rows from a private generator (the
        engine's stream of unseeded draws stays what it would be), and leaves LoRA's warmup to the
        foreground call. A step whose shape it has not reached yet compiles that shape itself.
        Returns False when `stop` ended it early."""
        from tqdm.auto import tqdm
        pairs = self.buckets.pairs() if pairs is None else pairs
        generator = self.generator if stop is None else np.random.default_rng(0)
        desc = "Compiling step buckets" + (" (in the background)" if stop is not None else "")
        for t, b in tqdm(pairs, desc=desc, disable=not progress):
            if stop is not None and stop.is_set():
                return False
            inputs = build_step_inputs([], block_size=self.block_size, table_width=self.table_width,
                                       num_tokens_padded=t, num_seqs_padded=b,
                                       seq_lora_slots=[] if self.lora is not None else None)
            self._compile_step(inputs, self._sampling([], b, generator=generator))
            if self.spec_rows:
                r = self._verification_rows(t, b)
                inputs = build_step_inputs([], block_size=self.block_size, table_width=self.table_width,
                                           num_tokens_padded=t, num_seqs_padded=b, num_logits_rows=r,
                                           seq_lora_slots=[] if self.lora is not None else None)
                self._compile_step(inputs, self._sampling([], r, generator=generator), num_logits_rows=0)
        if self.lora is not None and stop is None:
            self.lora.warmup()          # the adapter slot fill (else compiled at the first adapter's load)
            jax.block_until_ready(self.lora.stacks)
        return True

    def _compile_step(self, inputs: StepInputs, sampling, num_logits_rows: int | None = None) -> None:
        """Compiles (does not run) the forward and the greedy no-logprobs sampler for these shapes."""
        arrays, lora = self._step_args(inputs, None, num_logits_rows)
        forward = self._forward.lower(None, self.state, self.kv_cache, arrays, lora).compile()
        self._executables.add(("forward", None, _signature(arrays)))
        rows = len(sampling.temperature)
        # the logits as the forward hands them over (its output sharding: replicated under a mesh)
        logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32,
                                      sharding=forward.output_shardings[1] if self._mesh is not None else None)
        self._sample.lower(None, False, logits, sampling).compile()
        self._executables.add(("sample", None, False, rows, _signature(sampling)))

    # ---- one step -------------------------------------------------------------------------------
    def execute(self, scheduled, block_copies, sampling_rows, prompt_logprobs: bool = False) -> StepResult:
        """Runs one step over `scheduled` (list of ScheduledSequence); returns rows for all of them.

        sampling_rows: one SamplingRow per scheduled sequence (None where no token is sampled); in a
        verification step (some sequence has num_spec_tokens k > 0) 1 + k consecutive rows for such a
        sequence (the positions of its last token and its drafts); results come back in that order.
        Variants (static): logprobs are computed with K = max_logprobs when any row asks for them
        (None: no logprob work at all); the penalty path only when a row uses penalties; prompt
        logprobs (K = max_logprobs) for every flat row when `prompt_logprobs`.
        """
        want_lp = any(r is not None and r.params.logprobs is not None for r in sampling_rows)
        num_logprobs = self.config.max_logprobs if want_lp else None
        use_penalties = needs_penalties(sampling_rows)
        hooks = self.hooks
        if block_copies:
            with hooks.part("cow_copy"):
                self._copy_blocks(block_copies)
                if hooks:
                    jax.block_until_ready(self.kv_cache)
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        t, b = self.buckets.lookup(num_tokens, len(scheduled))
        # a verification step: R logits rows, fixed per (T, B) pair (warmed up with it)
        rows_padded = self._verification_rows(t, b) if len(sampling_rows) > len(scheduled) else None
        with hooks.part("inputs"):
            lora_slots = self.lora.slots_for(scheduled) if self.lora is not None else None
            inputs = build_step_inputs(scheduled, block_size=self.block_size, table_width=self.table_width,
                                       num_tokens_padded=t, num_seqs_padded=b, with_next_tokens=prompt_logprobs,
                                       seq_lora_slots=lora_slots, num_logits_rows=rows_padded)
        with hooks.part("sampling_inputs"):
            sampling = self._sampling(sampling_rows, rows_padded or b, use_penalties)
        hooks.inputs(inputs, sampling)
        with hooks.part("device"):
            out, prompt_out = self._run(inputs, sampling, num_logprobs=num_logprobs, use_penalties=use_penalties,
                                        prompt_logprobs=self.config.max_logprobs if prompt_logprobs else None,
                                        num_logits_rows=len(sampling_rows) if rows_padded else None)
            if hooks:       # the wait belongs to this part (device_get below would wait anyway)
                jax.block_until_ready((out, prompt_out))
        n = len(sampling_rows)
        host, prompt_host = jax.device_get((out, prompt_out))
        top_ids = host.top_ids[:n] if want_lp else None
        top_lp = host.top_logprobs[:n] if want_lp else None
        result = StepResult(host.tokens[:n], host.logprob[:n], host.rank[:n], top_ids, top_lp)
        if prompt_host is not None:
            (result.prompt_logprob, result.prompt_rank, result.prompt_top_ids,
             result.prompt_top_logprobs) = (a[:num_tokens] for a in prompt_host)
        return result

    def _verification_rows(self, t: int, b: int) -> int:
        """R of a verification step in bucket (T, B): at most 1 + k rows per sequence, at most one per
        token (a few drafting sequences in a wide step do not pay B * (1 + k) sampler rows)."""
        return min(t, b * self.spec_rows)

    def _sampling(self, rows, pad_to: int, use_penalties: bool = False, generator=None) -> SamplingTensors:
        # Fixed widths keep the compiled shapes inside the table: the token history spans
        # max_model_len (penalty variant only), banned ids 16 (more only for unusual stop lists).
        banned = max(16, max((len(r.params.all_stop_token_ids(self.eos_token_ids)) for r in rows
                              if r is not None), default=0))
        generator = generator if generator is not None else self.generator
        return SamplingTensors.build(
            rows, pad_to=pad_to, vocab_size=self.model_config.vocab_size, generator=generator,
            eos_token_ids=self.eos_token_ids, history_len=self.table_width * self.block_size if use_penalties else 0,
            banned_width=1 << (banned - 1).bit_length())

    def _run(self, inputs: StepInputs, sampling, *, num_logprobs, use_penalties: bool, prompt_logprobs,
             num_logits_rows: int | None = None):
        arrays, lora = self._step_args(inputs, prompt_logprobs, num_logits_rows)
        # the executables this runner has: a new key here is a compile (num_compiled; jit's own cache
        # does not count the ones warmup compiled ahead of time until their first call)
        self._executables.add(("forward", prompt_logprobs, _signature(arrays)))
        self._executables.add(("sample", num_logprobs, use_penalties, len(sampling.temperature), _signature(sampling)))
        self.kv_cache, logits, prompt_out = self._forward(prompt_logprobs, self.state, self.kv_cache, arrays, lora)
        return self._sample(num_logprobs, use_penalties, logits, sampling), prompt_out

    def _step_args(self, inputs: StepInputs, prompt_logprobs, num_logits_rows):
        """(arrays, lora): the forward's inputs dict and LoRA stacks for this step."""
        names = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start",
                 "logits_indices") + (("next_token_ids",) if prompt_logprobs is not None else ())
        names += ("lora_slots",) if self.lora is not None else ()
        arrays = {k: getattr(inputs, k) for k in names}
        if num_logits_rows is not None:
            # the verification variant (a different input structure: its own executables)
            arrays["num_logits_rows"] = np.int32(num_logits_rows)
        return arrays, (self.lora.step_args() if self.lora is not None else None)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        size = next((c for c in COPY_BUCKETS if c >= len(copies)), None)
        if size is None:
            raise BucketError(f"{len(copies)} block copies in one step exceed {COPY_BUCKETS[-1]}")
        src = np.zeros(size, np.int32)
        dst = np.zeros(size, np.int32)
        src[: len(copies)], dst[: len(copies)] = zip(*copies)
        self.kv_cache = self._copy(self.kv_cache, src, dst)
