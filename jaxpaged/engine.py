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
share the prompt's blocks. A beam search (BeamSearchParams) is a BeamSearchState (beam_search.py) whose
beams are sequences too, so it shares the steps with everything else in flight. Prompts and params are
checked once, on the way in, by the InputProcessor (inputs.py). The engine changes no process-wide JAX
setting (see compilation_cache.py).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from jaxpaged.engine_config import EngineConfig
from jaxpaged.generation_config import sampling_defaults
from jaxpaged.kv_sizing import KVPoolPlan, describe, plan_kv_pool
from jaxpaged.outputs import RequestOutput
from jaxpaged.backends import get_backend, kv_bytes_per_block, kv_cache_dtype, resolve_backend
from jaxpaged.runner import ModelRunner
from jaxpaged.detokenizer import TokenDecoder
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.beam_search import BeamSearchState
from jaxpaged.inputs import InputProcessor
from jaxpaged.request_state import RequestState
from jaxpaged.scheduler import Scheduler, SchedulerStats
from jaxpaged.sharding import make_mesh, place_params, prepare_params
from jaxpaged.spec_decode.speculator import Speculator
from jaxpaged.step_hooks import StepHooks
from jaxpaged.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


@dataclass
class EngineStats(SchedulerStats):
    """The scheduler's stats plus the engine's token counters (cumulative)."""
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # speculative decoding (spec_decode/speculator.py SpecDecodeStats); zeros without it
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list = dataclasses.field(default_factory=list)
    # LoRA (enable_lora; vLLM's lora_requests_info labels): adapter names of running / waiting sequences
    max_lora: int = 0
    running_lora_adapters: str = ""
    waiting_lora_adapters: str = ""


def _prepare_backend(requested: str) -> None:
    try:
        get_backend(resolve_backend(requested)).prepare()
    except ValueError:      # a bad backend name is reported where the runner resolves it
        pass


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, progress: bool = True, background_warmup: bool = False,
                 **kwargs):
        """background_warmup (the server's start): compile only the smallest step shape here and the rest
        of the bucket table in a thread while requests are already served (a shape not compiled yet
        compiles at its first step); `stop_warmup()` ends it. Default: all of it before returning."""
        from jaxpaged.convert import load_model
        from jaxpaged.models import build_state

        config = config.replace(**kwargs) if config is not None else EngineConfig(**kwargs)
        self.config = config
        _prepare_backend(config.attention_backend)      # first start: the kernel build overlaps the loading
        loaded = load_model(config.model, dtype=config.dtype, cache_dir=config.download_dir,
                            tokenizer=config.tokenizer, progress=progress, write_cache=True,
                            quantization=config.quantization)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.loras = self._lora_registry(loaded.config)     # None unless enable_lora
        self.default_sampling = self._default_sampling()
        # tensor_parallel_size > 1: a "tp" mesh, params laid out and placed per shard (sharding.py)
        self.mesh = make_mesh(config.tensor_parallel_size)
        self.model_config, params = prepare_params(self.model_config, loaded.params, config.tensor_parallel_size)
        graphdef, state = build_state(self.model_config, params, config.dtype)
        state = place_params(state, self.model_config, self.mesh)
        self.kv_cache_dtype = kv_cache_dtype(config)     # the KV pool is sized by it (no side effects)
        self.kv_plan = self._plan_kv_pool(state)
        self.max_model_len, num_blocks = self.kv_plan.max_model_len, self.kv_plan.num_blocks
        self.speculator = self._speculator(num_blocks, progress)
        self.scheduler = Scheduler(num_blocks=num_blocks, block_size=config.block_size,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len,
                                   enable_prefix_caching=config.enable_prefix_caching,
                                   max_loras=config.max_loras if config.enable_lora else None)
        self.step_hooks = StepHooks()                   # observers of each step (profiling), shared with the runner
        self.runner = ModelRunner(config, self.model_config, graphdef, state, num_blocks, self.max_model_len,
                                  self.kv_cache_dtype, mesh=self.mesh, hooks=self.step_hooks,
                                  params_cache_entry=loaded.cache_entry)
        self.warmup_thread: threading.Thread | None = None
        self._warmup_stop = threading.Event()
        self.warmup_done = threading.Event()    # set once no warmup is pending (not when stop_warmup cut it short)
        if not config.enforce_eager:
            self._warmup(progress, background_warmup)
        else:
            self.warmup_done.set()
        self._decode_token = TokenDecoder(self.tokenizer)
        # grammars of structured-output requests (compiled in a thread pool on first use)
        self.structured_output = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                         self.model_config.eos_token_ids)
        self.input_processor = InputProcessor(
            self.tokenizer, vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
            kv_capacity_tokens=self.scheduler.max_tokens_per_sequence(), max_num_seqs=config.max_num_seqs,
            max_logprobs=config.max_logprobs)
        # unfinished user requests by request_id (RequestState, or BeamSearchState for beam search);
        # a Sequence's request_id names its owner here
        self._requests: dict[str, RequestState | BeamSearchState] = {}
        self._waiting_beams: collections.deque[BeamSearchState] = collections.deque()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    def _warmup(self, progress: bool, background: bool) -> None:
        if not background:
            self.runner.warmup(progress=progress)
            self.warmup_done.set()
            return
        pairs = self.runner.buckets.pairs()
        self.runner.warmup(progress=False, pairs=pairs[:1])        # the smallest shape (and LoRA's) now

        def rest():
            try:
                if self.runner.warmup(progress=progress, pairs=pairs[1:], stop=self._warmup_stop):
                    logger.info("background warmup done: all %d step shapes compiled", len(pairs))
                    self.warmup_done.set()
            except Exception:       # noqa: BLE001 - those shapes then compile at their first step
                logger.exception("background warmup failed; the remaining shapes compile at first use")

        self.warmup_thread = threading.Thread(target=rest, name="jaxpaged-warmup", daemon=True)
        self.warmup_thread.start()

    def stop_warmup(self, timeout: float = 60.0) -> None:
        """Ends a background warmup after the shape it is compiling (before the process exits)."""
        self._warmup_stop.set()
        if self.warmup_thread is not None:
            self.warmup_thread.join(timeout)

    def _speculator(self, num_blocks: int, progress: bool) -> Speculator | None:
        """speculative_config -> the Speculator (spec_decode/); the draft_model method loads its draft here."""
        spec = self.config.speculative_config
        if spec is None:
            return None
        draft = None
        if spec.method == "draft_model":
            from jaxpaged.spec_decode.draft_model import DraftModelProposer
            draft = DraftModelProposer(self.config, self.model_config, self.tokenizer, num_blocks, self.max_model_len,
                                       progress=progress)
        return Speculator(spec, self.max_model_len, draft)

    def _default_sampling(self) -> dict:
        """The model's recommended sampling fields (generation_config.json), checked once at start."""
        defaults = sampling_defaults(self.config.model, self.config.generation_config)
        if defaults:
            try:
                SamplingParams(**defaults)
            except (ValueError, TypeError) as e:
                raise ValueError(f"generation_config: the model's generation_config.json holds an invalid value: "
                                 f"{e}") from None
            logger.info("default sampling parameters from the model's generation_config.json: %s "
                        "(--generation-config vllm ignores them)", defaults)
        return defaults

    def _lora_registry(self, checkpoint_config):
        if not self.config.enable_lora:
            return None
        from jaxpaged.lora.registry import LoRARegistry
        import numpy as np
        return LoRARegistry(checkpoint_config, max_lora_rank=self.config.max_lora_rank, dtype=np.float32,
                            tensor_parallel_size=self.config.tensor_parallel_size)

    def _lora_stack_bytes(self) -> int:
        """The adapter slot stacks' device bytes (counted with the params when the KV pool is sized)."""
        if not self.config.enable_lora:
            return 0
        import jax
        from jaxpaged.lora.device import stack_bytes, stack_dtype
        cfg = self.config
        return stack_bytes(self.model_config, cfg.max_loras, cfg.max_lora_rank,
                           stack_dtype(cfg.dtype, jax.default_backend()))

    # ---- LoRA adapters (vLLM's names) -------------------------------------------------------------
    def add_lora(self, lora_request) -> bool:
        """Loads an adapter into host memory (checked now: ValueError naming the field); requests
        name it by LoRARequest. True once loaded (also when it already was)."""
        self._lora_of(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forgets adapter `lora_id`; requests already running with it finish with it. False if unknown."""
        if self.loras is None:
            return False
        loaded = self.loras.get(lora_id)
        if loaded is None:
            return False
        self.loras.remove(lora_id)
        if not any(s.lora is loaded for s in self.scheduler.seqs.values()):
            self.runner.lora.release(loaded.key)
        return True

    def list_loras(self) -> set[int]:
        return set() if self.loras is None else {x.lora_int_id for x in self.loras.list()}

    def _lora_of(self, lora_request):
        if lora_request is None:
            return None
        if self.loras is None:
            raise ValueError("lora_request: LoRA is not enabled; start the engine with enable_lora=True")
        return self.loras.add(lora_request)

    # ---- sizing -----------------------------------------------------------------------------------
    def _plan_kv_pool(self, state) -> KVPoolPlan:
        """KV pool blocks and max_model_len (kv_sizing.py), logged with what the params take."""
        cfg = self.config
        from jax.tree_util import tree_leaves
        params_bytes = sum(int(x.nbytes) for x in tree_leaves(state)) + self._lora_stack_bytes()
        plan = plan_kv_pool(cfg, self.model_config.max_position_embeddings,
                            kv_bytes_per_block(self.model_config, cfg.block_size, self.kv_cache_dtype), params_bytes)
        logger.info(describe(plan, self.kv_cache_dtype, params_bytes))
        if plan.note:
            logger.warning(plan.note)
        return plan

    # ---- requests ---------------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.tokenizer

    def add_request(self, request_id: str, prompt, params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None, lora_request=None) -> None:
        """Queues a request. prompt: str, token ids (list / tuple / 1-D numpy), {"prompt": str} or
        {"prompt_token_ids": [...]}. params: SamplingParams (n completions), or BeamSearchParams (a beam
        search: its RequestOutput lists the best beams, see beam_search.py).

        lora_request: a LoRARequest (enable_lora=True): the request runs with that adapter, loaded on
        first use. Raises ValueError naming the field for bad input (inputs.py has the rules); nothing
        is queued then.
        """
        params = params if params is not None else SamplingParams(**self.default_sampling)
        processed, params = self.input_processor.process(prompt, params)
        request_id = str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        arrival = arrival_time if arrival_time is not None else time.time()
        lora = self._lora_of(lora_request)
        text, ids = processed.prompt, processed.prompt_token_ids
        common = dict(eos_token_ids=self.model_config.eos_token_ids, max_model_len=self.max_model_len,
                      decode_token=self._decode_token, tokenizer=self.tokenizer)
        if isinstance(params, BeamSearchParams):
            eos = self.model_config.eos_token_ids
            if not eos and getattr(self.tokenizer, "eos_token_id", None) is not None:
                common["eos_token_ids"] = (self.tokenizer.eos_token_id,)
            state = BeamSearchState(request_id, text, ids, params, arrival, **common)
            state.lora = lora
            self._waiting_beams.append(state)       # step() starts it when its beams have seats
            self._requests[request_id] = state
            self._prompt_tokens_total += len(ids)
            return
        state = RequestState(request_id, text, ids, params, arrival, **common)
        seqs = state.first_sequences()
        for seq in seqs:
            seq.lora = lora
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            for seq in seqs:        # each its own matcher; the compile is shared (cached by spec)
                seq.structured_output = self.structured_output.new_state(params.structured_outputs)
        if len(seqs) == 1:     # the scheduler validates too: register with it before storing anything
            self.scheduler.add_sequence(seqs[0])
        else:
            self.scheduler.add_sequence_group(seqs)
        self._requests[request_id] = state
        self._prompt_tokens_total += len(ids)

    def abort_request(self, request_id) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self._requests.pop(rid, None)
            if state is not None:
                state.abort(self.scheduler)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        """vLLM's name: user requests added and not yet finished or aborted."""
        return len(self._requests)

    # ---- one step ---------------------------------------------------------------------------------
    def add_step_hook(self, hook) -> None:
        """Registers a step observer (jaxpaged/step_hooks.py: timing parts, seeing each step's inputs)."""
        self.step_hooks.add(hook)

    def remove_step_hook(self, hook) -> None:
        self.step_hooks.remove(hook)

    def step(self) -> list[RequestOutput]:
        with self.step_hooks.step():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        sched, requests = self.scheduler, self._requests
        if self._waiting_beams:
            self._start_waiting_beams()
        spec = self.speculator
        with self.step_hooks.part("schedule"):
            if spec is not None:
                spec.propose(sched.running, requests)
            out = sched.schedule()
        touched: dict[str, object] = {}
        for seq in out.finished:      # the scheduler gave up on these (they can never fit)
            state = requests.get(seq.request_id)
            if state is not None:
                state.on_scheduler_finished(seq, sched)
                touched[state.request_id] = state
        if not out.scheduled and not out.finished and requests:
            self._release_stalled_beams()
        if out.scheduled:
            now = time.time()
            states = [requests[s.seq.request_id] for s in out.scheduled]
            first = None        # a verification step: each sequence's first sampling row (speculator.py)
            if spec is not None and spec.verifies(out.scheduled):
                rows, first = spec.sampling_rows(out.scheduled, states)
            else:
                rows = [st.sampling_row(s.seq) if s.sample else None for st, s in zip(states, out.scheduled)]
            want_prompt_lp = any(st.needs_prompt_logprobs(s.start) for st, s in zip(states, out.scheduled))
            result = self.runner.execute(out.scheduled, out.block_copies, rows, prompt_logprobs=want_prompt_lp)
            if want_prompt_lp:
                self._record_prompt_logprobs(out.scheduled, states, result)
            sched.update_from_output(out)
            for i, (st, s) in enumerate(zip(states, out.scheduled)):
                st.mark_scheduled(now)
                if first is not None:
                    if s.sample:
                        self._generation_tokens_total += spec.on_verified(st, s, result, first[i], sched)
                        touched[st.request_id] = st
                    continue
                if rows[i] is None:
                    continue
                self._generation_tokens_total += 1
                st.on_sampled(s.seq, result, i, sched)
                touched[st.request_id] = st
        if spec is not None:
            spec.after_step(sched.running)
        outputs = []
        for rid, state in touched.items():
            outputs.append(state.to_output())
            if state.finished:
                requests.pop(rid, None)
        return outputs

    def _start_waiting_beams(self) -> None:
        """Beam searches start first come first served while the beam_width seats each will fork into
        fit max_num_seqs next to those already running (a fork without a seat waits and recomputes);
        one always runs."""
        reserved = sum(st.width for st in self._requests.values()
                       if isinstance(st, BeamSearchState) and st.beams and not st.finished)
        while self._waiting_beams:
            st = self._waiting_beams[0]
            if not st.finished:             # (an aborted one is dropped)
                if reserved and reserved + st.width > self.scheduler.max_num_seqs:
                    return
                self.scheduler.add_sequence(st.first_sequences()[0])
                reserved += st.width
            self._waiting_beams.popleft()

    def _release_stalled_beams(self) -> None:
        """Nothing could be scheduled: only beams waiting for their siblings' blocks do that (beam_search.py)."""
        beams = [st for st in self._requests.values() if isinstance(st, BeamSearchState)]
        if beams and not any([st.release_waiting_parents(self.scheduler) for st in beams]):
            raise RuntimeError("beam_search: nothing can be scheduled (KV pool too small for one beam?)")

    def _record_prompt_logprobs(self, scheduled, states, result) -> None:
        row = 0   # flat rows follow the scheduled order (step_inputs.py)
        for s, state in zip(scheduled, states):
            if state.needs_prompt_logprobs(s.start):
                state.record_prompt_logprobs(s.start, s.num_new_tokens, row, result, self._decode_token)
            row += s.num_new_tokens

    def get_stats(self) -> EngineStats:
        stats = EngineStats(**dataclasses.asdict(self.scheduler.stats()), prompt_tokens_total=self._prompt_tokens_total,
                            generation_tokens_total=self._generation_tokens_total)
        if self.speculator is not None:
            sd = self.speculator.stats
            stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens = sd.num_drafts, sd.num_draft_tokens
            stats.spec_decode_num_accepted_tokens = sd.num_accepted_tokens
            stats.spec_decode_num_accepted_tokens_per_pos = list(sd.accepted_per_pos)
        if self.loras is not None:
            names = lambda seqs: ",".join(sorted({s.lora.request.lora_name for s in seqs if s.lora is not None}))
            stats.max_lora = self.config.max_loras
            stats.running_lora_adapters = names(self.scheduler.running)
            stats.waiting_lora_adapters = names(self.scheduler.waiting)
        return stats
