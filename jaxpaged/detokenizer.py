"""Incremental detokenization and stop rules: sampled token ids -> text deltas -> finish reasons.

IncrementalDetokenizer decodes a short window of ids (vLLM's prefix/read offsets): the window holds the
ids of the text emitted last (window[:read_offset], context) and the ids not emitted yet; new text is
decode(window) minus decode(window[:read_offset]). The context (rather than each token alone) keeps
tokenizer context such as SentencePiece's leading space; the first window starts with the prompt's last
tokens, so the first generated word gets its space. When the window's text ends in U+FFFD, the newest
tokens hold only part of a multi-byte UTF-8 character (byte-level BPE splits emoji and CJK across tokens)
and nothing is emitted until the character completes. Only the window is kept: the sequence's token ids
are owned by the scheduler's Sequence (sequence.py), not copied here.

StopChecker applies the stop rules in vLLM's order:
  1. stop_token_ids, then eos (unless ignore_eos), once min_tokens outputs exist: finish "stop"
     (stop_reason = the token id, None for eos); the token's text is not added to the output text
     unless include_stop_str_in_output;
  2. stop strings, searched only where the newest text could complete one (so a stop string spanning
     several tokens is found when its last piece arrives); the text is cut before it (or after it with
     include_stop_str_in_output); stop_reason = the stop string;
  3. max_tokens (None = up to max_model_len) or max_model_len reached: finish "length".

SequenceDetokenizer ties both together for one sequence. TokenDecoder decodes single tokens for
Logprob.decoded_token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# Prompt tokens decoded as context before the first generated token (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns output token ids, appended a few at a time, into text deltas.

    The deltas (plus `flush()` at the end) concatenate to tokenizer.decode(output ids,
    skip_special_tokens=...) for byte-level BPE tokenizers; no delta ends inside a character.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # the decoding window: context ids (the last prompt tokens at first), then ids not emitted yet
        self._window: list[int] = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        self.read_offset = len(self._window)    # window[:read_offset] is context, already emitted

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    def append(self, token_ids: int | Sequence[int]) -> str:
        """Adds output token(s); returns the newly completed text (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = self._window
        ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(ids[:self.read_offset])
        new_text = self._decode(ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # nothing new yet (a skipped special token), or an incomplete UTF-8 character at the end
            return ""
        delta = new_text[len(prefix_text):]
        self._advance()
        return delta

    def _advance(self) -> None:
        """Everything in the window is emitted: what was new becomes the next window's context."""
        del self._window[:self.read_offset]
        self.read_offset = len(self._window)

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes to U+FFFD)."""
        ids = self._window
        if self.read_offset == len(ids):
            return ""
        prefix_text = self._decode(ids[:self.read_offset])
        new_text = self._decode(ids)
        self._advance()
        return new_text[len(prefix_text):]


class TokenDecoder:
    """decoded_token for logprobs: one token decoded alone (special tokens kept), cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = s
        return s


def find_stop_string(text: str, new_char_count: int, stop: Sequence[str]) -> Optional[tuple[int, str]]:
    """The earliest stop string occurrence that ends inside the last `new_char_count` characters of
    `text` (earlier occurrences were checked before). Returns (index in text, stop string) or None."""
    if not stop or new_char_count <= 0:
        return None
    best: Optional[tuple[int, str]] = None
    n = len(text)
    for s in stop:
        # an occurrence ending in the new text starts at or after n - new_char_count - len(s) + 1
        i = text.find(s, max(0, n - new_char_count - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def check_stop_strings(text: str, new_char_count: int, stop: Sequence[str],
                       include_stop_str_in_output: bool) -> Optional[tuple[str, str]]:
    """(stop string, text truncated at it) when the new text completes a stop string, else None."""
    hit = find_stop_string(text, new_char_count, stop)
    if hit is None:
        return None
    i, s = hit
    return s, (text[: i + len(s)] if include_stop_str_in_output else text[:i])


@dataclass
class StopResult:
    finish_reason: str                 # "stop" | "length"
    stop_reason: int | str | None = None


class StopChecker:
    """The stop rules of one sequence (see the module docstring for the order)."""

    def __init__(self, params, eos_token_ids: Sequence[int] = (), max_model_len: Optional[int] = None,
                 num_prompt_tokens: int = 0):
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else {int(i) for i in eos_token_ids}
        self.stop_token_ids = set(params.stop_token_ids)
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        max_tokens = params.max_tokens
        if max_tokens is None and max_model_len is not None:
            max_tokens = max_model_len - num_prompt_tokens
        self.max_tokens = max_tokens

    def check_token(self, token_id: int, num_output_tokens: int) -> Optional[StopResult]:
        """After appending token_id, making num_output_tokens outputs."""
        if num_output_tokens < self.params.min_tokens:
            return None
        if token_id in self.stop_token_ids:
            return StopResult("stop", int(token_id))
        if token_id in self.eos_token_ids:
            return StopResult("stop", None)
        return None

    def check_text(self, text: str, new_char_count: int, num_output_tokens: int
                   ) -> Optional[tuple[StopResult, str]]:
        """(result, truncated text) when the newest text completes a stop string."""
        if not self.params.stop or num_output_tokens < self.params.min_tokens:
            return None
        hit = check_stop_strings(text, new_char_count, self.params.stop, self.params.include_stop_str_in_output)
        if hit is None:
            return None
        return StopResult("stop", hit[0]), hit[1]

    def check_length(self, num_output_tokens: int) -> Optional[StopResult]:
        if self.max_tokens is not None and num_output_tokens >= self.max_tokens:
            return StopResult("length")
        if self.max_model_len is not None and self.num_prompt_tokens + num_output_tokens >= self.max_model_len:
            return StopResult("length")
        return None


class SequenceDetokenizer:
    """Text and finish state of one generated sequence: `append(token_id)` per sampled token."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params, eos_token_ids: Sequence[int] = (),
                 max_model_len: Optional[int] = None):
        self.params = params
        self.detok = (IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                             params.spaces_between_special_tokens)
                      if params.detokenize and tokenizer is not None else None)
        self.stop = StopChecker(params, eos_token_ids, max_model_len, len(prompt_token_ids))
        self.num_output_tokens = 0      # the ids themselves are the Sequence's (sequence.py)
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _finish(self, r: StopResult) -> StopResult:
        self.finish_reason, self.stop_reason = r.finish_reason, r.stop_reason
        if self.detok is not None and r.finish_reason == "length":
            self.text += self.detok.flush()
        return r

    def append(self, token_id: int) -> Optional[StopResult]:
        """Records one sampled token; returns the StopResult when the sequence ends with it."""
        if self.finished:
            raise RuntimeError("append after the sequence finished")
        token_id = int(token_id)
        self.num_output_tokens += 1
        n = self.num_output_tokens
        r = self.stop.check_token(token_id, n)
        if r is not None:
            if self.detok is not None and self.params.include_stop_str_in_output:
                self.text += self.detok.append(token_id) + self.detok.flush()
            return self._finish(r)
        if self.detok is not None:
            delta = self.detok.append(token_id)
            self.text += delta
            hit = self.stop.check_text(self.text, len(delta), n)
            if hit is not None:
                self.text = hit[1]
                self.finish_reason, self.stop_reason = hit[0].finish_reason, hit[0].stop_reason
                return hit[0]
        r = self.stop.check_length(n)
        return self._finish(r) if r is not None else None

    def stream_text(self) -> str:
        """The text safe to show while running: holds back the last characters that could still be the
        start of a stop string (vLLM's output_text_buffer_length); all of it once finished."""
        k = self.params.output_text_buffer_length
        if self.finished or k == 0:
            return self.text
        return self.text[:-k] if len(self.text) > k else ""
