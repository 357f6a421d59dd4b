"""StructuredOutputManager: compiles grammars off the engine thread and caches them by spec.

One per engine. The llguidance tokenizer (about 0.5 s to build for a 49k vocabulary) is made on the
first structured request, inside the pool. `new_state(spec)` returns a GrammarState at once; its
compile runs in a small thread pool (llguidance releases the GIL while it builds a matcher), and the
scheduler keeps the request waiting until `GrammarState.is_ready()`, so other requests' steps are
never held up by a compile. Compiled matchers are cached by `StructuredOutputsParams.key()` (LRU);
every sequence gets its own copy (`LLMatcher.deep_copy`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from jaxpaged.structured_output.params import StructuredOutputsParams
from jaxpaged.structured_output.state import GrammarState

CACHE_SIZE = 256          # compiled grammars kept
COMPILE_THREADS = 2


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self._pool: ThreadPoolExecutor | None = None
        self._tokenizer_future: Future | None = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        """A sequence's grammar state; the compile starts (or is found in the cache) now."""
        return GrammarState(self._compiled(spec), self.eos_token_ids)

    def _compiled(self, spec: StructuredOutputsParams) -> Future:
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="jaxpaged-grammar")
                self._tokenizer_future = self._pool.submit(self._build_tokenizer)
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _build_tokenizer(self):
        from jaxpaged.tokenizer import CachedTokenizer

        # the model's vocabulary may be padded past the tokenizer's: masks span the model's
        tok = self._hf_tokenizer
        if isinstance(tok, CachedTokenizer):        # its Rust tokenizer as llguidance.hf would pass it
            from llguidance import LLTokenizer      # (llguidance.hf imports transformers)
            return LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=self.vocab_size,
                               eos_token=self.eos_token_ids or tok.eos_token_id)
        import llguidance.hf
        return llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)

    def _compile(self, spec: StructuredOutputsParams):
        from llguidance import LLMatcher

        tokenizer = self._tokenizer_future.result()
        matcher = LLMatcher(tokenizer, spec.to_grammar(), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {matcher.get_error()}")
        return matcher

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
