"""POST /v1/completions: prompts (text or token ids) -> engine requests -> OpenAI text_completion JSON or SSE.

Prompt i with n samples gives choices i*n .. i*n+n-1 (vLLM's numbering). Text prompts are tokenized
here (the tokenizer's special tokens added, as LLM.generate does): OpenAI's max_tokens rule needs the
prompt length. The engine validates the token ids (emptiness, vocabulary, max_model_len).
"""
from __future__ import annotations

import contextlib
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import OpenAIError, invalid_request
from .protocol import (CompletionLogProbs, CompletionRequest, CompletionResponse, CompletionResponseChoice,
                       UsageInfo, random_id)
from .structured import structured_outputs_of
from .serving import (SAMPLING_FIELDS, ClientDisconnected, ServingContext, SSEResponse, clamp_logprob, merge_streams,
                      ordered_top, sse, sse_error)


def _prompts(ctx: ServingContext, prompt) -> list[tuple[str | None, list[int]]]:
    """[(text or None, token ids)] for each prompt of the request."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid_request("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return [(text, ctx.encode(text)) for text in prompt]
    if isinstance(prompt[0], int):
        return [(None, list(prompt))]
    return [(None, list(ids)) for ids in prompt]


def completion_logprobs(ctx: ServingContext, token_ids: list[int], entries: list, k: int,
                        initial_offset: int) -> CompletionLogProbs:
    """OpenAI's completions logprobs; `entries[i]` is {token_id: Logprob} or None (an echoed first prompt token)."""
    result = CompletionLogProbs()
    offset = initial_offset
    for tid, entry in zip(token_ids, entries):
        lp = entry.get(tid) if entry else None
        token = ctx.token_text(tid, lp)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if lp is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(clamp_logprob(lp.logprob))
        # keyed by text (OpenAI's shape): tokens that decode alike keep the best-ranked value
        top: dict[str, float] = {}
        for t, l in ordered_top(entry, k):
            top.setdefault(ctx.token_text(t, l), clamp_logprob(l.logprob))
        top.setdefault(token, clamp_logprob(lp.logprob))
        result.top_logprobs.append(top)
    return result


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    if req.suffix is not None:
        raise invalid_request("suffix is not supported", param="suffix")
    if req.stream_options is not None and not req.stream:
        raise invalid_request("stream_options can only be set when stream is true", param="stream_options")
    prompts = _prompts(ctx, req.prompt)
    structured = structured_outputs_of(req)
    request_id = random_id("cmpl")
    items = []
    for i, (_, ids) in enumerate(prompts):
        max_tokens = ctx.resolve_max_tokens(len(ids), req.max_tokens, "prompt", "max_tokens")
        params = ctx.sampling_params(dict(
            n=req.n, best_of=req.best_of, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
            min_tokens=req.min_tokens, logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=req.logit_bias,
            structured_outputs=structured))
        items.append((f"{request_id}-{i}", ids, params))
    try:
        streams = await ctx.add_all(items, _PARAM_NAMES, ctx.lora_request(req.model))
    except OpenAIError as exc:
        if exc.param != "prompt_logprobs":
            raise
        # an engine without prompt logprobs: echo the prompt with null logprobs for its tokens
        for _, _, params in items:
            params.prompt_logprobs = None
        streams = await ctx.add_all(items, _PARAM_NAMES, ctx.lora_request(req.model))
    created = int(time.time())
    if req.stream:
        gen = _stream(ctx, req, request_id, created, prompts, streams)
        return SSEResponse(gen, on_close=lambda: _abort_unfinished(ctx, streams))
    try:
        finals = await ctx.final_outputs(raw, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(_response(ctx, req, request_id, created, prompts, finals).model_dump(mode="json"))


_PARAM_NAMES = {**{name: name for name in SAMPLING_FIELDS}, "prompt": "prompt", "prompt_token_ids": "prompt"}


def _abort_unfinished(ctx: ServingContext, streams) -> None:
    ids = [s.request_id for s in streams if not s.finished]
    if ids:
        ctx.engine.abort(ids)


def _echo_text(ctx: ServingContext, prompt_text: str | None, ids: list[int]) -> str:
    return prompt_text if prompt_text is not None else ctx.tokenizer.decode(ids)


def _response(ctx, req, request_id, created, prompts, finals) -> CompletionResponse:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, ((text, ids), out) in enumerate(zip(prompts, finals)):
        prompt_tokens += len(ids)
        echo_text = _echo_text(ctx, text, ids) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                token_ids, entries = list(c.token_ids), list(c.logprobs or [None] * len(c.token_ids))
                if req.echo:
                    prompt_entries = list(out.prompt_logprobs or [None] * len(ids))
                    token_ids, entries = list(ids) + token_ids, prompt_entries + entries
                logprobs = completion_logprobs(ctx, token_ids, entries, req.logprobs, 0)
            choices.append(CompletionResponseChoice(
                index=i * req.n + c.index, text=echo_text + c.text, logprobs=logprobs,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    choices.sort(key=lambda ch: ch.index)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    return CompletionResponse(id=request_id, created=created, model=req.model or ctx.model_name, choices=choices,
                              usage=usage)


async def _stream(ctx, req, request_id, created, prompts, streams):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(include_usage and req.stream_options.continuous_usage_stats)
    sent: dict[int, list] = {}     # choice index -> [chars sent, tokens sent, finished]
    completion_tokens: dict[int, int] = {}
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    base = {"id": request_id, "object": "text_completion", "created": created, "model": req.model or ctx.model_name}
    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                text_prompt, ids = prompts[i]
                for c in out.outputs:
                    index = i * req.n + c.index
                    state = sent.setdefault(index, [0, 0, False])
                    if state[2]:
                        continue
                    first = state[0] == 0 and state[1] == 0
                    delta_text = c.text[state[0]:]
                    delta_ids = list(c.token_ids[state[1]:])
                    delta_entries = list((c.logprobs or [])[state[1]:]) or [None] * len(delta_ids)
                    prefix = ""
                    if first and req.echo:
                        prefix = _echo_text(ctx, text_prompt, ids)
                        prompt_entries = list(out.prompt_logprobs or [None] * len(ids))
                        delta_ids, delta_entries = list(ids) + delta_ids, prompt_entries + delta_entries
                    finished = c.finish_reason is not None
                    if not (prefix or delta_text or finished or (delta_ids and req.logprobs is not None)):
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        echoed = len(_echo_text(ctx, text_prompt, ids)) if req.echo else 0
                        offset = 0 if prefix else state[0] + echoed
                        logprobs = completion_logprobs(ctx, delta_ids, delta_entries, req.logprobs,
                                                       offset).model_dump()
                    state[0], state[1], state[2] = len(c.text), len(c.token_ids), finished
                    completion_tokens[index] = len(c.token_ids)
                    chunk = dict(base, choices=[{
                        "index": index, "text": prefix + delta_text, "logprobs": logprobs,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
                    if include_usage:
                        chunk["usage"] = _usage(prompt_tokens, completion_tokens) if continuous else None
                    yield sse(chunk)
        if include_usage:
            yield sse(dict(base, choices=[], usage=_usage(prompt_tokens, completion_tokens)))
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
        yield sse_error(exc)
    finally:
        _abort_unfinished(ctx, streams)
    yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: dict[int, int]) -> dict:
    done = sum(completion_tokens.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
