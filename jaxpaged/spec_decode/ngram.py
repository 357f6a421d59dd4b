"""N-gram (prompt lookup) proposer: draft tokens copied from the sequence's own earlier text.

For n from prompt_lookup_max down to prompt_lookup_min: find the LATEST earlier occurrence of the
sequence's last n tokens (prompt + output) that is followed by at least one token, and propose the
up to k tokens that followed it. No match for any n: no proposal (the sequence decodes one token).
Host only (numpy); its cost is one pass over the sequence's tokens per n.
"""
from __future__ import annotations

import numpy as np


def propose_ngram(token_ids, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k draft tokens continuing `token_ids` (a list of ints or an int array), [] when nothing matches.

    Index arithmetic: with L tokens and suffix s = tokens[L-n:], a match starts at i when
    tokens[i:i+n] == s and i + n <= L - 1 (an EARLIER occurrence, the suffix itself excluded, with a
    following token); the proposal is tokens[i+n : i+n+k].
    """
    L = len(token_ids)
    if k < 1 or L < n_min + 1:
        return []
    toks = np.asarray(token_ids, dtype=np.int64)                        # [L]
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        starts = _match_starts(toks, n)
        if starts.size:
            i = int(starts[-1])
            return toks[i + n: i + n + k].tolist()
    return []


def _match_starts(toks: np.ndarray, n: int) -> np.ndarray:
    """Ascending starts i in [0, L - n - 1] with toks[i:i+n] == toks[L-n:]."""
    L = toks.shape[0]
    suffix = toks[L - n:]
    # candidates by the first token, then confirmed column by column (cheap: few survive)
    cand = np.flatnonzero(toks[: L - n] == suffix[0])                   # i <= L - n - 1
    for j in range(1, n):
        if not cand.size:
            break
        cand = cand[toks[cand + j] == suffix[j]]
    return cand
