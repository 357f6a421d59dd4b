"""Host-side construction of one step's flat, ragged model inputs (numpy), padded to a bucket.

For scheduled sequence b with `start` computed tokens and `n` new ones, its tokens occupy flat rows
query_start[b] .. query_start[b+1]-1 at positions start .. start+n-1; the token at position p is
written to slot block_table[p // BS] * BS + p % BS. Rows past the real token count are padding:
token 0, position 0, slot 0 (inside the null block 0, which no sequence reads). Padding sequences
have seq_len 0 and q_len 0.

Speculative decoding: a sequence scheduled with k = num_spec_tokens drafts has them as its last k
rows (after its real last token); with `num_logits_rows` the step has the verification layout:
logits_indices [R] lists each sequence's last 1 + k rows in order (one row for the others), then
-1 padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepInputs:
    token_ids: np.ndarray       # [T] int32
    positions: np.ndarray       # [T] int32
    slot_mapping: np.ndarray    # [T] int32
    block_tables: np.ndarray    # [B, W] int32
    seq_lens: np.ndarray        # [B] int32   context incl. this step's tokens; 0 = padding sequence
    query_start: np.ndarray     # [B+1] int32
    logits_indices: np.ndarray  # [B] int32   flat row of each sequence's last token (0 for padding);
                                # [R] in the verification layout (see the module docstring)
    next_token_ids: np.ndarray | None  # [T] int32 token at position + 1 of each row (prompt logprobs), else None
    num_tokens: int             # real (unpadded) token count
    num_seqs: int               # real (unpadded) sequence count
    lora_slots: np.ndarray | None = None  # [T] int32 adapter slot of each row (0: none) when LoRA is enabled


def build_step_inputs(scheduled, *, block_size: int, table_width: int, num_tokens_padded: int,
                      num_seqs_padded: int, with_next_tokens: bool = False,
                      seq_lora_slots: list[int] | None = None,
                      num_logits_rows: int | None = None) -> StepInputs:
    """scheduled: list of ScheduledSequence (seq, start, num_new_tokens, block_table).

    with_next_tokens: also fill next_token_ids (row r at position p holds token p + 1 of its sequence,
    0 where that token is not known yet), which prompt logprobs score.
    seq_lora_slots: the adapter slot of each scheduled sequence (LoRA enabled); its rows carry it.
    """
    t_pad, b_pad = num_tokens_padded, num_seqs_padded
    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.zeros(t_pad, np.int32)
    block_tables = np.zeros((b_pad, table_width), np.int32)
    seq_lens = np.zeros(b_pad, np.int32)
    query_start = np.zeros(b_pad + 1, np.int32)
    logits_indices = np.zeros(b_pad, np.int32)
    next_ids = np.zeros(t_pad, np.int32) if with_next_tokens else None
    lora_slots = np.zeros(t_pad, np.int32) if seq_lora_slots is not None else None
    row = 0
    for b, s in enumerate(scheduled):
        n, start = s.num_new_tokens, s.start
        table = np.asarray(s.block_table, np.int32)
        block_tables[b, : len(table)] = table
        pos = np.arange(start, start + n, dtype=np.int32)
        k = s.num_spec_tokens
        toks = _token_slice(s.seq, start, n - k)
        token_ids[row: row + n] = toks + s.seq.spec_token_ids[:k] if k else toks
        positions[row: row + n] = pos
        slots[row: row + n] = table[pos // block_size] * block_size + pos % block_size
        seq_lens[b] = start + n
        if with_next_tokens:
            nxt = _token_slice(s.seq, start + 1, n)   # shorter by one at the sequence's end
            next_ids[row: row + len(nxt)] = nxt
        if lora_slots is not None:
            lora_slots[row: row + n] = seq_lora_slots[b]
        row += n
        query_start[b + 1] = row
        logits_indices[b] = row - 1
    query_start[len(scheduled) + 1:] = row   # padding sequences: empty query ranges at the end
    if num_logits_rows is not None:
        logits_indices = verification_rows(scheduled, query_start, num_logits_rows)
    return StepInputs(token_ids, positions, slots, block_tables, seq_lens, query_start, logits_indices,
                      next_ids, num_tokens=row, num_seqs=len(scheduled), lora_slots=lora_slots)


def _token_slice(seq, start: int, n: int) -> list[int]:
    """seq's token ids [start, start+n) without concatenating prompt and output (hot path)."""
    prompt, output = seq.prompt_token_ids, seq.output_token_ids
    p = len(prompt)
    if start >= p:
        return output[start - p: start - p + n]
    if start + n <= p:
        return prompt[start: start + n]
    return prompt[start:] + output[: start + n - p]


def verification_rows(scheduled, query_start: np.ndarray, num_rows: int) -> np.ndarray:
    """[num_rows] int32: the flat rows whose logits a verification step samples. Sequence b with k
    drafts ends at row e = query_start[b+1]; its rows are e-1-k .. e-1 (its last real token scores
    draft 0, draft j scores draft j+1, the last draft scores the bonus token). -1 pads."""
    need = sum(s.num_spec_tokens + 1 for s in scheduled)
    if need > num_rows:
        raise ValueError(f"num_logits_rows: {num_rows} rows cannot hold the step's {need} sampled positions")
    out = np.full(num_rows, -1, np.int32)
    r = 0
    for b, s in enumerate(scheduled):
        e = int(query_start[b + 1])
        k = s.num_spec_tokens
        out[r: r + k + 1] = np.arange(e - 1 - k, e, dtype=np.int32)
        r += k + 1
    return out
