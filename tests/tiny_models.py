"""Builds tiny random-weight Hugging Face models (torch + transformers) and a tiny byte-level BPE tokenizer.

Used by tests only: the engine never imports torch.
"""
from __future__ import annotations

import json
import os

TEXT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "Hello world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9. "
    "JAX is a library for array computing. Paged attention stores keys and values in blocks. "
    "Unicode: café, naïve, 日本語, emoji 🙂. "
) * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# kind -> (transformers config class name, config overrides)
KINDS = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama_hd128": ("LlamaConfig", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                                        head_dim=128)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gpt2": ("GPT2Config", None),
}


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on TEXT, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """Returns a random-weight transformers model (torch, f32, eval mode)."""
    import torch
    import transformers

    cls_name, extra = KINDS[kind]
    if kind == "gpt2":
        cfg = dict(vocab_size=BASE["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                   bos_token_id=1, eos_token_id=2)
    else:
        cfg = {**BASE, **extra}
    cfg.update(overrides)
    config = getattr(transformers, cls_name)(**cfg)
    torch.manual_seed(seed)
    model_cls = transformers.AutoModelForCausalLM.from_config(config).__class__
    model = model_cls(config)
    # larger-than-default init so logits are not all near zero and greedy choices are well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_tiny_model(kind: str, path: str, **overrides) -> None:
    """Saves config.json, model.safetensors and a tokenizer for a tiny model of `kind` into `path`."""
    model = make_hf_model(kind, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    tok = make_tokenizer(model.config.vocab_size)
    tok.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
