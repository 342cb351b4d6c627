"""A deployment's model files on this machine, resolved once, before any server starts.

`local_model(config)` turns what `model` names into a local diffusers directory:
- an offline model (`tiny`, `sd15-random`): written into the cache on first use;
- a directory: checked to hold what the stages load (the error names the missing file);
- a single-file checkpoint (`.safetensors`, `.ckpt`): converted once into the cache
  (sd_backend.checkpoints);
- a hub id (`owner/name`): downloaded once into `<cache_dir>/hub` with a progress bar, only
  the files the stages load. A model that cannot be had fails in seconds with one line
  naming it and what to do.

`sd-triton serve` calls it with progress before tritonserver starts and then gives the
model stubs `HF_HUB_OFFLINE=1`: each resolves the same id from the same cache without
reaching for the network, and no stub downloads on its own.
"""

from __future__ import annotations

from pathlib import Path

from .config import DeploymentConfig
from .hub import download
from .model_files import CHECKPOINT_SUFFIXES, ModelUnavailable, check_model_dir
from .offline import OFFLINE_MODELS, write_offline_model

__all__ = ["ModelUnavailable", "local_model"]


def local_model(config: DeploymentConfig, progress: bool = False) -> Path:
    """The local diffusers directory of `config.model` (see the module docstring)."""
    model = config.model
    if model in OFFLINE_MODELS:
        return write_offline_model(model, Path(config.cache_dir) / model)
    path = Path(model).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if path.suffix in CHECKPOINT_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ModelUnavailable(f"model: {model} does not exist")
        from .checkpoints import converted_checkpoint

        return converted_checkpoint(path, Path(config.cache_dir), progress)
    if model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        return download(model, Path(config.cache_dir) / "hub", progress)
    raise ModelUnavailable(
        f"model: {model!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}), a directory, a "
        f"{' or '.join(CHECKPOINT_SUFFIXES)} checkpoint, nor a Hugging Face hub id of the form owner/name"
    )
