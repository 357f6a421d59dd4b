"""Random-weight Hugging Face Llama checkpoints of real model shapes, for benchmarks where the real
weights are not at hand (a lent GPU machine cannot reach the hub and takes 64 MiB of files).

    python -m jaxpaged.bench random-model --shape smollm2-135m --tokenizer TOKDIR --out DIR

Writes DIR/config.json (a LlamaConfig), DIR/model.safetensors (bf16, N(0, 0.02) weights, norms 1)
and the tokenizer files copied from TOKDIR (or, without --tokenizer, built from the built-in
model's GGUF). Throughput does not depend on the weights' values (`--ignore-eos` runs fix the
lengths), only on the shapes, so a random checkpoint measures what the real one would.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

# shape -> LlamaConfig fields (the real models' published configs)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                        max_position_embeddings=131072),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                      max_position_embeddings=8192),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def add_args(p) -> None:
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer.json (default: the built-in model's tokenizer)")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's size")
    p.add_argument("--seed", type=int, default=0)


def llama_config(shape: str, vocab_size: int) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    return dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                rms_norm_eps=1e-5, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16")


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names -> shapes ([out, in] for Linear weights)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def _copy_tokenizer(src: str | None, out: str) -> int:
    """Tokenizer files into `out`; returns the vocabulary size."""
    if src is None:
        from convert.resolve import builtin_model_path
        from jaxpaged.convert.gguf_io import GGUFFile
        from jaxpaged.convert.gguf_tokenizer import build_tokenizer
        build_tokenizer(GGUFFile(builtin_model_path("smollm2-135m-instruct"))).save_pretrained(out)
    else:
        if not os.path.exists(os.path.join(src, "tokenizer.json")):
            raise ValueError(f"--tokenizer {src}: no tokenizer.json there")
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), out)
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(out, "tokenizer.json")).get_vocab_size()


def write_random_model(out: str, shape: str = "smollm2-135m", tokenizer: str | None = None,
                       vocab_size: int | None = None, seed: int = 0) -> str:
    """Writes the checkpoint directory; returns its path."""
    import ml_dtypes
    from safetensors.numpy import save_file
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    tok_vocab = _copy_tokenizer(tokenizer, out)
    cfg = llama_config(shape, vocab_size or tok_vocab)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shp in tqdm(tensor_shapes(cfg).items(), desc=f"random {shape}", unit="tensor"):
        if len(shp) == 1:                          # RMSNorm scales
            tensors[name] = np.ones(shp, ml_dtypes.bfloat16)
        else:
            tensors[name] = (rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return out


def run(args) -> None:
    path = write_random_model(args.out, args.shape, args.tokenizer, args.vocab_size, args.seed)
    n = sum(int(np.prod(s)) for s in tensor_shapes(json.load(open(os.path.join(path, "config.json")))).values())
    print(f"wrote {path}: {args.shape}, {n / 1e6:.0f}M random bf16 parameters")
