"""What completions and chat share: model-name checks, SamplingParams from a request, OpenAI's
max_tokens rule, logprob formatting, SSE framing, and running a request so that a client disconnect
aborts it.

Prompts and sampling params are validated by the engine (jaxpaged/inputs.py, in add_request); its
ValueError becomes a 400 naming the request's field (`add`). The server checks only what is its own:
the request's shape, the model name, and OpenAI's rule that prompt + max_tokens fit the context.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from functools import lru_cache

from starlette.requests import Request
from starlette.responses import StreamingResponse

from jaxpaged.chat_messages import ChatMessageError, normalize_messages
from jaxpaged.inputs import render_chat
from jaxpaged.sampling_params import SamplingParams
from .errors import OpenAIError, from_value_error, internal_error, invalid_request, not_found_model
from .limits import ServerLimits

logger = logging.getLogger("jaxpaged.server")

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class ServingContext:
    """Per-app state shared by the handlers: the async engine, names, tokenizer and limits."""

    def __init__(self, async_engine, served_model_names: list[str], metrics, limits: ServerLimits | None = None):
        self.engine = async_engine
        self.limits = limits or ServerLimits()
        self.served_model_names = served_model_names
        self.metrics = metrics
        self.tokenizer = async_engine.get_tokenizer()
        self.max_model_len = int(async_engine.max_model_len)
        inner = async_engine.engine                 # the Engine contract (docs/CONTRACTS.md)
        self.vocab_size = int(inner.model_config.vocab_size)
        # the engine's limits, to document them (/openapi.json); the engine enforces them (inputs.py)
        self.max_num_seqs = int(inner.config.max_num_seqs)
        self.max_logprobs = int(inner.config.max_logprobs)
        self.model_path = str(inner.config.model)
        # the model's generation_config.json recommendations: they fill the sampling fields a request leaves unset
        self.default_sampling = dict(inner.default_sampling)
        self.decode_token = lru_cache(maxsize=65536)(self._decode_token)
        # --tool-call-parser / --enable-auto-tool-choice (server/serving_tools.py)
        self.tool_call_parser: str | None = None
        self.enable_auto_tool_choice = False
        self.lora = None      # server/lora.LoRAServing with --enable-lora: adapters answer as models

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # ------------------------------------------------------------ checks

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names and self.lora_request(model) is None:
            raise not_found_model(model)

    def lora_request(self, model: str | None):
        """The LoRARequest a request's `model` names (an adapter), else None (the base model)."""
        return self.lora.request_for(model) if self.lora is not None else None

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                           max_tokens_param: str) -> int | None:
        """max_tokens to send to the engine; 400 when prompt + completion cannot fit in max_model_len
        (OpenAI's rule; offline, the engine stops such a request at max_model_len instead). A prompt
        that alone leaves no room is the engine's to reject (inputs.py)."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            return max_tokens
        if max_tokens is None:     # the model's recommendation and the operator's default cap, within what is left
            caps = [limit - num_prompt_tokens, self.default_sampling.get("max_tokens"), self.limits.default_max_tokens]
            return min(c for c in caps if c)
        if max_tokens >= 1 and num_prompt_tokens + max_tokens > limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt_param}, "
                f"{max_tokens} in the completion). Please reduce the length of the {prompt_param} "
                f"or completion.", param=max_tokens_param)
        return max_tokens

    def sampling_params(self, fields: dict, rename: dict[str, str] | None = None) -> SamplingParams:
        """SamplingParams from request values (None means the default); a TypeError/ValueError -> 400 naming the field."""
        kwargs = {k: v for k, v in self.default_sampling.items() if k != "max_tokens"}   # resolve_max_tokens' job
        kwargs.update((k, v) for k, v in fields.items() if v is not None and k in SAMPLING_FIELDS)
        known = {name: name for name in SAMPLING_FIELDS}
        known.update(rename or {})
        try:
            params = SamplingParams(**kwargs)     # the engine checks the rest (vocabulary, limits, n)
        except (ValueError, TypeError, OverflowError) as exc:
            raise from_value_error(exc, known) from None
        return params

    # ------------------------------------------------------------ tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _decode_token(self, token_id: int) -> str:
        try:
            return self.tokenizer.decode([token_id])
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know
            return ""

    def token_text(self, token_id: int, logprob) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.decode_token(int(token_id))

    def apply_chat_template(self, messages: list, *, add_generation_prompt: bool,
                            continue_final_message: bool, extra: dict | None, tools: list | None = None) -> str:
        if not messages:
            raise invalid_request("messages must not be empty", param="messages")
        fields = ("role", "content", "name", "tool_calls", "tool_call_id")
        try:   # OpenAI's rules (jaxpaged/chat_messages.py): a 400 naming the field
            normalize_messages([{k: v for k, v in m.model_dump().items() if k in fields and v is not None}
                                for m in messages])
        except ChatMessageError as exc:
            raise invalid_request(str(exc), param=exc.param) from None
        convo = [_template_message(m) for m in messages]
        reserved = {"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                    "return_dict", "return_tensors", "padding", "truncation", "max_length", "tools",
                    "documents", "chat_template", "tokenizer_kwargs", "return_assistant_tokens_mask"}
        kwargs = {k: v for k, v in (extra or {}).items() if k not in reserved}
        if continue_final_message and add_generation_prompt:
            raise invalid_request("continue_final_message and add_generation_prompt cannot both be true",
                                  param="continue_final_message")
        try:
            text = render_chat(self.tokenizer, convo, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, chat_template_kwargs=kwargs,
                               tools=tools or None)
        except ImportError as exc:   # a runtime dependency is missing: the server's fault, not the request's
            raise internal_error(f"the server cannot render chat templates: {exc} (install it where the server "
                                 f"runs, then restart the server)") from None
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise invalid_request(f"messages could not be rendered with the chat template: {exc}",
                                  param="messages") from None
        if not isinstance(text, str):
            raise invalid_request("the chat template did not produce a string", param="messages")
        return text

    # ------------------------------------------------------------ running requests

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, param_names,
                  lora_request=None):
        """Adds one request to the engine, which validates it; its ValueError becomes a 400 naming the
        request's field (`param_names` maps the engine's field names to the request's)."""
        try:
            if lora_request is not None:
                return await self.engine.add_request(request_id, prompt_ids, params, lora_request=lora_request)
            return await self.engine.add_request(request_id, prompt_ids, params)
        except (ValueError, TypeError, OverflowError) as exc:
            raise from_value_error(exc, param_names) from None

    async def add_all(self, items: list[tuple[str, list[int], SamplingParams]], param_names,
                      lora_request=None) -> list:
        """Adds several requests; if one is rejected, aborts the ones already added."""
        streams = []
        try:
            for request_id, ids, params in items:
                streams.append(await self.add(request_id, ids, params, param_names, lora_request))
        except BaseException:
            self.engine.abort([s.request_id for s in streams])
            raise
        return streams

    async def final_outputs(self, raw: Request, streams: list) -> list:
        """Waits for every stream's final RequestOutput; a client disconnect aborts them all."""
        async def last(stream):
            out = None
            async for out in stream:
                pass
            return out

        work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
        watcher = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            raise ClientDisconnected()
        finally:
            for task in (work, watcher):
                task.cancel()
            await asyncio.gather(work, watcher, return_exceptions=True)
            unfinished = [s.request_id for s in streams if not s.finished]
            if unfinished:
                self.engine.abort(unfinished)


def _template_message(m) -> dict:
    """A chat message as chat templates read it: an assistant's earlier `tool_calls` (arguments as
    objects, as Hermes/Llama templates expect) and a tool result's `tool_call_id` pass through."""
    item = {"role": m.role, "content": m.text()}
    if m.name is not None:
        item["name"] = m.name
    extra = m.model_extra or {}
    if isinstance(extra.get("tool_call_id"), str):
        item["tool_call_id"] = extra["tool_call_id"]
    calls = extra.get("tool_calls")
    if isinstance(calls, list) and calls:
        item["tool_calls"] = [_template_tool_call(c) for c in calls if isinstance(c, dict)]
    return item


def _template_tool_call(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass                     # not JSON: the template gets the string
    return {**call, "function": fn}


async def wait_for_disconnect(raw: Request) -> None:
    """Returns when the ASGI server reports the client gone (the body has been read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def merge_streams(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(index, RequestOutput) from several streams as they arrive; ends when all have finished."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, None, exc))
        finally:
            queue.put_nowait((i, None, StopAsyncIteration()))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out, exc = await queue.get()
            if isinstance(exc, StopAsyncIteration):
                remaining -= 1
            elif exc is not None:
                if isinstance(exc, asyncio.CancelledError):
                    continue
                raise exc
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                                separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    if isinstance(exc, OpenAIError):
        return sse(exc.body())
    return sse({"error": {"message": str(exc) or exc.__class__.__name__, "type": "internal_server_error",
                          "param": None, "code": None}})


class SSEResponse(StreamingResponse):
    """text/event-stream that, whatever the ASGI spec version, stops and closes its body iterator
    (whose `finally` aborts the engine requests) as soon as the client disconnects."""

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def listen():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        stream_task = asyncio.ensure_future(self.stream_response(send))
        listen_task = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({stream_task, listen_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream_task, listen_task):
                task.cancel()
            results = await asyncio.gather(stream_task, listen_task, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._on_close is not None:
                self._on_close()
        err = results[0]
        if isinstance(err, BaseException) and not isinstance(err, (asyncio.CancelledError, OSError)):
            logger.warning("stream ended with %r", err)


def clamp_logprob(value: float) -> float:
    value = float(value)
    if value != value:  # NaN
        return LOGPROB_FLOOR
    return max(value, LOGPROB_FLOOR)


def ordered_top(entry: dict, k: int) -> list[tuple[int, object]]:
    """The top-k (token_id, Logprob) of one logprobs entry, by rank (ties keep insertion order)."""
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and 1 <= lp.rank <= k]
    ranked.sort(key=lambda item: item[1].rank)
    return ranked[:k]
