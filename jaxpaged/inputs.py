"""One input path: whatever a user passes as a prompt -> a validated prompt (token ids, and the text if any).

Every front end goes through here: LLM.generate / chat / beam_search hand their prompts to
LLMEngine.add_request, which runs InputProcessor; the server tokenizes (it needs the count for
OpenAI's max_tokens rule) and hands token ids to the engine, whose ValueError becomes its 400.
Each rule is checked once, in the engine's add_request path, and raises ValueError naming the field:

    prompt            str (tokenized with the tokenizer's special tokens), not empty
    prompt_token_ids  list / tuple / 1-D numpy array of ints in [0, vocab_size), not empty
    dict prompts      {"prompt": str} or {"prompt_token_ids": [...]} (vLLM's TextPrompt / TokensPrompt)
    length            len(prompt_token_ids) < max_model_len (room for one generated token), and
                      prompt + 1 token within the KV pool (one sequence can hold at most the whole pool)
    params            SamplingParams.validate (vocabulary, max_logprobs, max_model_len), n <= max_num_seqs;
                      BeamSearchParams: 2 * beam_width <= max_logprobs, beam_width <= max_num_seqs

Chat conversations become one prompt through the tokenizer's chat template (render_chat).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxpaged.chat_messages import normalize_message
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams


@dataclass(frozen=True)
class ProcessedPrompt:
    """A validated prompt: its token ids, and its text when it was given as text (else None)."""
    prompt: str | None
    prompt_token_ids: list[int]


def as_prompt_list(prompts) -> list:
    """LLM.generate / beam_search's `prompts` as a list of single prompts.

    A str, a dict, a list of token ids or a 1-D numpy array is ONE prompt; a 2-D numpy array is
    one prompt per row; any other sequence is a list of prompts (each checked later by process()).
    """
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            return [prompts]
        if prompts.ndim == 2:
            return list(prompts)
        raise ValueError(f"prompts: a numpy array of prompts must be 1-D or 2-D, got {prompts.ndim}-D")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: must not be empty")
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
        return [prompts]          # one prompt given as token ids
    return prompts


def check_token_ids(ids, vocab_size: int, field: str = "prompt_token_ids") -> list[int]:
    """ids as a list of int, each in [0, vocab_size); ValueError naming `field` otherwise."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{field}: must be a 1-D array of integer token ids")
        ids = ids.tolist()
    elif not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{field}: must be a list of int")
    ids = [int(t) for t in ids]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


class InputProcessor:
    """The engine's entry checks. `kv_capacity_tokens`: the most tokens one sequence can hold (the pool)."""

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, kv_capacity_tokens: int,
                 max_num_seqs: int, max_logprobs: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_num_seqs = max_num_seqs
        self.max_logprobs = max_logprobs

    def process(self, prompt, params: Any = None) -> tuple[ProcessedPrompt, Any]:
        """(the validated prompt, the validated params); params None -> SamplingParams()."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        processed = self.tokenize(prompt)
        if isinstance(params, SamplingParams):
            params.validate(vocab_size=self.vocab_size, max_logprobs=self.max_logprobs,
                            max_model_len=self.max_model_len)
        self.check_length(processed.prompt_token_ids)
        self.check_width(params)
        return processed, params

    def tokenize(self, prompt) -> ProcessedPrompt:
        """The prompt's token ids (and text); checks the type, emptiness of text and the vocabulary."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
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
            return ProcessedPrompt(prompt, list(self.tokenizer.encode(prompt)))
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return ProcessedPrompt(None, check_token_ids(prompt, self.vocab_size))
        raise ValueError(f"prompt: expected str or list of token ids, got {type(prompt).__name__}")

    def check_length(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty (0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens is too long: max_model_len is {self.max_model_len} "
                             f"(prompt plus at least one generated token)")
        if len(ids) + 1 > self.kv_capacity_tokens:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the KV cache ({self.kv_capacity_tokens} tokens)")

    def check_width(self, params) -> None:
        """How many sequences the request needs at once: n samples, or beam_width beams."""
        if isinstance(params, BeamSearchParams):
            w = params.beam_width
            if 2 * w > self.max_logprobs:
                raise ValueError(f"beam_width: {w} needs 2 * beam_width = {2 * w} candidates per beam, more than "
                                 f"max_logprobs ({self.max_logprobs}); raise max_logprobs or lower beam_width")
            if w > self.max_num_seqs:
                raise ValueError(f"beam_width: {w} exceeds max_num_seqs ({self.max_num_seqs})")
        elif params.n > self.max_num_seqs:
            raise ValueError(f"n: {params.n} exceeds max_num_seqs {self.max_num_seqs}")


def plain_message(i: int, m) -> dict:
    """One chat message checked by OpenAI's rules (jaxpaged/chat_messages.py), its content as one string."""
    return normalize_message(i, m)


def render_chat(tokenizer, conversation: list[dict], *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, tools: list | None = None) -> str:
    """A conversation of plain messages ({"role", "content"} with string content) rendered through the
    chat template; the text already holds the template's special tokens (tokenize it adding none)."""
    return tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False, tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message,
                                         **(chat_template_kwargs or {}))
