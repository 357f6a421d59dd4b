"""A Hugging Face fast tokenizer built from a GGUF file's `tokenizer.*` metadata, without torch.

transformers builds GGUF tokenizers only when torch is installed, so we assemble the same thing
from the `tokenizers` library directly:

  tokenizer.ggml.model = "gpt2"  -> byte-level BPE: vocab from `tokens`, `merges` as given
  tokenizer.ggml.pre             -> how text is split before BPE (below)
  tokenizer.ggml.token_type      -> 3 (control) tokens become special added tokens
  bos/eos/unk/padding ids        -> the wrapper's special tokens; add_bos_token -> a post-processor
  tokenizer.chat_template        -> the wrapper's chat template

Pre-tokenizers: "smollm", "gpt2", "default" and unknown names split with GPT-2's ByteLevel regex
(what transformers does for them); the Llama-3 family ("llama-bpe", "llama3", ...) splits with the
Llama-3 regex first, then maps bytes without a regex.
"""
from __future__ import annotations

import functools
import warnings

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)
CONTROL = 3  # llama.cpp token type of control tokens (<|im_start|>, <|endoftext|>, ...)
USER_DEFINED = 4  # tokens matched whole in text but not special

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_OF_PRE = {name: _LLAMA3_SPLIT for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")}
GPT2_REGEX_PRE = ("smollm", "gpt2", "default")


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE tokens).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and up,
    in byte order, so every byte has a visible, non-whitespace character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell(token: str, alphabet: set[str], table: dict[int, str]) -> str:
    """A token in the byte alphabet as is; any other text respelled byte by byte (what the merges use)."""
    if set(token) <= alphabet:
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


def build_tokenizer(gguf_file):
    """PreTrainedTokenizerFast from a GGUFFile's metadata (see module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = gguf_file.path
    kind = gguf_file.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model = {kind!r} is not supported; "
                         f"supported: {list(SUPPORTED_TOKENIZER_MODELS)}")
    tokens = gguf_file.require("tokenizer.ggml.tokens")
    merges = gguf_file.require("tokenizer.ggml.merges")
    types = gguf_file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    table = byte_alphabet()
    alphabet = set(table.values())

    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(_spell(token, alphabet, table), index)
    pairs = []
    for line in merges:
        left, sep, right = line.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge {line!r} in tokenizer.ggml.merges (expected 'a b')")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))

    pre = gguf_file.get("tokenizer.ggml.pre")
    if pre in SPLIT_REGEX_OF_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX_OF_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in (None, *GPT2_REGEX_PRE):
            warnings.warn(f"{path}: tokenizer.ggml.pre = {pre!r} is not known here; splitting text with "
                          f"GPT-2's regex, which may tokenize differently from llama.cpp", stacklevel=2)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    # Control tokens become special tokens so text like "<|im_start|>" maps to one id. A control token
    # spelled outside the byte alphabet is a mislabel in some files and is left alone.
    specials = [AddedToken(t, normalized=False, special=True)
                for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    tok.add_special_tokens(specials)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    def token_of(key: str):
        idx = gguf_file.get(f"tokenizer.ggml.{key}")
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} = {idx} is outside the vocabulary of {len(tokens)}")
        return tokens[int(idx)]

    bos, eos = token_of("bos_token_id"), token_of("eos_token_id")
    add_bos = bool(gguf_file.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(gguf_file.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
    ids = [(t, tok.token_to_id(t)) for t in {bos, eos} if t is not None and (add_bos or add_eos)]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token_of("unknown_token_id"),
        pad_token=token_of("padding_token_id"), clean_up_tokenization_spaces=False)
    template = gguf_file.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast
