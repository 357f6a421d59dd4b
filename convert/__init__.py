"""jaxpaged.convert: Hugging Face / GGUF checkpoints -> JAX params, and the converted-params cache."""
