"""GGUF files: metadata -> HF-style config dict, tensors -> dequantized float32 under HF names.

Flow: `GGUFFile(path)` opens the file with `gguf.GGUFReader` (memory-mapped; nothing is dequantized
yet) and checks the architecture. `hf_config()` builds the dict `ModelConfig.from_hf_config` takes,
from the `llama.*` keys. `weights()` returns a reader with `names` (HF names such as
`model.layers.0.self_attn.q_proj.weight`) and `get(name)`, which dequantizes one tensor to float32
and undoes llama.cpp's Q/K row permutation, so the result equals the HF tensor (up to quantization).

The permutation: llama.cpp's converter reorders the rows of q_proj/k_proj inside every head from
HF's "rotate half" layout [first half of the rotary dims, second half] to interleaved pairs, i.e.
HF rows (head, half, j) are stored at (head, j, half) with half in {0, 1} and j < head_dim / 2.
Undoing it is the reverse axis swap on the same [heads, ., ., in] view.
"""
from __future__ import annotations

import os

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF per-block tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when unknown."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if layer.isdigit() and part in GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}"
        return None
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rope row permutation of a q/k projection ([n_heads * head_dim, ...] rows)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute a q/k tensor of {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """One GGUF file's metadata and tensors (memory-mapped)."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged file
            raise ValueError(f"{path}: could not read the GGUF file ({type(e).__name__}: {e}); "
                             f"is it truncated or corrupt?") from None
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} needs bytes up to "
                                 f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.architecture = self.get("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{path}: GGUF architecture {self.architecture!r} is not supported; "
                             f"supported: {list(SUPPORTED_ARCHITECTURES)}")

    def get(self, key: str, default=None):
        """A metadata value (str, number, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def hf_config(self) -> dict:
        """The HF config.json-style dict of a llama-architecture GGUF."""
        arch = self.architecture
        names = set(self.tensor_names)
        if "rope_freqs.weight" in names:
            raise ValueError(f"{self.path}: tensor rope_freqs.weight (llama.cpp's form of Llama-3.1 rope scaling) "
                             f"is not supported yet; use the Hugging Face checkpoint instead")
        scaling = self.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ValueError(f"{self.path}: {arch}.rope.scaling.type = {scaling!r} is not supported; "
                             f"supported: ['none']")
        heads = int(self.require(f"{arch}.attention.head_count"))
        hidden = int(self.require(f"{arch}.embedding_length"))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        vocab = self.get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None and embed is not None:
            vocab = int(embed.shape[-1])  # ggml order: [hidden, vocab]
        if vocab is None:
            raise ValueError(f"{self.path}: cannot tell the vocabulary size ({arch}.vocab_size, "
                             f"tokenizer.ggml.tokens and token_embd.weight are all missing)")
        cfg = {
            "model_type": arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self.require(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(self.require(f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.get(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": int(self.get(f"{arch}.attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self.get(f"{arch}.context_length", 2048)),
            "rms_norm_eps": float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.get(f"{arch}.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
        }
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            value = self.get(f"tokenizer.ggml.{key}")
            if value is not None:
                cfg[key.replace("padding", "pad")] = int(value)
        return cfg

    def weights(self) -> "GGUFWeights":
        return GGUFWeights(self)


class GGUFWeights:
    """Tensors of a GGUF under HF names, dequantized to float32 one at a time."""

    def __init__(self, gguf_file: GGUFFile):
        self.file = gguf_file
        cfg = gguf_file.hf_config()
        self._heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
        self._tensor_of: dict[str, object] = {}
        for t in gguf_file.reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is None:
                raise ValueError(f"{gguf_file.path}: GGUF tensor {t.name!r} has no Hugging Face equivalent "
                                 f"for architecture {gguf_file.architecture!r}")
            self._tensor_of[hf] = t
        self.names: list[str] = list(self._tensor_of)

    def get(self, name: str) -> np.ndarray:
        from gguf import quants

        t = self._tensor_of[name]
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # numpy shape is ggml's dims reversed: [out, in] for a matrix, like HF's nn.Linear weight
        w = w.reshape([int(d) for d in reversed(t.shape)])
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if part in self._heads:
            w = unpermute_qk(w, self._heads[part])
        return w

    def close(self) -> None:
        self._tensor_of.clear()
