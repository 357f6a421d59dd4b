"""GrammarState: one sequence's position in its grammar, and the packed token masks of a step.

Mask layout (llguidance's, and what sampler.apply_token_bitmask unpacks): row b is W = ceil(V / 32)
int32 words; token t is allowed iff bit (t % 32) of word (t // 32) is set. A row of all ones (-1)
allows every token, which is how rows without a grammar look in a batch that has some.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_executor = None


def mask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarState:
    """Created by StructuredOutputManager.new_state. The compile may still be running: `is_ready()`."""

    def __init__(self, compiled: Future, eos_token_ids: Sequence[int]):
        self._compiled = compiled
        self._eos = list(eos_token_ids)
        self._matcher = None
        self.error: str | None = None      # set when the grammar failed to compile or a token broke it

    def is_ready(self) -> bool:
        return self._compiled.done()

    @property
    def matcher(self):
        """This sequence's own matcher (a copy of the compiled one), or None after an error."""
        if self._matcher is None and self.error is None:
            try:
                self._matcher = self._compiled.result().deep_copy()
            except Exception as exc:  # noqa: BLE001 - reported through `error`; the row then allows eos only
                self.error = str(exc)
                logger.error("structured output: %s", exc)
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False (and `error` set) when the grammar rejects it."""
        m = self.matcher
        if m is None:
            return False
        if m.is_stopped():
            return True            # tokens after the grammar's end (eos under ignore_eos) change nothing
        if not m.consume_token(int(token_id)):
            self.error = m.get_error() or f"token {token_id} rejected"
            logger.error("structured output: %s", self.error)
            return False
        return True

    def is_terminated(self) -> bool:
        m = self.matcher
        return m is not None and m.is_stopped()

    def fill_eos_only(self, mask: np.ndarray, row: int) -> None:
        mask[row] = 0
        for t in self._eos:
            mask[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))


def fill_bitmasks(rows: list[tuple[GrammarState, int]], mask: np.ndarray) -> None:
    """Writes the next-token mask of each (state, row) into mask [B, W] int32 (C-contiguous).
    Healthy matchers are filled in parallel by llguidance's executor (the GIL is released); a
    state in error allows eos only, so its sequence ends."""
    global _executor
    import llguidance

    ok = []
    for state, row in rows:
        m = state.matcher
        if m is None or m.is_error():
            if state.error is None:
                state.error = m.get_error() if m is not None else "no matcher"
            state.fill_eos_only(mask, row)
        else:
            ok.append((m, row))
    if ok:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        B, W = mask.shape
        _executor.unsafe_compute_mask_ptr(ok, mask.ctypes.data, W * 4, B)
