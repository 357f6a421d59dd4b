"""LLM: the offline API (vLLM's names). generate / chat / beam_search over one LLMEngine.

    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16))
    outs[0].outputs[0].text
"""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm.auto import tqdm

from jaxpaged.beam_search import to_beam_search_output
from jaxpaged.chat_messages import normalize_messages
from jaxpaged.compilation_cache import enable_compilation_cache
from jaxpaged.engine import LLMEngine
from jaxpaged.engine_config import DEFAULT_MODEL, EngineConfig
from jaxpaged.inputs import as_prompt_list, render_chat
from jaxpaged.outputs import BeamSearchOutput, RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams


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

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams used when none are given: SamplingParams() updated with the model's
        generation_config.json recommendations (EngineConfig.generation_config="auto", the default)."""
        return SamplingParams(**self.llm_engine.default_sampling)

    # ---- generate -----------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token ids, a list of token-id lists, numpy arrays, or dict
        prompts (jaxpaged/inputs.py). Returns one RequestOutput per prompt, in input order. All prompts are
        validated before any runs. lora_request: a LoRARequest for every prompt, or a list of them (one per
        prompt, None for the base model); needs LLM(..., enable_lora=True).
        """
        prompts = as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        return self._run(self._add_all(prompts, _as_params_list(sampling_params, len(prompts)),
                                       _as_lora_list(lora_request, len(prompts))), use_tqdm, "Processed prompts")

    def _add_all(self, prompts: list, params: list, loras: list | None = None) -> list[str]:
        """Adds every prompt to the engine (which validates it); on the first bad one, none stays queued."""
        ids = [str(next(self._counter)) for _ in prompts]
        engine = self.llm_engine
        added = []
        loras = loras if loras is not None else [None] * len(prompts)
        try:
            for rid, prompt, p, lora in zip(ids, prompts, params, loras):
                engine.add_request(rid, prompt, p, lora_request=lora)
                added.append(rid)
        except Exception:
            engine.abort_request(added)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool, desc: str) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc=desc, disable=not use_tqdm)
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
             chat_template_kwargs: dict | None = None, tools: list | None = None,
             lora_request=None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations.

        content may be a string or OpenAI content parts ([{"type": "text", "text": ...}]);
        chat_template_kwargs (e.g. {"enable_thinking": False}) and tools go to the chat template.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(c, chat_template, add_generation_prompt,
                                                             continue_final_message, chat_template_kwargs,
                                                             tools)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def chat_prompt_ids(self, conversation, chat_template=None, add_generation_prompt=True,
                        continue_final_message=False, chat_template_kwargs=None, tools=None) -> list[int]:
        """Token ids of a conversation rendered through the tokenizer's chat template."""
        tok = self.get_tokenizer()
        conversation = normalize_messages(conversation)     # OpenAI's role / content rules (ValueError)
        text = render_chat(tok, conversation, chat_template=chat_template, tools=tools,
                           add_generation_prompt=add_generation_prompt and not continue_final_message,
                           continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
        # the template already holds any special tokens (bos, role markers): add none
        return list(tok.encode(text, add_special_tokens=False))

    # ---- beam search --------------------------------------------------------------------------------
    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False,
                    lora_request=None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: one BeamSearchOutput per prompt (best sequences first). Each prompt is an
        engine request with BeamSearchParams (jaxpaged/beam_search.py): beams share KV blocks and the steps
        with any other request in flight."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: expected BeamSearchParams, got {type(params).__name__}")
        prompts = as_prompt_list(prompts)
        outs = self._run(self._add_all(prompts, [params] * len(prompts), _as_lora_list(lora_request, len(prompts))),
                         use_tqdm, "Beam search")
        return [to_beam_search_output(o, self.get_tokenizer(), params) for o in outs]


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return params


def _as_lora_list(lora_request, n: int) -> list:
    if lora_request is None or not isinstance(lora_request, (list, tuple)):
        return [lora_request] * n
    if len(lora_request) != n:
        raise ValueError(f"lora_request: got {len(lora_request)} for {n} prompts")
    return list(lora_request)
