"""The backend boundary (issue 13): model code names no kernel package and no dtype trick; a model
family lives in its own file plus one registry line; the bench observes steps through public hooks
and rebinds nothing; resolving a backend has no side effects."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("jaxpaged", "convert", "server", "cpu_kernels", "pallas_kernels")
           for p in (ROOT / d).rglob("*.py")]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_files_import_no_kernel_package_or_sharding():
    for path in (ROOT / "jaxpaged" / "models").glob("*.py"):
        bad = {m for m in _imports(path)
               if m.split(".")[0] in ("cpu_kernels", "pallas_kernels") or m == "jaxpaged.sharding"
               or m.startswith("jaxpaged.backends")}
        assert not bad, f"{path.name} imports {bad}"
        assert "uint16" not in path.read_text(), f"{path.name} knows a storage trick"


def test_a_family_is_one_file_and_a_registry_line():
    from jaxpaged.models.registry import FAMILY_MODULES, families
    registry = ROOT / "jaxpaged" / "models" / "registry.py"
    family_files = {pathlib.Path(f.__file__) for f in families()}
    for path in SOURCES:
        if path not in family_files | {registry}:
            assert not re.search(r"(model_type|family)\s*[!=]=\s*['\"]", path.read_text()), \
                f"{path} special-cases a model type"
    for module_name, fam in zip(FAMILY_MODULES, families()):
        own = pathlib.Path(fam.__file__)
        for path in SOURCES:
            if path in (registry, own):
                continue
            text = path.read_text()
            assert module_name not in text, f"{path} names the family module {module_name}"
            for model_type in fam.MODEL_TYPES:
                # convert/gguf_tokenizer.py: "gpt2" is llama.cpp's name of the byte-level BPE tokenizer
                # model (tokenizer.ggml.model), not the model family
                if path.name == "gguf_tokenizer.py" and model_type == "gpt2":
                    continue
                # bench/random_model.py writes Hugging Face Llama checkpoints: "llama" there is the
                # config.json it writes, not a branch on the family
                if path.name == "random_model.py" and model_type == "llama":
                    continue
                assert not re.findall(rf"['\"]{model_type}['\"]", text), f"{path} names the model type {model_type!r}"


def test_every_family_defines_what_the_registry_lists():
    from jaxpaged.models.registry import families, supported_model_types
    for fam in families():
        for name in ("MODEL_TYPES", "config_from_hf", "CHECKPOINT_TABLE", "IGNORED", "TIED_DUPLICATES",
                     "normalize_name", "TP_SPLIT_AXES", "MODEL_CLASS"):
            assert hasattr(fam, name), f"{fam.__name__} lacks {name}"
    assert {"llama", "mistral", "qwen2", "qwen3", "gpt2"} <= set(supported_model_types())
    from jaxpaged.config import ModelConfig
    with pytest.raises(ValueError, match="model_type: 'bert' is not supported"):
        ModelConfig.from_hf_config({"model_type": "bert"})


def _assigned(target):
    """The direct targets of an assignment (through tuples and starred names)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _assigned(elt)
    elif isinstance(target, ast.Starred):
        yield from _assigned(target.value)
    else:
        yield target


def test_bench_rebinds_nothing():
    """The bench never assigns an attribute of a module, the engine, the runner or the scheduler
    (profiling goes through LLMEngine.add_step_hook), and never calls setattr."""
    for path in (ROOT / "jaxpaged" / "bench").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in (x for target in targets for x in _assigned(target)):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    owner = t.value.id
                    assert owner not in modules and not re.search(r"engine|runner|sched|llm", owner), \
                        f"{path.name}:{node.lineno} rebinds {ast.unparse(t)}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                pytest.fail(f"{path.name}:{node.lineno} calls setattr")


def test_resolving_a_backend_builds_nothing():
    code = ("import cpu_kernels.build as b\n"
            "def boom(*a, **k): raise AssertionError('built while resolving')\n"
            "b._compile = boom\n"
            "from jaxpaged.backends import resolve_backend, kv_cache_dtype\n"
            "from jaxpaged.engine_config import EngineConfig\n"
            "assert resolve_backend('auto', 'cpu') == ('native' if b.compiler_available() else 'pallas')\n"
            "assert resolve_backend('auto', 'gpu') == 'pallas'\n"
            "assert kv_cache_dtype(EngineConfig(dtype='bfloat16', attention_backend='pallas'), 'cpu') == 'float32'\n"
            "assert kv_cache_dtype(EngineConfig(dtype='bfloat16', attention_backend='pallas'), 'gpu') == 'bfloat16'\n"
            "assert kv_cache_dtype(EngineConfig(dtype='bfloat16', attention_backend='native'), 'cpu') == 'bfloat16'\n"
            "print('ok')\n")
    env = {"JAXPAGED_CACHE": "/nonexistent/never-written", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                       cwd=str(ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    from jaxpaged.backends import resolve_backend
    with pytest.raises(ValueError, match="attention_backend: 'native' runs on CPU only"):
        resolve_backend("native", "gpu")
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("cuda", "cpu")


def test_weight_types_multiply_like_dense():
    from jaxpaged.weights import BF16Bits, TiedEmbedding, matmul, matmul_t, take, value
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((8, 12)), jnp.bfloat16)          # [K, N]
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.bfloat16)
    bits = BF16Bits(jax.lax.bitcast_convert_type(w, jnp.uint16))
    np.testing.assert_array_equal(np.asarray(matmul(x, bits)), np.asarray(matmul(x, w)))
    assert matmul(x, bits).dtype == jnp.float32 and value(bits).dtype == jnp.bfloat16
    table = jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)      # [V, H]
    ids = jnp.asarray([3, 0, 9])
    tied = TiedEmbedding(table=table, head=table.T)
    np.testing.assert_array_equal(np.asarray(take(tied, ids)), np.asarray(table[ids]))
    np.testing.assert_allclose(np.asarray(matmul_t(x, tied)), np.asarray(x, np.float32) @ np.asarray(table).T,
                               rtol=1e-5)
    # a weight type is a pytree: it goes through jit and tree_map like an array
    doubled = jax.jit(lambda t: jax.tree.map(lambda a: a * 2, t))(tied)
    np.testing.assert_array_equal(np.asarray(value(doubled)), 2 * np.asarray(table))


def test_step_hooks_see_every_part(tiny_llama, tmp_path_factory):
    from jaxpaged import SamplingParams
    from tests.engine_utils import make_llm
    llm = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=32)
    engine = llm.llm_engine

    class Recorder:
        def __init__(self):
            self.events, self.inputs = [], []

        def begin_step(self):
            self.events.append("begin")

        def end_step(self):
            self.events.append("end")

        def end_part(self, name, seconds, cpu):
            assert seconds >= 0 and cpu >= 0
            self.events.append(name)

        def on_inputs(self, inputs, sampling):
            self.inputs.append((inputs.num_tokens, inputs.num_seqs))

    rec = Recorder()
    engine.add_step_hook(rec)
    llm.generate(["hello there friend"], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                 use_tqdm=False)
    engine.remove_step_hook(rec)
    first = rec.events[:rec.events.index("end") + 1]
    assert first == ["begin", "schedule", "inputs", "sampling_inputs", "device", "end"]
    assert rec.events.count("begin") == rec.events.count("end") == len(rec.inputs) == 3
    assert [n for n, _ in rec.inputs][1:] == [1, 1] and all(b == 1 for _, b in rec.inputs)
    n = len(rec.events)
    llm.generate(["again"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(rec.events) == n                       # removed: no longer called


def test_auto_falls_back_to_pallas_when_the_native_kernels_cannot_build(monkeypatch, caplog):
    import cpu_kernels.build
    from cpu_kernels import NativeBuildError
    from jaxpaged.runner import ready_backend

    def fail():
        raise NativeBuildError("no compiler here")
    monkeypatch.setattr(cpu_kernels.build, "load", fail)
    monkeypatch.setattr(cpu_kernels.build, "compiler_available", lambda: True)
    with caplog.at_level("WARNING"):
        assert ready_backend("auto").name == "pallas"
    assert "falling back to Pallas" in caplog.text and "no compiler here" in caplog.text
    with pytest.raises(NativeBuildError, match="no compiler here"):
        ready_backend("native")                     # asked for by name: the error is the user's to see
    assert ready_backend("jnp").name == "jnp"
