"""LoRA adapters chosen per request: `LORA` names one of the deployment's `lora_choices`,
`LORA_SCALE` weights it.

Every choice is loaded at load time through diffusers' own loaders (diffusers/PEFT and kohya
files, as `sd_backend.lora`), then PEFT's wrappers are taken out of the model again and kept
aside: the model's modules stay plain, so the fast path patches and captures an ordinary
model. Choosing an adapter rewrites the adapted weights in place: each one goes back to its
weight at load, then gets PEFT's own merge of the chosen adapter at the chosen scale, the
arithmetic of `pipe.load_lora_weights(file)` + `pipe.fuse_lora(lora_scale=scale)`. The
tensors keep their storage, so the captured CUDA graphs, which read the weights where they
are at every replay, stay valid. The UNet and the text encoder switch when a batch's group
asks for another adapter than the last one: a request costs nothing per step, a switch one
pass over the adapted weights (benchmarks/NOTES.md has the figures).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from .lora import LoraSpec, parse_loras

NO_ADAPTER = ""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_lora_choices(entries: Sequence[str]) -> dict[str, LoraSpec]:
    """`lora_choices` entries (`"name=file.safetensors"`, or a file whose stem is its name) as
    {name: spec}; ValueError naming the entry for a bad name, a duplicate or a missing file.
    A `:scale` after the file is the scale a request gets when it leaves LORA_SCALE out."""
    choices: dict[str, LoraSpec] = {}
    for entry in entries:
        name, sep, file = entry.partition("=")
        if not sep:
            name, file = "", entry
        (spec,) = parse_loras([file])
        if not name:
            name = spec.file.rsplit("/", 1)[-1].removesuffix(".safetensors")
        if not _NAME.fullmatch(name):
            raise ValueError(f"lora_choices: {entry!r}: {name!r} is not a name (letters, digits, '_', '.', '-')")
        if name in choices:
            raise ValueError(f"lora_choices: {entry!r}: the name {name!r} is given twice")
        choices[name] = spec
    return choices


@dataclasses.dataclass
class _Adapted:
    layer: object  # PEFT's LoraLayer, out of the model, holding every choice adapting its base layer
    weight: object  # the base layer's weight at load (deployment-fused adapters included)
    bias: object  # and its bias, or None


class AdapterSwitch:
    """The preloaded choices of one model component ("unet", "text_encoder", "text_encoder_2")."""

    def __init__(self, model, component: str, choices: Mapping[str, LoraSpec], sdxl: bool):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .lora import load_adapter

        self.choices = dict(choices)
        self.current = (NO_ADAPTER, 1.0)
        self._adapted: list[_Adapted] = []
        for name, spec in self.choices.items():
            load_adapter(model, component, spec.file, _adapter_name(name), sdxl)
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    base = child.get_base_layer()
                    setattr(parent, child_name, base)  # the model is plain again
                    bias = getattr(base, "bias", None)
                    self._adapted.append(_Adapted(child, base.weight.detach().clone(), None if bias is None else bias.detach().clone()))

    def select(self, name: str, scale: float) -> bool:
        """Make the weights those of adapter `name` at `scale` (NO_ADAPTER: the weights at
        load); True when they changed. Raises KeyError for a name not preloaded."""
        import torch

        if name != NO_ADAPTER and name not in self.choices:
            raise KeyError(name)
        wanted = (name, float(scale) if name != NO_ADAPTER else 1.0)
        if wanted == self.current:
            return False
        adapter = _adapter_name(name)
        with torch.no_grad():
            for item in self._adapted:
                layer, base = item.layer, item.layer.get_base_layer()
                touched = {self.current[0], name} & {n for n in self.choices if _adapter_name(n) in layer.lora_A}
                if not touched:
                    continue  # neither the last adapter nor this one adapts it
                base.weight.copy_(item.weight)
                if item.bias is not None:
                    base.bias.copy_(item.bias)
                layer.merged_adapters.clear()
                if name != NO_ADAPTER and adapter in layer.lora_A:
                    # diffusers' fuse_lora(lora_scale=s) after load_lora_weights: scaling
                    # alpha / r (set_scale 1), times s (scale_layer), then PEFT's merge
                    layer.set_scale(adapter, 1.0)
                    layer.scaling[adapter] *= wanted[1]
                    layer.merge(adapter_names=[adapter])
        self.current = wanted
        return True


def _adapter_name(name: str) -> str:
    return f"choice_{name}"
