"""Structured output: decoding constrained by a JSON schema, a regex, a choice list or a grammar.

  params.py    StructuredOutputsParams (vLLM's names), its checks and its llguidance grammar text
  manager.py   StructuredOutputManager: the llguidance tokenizer, a compile thread pool, the grammar cache
  state.py     GrammarState: one sequence's matcher; fill_bitmasks: packed int32 masks for a step's rows

The sampler applies the masks inside its jitted call (sampler.apply_token_bitmask). llguidance is
imported only when a request asks for structured output.
"""
from jaxpaged.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
