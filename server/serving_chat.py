"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> one engine request (n samples)
-> OpenAI chat.completion JSON or chat.completion.chunk SSE.

The rendered template is tokenized without adding special tokens (the template writes its own),
as vLLM does. Streaming sends, per choice, a first chunk with the role, then content deltas, the
last one carrying finish_reason.
"""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import invalid_request
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                       ChatLogprobToken, TopLogprob, UsageInfo, random_id)
from .serving_tools import ToolStream, plan_tools, tool_calls_of
from .serving_tools import finish_reason as tool_finish_reason
from .structured import structured_outputs_of
from .serving import (SAMPLING_FIELDS, ClientDisconnected, ServingContext, SSEResponse, clamp_logprob,
                      ordered_top, sse, sse_error)


def chat_logprobs(ctx: ServingContext, token_ids: list[int], entries: list, k: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries):
        lp = entry.get(tid) if entry else None
        token = ctx.token_text(tid, lp)
        top = []
        for t, l in ordered_top(entry or {}, k):
            text = ctx.token_text(t, l)
            top.append(TopLogprob(token=text, logprob=clamp_logprob(l.logprob), bytes=list(text.encode())))
        content.append(ChatLogprobToken(
            token=token, logprob=clamp_logprob(lp.logprob) if lp is not None else -9999.0,
            bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def _param_names(req: ChatCompletionRequest) -> dict:
    names = {name: name for name in SAMPLING_FIELDS}
    names.update(logprobs="top_logprobs", prompt="messages", prompt_token_ids="messages")
    if req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise invalid_request("stream_options can only be set when stream is true", param="stream_options")
    if req.top_logprobs and not req.logprobs:
        raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    structured = structured_outputs_of(req)
    plan = plan_tools(ctx, req)
    if plan.structured is not None:
        if structured is not None:
            raise invalid_request(f'tool_choice {plan.mode!r} constrains the output itself: it cannot be combined '
                                  f'with response_format or structured_outputs', param="tool_choice")
        structured = plan.structured
    prompt_text = ctx.apply_chat_template(
        req.messages, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message, extra=req.chat_template_kwargs, tools=plan.tools)
    ids = ctx.encode(prompt_text, add_special_tokens=req.add_special_tokens)
    names = _param_names(req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = ctx.resolve_max_tokens(len(ids), requested, "messages", names["max_tokens"])
    params = ctx.sampling_params(dict(
        n=req.n, best_of=req.best_of, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
        min_tokens=req.min_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=req.logit_bias,
        structured_outputs=structured), names)
    request_id = random_id("chatcmpl")
    (stream,) = await ctx.add_all([(request_id, ids, params)], names, ctx.lora_request(req.model))
    created = int(time.time())
    echo = req.messages[-1].text() if req.echo and req.messages[-1].role == "assistant" else ""
    if req.stream:
        return SSEResponse(_stream(ctx, req, plan, request_id, created, len(ids), stream, echo),
                           on_close=lambda: None if stream.finished else ctx.engine.abort(request_id))
    try:
        (final,) = await ctx.final_outputs(raw, [stream])
    except ClientDisconnected:
        return Response(status_code=499)
    choices, completion_tokens = [], 0
    for c in final.outputs:
        completion_tokens += len(c.token_ids)
        logprobs = None
        if req.logprobs:
            entries = list(c.logprobs or [None] * len(c.token_ids))
            logprobs = chat_logprobs(ctx, list(c.token_ids), entries, req.top_logprobs or 0)
        content, calls = tool_calls_of(plan, c.text)
        message = AssistantMessage(content=echo + content if content is not None else (echo or None),
                                   tool_calls=[call.to_openai() for call in calls])
        choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                  finish_reason=tool_finish_reason(plan, calls, c.finish_reason),
                                  stop_reason=c.stop_reason))
    choices.sort(key=lambda ch: ch.index)
    usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                      total_tokens=len(ids) + completion_tokens)
    body = ChatCompletionResponse(id=request_id, created=created, model=req.model or ctx.model_name, choices=choices,
                                  usage=usage)
    return JSONResponse(body.model_dump(mode="json"))


async def _stream(ctx, req, plan, request_id, created, prompt_tokens, stream, echo):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(include_usage and req.stream_options.continuous_usage_stats)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model or ctx.model_name}
    sent: dict[int, list] = {}     # choice index -> [chars sent, tokens sent, finished]
    tool_streams: dict[int, ToolStream] = {}     # choice index -> its deltas (content / tool calls)

    def chunk(choices, usage_counts=None):
        c = dict(base, choices=choices)
        if include_usage:
            c["usage"] = _usage(prompt_tokens, usage_counts) if usage_counts is not None else None
        return sse(c)

    try:
        for index in range(req.n):
            sent[index] = [0, 0, False]
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                          "finish_reason": None}], sent if continuous else None)
        async for out in stream:
            for c in out.outputs:
                state = sent.setdefault(c.index, [0, 0, False])
                if state[2]:
                    continue
                delta_ids = list(c.token_ids[state[1]:])
                finished = c.finish_reason is not None
                ts = tool_streams.setdefault(c.index, ToolStream(plan))
                deltas = ts.deltas(c.text, finished)
                if not (deltas or finished or (delta_ids and req.logprobs)):
                    continue
                logprobs = None
                if req.logprobs:
                    entries = list((c.logprobs or [])[state[1]:]) or [None] * len(delta_ids)
                    logprobs = chat_logprobs(ctx, delta_ids, entries, req.top_logprobs or 0).model_dump()
                state[0], state[1], state[2] = len(c.text), len(c.token_ids), finished
                # several deltas (content, then the calls) go out as consecutive chunks
                deltas = deltas or [{} if finished else {"content": ""}]
                for j, delta in enumerate(deltas):
                    last = j == len(deltas) - 1
                    choice = {"index": c.index, "delta": delta, "logprobs": logprobs if last else None,
                              "finish_reason": tool_finish_reason(plan, ts.calls, c.finish_reason) if last else None}
                    if finished and last:
                        choice["stop_reason"] = c.stop_reason
                    yield chunk([choice], sent if continuous else None)
        if include_usage:
            yield chunk([], sent)
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
        yield sse_error(exc)
    finally:
        if not stream.finished:
            ctx.engine.abort(request_id)
    yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, sent: dict[int, list]) -> dict:
    done = sum(state[1] for state in sent.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
