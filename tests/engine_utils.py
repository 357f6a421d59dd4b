"""A tiny-model LLM for engine-level tests: enforce_eager (no warmup) and a session-wide cache dir."""
from jaxpaged import LLM


def make_llm(path, tmp_path_factory, **engine_args):
    """LLM(path) with compile-light defaults; engine_args (sizes, flags) override them."""
    args = dict(block_size=16, enforce_eager=True,
                download_dir=str(tmp_path_factory.getbasetemp() / "jp-cache"))
    args.update(engine_args)
    return LLM(path, **args)
