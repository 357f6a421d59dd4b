"""Lowering the kernels for CUDA on a machine without a GPU (tests, gpu-check's dry run).

`jax.export(..., platforms=["cuda"])` runs the Pallas GPU lowering, which builds the kernel IR
(Triton or Mosaic GPU) at export time. From jax 0.11 that lowering asks the device for its
compute capability; without a GPU it needs an abstract one (`target_gpu`).
"""
from __future__ import annotations

import contextlib
import re

import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALLS = ("mosaic_gpu_v2", "mosaic_gpu")
KERNEL_CALLS = (TRITON_CALL, *MOSAIC_CALLS)
H200 = ("NVIDIA H200", 132)      # device kind, SMs


def target_gpu(kind: str = H200[0], num_cores: int = H200[1]):
    """Context in which Pallas lowers for `kind` without a GPU (a no-op before jax 0.11)."""
    if jax.__version_info__ < (0, 11):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=num_cores, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device))


def export_for_cuda(fn, *args, donate_argnums=()) -> str:
    """The StableHLO text of fn(*args) lowered for CUDA (args: ShapeDtypeStructs)."""
    unchecked = [export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALLS]
    with target_gpu():
        exported = export.export(jax.jit(fn, donate_argnums=donate_argnums), platforms=["cuda"],
                                 disabled_checks=unchecked)(*args)
    return exported.mlir_module()


def kernel_calls(module: str) -> list[str]:
    """The kernel custom_call lines of a lowered module (Triton or Mosaic GPU)."""
    return [line for line in module.splitlines()
            if any(f"custom_call @{name}(" in line for name in KERNEL_CALLS)]


def triton_grid(call_line: str) -> tuple[int, int, int]:
    """(grid_x, grid_y, grid_z) of a Triton custom_call line."""
    return tuple(int(re.search(rf"grid_{a} = (\d+)", call_line).group(1)) for a in "xyz")


def operand_types(call_line: str) -> list[str]:
    """Operand types of a custom_call line: its trailing `: (t1, t2, ...) -> result`."""
    sig = call_line[call_line.rindex("} : (") + 5:call_line.rindex(") -> ")]
    return re.findall(r"tensor<[^>]*>", sig)
