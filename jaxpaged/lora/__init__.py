"""Multi-LoRA serving: many PEFT adapters on one base model, batched in one step.

  request.py      LoRARequest (vLLM's names)
  modules.py      which Linears take adapters: the family's CHECKPOINT_TABLE decoder kernels
  peft_loader.py  adapter_config.json + adapter_model.safetensors -> padded host arrays (numpy)
  registry.py     LoRARegistry: the engine's loaded adapters (LoadedLoRA, keyed per load)
  slots.py        SlotLRU: adapter -> device slot, LRU eviction, the step's adapters pinned
  device.py       LoRADeviceSlots: fixed-shape slot stacks on the device, filled by a jitted update
  weight.py       LoRAWeight: the kernel weight type whose matmul adds each row's adapter delta
"""
from jaxpaged.lora.request import LoRARequest

__all__ = ["LoRARequest"]
