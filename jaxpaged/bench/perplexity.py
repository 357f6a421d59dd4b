"""perplexity: a model's perplexity on a fixed English text, from the engine's prompt log-probs.

    python -m jaxpaged.bench perplexity --dtype float32 [--quantization int8] [--kv-cache-dtype ...]

The text (default: jaxpaged/bench/data/english.txt, written for this benchmark) is tokenized once
and cut into consecutive windows of at most `--window` tokens; every window is one request with
`prompt_logprobs=0` and max_tokens=1, so each token after a window's first is scored given the
tokens before it in that window. Perplexity = exp(mean negative log-likelihood) over all scored
tokens. Several `--config` runs (e.g. dense vs int8) are printed side by side, each with the bytes
of its decoder Linear weights as the engine holds them.
"""
from __future__ import annotations

import math
import os
import time

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "data", "english.txt")


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default=DEFAULT_TEXT, help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quantization", default=None, choices=("int8", "gguf"),
                   help="weight quantization of every run (a --config may override it)")
    p.add_argument("--kv-cache-dtype", default="auto", help="KV cache dtype of every run (e.g. int8, fp8; "
                   "a --config may override it: --config '' --config kv_cache_dtype=int8 compares the two)")
    p.add_argument("--config", action="append", default=None,
                   help="engine settings of one run, e.g. 'quantization=int8' or 'kv_cache_dtype=bfloat16'; "
                        "repeat for several runs side by side (default: one run with the model as is)")
    p.add_argument("--download-dir", default=None)


def _parse_config(text: str) -> dict:
    out = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = None if value.strip().lower() == "none" else value.strip()
    return out


def perplexity(llm, token_ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of `token_ids` under `llm`, in windows of `window`."""
    from jaxpaged import SamplingParams

    if window < 2:
        raise ValueError(f"window: must be >= 2, got {window}")
    windows = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, n = 0.0, 0
    for w, out in zip(windows, outs):
        for i in range(1, len(w)):
            nll -= out.prompt_logprobs[i][w[i]].logprob
            n += 1
    return math.exp(nll / n), n


def linear_weight_bytes(llm) -> int:
    """Bytes of the decoder layers' Linear weights as the runner holds them (scales included)."""
    import jax
    from flax import nnx

    from jaxpaged.models.layers import Linear
    from jaxpaged.weights import Weight

    runner = llm.llm_engine.runner
    model = nnx.merge(runner.graphdef, runner.state)
    total = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and not module.vocab:
            w = module.kernel.get_value()
            leaves = jax.tree_util.tree_leaves(w) if isinstance(w, Weight) else [w]
            total += sum(x.nbytes for x in leaves)
    return total


def run(args) -> None:
    from jaxpaged import LLM

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    rows = []
    for spec in args.config or [""]:
        extra = _parse_config(spec)
        t0 = time.perf_counter()
        engine_args = dict(dtype=args.dtype, max_model_len=max(args.window + 8, 128),
                           max_num_batched_tokens=max(args.window, 64), enforce_eager=True,
                           download_dir=args.download_dir, quantization=args.quantization,
                           kv_cache_dtype=args.kv_cache_dtype)
        llm = LLM(args.model, **{**engine_args, **extra})
        ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
        ppl, n = perplexity(llm, ids, args.window)
        engine = llm.llm_engine       # KV cache dtype and bytes per cached token (all layers, K and V)
        kv = f"KV {engine.kv_cache_dtype} {engine.kv_plan.bytes_per_block // engine.kv_plan.block_size} B/token"
        rows.append((spec or "(as is)", ppl, n, time.perf_counter() - t0, linear_weight_bytes(llm), kv))
        del engine
        del llm
    base = rows[0][1]
    print(f"perplexity of {os.path.basename(args.text)} ({rows[0][2]} scored tokens, windows of {args.window}), "
          f"{args.model} {args.dtype}")
    for spec, ppl, n, secs, nbytes, kv in rows:
        print(f"  {spec:<36} ppl {ppl:9.4f}  ({100 * (ppl / base - 1):+6.2f}% vs first)  "
              f"Linear weights {nbytes / 2**20:7.1f} MiB ({nbytes / rows[0][4]:.2f}x)  {kv}  {secs:6.1f} s")
