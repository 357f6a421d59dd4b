"""The built-in SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): greedy tokens equal transformers'.

The reference model is transformers' LlamaForCausalLM filled by transformers' own GGUF reader
(`load_gguf_checkpoint`, the tensor step of `from_pretrained(gguf_file=...)`), independent of our
converter; the prompts go through the engine in one batch.
"""
import functools

import gguf
import pytest
import torch

from jaxpaged import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 16


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    get_map = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(get_map)   # speeds up transformers' mapping
    try:
        with torch.device("meta"):
            meta = LlamaForCausalLM(LlamaConfig(num_hidden_layers=30, tie_word_embeddings=True))
        parsed = gguf_utils.load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=meta)
    finally:
        gguf.get_tensor_name_map = get_map
    cfg = parsed["config"]
    config = LlamaConfig(**{**{k: v for k, v in cfg.items() if k != "model_type"}, "tie_word_embeddings": True})
    model = LlamaForCausalLM(config).eval()
    missing, _ = model.load_state_dict({k: v.float() for k, v in parsed["tensors"].items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM("smollm2-135m-instruct", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
               enforce_eager=True, download_dir=str(tmp_path_factory.mktemp("smol-cache")))


def test_greedy_tokens_equal_transformers_and_paris(llm, hf_smollm2):
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf_smollm2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=2,
                                      eos_token_id=None)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt
    assert outs[0].outputs[0].text.strip().startswith("Paris")


def test_chat_template_generates_an_answer(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_bfloat16_weights_stored_as_bits_and_still_paris(tmp_path):
    import jax
    import numpy as np

    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=32, enforce_eager=True, download_dir=str(tmp_path))
    runner = llm.llm_engine.runner
    # CPU: bf16 weights travel as uint16 bit patterns except the vocabulary-sized table (f32), and the
    # bf16 KV cache is held as bits too ("auto" under the native attention)
    leaves = jax.tree_util.tree_leaves(runner.state)
    assert {np.dtype(x.dtype).name for x in leaves if 49152 not in x.shape} == {"uint16"}
    # the tied table: f32 for XLA's LM head, or bits for the lookup beside an AMX-packed head
    vocab = {np.dtype(x.dtype).name for x in leaves if 49152 in x.shape}
    assert vocab == ({"uint16"} if runner.native_matmul else {"float32"})
    assert runner.attention_backend == "native" and runner.kv_cache[0].dtype == np.uint16
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].text.strip().startswith("Paris")


SMALL_SCHEMAS = [
    ("Give the name and age of a fictional person as JSON.",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120}},
      "required": ["name", "age"], "additionalProperties": False}),
    ("What is the capital of France? Answer in JSON.",
     {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                       "capital": {"type": "string", "maxLength": 20}},
      "required": ["country", "capital"], "additionalProperties": False}),
    ("Is the sky blue? Answer in JSON.",
     {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
      "additionalProperties": False}),
    ("List three colors as JSON.",
     {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                  "maxItems": 3}},
      "required": ["colors"], "additionalProperties": False}),
]


def test_small_schemas_finish_with_stop_within_200_tokens(llm):
    """Issue 15's bar: on the built-in model at least 3 of 4 constrained outputs finish with "stop"
    within 200 tokens; every one that does validates."""
    import json

    import jsonschema

    from jaxpaged import StructuredOutputsParams

    convs = [[{"role": "user", "content": q}] for q, _ in SMALL_SCHEMAS]
    params = [SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(json=s))
              for _, s in SMALL_SCHEMAS]
    outs = llm.chat(convs, params, use_tqdm=False)
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 3, [o.outputs[0].text for o in outs]
    for (_, schema), out in zip(SMALL_SCHEMAS, outs):
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_readme_quickstart_prints_what_it_says(llm, capsys):
    """The README's Quickstart, run on this module's engine (same model, greedy): each print shows the
    answer its `# -> ...` comment promises."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    promised = re.findall(r"print\(.*?\)\s+# -> (.*)$", block, flags=re.M)
    assert len(promised) == 2
    code = re.sub(r"^llm = LLM\(.*$", "", block, flags=re.M)      # this module's llm instead of a new one
    exec(compile(code, "README.md", "exec"), {"llm": llm})
    printed = [line.strip() for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == promised
