"""What a warm start reuses: packed weights from the converted-params cache entry (no pack calls), and
every compiled executable from JAX's persistent compilation cache (hit counts, not timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxpaged import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
PROMPTS = ["Hello there", "a b c d e f g"]


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_second_load_reads_packed_weights_from_the_cache(tiny_llama, tmp_path, monkeypatch):
    import cpu_kernels.matmul as mm
    monkeypatch.setattr(mm, "worthwhile", lambda dt: True)    # packing forced on whatever this CPU is
    kw = dict(download_dir=str(tmp_path), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              enforce_eager=True)
    before = mm.pack_count()
    first = LLM(tiny_llama, **kw)
    packed = mm.pack_count() - before
    cache = first.llm_engine.runner.packed_cache
    assert packed == 8 and (cache.hits, cache.misses) == (0, 8)   # 7 stacked kernels + the tied head
    entry = first.llm_engine.runner.packed_cache.final
    assert os.path.isfile(os.path.join(entry, "COMPLETE")) and os.path.basename(entry) == mm.flavour("float32")
    want = _tokens(first)
    del first

    before = mm.pack_count()
    second = LLM(tiny_llama, **kw)
    cache = second.llm_engine.runner.packed_cache
    assert mm.pack_count() == before and (cache.hits, cache.misses) == (8, 0)
    assert _tokens(second) == want
    # bf16 params are another cache entry, packed in their own flavour
    bf16 = LLM(tiny_llama, dtype="bfloat16", **kw)
    assert bf16.llm_engine.runner.packed_cache.misses == 8


def test_unpacked_engines_have_no_packed_cache(tiny_llama, tmp_path):
    llm = LLM(tiny_llama, download_dir=str(tmp_path), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              enforce_eager=True, native_matmul=False)
    assert llm.llm_engine.runner.packed_cache is None
    assert not any("packed" in dirs for _, dirs, _ in os.walk(tmp_path))


_CHILD = r"""
import json, sys
from jaxpaged import LLM, SamplingParams
from jaxpaged.compilation_cache import cache_stats
path, root = sys.argv[1], sys.argv[2]
llm = LLM(path, download_dir=root, compilation_cache_dir=root + "/xla", max_num_seqs=4,
          max_num_batched_tokens=32, max_model_len=64)
llm.generate(["Hello there"], SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=3, seed=1),
             use_tqdm=False)
print("RESULT " + json.dumps({**cache_stats(), "compiled": llm.llm_engine.runner.num_compiled()}))
"""


def _start(model, root):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, model, root], capture_output=True, text=True, env=env,
                          timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_warm_start_compiles_nothing(tiny_llama, tmp_path):
    """A second process with the same config reads every executable (step buckets, sampler, small
    helpers) from the persistent cache: no compile misses at all."""
    cold = _start(tiny_llama, str(tmp_path))
    assert cold["misses"] >= cold["compiled"] > 0
    warm = _start(tiny_llama, str(tmp_path))
    assert warm["misses"] == 0, warm
    assert warm["hits"] >= warm["compiled"] == cold["compiled"]


def test_warmup_compiles_ahead_of_time_and_steps_compile_nothing(tiny_llama, tmp_path):
    """warmup() compiles every bucket without running it; the steps afterwards find every executable
    in jit's own caches: no compile request reaches XLA or the persistent cache."""
    from jaxpaged.compilation_cache import cache_stats
    llm = LLM(tiny_llama, download_dir=str(tmp_path), compilation_cache_dir=str(tmp_path / "xla"), max_num_seqs=4,
              max_num_batched_tokens=32, max_model_len=64)
    runner = llm.llm_engine.runner
    assert runner.num_compiled() == len(runner.buckets.pairs()) + len(runner.buckets.seq_buckets)
    before = cache_stats()
    prompts = ["Hello there", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "x", "one two three"]
    params = [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=9, seed=3),
              SamplingParams(temperature=1.0, max_tokens=5), SamplingParams(temperature=0.5, min_p=0.1, max_tokens=7)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 9, 5, 7] or all(o.outputs[0].token_ids for o in outs)
    assert cache_stats() == before
    assert runner.num_compiled() == len(runner.buckets.pairs()) + len(runner.buckets.seq_buckets)
