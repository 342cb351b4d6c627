"""LoRA adapters of a deployment, fused into the weights at load.

`lora` in deployment.toml lists adapter files (`"file"` or `"file:scale"`, scale 1 when
left out), in the formats users have: diffusers/PEFT and kohya (AUTOMATIC1111, ComfyUI,
civitai) `.safetensors`, read by diffusers' own loader (`lora_state_dict` converts kohya's
names). Each stage loads every adapter for what it holds, weights each by its scale and
fuses them together, as `pipe.load_lora_weights(file, adapter_name=...)` for each, then
`pipe.set_adapters(names, adapter_weights=scales)` and `pipe.fuse_lora()` do (fusing one
before loading the next would not do: PEFT unfuses a fused adapter when another is loaded),
then drops PEFT's wrappers (diffusers' unload after a fuse):
the fused weights stay, the modules are plain again, so the fast path and the captured
graphs see an ordinary model and a request pays nothing for the adapters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    file: str
    scale: float = 1.0


def parse_loras(entries: Sequence[str]) -> tuple[LoraSpec, ...]:
    """`lora` entries as specs; ValueError naming the entry for a missing file or a bad scale."""
    specs = []
    for entry in entries:
        file, scale = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                file, scale = head, float(tail)
            except ValueError:
                pass  # a ':' inside the path
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"lora: {entry!r}: no such file (an adapter .safetensors, optionally followed by :scale)")
        specs.append(LoraSpec(str(path), scale))
    return tuple(specs)


def _loader(sdxl: bool):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin


def load_adapter(model, component: str, file: str, name: str, sdxl: bool) -> None:
    """Load `file`'s part for `component` into `model` as PEFT adapter `name` (unfused), with
    diffusers' loader (kohya names converted); a file without a part for it adds nothing."""
    loader = _loader(sdxl)
    state, alphas = loader.lora_state_dict(file)
    if component == "unet":
        loader.load_lora_into_unet(state, alphas, unet=model, adapter_name=name)
    else:
        loader.load_lora_into_text_encoder(state, alphas, text_encoder=model, prefix=component, adapter_name=name)


def fuse_loras(model, component: str, loras: Sequence[LoraSpec], sdxl: bool) -> None:
    """Fuse every adapter's part for `component` ("unet", "text_encoder", "text_encoder_2") into
    `model`, each weighted by its scale; a file without a part for it changes nothing there."""
    if not loras:
        return
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    # every adapter loaded before any is fused: loading one into a model with a fused adapter
    # makes PEFT unfuse that one first (its contribution would be lost at the unload)
    for index, spec in enumerate(loras):
        name = f"deployment_{index}"
        load_adapter(model, component, spec.file, name, sdxl)
        if any(isinstance(m, BaseTunerLayer) and name in m.lora_A for m in model.modules()):
            names.append((name, spec.scale))  # else this file adapts other components only
    if not names:
        return
    # all active at their own scales, then fused together (diffusers' set_adapters + fuse_lora)
    # then PEFT's wrappers dropped: the fused weights stay, the modules are plain again
    adapters, scales = [n for n, _ in names], [s for _, s in names]
    if component == "unet":
        model.set_adapters(adapters, weights=scales)
        model.fuse_lora(lora_scale=1.0, adapter_names=adapters)
        model.unload_lora()
    else:
        set_weights_and_activate_adapters(model, adapters, scales)
        fuse_text_encoder_lora(model, lora_scale=1.0, adapter_names=adapters)
        _remove_text_encoder_monkey_patch(model)
