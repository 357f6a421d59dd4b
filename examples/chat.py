"""One chat turn: a system and a user message rendered through the model's chat template.

    python examples/chat.py                          # the built-in smollm2-135m-instruct
    python examples/chat.py /path/to/hf_dir          # any model whose tokenizer has a chat template
"""
import sys

from jaxpaged import LLM, SamplingParams


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    # enforce_eager: skip warmup(), which compiles every bucket shape up front (minutes on CPU);
    # a short script compiles only the few shapes it uses, on first use.
    llm = LLM(model=model, enforce_eager=True)
    messages = [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=64))[0]
    for m in messages:
        print(f"{m['role']}: {m['content']}")
    print(f"assistant: {out.outputs[0].text}")


if __name__ == "__main__":
    main()
