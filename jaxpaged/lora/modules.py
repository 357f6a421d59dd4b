"""Which Linear layers of a model family take LoRA deltas, read from the family file's CHECKPOINT_TABLE.

Every stacked decoder kernel row of the table (`layers/<name>/kernel`, a per-layer HF name with "{i}")
is a LoRA target: its HF module name (the table's name without ".weight", e.g.
`model.layers.{i}.self_attn.q_proj` or GPT-2's `h.{i}.attn.c_attn`) is what PEFT's adapter tensors
are named after, and its shape function gives (in, out). So a family file needs nothing LoRA-specific:
adding a family adds its targets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from jaxpaged.config import ModelConfig


@dataclass(frozen=True)
class LoRAModule:
    path: str                  # the Linear's module path in the model, e.g. "layers/q_proj"
    hf_name: str               # HF module name with "{i}" for the layer, e.g. "model.layers.{i}.self_attn.q_proj"
    pattern: re.Pattern        # matches an HF module name of one layer; group 1 = the layer index
    d_in: int
    d_out: int

    @property
    def suffix(self) -> str:
        """The name after the layer index ("self_attn.q_proj"): what PEFT's target_modules names."""
        return self.hf_name.split("{i}.", 1)[1]


def lora_modules(cfg: ModelConfig) -> dict[str, LoRAModule]:
    """{module path: LoRAModule} of every stacked decoder Linear of cfg's family, in table order.
    (in, out) come from the table's shape functions evaluated on `cfg` (after any TP layout change
    of the config, the device shapes; on the checkpoint's config, the file's)."""
    out = {}
    for hf, path, _, shape, when in cfg.family.CHECKPOINT_TABLE:
        if "{i}" not in hf or not path.startswith("layers/") or not path.endswith("/kernel"):
            continue
        if when is not None and not (getattr(cfg, when[1:]) is False if when.startswith("!")
                                     else getattr(cfg, when)):
            continue
        module = path[: -len("/kernel")]
        name = hf[: -len(".weight")]
        regex = re.compile(re.escape(name).replace(re.escape("{i}"), r"(\d+)") + "$")
        d_in, d_out = shape(cfg)
        out[module] = LoRAModule(module, name, regex, d_in, d_out)
    return out


def match_target(modules: dict[str, LoRAModule], target: str) -> list[LoRAModule]:
    """The modules a PEFT target_modules entry names: PEFT matches a name against the end of the
    module's dotted name ("q_proj" -> self_attn.q_proj, "c_proj" -> attn.c_proj and mlp.c_proj)."""
    return [m for m in modules.values() if m.suffix == target or m.suffix.endswith("." + target)]
