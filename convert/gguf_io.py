"""GGUF files: metadata -> HF-style config dict, tensors -> dequantized float32 under HF names.

Flow: `GGUFFile(path)` opens the file with `gguf.GGUFReader` (memory-mapped; nothing is dequantized
yet) and finds the model family that reads its `general.architecture` (models/registry.py).
`hf_config()` is the family's `gguf_config`: the dict `ModelConfig.from_hf_config` takes.
`weights()` returns a reader with `names` (HF names, from the family's `gguf_to_hf_name`) and
`get(name)`, which dequantizes one tensor to float32 and passes it through the family's
`gguf_tensor` (e.g. undoing llama.cpp's Q/K row permutation), so the result equals the HF tensor
(up to quantization).

The permutation: llama.cpp's converter reorders the rows of q_proj/k_proj inside every head from
HF's "rotate half" layout [first half of the rotary dims, second half] to interleaved pairs, i.e.
HF rows (head, half, j) are stored at (head, j, half) with half in {0, 1} and j < head_dim / 2.
Undoing it is the reverse axis swap on the same [heads, ., ., in] view.
"""
from __future__ import annotations

import os

import numpy as np


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
        from jaxpaged.models.registry import family_of_gguf
        self.architecture = self.get("general.architecture")
        self.family = family_of_gguf(self.architecture, path)

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
        """The HF config.json-style dict of this file (its family's reading of the metadata)."""
        return self.family.gguf_config(self)

    def vocab_size(self) -> int:
        """{arch}.vocab_size, else the tokenizer's token count, else the embedding's width."""
        arch = self.architecture
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        vocab = self.get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None and embed is not None:
            vocab = int(embed.shape[-1])  # ggml order: [hidden, vocab]
        if vocab is None:
            raise ValueError(f"{self.path}: cannot tell the vocabulary size ({arch}.vocab_size, "
                             f"tokenizer.ggml.tokens and token_embd.weight are all missing)")
        return int(vocab)

    def special_token_ids(self) -> dict:
        """bos/eos/pad token ids from the tokenizer metadata, under HF config names."""
        out = {}
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            value = self.get(f"tokenizer.ggml.{key}")
            if value is not None:
                out[key.replace("padding", "pad")] = int(value)
        return out

    def weights(self) -> "GGUFWeights":
        return GGUFWeights(self)


class GGUFWeights:
    """Tensors of a GGUF under HF names, dequantized to float32 one at a time."""

    def __init__(self, gguf_file: GGUFFile):
        self.file = gguf_file
        self._config = gguf_file.hf_config()
        self._tensor_of: dict[str, object] = {}
        for t in gguf_file.reader.tensors:
            hf = gguf_file.family.gguf_to_hf_name(t.name)
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
        return self.file.family.gguf_tensor(self._config, t.name, w)

    def qtype(self, name: str) -> str:
        """The GGUF tensor type's name of an HF-named tensor ("F32", "Q4_1", ...)."""
        return self._tensor_of[name].tensor_type.name

    def blocks(self, name: str) -> np.ndarray:
        """A quantized matrix's raw blocks as the file holds them, [out, row_bytes] uint8, through the
        family's row transform (rows are whole blocks, so a row permutation applies as is)."""
        t = self._tensor_of[name]
        raw = np.asarray(t.data, dtype=np.uint8)
        return self.file.family.gguf_tensor(self._config, t.name, raw)

    def close(self) -> None:
        self._tensor_of.clear()
