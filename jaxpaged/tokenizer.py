"""CachedTokenizer: a cache entry's tokenizer, served by the `tokenizers` library (no transformers import).

A converted-params cache entry keeps the tokenizer as transformers' `save_pretrained` wrote it
(tokenizer.json + tokenizer_config.json + chat_template.jinja). Importing transformers to read it
back costs seconds at every warm start (and transformers imports torch when torch is installed), so
the engine's own calls go straight to the Rust tokenizer:

  encode(text, add_special_tokens)         -> tokenizers.Tokenizer.encode(...).ids
  decode(ids, skip_special_tokens)         -> tokenizers.Tokenizer.decode(...)
  convert_ids_to_tokens, get_vocab, len(), vocab_size, the special tokens and their ids

which is what transformers' TokenizersBackend does for these (tests/test_tokenizer.py compares them
on the same files). Everything else (apply_chat_template, __call__, batch_decode, ...) is transformers'
own: the TokenizersBackend for the same directory is loaded on first use and the call is handed to it,
so chat templates render exactly as transformers renders them.

`load_entry_tokenizer(path)` returns a CachedTokenizer only for the saved form in which transformers'
loading changes nothing about the Rust tokenizer (a TokenizersBackend / PreTrainedTokenizerFast with a
tokenizer.json that has a post-processor, every special token already a special added token, no
add_bos_token / add_eos_token override, no clean-up of spaces; what save_pretrained writes for the
models here), and transformers' AutoTokenizer otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import threading

logger = logging.getLogger(__name__)

_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> str | None:
    """A special token as tokenizer_config.json holds it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class CachedTokenizer:
    def __init__(self, path: str, config: dict):
        from tokenizers import Tokenizer

        self.name_or_path = path
        self.backend_tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.backend_tokenizer.no_padding()
        self.backend_tokenizer.no_truncation()
        self.special_tokens = {k: _content(config.get(k)) for k in _SPECIAL}      # None where unset
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special_tokens = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        template = os.path.join(path, "chat_template.jinja")
        self.chat_template = config.get("chat_template")
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                self.chat_template = f.read()
        self._hf = None
        self._hf_lock = threading.Lock()

    # ---- the engine's calls, on the Rust tokenizer ------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if kwargs:
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
               spaces_between_special_tokens: bool = True, **kwargs) -> str:
        # spaces_between_special_tokens: only transformers' slow (Python) tokenizers read it; its fast
        # ones, which this one stands for, ignore it (tested)
        if kwargs or clean_up_tokenization_spaces:
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        seen = [t for t in list(self.special_tokens.values()) + self.extra_special_tokens if t is not None]
        return list(dict.fromkeys(seen))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in self.convert_tokens_to_ids(self.all_special_tokens) if i is not None]

    def __getattr__(self, name: str):
        # bos_token / bos_token_id etc. from the config; anything else is transformers' (loaded now)
        if name in _SPECIAL:
            return self.__dict__["special_tokens"][name]
        if name.endswith("_id") and name[:-3] in _SPECIAL:
            token = self.__dict__["special_tokens"][name[:-3]]
            return None if token is None else self.backend_tokenizer.token_to_id(token)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    # ---- transformers' tokenizer, for everything else ----------------------------------------------
    @property
    def hf(self):
        """transformers' tokenizer for the same files (imported and loaded on first use)."""
        with self._hf_lock:
            if self._hf is None:
                logger.info("loading transformers' tokenizer for %s (first chat template or other "
                            "transformers call)", self.name_or_path)
                from transformers import AutoTokenizer
                self._hf = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True)
            return self._hf

    def apply_chat_template(self, conversation, *args, **kwargs):
        return self.hf.apply_chat_template(conversation, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def __getstate__(self):                 # pickles (Ray workers) as its files' path
        return {"name_or_path": self.name_or_path}

    def __setstate__(self, state):
        self.__init__(state["name_or_path"], _read_config(state["name_or_path"]))

    def __repr__(self) -> str:
        return f"CachedTokenizer({self.name_or_path!r}, vocab={len(self)})"


def _read_config(path: str) -> dict:
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        return json.load(f)


def _served_exactly(path: str, config: dict | None) -> CachedTokenizer | None:
    """A CachedTokenizer for `path` when transformers would load the very same Rust tokenizer, else None.
    (transformers rebuilds the post-processor when add_bos_token / add_eos_token are given or it is
    missing, and adds the named special tokens as special added tokens.)"""
    if (config is None or config.get("tokenizer_class") not in _FAST_CLASSES
            or config.get("backend", "tokenizers") != "tokenizers" or config.get("clean_up_tokenization_spaces")
            or "add_bos_token" in config or "add_eos_token" in config
            or not os.path.isfile(os.path.join(path, "tokenizer.json"))
            or os.path.isdir(os.path.join(path, "additional_chat_templates"))):
        return None
    tok = CachedTokenizer(path, config)
    specials = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    if tok.backend_tokenizer.post_processor is None or not set(tok.all_special_tokens) <= specials:
        return None
    return tok


def load_entry_tokenizer(path: str):
    """The tokenizer saved in `path`: a CachedTokenizer when the files are in a form it serves exactly,
    else transformers' AutoTokenizer. Raises what either raises on unreadable files."""
    try:
        config = _read_config(path)
    except (OSError, ValueError):
        config = None
    tok = _served_exactly(path, config)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
