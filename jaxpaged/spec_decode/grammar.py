"""Structured output under speculation: drafts cut to what the grammar accepts, and each drafted
position's token mask taken after the drafts before it.

Row j of a drafting sequence samples the position after drafts[:j]; its mask must be the grammar's
mask there, exactly as the non-speculative step would compute it once those tokens were accepted.
`DraftGrammar` is a GrammarState stand-in for such a row: a copy of the sequence's matcher advanced
past drafts[:j] (the sequence's own matcher only ever advances by emitted tokens).
"""
from __future__ import annotations

import numpy as np


def grammar_prefix(state, drafts: list[int]) -> list[int]:
    """The longest prefix of drafts the sequence's grammar accepts now ([] when the grammar is done,
    in error, or still compiling)."""
    m = state.matcher if state.is_ready() else None
    if m is None or m.is_error() or m.is_stopped():
        return []
    return drafts[: int(m.validate_tokens(drafts))]


class DraftGrammar:
    """What sampler's mask fill reads of a GrammarState (matcher, error, fill_eos_only), for the row
    after `drafts` (which the grammar accepts: grammar_prefix)."""

    def __init__(self, state, drafts: list[int]):
        self._state = state
        self.error = None
        m = state.matcher.deep_copy()
        if not m.consume_tokens(list(drafts)):
            self.error = m.get_error() or "draft tokens rejected"
        self.matcher = m

    def fill_eos_only(self, mask: np.ndarray, row: int) -> None:
        self._state.fill_eos_only(mask, row)
