"""Greedy generation for three prompts with the offline API.

    python examples/generate.py                      # the built-in smollm2-135m-instruct
    python examples/generate.py /path/to/hf_dir      # or a Hugging Face directory / .gguf file

The first run converts the checkpoint and caches the JAX params ($JAXPAGED_CACHE or
~/.cache/jaxpaged); later runs load from the cache.
"""
import sys

from jaxpaged import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "def fibonacci(n):",
]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    # enforce_eager: skip warmup(), which compiles every bucket shape up front (minutes on CPU);
    # a short script compiles only the few shapes it uses, on first use.
    llm = LLM(model=model, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=32)  # temperature 0 = greedy
    for out in llm.generate(PROMPTS, params):
        print(f"prompt: {out.prompt!r}")
        print(f"text:   {out.outputs[0].text!r}")
        print(f"        ({len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason})")
        print()


if __name__ == "__main__":
    main()
