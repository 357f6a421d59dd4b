"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the acceptance rule of a verification step.

config.py     SpeculativeConfig: vLLM's speculative_config, parsed and checked once
ngram.py      propose_ngram: drafts copied from the sequence's own earlier tokens (host, numpy)
speculator.py Speculator: the engine's side (which sequences propose, their sampling rows, acceptance, counters)
grammar.py    structured output under speculation: drafts the grammar accepts, each row's mask after its drafts
draft_model.py DraftModelProposer: the draft_model method (its own runner and paged KV pool, greedy drafts)
"""
from jaxpaged.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
