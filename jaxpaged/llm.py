"""LLM: the offline API (vLLM's names). generate / chat / beam_search over one LLMEngine.

    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16))
    outs[0].outputs[0].text
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxpaged.compilation_cache import enable_compilation_cache
from jaxpaged.engine import LLMEngine
from jaxpaged.engine_config import DEFAULT_MODEL, EngineConfig
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams


class LLM:
    """An offline engine. Keyword arguments are EngineConfig fields (see engine_config.py)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs):
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise ValueError(f"unknown LLM arguments {sorted(unknown)}; valid: {EngineConfig.field_names()}")
        config = EngineConfig(model=model, **kwargs)
        enable_compilation_cache(config)     # the entry point sets process-wide JAX config, not the engine
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    # ---- generate -----------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token ids, a list of token-id lists, or dict prompts.

        Returns one RequestOutput per prompt, in input order. All prompts are validated before any runs.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        ids = [str(next(self._counter)) for _ in prompts]
        engine = self.llm_engine
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
                added.append(rid)
        except Exception:
            engine.abort_request(added)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(done) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    # ---- chat ---------------------------------------------------------------------------------------
    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations.

        content may be a string or OpenAI content parts ([{"type": "text", "text": ...}]);
        chat_template_kwargs (e.g. {"enable_thinking": False}) and tools go to the chat template.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(c, chat_template, add_generation_prompt,
                                                             continue_final_message, chat_template_kwargs,
                                                             tools)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt_ids(self, conversation, chat_template=None, add_generation_prompt=True,
                        continue_final_message=False, chat_template_kwargs=None, tools=None) -> list[int]:
        """Token ids of a conversation rendered through the tokenizer's chat template."""
        tok = self.get_tokenizer()
        conversation = [_plain_message(i, m) for i, m in enumerate(conversation)]
        text = tok.apply_chat_template(conversation, chat_template=chat_template, tokenize=False, tools=tools,
                                       add_generation_prompt=add_generation_prompt and not continue_final_message,
                                       continue_final_message=continue_final_message,
                                       **(chat_template_kwargs or {}))
        # the template already holds any special tokens (bos, role markers): add none
        return list(tok.encode(text, add_special_tokens=False))

    # ---- beam search --------------------------------------------------------------------------------
    def beam_search(self, prompts, params, use_tqdm: bool = False) -> list:
        """vLLM's LLM.beam_search (BeamSearchParams -> one BeamSearchOutput per prompt, best sequences first),
        run inside the engine with beams sharing KV blocks; see jaxpaged/beam_search.py."""
        from jaxpaged.beam_search import beam_search
        return beam_search(self.llm_engine, prompts, params, use_tqdm=use_tqdm)


def _plain_message(i: int, m) -> dict:
    """A chat message with string content (OpenAI text content parts joined); ValueError otherwise."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}]: each message needs 'role' and 'content'")
    content = m["content"]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                 f"are supported, got {part!r}")
            texts.append(part["text"])
        return {**m, "content": "".join(texts)}
    if content is not None and not isinstance(content, str):
        raise ValueError(f"messages[{i}].content: expected a string or a list of text parts")
    return m


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return [prompts.tolist()]
    prompts = list(prompts)
    if prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        return [prompts]          # one prompt given as token ids
    if not prompts:
        raise ValueError("prompts: must not be empty")
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return params
