"""The Pallas GGUF block matmul (pallas_kernels/gguf_matmul.py) in interpret mode on CPU, against
gguf_blocks.GGUFBlocks' dequantize-then-dot, and wired through the Pallas backend
(backends/pallas.PallasBlocks). CUDA lowering: tests/test_weight_kernels_gpu_lowering.py."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxpaged import LLM, SamplingParams
from jaxpaged.gguf_blocks import GGUFBlocks
from pallas_kernels.gguf_matmul import gguf_matmul


def _blocks(qtype, layers, n, k, seed=5):
    import gguf
    rng = np.random.default_rng(seed)
    return np.stack([gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * (i + 1),
                                          gguf.GGMLQuantizationType[qtype]) for i in range(layers)])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_interpret_equals_the_jnp_blocks(qtype, m):
    """N = 77 (no multiple of the 64-row tile: the last rows read clamped, cut off), K = 96 (3 blocks);
    stacked blocks read at a traced layer."""
    blocks = jnp.asarray(_blocks(qtype, 2, 77, 96))                        # [2, 77, 3 * size]
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 96)), jnp.float32)
    run = jax.jit(lambda x, layer: gguf_matmul(x, blocks, layer, qtype=qtype, interpret=True))
    for layer in (0, 1):
        out = run(x, jnp.int32(layer))
        ref = GGUFBlocks(blocks[layer], qtype).matmul(x)
        assert out.shape == (m, 77) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))


def test_bad_arguments_are_value_errors():
    blocks = jnp.asarray(_blocks("Q8_0", 1, 8, 64))
    with pytest.raises(ValueError, match="gguf_matmul: expected x"):
        gguf_matmul(jnp.zeros((2, 32)), blocks, qtype="Q8_0", interpret=True)
    with pytest.raises(ValueError, match="gguf_matmul: qtype"):
        gguf_matmul(jnp.zeros((2, 64)), blocks, qtype="Q5_K", interpret=True)


def test_pallas_backend_reads_gguf_blocks_with_the_kernel(tiny_model_factory, tmp_path, monkeypatch):
    """quantization="gguf" on the Pallas backend with the kernels forced on (interpret mode on CPU): the
    7 stacked Q8_0 block weights become PallasBlocks and the greedy tokens equal the default engine's."""
    from jaxpaged.backends.pallas import MATMUL_ENV, PallasBlocks
    from tests.test_gguf import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "tiny-q8.gguf"), tiny_model_factory("llama"), quantize=True)
    kw = dict(quantization="gguf", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              enforce_eager=True, download_dir=str(tmp_path / "dl"))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 250, 41, 7], [300, 2, 2, 2, 61]]
    tokens = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    want = tokens(LLM(path, **kw))
    monkeypatch.setenv(MATMUL_ENV, "on")
    llm = LLM(path, attention_backend="pallas", **kw)
    is_p = lambda v: isinstance(v, PallasBlocks)
    leaves = [x for x in jax.tree_util.tree_leaves(llm.llm_engine.runner.state, is_leaf=is_p) if is_p(x)]
    assert len(leaves) == 7 and {w.blocks.qtype for w in leaves} == {"Q8_0"}
    assert tokens(llm) == want
