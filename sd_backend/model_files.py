"""What a diffusers Stable Diffusion directory must hold for the stages to load it, and the
error for a model that cannot be had."""

from __future__ import annotations

from pathlib import Path

REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
)
WEIGHTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ModelUnavailable(ValueError):
    """The model a deployment names cannot be had; the message says why and what to do."""


def check_model_dir(path: Path) -> None:
    """Raise ModelUnavailable naming every file of a diffusers Stable Diffusion directory that is missing."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    missing += [
        f"{component}/{stem}.safetensors (or .bin)"
        for component, stem in WEIGHTS.items()
        if not any((path / component / f"{stem}{suffix}").is_file() for suffix in (".safetensors", ".bin"))
    ]
    if not (path / "tokenizer" / "tokenizer.json").is_file():
        missing += [f"tokenizer/{name}" for name in TOKENIZER_FILES if not (path / "tokenizer" / name).is_file()]
    if missing:
        raise ModelUnavailable(
            f"model: {path} is not a diffusers Stable Diffusion directory: missing {', '.join(missing)}"
        )
