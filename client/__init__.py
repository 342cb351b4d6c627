"""Client for the `stable_diffusion` ensemble: Python API (`SDClient`) and the `sd-client` CLI."""

from .api import Cancelled, GenerationResult, Progress, SDClient, ServerUnreachable, lora_choices, save_png

__all__ = ["Cancelled", "GenerationResult", "Progress", "SDClient", "ServerUnreachable", "lora_choices", "save_png"]
