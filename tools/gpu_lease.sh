#!/usr/bin/env bash
# One call on a lent GPU machine (no network; its python3 has jax with CUDA): installs what jaxpaged
# needs and the machine lacks from wheels carried in .whl/, writes a random-weight SmolLM2-shaped
# checkpoint (the real weights cannot travel) and runs `bench gpu-check`; the report lands in $OUT.
#
# Prepare here, once (the wheels and the tokenizer are ignored by git and carried with the call):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf fastapi starlette \
#     pydantic pydantic-core annotated-types typing-inspection typing-extensions uvicorn llguidance opentelemetry-api
#   python -c "from convert.resolve import builtin_model_path; from jaxpaged.convert.gguf_io import GGUFFile; \
#     from jaxpaged.convert.gguf_tokenizer import build_tokenizer; \
#     build_tokenizer(GGUFFile(builtin_model_path('smollm2-135m-instruct'))).save_pretrained('.whl/smollm2-tok')"
# then: device run, carry [".whl"], command "bash tools/gpu_lease.sh [gpu-check options]".
set -u
OUT=${OUT:-/tmp/gpu-lease}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
$PY -c "import jax, jaxlib, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
MODEL=/tmp/random-smollm2
$PY -m jaxpaged.bench random-model --shape smollm2-135m --tokenizer .whl/smollm2-tok --out "$MODEL" 2>&1 | tail -1
$PY -m jaxpaged.bench gpu-check --out "$OUT/gpu_check.md" --e2e-model "$MODEL" "$@" 2>&1 | tee "$OUT/gpu_check.log"
