"""LLMEngine: add_request / step / abort_request over the scheduler and the model runner.

One step:
  scheduler.schedule()               which sequences advance by how many tokens (host, pure Python)
  runner.execute(...)                the jitted step: model over the flat ragged batch + sampling
  scheduler.update_from_output(...)  num_computed_tokens catch up; full blocks get prefix hashes
  per sampled sequence               append the token, detokenize, logprobs, stop checks, finish
  -> RequestOutput for every request that advanced (text cumulative, like vLLM)

Who owns what: the Scheduler owns the Sequences (sequence.py: token ids, KV progress, status); a
user request is a RequestState (request_state.py: prompt, params, metrics) with one CompletionState
per completion (logprobs, text, finish state). A request with n > 1 is n sequences (`<id>#<i>`) that
share the prompt's blocks. The engine changes no process-wide JAX setting (see compilation_cache.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from jaxpaged.engine_config import EngineConfig
from jaxpaged.outputs import RequestOutput
from jaxpaged.runner import ModelRunner, kv_bytes_per_block, resolve_kv_cache_dtype
from jaxpaged.detokenizer import TokenDecoder
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.request_state import CompletionState, RequestState
from jaxpaged.scheduler import Scheduler, SchedulerStats
from jaxpaged.sequence import Sequence, SequenceStatus
from jaxpaged.sharding import make_mesh, place_params, prepare_params

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 2 << 30   # cap of the default KV pool (2 GiB) when neither size is given


@dataclass
class EngineStats(SchedulerStats):
    """The scheduler's stats plus the engine's token counters (cumulative)."""
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, progress: bool = True, **kwargs):
        from jaxpaged.convert import load_model
        from jaxpaged.models import build_state

        config = config.replace(**kwargs) if config is not None else EngineConfig(**kwargs)
        self.config = config
        loaded = load_model(config.model, dtype=config.dtype, cache_dir=config.download_dir,
                            tokenizer=config.tokenizer, progress=progress, write_cache=True)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.max_model_len = self._max_model_len()
        # tensor_parallel_size > 1: a "tp" mesh, params laid out and placed per shard (sharding.py)
        self.mesh = make_mesh(config.tensor_parallel_size)
        self.model_config, params = prepare_params(self.model_config, loaded.params, config.tensor_parallel_size)
        graphdef, state = build_state(self.model_config, params, config.dtype)
        state = place_params(state, self.mesh)
        num_blocks = self._num_blocks()
        self.scheduler = Scheduler(num_blocks=num_blocks, block_size=config.block_size,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.runner = ModelRunner(config, self.model_config, graphdef, state, num_blocks, self.max_model_len,
                                  mesh=self.mesh)
        if not config.enforce_eager:
            self.runner.warmup(progress=progress)
        self._decode_token = TokenDecoder(self.tokenizer)
        self._requests: dict[str, RequestState] = {}       # unfinished user requests by request_id
        self._completions: dict[str, CompletionState] = {}  # their completions by seq_id
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    # ---- sizing -----------------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        want = self.config.max_model_len
        if want is None:
            return min(limit, 4096)
        if want > limit:
            raise ValueError(f"max_model_len: {want} exceeds the model's max_position_embeddings {limit}")
        return want

    def _num_blocks(self) -> int:
        """Physical blocks incl. the null block 0."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_bytes_per_block(self.model_config, cfg.block_size, resolve_kv_cache_dtype(cfg))
        if cfg.kv_cache_memory_bytes is not None:
            n = cfg.kv_cache_memory_bytes // per_block
            if n < 2:
                raise ValueError(f"kv_cache_memory_bytes: {cfg.kv_cache_memory_bytes} holds fewer than 2 blocks "
                                 f"of {per_block} bytes")
            return int(n)
        full = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size) + 1
        return int(max(2, min(full, DEFAULT_KV_CACHE_BYTES // per_block)))

    # ---- requests ---------------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.tokenizer

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues a request. prompt: str, list of token ids, or {"prompt": str} / {"prompt_token_ids": [...]}.

        Raises ValueError naming the field for bad input; nothing is queued then.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        request_id = str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        params.validate(vocab_size=self.model_config.vocab_size, max_logprobs=self.config.max_logprobs,
                        max_model_len=self.max_model_len)
        self._check_length(ids)
        arrival = arrival_time if arrival_time is not None else time.time()
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n: {params.n} exceeds max_num_seqs {self.config.max_num_seqs}")
        state = RequestState(request_id, text, ids, params, arrival)
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            # n > 1 with a seed: sample i uses seed + i (vLLM), else every sample would be identical
            child_params = params if params.n == 1 or params.seed is None else params.clone()
            if child_params is not params:
                child_params.seed = params.seed + i
            seq = Sequence(seq_id, ids, child_params, arrival, skip_prefix_cache=params.prompt_logprobs is not None)
            state.completions.append(CompletionState(
                seq, state, i, self.tokenizer, eos_token_ids=self.model_config.eos_token_ids,
                max_model_len=self.max_model_len, decode_token=self._decode_token))
        seqs = [c.seq for c in state.completions]
        if params.n == 1:     # the scheduler validates too: register with it before storing anything
            self.scheduler.add_sequence(seqs[0])
        else:
            self.scheduler.add_sequence_group(seqs)
        self._requests[request_id] = state
        for c in state.completions:
            self._completions[c.seq.seq_id] = c
        self._prompt_tokens_total += len(ids)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt] if all(isinstance(t, (int, np.integer)) for t in prompt) else None
            if ids is None:
                raise ValueError("prompt_token_ids: must be a list of int")
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            return None, ids
        raise ValueError(f"prompt: expected str or list of token ids, got {type(prompt).__name__}")

    def _check_length(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty (0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens is too long: max_model_len is {self.max_model_len} "
                             f"(prompt plus at least one generated token)")
        capacity = self.scheduler.max_tokens_per_sequence()
        if len(ids) + 1 > capacity:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the KV cache ({capacity} tokens)")

    def abort_request(self, request_id) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self._requests.pop(rid, None)
            if state is None:
                continue
            for c in state.completions:
                self._completions.pop(c.seq.seq_id, None)
                if not c.finished:
                    c.abort()
                    self.scheduler.finish_sequence(c.seq.seq_id, SequenceStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        """vLLM's name: user requests added and not yet finished or aborted."""
        return len(self._requests)

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        touched: dict[str, RequestState] = {}
        for seq_id in out.finished:   # the scheduler gave up on these (they can never fit)
            c = self._completions.get(seq_id)
            if c is not None and not c.finished:
                c.finish_length()
                touched[c.request.request_id] = c.request
        if out.scheduled:
            now = time.time()
            completions = [self._completions[s.seq.seq_id] for s in out.scheduled]
            rows = [c.sampling_row() if s.sample else None for c, s in zip(completions, out.scheduled)]
            want_prompt_lp = any(c.request.needs_prompt_logprobs(s.start) for c, s in zip(completions, out.scheduled))
            result = self.runner.execute(out.scheduled, out.block_copies, rows, prompt_logprobs=want_prompt_lp)
            if want_prompt_lp:
                self._record_prompt_logprobs(out.scheduled, result)
            self.scheduler.update_from_output(out)
            for i, (c, s) in enumerate(zip(completions, out.scheduled)):
                c.request.mark_scheduled(now)
                if rows[i] is None:
                    continue
                self.scheduler.append_token(s.seq.seq_id, int(result.tokens[i]))
                self._generation_tokens_total += 1
                reason = c.on_token(result, i)
                if reason is not None:
                    status = SequenceStatus.FINISHED_LENGTH if reason == "length" else SequenceStatus.FINISHED_STOPPED
                    self.scheduler.finish_sequence(s.seq.seq_id, status)
                touched[c.request.request_id] = c.request
        outputs = []
        for rid, state in touched.items():
            outputs.append(state.to_output())
            if state.finished:
                self._requests.pop(rid, None)
                for c in state.completions:
                    self._completions.pop(c.seq.seq_id, None)
        return outputs

    def _record_prompt_logprobs(self, scheduled, result) -> None:
        row = 0   # flat rows follow the scheduled order (step_inputs.py)
        for s in scheduled:
            state = self._completions[s.seq.seq_id].request
            if state.needs_prompt_logprobs(s.start):
                state.record_prompt_logprobs(s.start, s.num_new_tokens, row, result, self._decode_token)
            row += s.num_new_tokens

    def get_stats(self) -> EngineStats:
        return EngineStats(**dataclasses.asdict(self.scheduler.stats()), prompt_tokens_total=self._prompt_tokens_total,
                           generation_tokens_total=self._generation_tokens_total)
