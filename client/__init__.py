"""Client for the `stable_diffusion` ensemble: Python API (`SDClient`) and the `sd-client` CLI."""

from .api import GenerationResult, SDClient, save_png

__all__ = ["GenerationResult", "SDClient", "save_png"]
