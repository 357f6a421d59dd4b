"""Command-line flags of `python -m jaxpaged.server`: one kebab-case flag per EngineConfig field, plus the server's own.

Flags are generated from the dataclass, so they always match `LLM(...)`'s arguments: an `int`
field takes an int, an `int | None` field an int (default None), a `bool` field becomes
`--flag/--no-flag`. Field comments in engine_config.py are not visible at runtime, so help texts
for the common flags live here (others show their type and default).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing

from jaxpaged.engine_config import EngineConfig

from .limits import ServerLimits
from .lora import RUNTIME_UPDATING_ENV, parse_lora_module
from .tool_parsers import TOOL_PARSERS

_HELP = {
    "model": "model name or path: an HF directory, a .gguf file, or the built-in smollm2-135m-instruct (the default)",
    "tokenizer": "tokenizer name or path (default: the model's)",
    "dtype": "parameter and activation dtype: float32 or bfloat16",
    "quantization": "weight quantization of every decoder Linear: int8 (weight-only, per output channel), or gguf "
                    "(a .gguf file's Q8_0/Q4_0/Q4_1 blocks kept quantized) (default: None)",
    "kv_cache_dtype": "KV cache dtype: auto (the attention backend's choice for --dtype), float32, bfloat16, "
                      "int8 or fp8 (= fp8_e4m3): K/V quantized at write with one scale per (token, KV head), "
                      "~2x the blocks of bf16 / ~4x of f32 in the same memory (default: auto)",
    "max_model_len": "longest prompt + completion in tokens (default: the model's max positions when the KV "
                     "cache holds that many, else what it holds; logged at start)",
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache blocks (overrides the memory flags below)",
    "kv_cache_memory_bytes": "memory for the KV cache: bytes, or with a unit (4GiB, 512MiB, 2GB, 1e9) "
                             "(default: --gpu-memory-utilization when given, else room for --max-num-seqs "
                             "sequences of --max-model-len tokens, at most 2 GiB)",
    "gpu_memory_utilization": "fraction of the device's memory (on CPU: the machine's RAM) for params + KV "
                              "cache; the KV cache gets what the params leave (default: unset, see "
                              "--kv-cache-memory-bytes)",
    "generation_config": "default sampling parameters: auto (the model's generation_config.json), vllm "
                         "(none), or a folder holding a generation_config.json (default: auto)",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "token budget of one step",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "seed": "engine seed for unseeded sampling",
    "tensor_parallel_size": "devices to shard the model over (a 'tp' mesh: heads, MLP and vocabulary split, "
                            "KV cache split by KV heads; default: 1)",
    "max_logprobs": "largest logprobs / top_logprobs a request may ask for",
    "download_dir": "cache of converted parameters",
    "compilation_cache_dir": "JAX persistent compilation cache",
    "enforce_eager": "skip the warmup compilation",
    "attention_backend": "attention kernels: auto (native C++ on CPU when it builds, else Pallas), "
                         "native, pallas, or jnp (the plain-jnp references)",
    "enable_lora": "serve LoRA adapters (PEFT folders) on the base model, batched together",
    "max_loras": "adapters in device slots at once; requests for more wait (default: 1)",
    "max_lora_rank": "largest adapter rank served; every adapter is padded to it (default: 16)",
    "speculative_config": "speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                          "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (default: off)",
    "native_matmul": "with the native backend, weight matmuls on pre-packed weights (AVX-512 f32 / AMX "
                     "bf16 CPUs); --no-native-matmul: XLA's dot",
}


def _base_type(hint) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot make a flag for {hint}")
        return args[0], True
    return hint, False


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("engine", "EngineConfig fields (the same names as LLM(...)'s arguments)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "speculative_config":     # JSON text, parsed and checked by EngineConfig
            group.add_argument(flag, dest=f.name, default=None, metavar="JSON", help=_HELP[f.name])
            continue
        typ, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if "default" not in help_text:
            help_text += f" (default: {default})"
        if f.name == "kv_cache_memory_bytes":
            typ = parse_bytes
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=default, help=help_text)
    return parser


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4GiB' / '512MiB' / '2GB' / '2G' / '1e9' / '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 4GiB, 512MiB, 2GB or a byte count, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpaged.server",
        description="jaxpaged OpenAI-compatible server (vLLM's flags and JSON).")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) the API answers to; the first is reported (default: --model)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (also read from $JAXPAGED_API_KEY)")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level (default: info)")
    server.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS origins, JSON list")
    server.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, JSON list")
    server.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, JSON list")
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    server.add_argument("--root-path", default=None, help="ASGI root_path when behind a path-based proxy")
    server.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key file")
    server.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate file")
    server.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs, /redoc, /openapi.json")
    server.add_argument("--disable-uvicorn-access-log", action="store_true", help="no per-request access log")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="how tool calls are read from the model's output for tool_choice \"auto\": "
                             "hermes (<tool_call> JSON) or llama3_json")
    lora = parser.add_argument_group("LoRA", "adapters served by name (with --enable-lora)")
    lora.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                      help="adapters loaded at start: name=path, or JSON {\"name\": ..., \"path\": ..., "
                           "\"base_model_name\": ...}; requests name them in 'model'")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
                           f"${RUNTIME_UPDATING_ENV}=1)")
    limits = parser.add_argument_group("limits", "bounds on the work clients can cause")
    defaults = ServerLimits()
    limits.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests,
                        help="requests waiting for a batch slot (one per prompt); beyond it new requests get "
                             f"429 with Retry-After; 0: no bound (default: {defaults.max_queued_requests})")
    limits.add_argument("--max-client-batch-size", type=int, default=defaults.max_client_batch_size,
                        help="prompts in one /v1/completions request; more is a 400 "
                             f"(default: {defaults.max_client_batch_size})")
    limits.add_argument("--payload-limit", type=int, default=defaults.payload_limit,
                        help=f"bytes of a request body; more is a 413; 0: no limit (default: {defaults.payload_limit})")
    limits.add_argument("--default-max-tokens", type=int, default=None,
                        help="max_tokens of a request that leaves it unset (chat), within what is left of "
                             f"max_model_len; 0: no cap (default: {defaults.default_max_tokens})")
    limits.add_argument("--override-generation-config", type=json.loads, default=None,
                        help="""vLLM's flag; here only '{"max_new_tokens": N}', the same as --default-max-tokens N""")
    # test hook: "module:callable" called with the EngineConfig instead of LLMEngine
    server.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    add_engine_args(parser)
    add_distributed_args(parser)
    compat = parser.add_argument_group(
        "accepted for vLLM compatibility", "vLLM flags that have no meaning here; given ones are logged and ignored")
    for flag, kind in IGNORED_VLLM_FLAGS.items():
        if kind is bool:
            compat.add_argument(flag, action="store_true", default=None)
        else:
            compat.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())
    return parser


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed", "replicas and multi-process engines (docs/SERVER.md)")
    group.add_argument("--data-parallel-size", type=int, default=1,
                       help="engine replicas behind this server, each in its own process(es) (default: 1: the "
                            "engine runs in the server process)")
    group.add_argument("--data-parallel-size-local", type=int, default=None,
                       help="replicas placed on this node; with Ray the others go wherever the cluster has room "
                            "(default: all of them)")
    group.add_argument("--data-parallel-backend", choices=["mp", "ray"], default="mp",
                       help="replica processes: mp (local child processes) or ray (Ray actors) (default: mp)")
    group.add_argument("--distributed-executor-backend", choices=["mp", "uni", "ray"], default=None,
                       help="ray: each engine's tensor-parallel mesh spans jax.distributed processes, one Ray actor "
                            "each (several hosts); mp/uni (default): one process drives its local devices")
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def check_distributed_args(args: argparse.Namespace) -> str | None:
    """The error for a bad combination of the distributed flags, or None."""
    if args.data_parallel_size < 1:
        return f"--data-parallel-size must be >= 1, got {args.data_parallel_size}"
    local = args.data_parallel_size_local
    if local is not None and not 0 <= local <= args.data_parallel_size:
        return f"--data-parallel-size-local must be in [0, --data-parallel-size], got {local}"
    if local is not None and local < args.data_parallel_size and args.data_parallel_backend != "ray":
        return "--data-parallel-size-local below --data-parallel-size needs --data-parallel-backend ray"
    return None


def uses_remote_engines(args: argparse.Namespace) -> bool:
    """Engines in other processes: several replicas, or any Ray backend (one Ray replica measures the overhead)."""
    return (args.data_parallel_size > 1 or args.data_parallel_backend == "ray"
            or args.distributed_executor_backend == "ray")


# vLLM flags that drop-in launch scripts often pass: accepted so those scripts start, then ignored.
IGNORED_VLLM_FLAGS = {
    "--swap-space": float,
    "--trust-remote-code": bool,
    "--disable-log-requests": bool,
    "--disable-log-stats": bool,
    "--enable-chunked-prefill": bool,    # always on: the scheduler chunks prefills
    "--max-log-len": int,
    "--max-cpu-loras": int,              # every registered adapter stays in host memory (small)
    "--lora-dtype": str,                 # adapters: the model's dtype (f32 on CPU)
    "--fully-sharded-loras": bool,       # under TP the slot stacks split with their kernels already
}


def ignored_flags_given(args: argparse.Namespace) -> list[str]:
    return [flag for flag in IGNORED_VLLM_FLAGS
            if getattr(args, flag[2:].replace("-", "_"), None) not in (None, False)]


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags (its ValueError names the field)."""
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names()})


def server_limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """ServerLimits from the flags (ValueError naming the flag's field on a bad value)."""
    default_max_tokens = args.default_max_tokens
    override = args.override_generation_config
    if override is not None:
        if not isinstance(override, dict) or set(override) - {"max_new_tokens"}:
            raise ValueError("override_generation_config: only {\"max_new_tokens\": N} is supported, "
                             f"got {override!r}")
        if default_max_tokens is None and "max_new_tokens" in override:
            default_max_tokens = override["max_new_tokens"]
    if default_max_tokens is None:
        default_max_tokens = ServerLimits.default_max_tokens
    return ServerLimits(max_queued_requests=args.max_queued_requests,
                        max_client_batch_size=args.max_client_batch_size, default_max_tokens=default_max_tokens,
                        payload_limit=args.payload_limit)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, EngineConfig]:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        args.limits = server_limits_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    error = check_distributed_args(args)
    if error:
        parser.error(error)
    return args, config
