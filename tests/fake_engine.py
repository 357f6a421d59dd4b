"""FakeEngine: the Engine contract (docs/CONTRACTS.md) with outputs computable by hand, for server tests.

Sequence j (of n) of a request whose last prompt token is L generates, at step i (0-based),
token (L + 1 + i + j) % vocab_size. Text is the tokenizer's decoding of the generated ids.
Logprobs: the sampled token has logprob -0.5 and rank 1; the top-k are (token + r - 1) % vocab
with logprob -0.5 * r for rank r; prompt logprobs are -1.0 (None for the first prompt token).
EOS (id 2) ends a sequence unless ignore_eos; stop strings and stop_token_ids end it as in vLLM.

KV accounting mimics the block manager: each sequence holds ceil(num_tokens / block_size)
blocks; a request is admitted only when its prompt blocks (times n) are free, and a sequence
that needs a new block when none is free waits a step. Everything is freed on finish/abort, so
`get_stats().kv_cache_usage` returning to 0 shows nothing leaked.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from jaxpaged.engine_config import EngineConfig
from jaxpaged.inputs import InputProcessor
from jaxpaged.outputs import CompletionOutput, RequestOutput, make_logprobs_entry
from jaxpaged.sampling_params import SamplingParams


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class FakeModelConfig:
    vocab_size: int
    eos_token_ids: tuple = (2,)


@dataclass
class _Seq:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    blocks: int = 0


@dataclass
class _Req:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    running: bool = False


def expected_tokens(prompt_ids: list[int], num: int, index: int = 0, vocab_size: int = 320) -> list[int]:
    """The ids FakeEngine generates for sequence `index` (before any stop)."""
    last = prompt_ids[-1]
    return [(last + 1 + i + index) % vocab_size for i in range(num)]


class FakeEngine:
    def __init__(self, tokenizer=None, *, vocab_size: int = 320, max_model_len: int = 256, block_size: int = 16,
                 num_kv_blocks: int = 129, max_num_seqs: int = 64, step_delay: float = 0.0,
                 model: str = "fake-model"):
        if tokenizer is None:
            from tests.tiny_models import make_tokenizer
            tokenizer = make_tokenizer(vocab_size)
        self.tokenizer = tokenizer
        self.config = EngineConfig(model=model, max_model_len=max_model_len, block_size=block_size,
                                   num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs)
        self.model_config = FakeModelConfig(vocab_size=vocab_size)
        self.max_model_len = max_model_len
        self.default_sampling: dict = {}        # the Engine contract: no generation_config.json defaults
        self.step_delay = step_delay
        self.total_blocks = num_kv_blocks - 1       # block 0 is the null block
        # the real engine's entry checks (same rules, same ValueErrors)
        self.input_processor = InputProcessor(tokenizer, vocab_size=vocab_size, max_model_len=max_model_len,
                                              kv_capacity_tokens=self.total_blocks * block_size,
                                              max_num_seqs=max_num_seqs, max_logprobs=self.config.max_logprobs)
        self.used_blocks = 0
        self.requests: dict[str, _Req] = {}
        self.stats = FakeStats()
        self.num_steps = 0
        self._thread_ids: set[int] = set()          # which threads touched the engine (should be one)

    # ---- contract ---------------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.tokenizer

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None):
        self._thread_ids.add(threading.get_ident())
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError("sampling_params: FakeEngine runs SamplingParams only")
        processed, params = self.input_processor.process(prompt, params)
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text, ids = processed.prompt, processed.prompt_token_ids
        seqs = [_Seq(j, logprobs=[] if params.logprobs is not None else None) for j in range(params.n)]
        self.requests[request_id] = _Req(request_id, text, ids, params, seqs)

    def abort_request(self, request_id) -> None:
        self._thread_ids.add(threading.get_ident())
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            req = self.requests.pop(rid, None)
            if req is not None:
                self._free(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> FakeStats:
        self.stats.num_running = sum(r.running for r in self.requests.values())
        self.stats.num_waiting = len(self.requests) - self.stats.num_running
        self.stats.kv_cache_usage = self.used_blocks / self.total_blocks
        return FakeStats(**vars(self.stats))

    def step(self) -> list[RequestOutput]:
        self._thread_ids.add(threading.get_ident())
        if self.step_delay:
            time.sleep(self.step_delay)
        self.num_steps += 1
        outputs = []
        for req in list(self.requests.values()):
            if not req.running and not self._admit(req):
                continue
            advanced = False
            for seq in req.seqs:
                if seq.finish_reason is None and self._grow(req, seq):
                    self._generate_one(req, seq)
                    advanced = True
            finished = all(s.finish_reason is not None for s in req.seqs)
            if advanced or finished:
                outputs.append(self._output(req, finished))
            if finished:
                del self.requests[req.request_id]
                self._free(req)
        return outputs

    # ---- internals ---------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.config.block_size)

    def _admit(self, req: _Req) -> bool:
        need = self._blocks_for(len(req.prompt_ids)) * len(req.seqs)
        if self.used_blocks + need > self.total_blocks:
            return False
        for seq in req.seqs:
            seq.blocks = self._blocks_for(len(req.prompt_ids))
        self.used_blocks += need
        req.running = True
        self.stats.prompt_tokens_total += len(req.prompt_ids)
        self.stats.prefix_cache_queries += len(req.prompt_ids)
        return True

    def _grow(self, req: _Req, seq: _Seq) -> bool:
        need = self._blocks_for(len(req.prompt_ids) + len(seq.token_ids) + 1) - seq.blocks
        if need <= 0:
            return True
        if self.used_blocks + need > self.total_blocks:
            return False
        seq.blocks += need
        self.used_blocks += need
        return True

    def _free(self, req: _Req) -> None:
        for seq in req.seqs:
            self.used_blocks -= seq.blocks
            seq.blocks = 0

    def _generate_one(self, req: _Req, seq: _Seq) -> None:
        p, vocab = req.params, self.model_config.vocab_size
        tok = (req.prompt_ids[-1] + 1 + len(seq.token_ids) + seq.index) % vocab
        seq.token_ids.append(tok)
        self.stats.generation_tokens_total += 1
        if seq.logprobs is not None:
            k = p.logprobs
            seq.logprobs.append(make_logprobs_entry(
                tok, -0.5, 1, [(tok + r) % vocab for r in range(k)], [-0.5 * (r + 1) for r in range(k)],
                decode=lambda t: self.tokenizer.decode([t])))
        seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=p.skip_special_tokens)
        n_out = len(seq.token_ids)
        if n_out >= p.min_tokens:
            if tok in p.stop_token_ids or (tok in (2,) and not p.ignore_eos):
                seq.finish_reason, seq.stop_reason = "stop", (tok if tok in p.stop_token_ids else None)
                return
            for s in p.stop:
                at = seq.text.find(s)
                if at >= 0:
                    seq.text = seq.text[: at + len(s)] if p.include_stop_str_in_output else seq.text[:at]
                    seq.finish_reason, seq.stop_reason = "stop", s
                    return
        if n_out >= p.max_tokens or len(req.prompt_ids) + n_out >= self.max_model_len:
            seq.finish_reason = "length"

    def _output(self, req: _Req, finished: bool) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            hold = req.params.output_text_buffer_length
            if seq.finish_reason is None and hold:
                text = text[:-hold] if len(text) > hold else ""
            outs.append(CompletionOutput(seq.index, text, list(seq.token_ids), -0.5 * len(seq.token_ids),
                                         list(seq.logprobs) if seq.logprobs is not None else None,
                                         seq.finish_reason, seq.stop_reason))
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [make_logprobs_entry(t, -1.0, 1, decode=lambda x: self.tokenizer.decode([x]))
                                        for t in req.prompt_ids[1:]]
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), prompt_logprobs, outs, finished)
