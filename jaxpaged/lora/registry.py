"""LoRARegistry: the adapters an engine knows, loaded once into host memory (pure Python + numpy).

`add(LoRARequest)` reads the PEFT folder (peft_loader.py) the first time an id is seen and returns
a LoadedLoRA; later requests with the same id share it. Each load gets a fresh `key`: the runner's
device slots and the prefix cache's hash chains are keyed by it, so an adapter removed and loaded
again under the same id never reuses K/V or a device slot computed with its old weights.
A Sequence holds its LoadedLoRA, so removing an adapter does not disturb requests already using it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from jaxpaged.config import ModelConfig
from jaxpaged.lora.peft_loader import load_peft_adapter
from jaxpaged.lora.request import LoRARequest


@dataclass(frozen=True, eq=False)
class LoadedLoRA:
    request: LoRARequest
    key: int                 # unique per load (slots and prefix hashes are keyed by it)
    arrays: dict             # {module path: (a [L, in, R], b [L, R, out])} host arrays in the device layout
    rank: int

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.arrays.values())


class LoRARegistry:
    def __init__(self, checkpoint_config: ModelConfig, *, max_lora_rank: int, dtype=np.float32,
                 tensor_parallel_size: int = 1):
        """checkpoint_config: the model's config as converted (before any tensor-parallel layout change)."""
        self.cfg = checkpoint_config
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.tp = tensor_parallel_size
        self._by_id: dict[int, LoadedLoRA] = {}
        self._keys = itertools.count(1)

    def add(self, request: LoRARequest) -> LoadedLoRA:
        """The loaded adapter of `request` (read from disk the first time its id is seen)."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request: expected a LoRARequest, got {type(request).__name__}")
        have = self._by_id.get(request.lora_int_id)
        if have is not None:
            if (have.request.lora_name, have.request.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(f"lora_int_id: {request.lora_int_id} is already loaded as "
                                 f"{have.request.lora_name!r} from {have.request.lora_path!r}")
            return have
        for other in self._by_id.values():
            if other.request.lora_name == request.lora_name:
                raise ValueError(f"lora_name: {request.lora_name!r} is already loaded with lora_int_id "
                                 f"{other.lora_int_id}")
        adapter = load_peft_adapter(request.lora_path, self.cfg, max_rank=self.max_lora_rank, dtype=self.dtype)
        loaded = LoadedLoRA(request, next(self._keys), self._tp_layout(adapter.arrays), adapter.rank)
        self._by_id[request.lora_int_id] = loaded
        return loaded

    def remove(self, lora_int_id: int) -> bool:
        """Forgets an adapter (requests already running with it finish with it). False if unknown."""
        return self._by_id.pop(lora_int_id, None) is not None

    def get(self, lora_int_id: int) -> LoadedLoRA | None:
        return self._by_id.get(lora_int_id)

    def by_name(self, name: str) -> LoadedLoRA | None:
        return next((x for x in self._by_id.values() if x.request.lora_name == name), None)

    def list(self) -> list[LoadedLoRA]:
        return list(self._by_id.values())

    def _tp_layout(self, arrays: dict) -> dict:
        """b's output columns get the base kernel's tensor-parallel layout (KV heads replicated, a
        family's regrouped columns: sharding.prepare_params on b as if it were the kernel)."""
        if self.tp == 1:
            return arrays
        from jaxpaged.sharding import prepare_params
        as_params = {"layers": {p.split("/", 1)[1]: {"kernel": b} for p, (_, b) in arrays.items()}}
        _, laid = prepare_params(self.cfg, as_params, self.tp)
        return {p: (a, np.asarray(laid["layers"][p.split("/", 1)[1]]["kernel"])) for p, (a, _) in arrays.items()}
