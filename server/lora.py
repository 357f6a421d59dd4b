"""LoRA adapters over HTTP (vLLM's flags, names and routes).

- `--lora-modules name=path ...` (or vLLM's JSON form `{"name": ..., "path": ..., "base_model_name": ...}`):
  adapters loaded at start (a bad one stops the start with its ValueError); needs `--enable-lora`.
- `/v1/models` lists each adapter with `parent` = the base model's served name; a request's
  `model=<adapter name>` runs with that adapter; an unknown name is a 404 (model_not_found).
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}`
  exist only with `--allow-runtime-lora-updating` or `JAXPAGED_ALLOW_RUNTIME_LORA_UPDATING=1` (vLLM:
  VLLM_ALLOW_RUNTIME_LORA_UPDATING). A bad adapter is a 400 naming the field, an unknown one a 404.
  The adapter is read on the engine thread, between steps (the engine is only touched there).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from starlette.responses import PlainTextResponse

from jaxpaged.lora.request import LoRARequest

from .errors import OpenAIError, invalid_request
from .protocol import ModelCard

RUNTIME_UPDATING_ENV = "JAXPAGED_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """One --lora-modules value: `name=path` or a JSON object with name, path (and base_model_name)."""
    import argparse
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
            return LoRAModulePath(str(d["name"]), str(d["path"]), d.get("base_model_name"))
        except (ValueError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"expected {{\"name\": ..., \"path\": ...}}, got {text!r} ({e})")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    return LoRAModulePath(name, path)


def runtime_updating_allowed(flag: bool) -> bool:
    return flag or os.environ.get(RUNTIME_UPDATING_ENV, "").lower() in ("1", "true")


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


class LoRAServing:
    """The adapters the server answers to by name (each a LoRARequest with a server-assigned id)."""

    def __init__(self, async_engine, base_names: list[str]):
        self.engine = async_engine
        self.base_names = base_names
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def load_static(self, modules: list[LoRAModulePath]) -> None:
        """--lora-modules, before the engine thread starts (the engine is called directly)."""
        engine = self.engine.engine
        for m in modules:
            req = self._new_request(m.name, m.path, m.base_model_name)
            try:
                engine.add_lora(req)
            except ValueError as e:
                raise ValueError(f"--lora-modules {m.name}={m.path}: {e}") from None
            self._by_name[m.name] = req

    def _new_request(self, name: str, path: str, base: str | None = None) -> LoRARequest:
        if name in self.base_names or name in self._by_name:
            raise invalid_request(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        return LoRARequest(name, next(self._ids), path, base)

    def request_for(self, model: str | None) -> LoRARequest | None:
        return self._by_name.get(model) if model is not None else None

    def cards(self, max_model_len: int) -> list[ModelCard]:
        return [ModelCard(id=r.lora_name, root=r.lora_path, parent=r.base_model_name or self.base_names[0],
                          max_model_len=max_model_len) for r in self._by_name.values()]

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        try:
            req = self._new_request(body.lora_name, body.lora_path)
        except ValueError as e:
            raise invalid_request(str(e), param="lora_name") from None
        try:
            await self.engine.call_in_engine_thread(lambda engine: engine.add_lora(req))
        except ValueError as e:
            raise invalid_request(str(e), param="lora_path") from None
        self._by_name[req.lora_name] = req
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        req = self._by_name.get(body.lora_name)
        if req is None:
            raise OpenAIError(f"The lora adapter '{body.lora_name}' cannot be found.", status=404,
                              param="lora_name", code="not_found")
        del self._by_name[body.lora_name]
        await self.engine.call_in_engine_thread(lambda engine: engine.remove_lora(req.lora_int_id))
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."


def install_lora_routes(app: FastAPI, lora: LoRAServing) -> None:
    """The runtime loading routes (only installed when runtime updating is allowed)."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await lora.load(body))

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await lora.unload(body))


def make_lora_serving(async_engine, names: list[str], modules: list[LoRAModulePath]) -> LoRAServing | None:
    """The server's adapters when the engine has LoRA enabled (None otherwise; --lora-modules then fails)."""
    config = getattr(getattr(async_engine, "engine", None), "config", None)
    if config is None or not getattr(config, "enable_lora", False):
        if modules:
            raise ValueError("--lora-modules: needs --enable-lora")
        return None
    if not hasattr(async_engine.engine, "add_lora"):
        raise ValueError("--enable-lora: LoRA adapters need a single local engine (not data-parallel replicas "
                         "or a distributed engine)")
    lora = LoRAServing(async_engine, names)
    lora.load_static(modules)
    return lora
