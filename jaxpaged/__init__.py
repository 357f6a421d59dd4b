"""jaxpaged: a JAX/Pallas LLM inference and serving engine (PagedAttention, continuous batching,
an OpenAI-compatible server), with vLLM's names."""
__version__ = "0.1.0"

from jaxpaged.engine_config import EngineConfig
from jaxpaged.lora.request import LoRARequest
from jaxpaged.outputs import (BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput)
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams


def __getattr__(name):
    # LLM / LLMEngine pull in jax and the models: import them on first use only
    if name == "LLM":
        from jaxpaged.llm import LLM
        return LLM
    if name == "LLMEngine":
        from jaxpaged.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "BeamSearchOutput", "BeamSearchSequence", "LoRARequest"]
