"""Which Stable Diffusion family a model directory holds, read from its own configs.

No setting names the family, so none can be set wrong: the UNet's `addition_embed_type`
"text_time" is SDXL (two text encoders, pooled embedding, micro-conditioning time ids);
otherwise one CLIP text encoder (SD 1.x, or SD 2.x when its cross-attention width is
OpenCLIP-H's). The scheduler config gives the prediction type and the UNet's sample size
times the VAE's scale the native image side; the VAE's config its latent scaling (and,
for SDXL, whose pipelines apply it, its latent normalization).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .schedulers import name_of

SDXL_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd1", "sd2" or "sdxl"
    native_size: int  # the model's own image side in pixels
    prediction_type: str  # "epsilon" or "v_prediction"
    pooled_dim: int = 0  # SDXL: width of text_encoder_2's projected (pooled) embedding
    zero_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: no NEGATIVE_PROMPT is zeros, not ""
    scheduler: str = "pndm"  # the request name of the scheduler its own config names (PNDM if none here)
    vae_scale: int = 8  # pixels per latent along each side: 2^(VAE blocks - 1)
    latent_scaling: float = 0.18215  # the VAE's scaling_factor
    latents_mean: tuple[float, ...] | None = None  # SDXL: the VAE's per-channel latent normalization,
    latents_std: tuple[float, ...] | None = None  # where its config has one (SD 1.x/2.x pipelines ignore it)
    latent_channels: int = 4  # the VAE's
    inpainting_unet: bool = False  # the UNet reads latents + mask + masked image's latents (9 channels)

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def min_size(self) -> int:
        """The smallest side this family is served at: SDXL falls apart below half its
        native side (diffusers' docs: below 512 for 1024-native SDXL), so it is refused there."""
        return self.native_size // 2 if self.is_sdxl else 0

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The (tokenizer, text encoder) subfolder suffixes: "" and, for SDXL, "_2"."""
        return ("", "_2") if self.is_sdxl else ("",)


def _config(source: Path, folder: str, name: str = "config.json") -> dict:
    path = source / folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"model: {source} has no {folder}/{name}; it is not a diffusers Stable Diffusion directory") from None


def read_family(source: str) -> ModelFamily:
    """The family of the diffusers directory `source` (raises ValueError naming what is inconsistent)."""
    root = Path(source)
    unet, vae = _config(root, "unet"), _config(root, "vae")
    scheduler = _config(root, "scheduler", "scheduler_config.json")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    common = dict(
        native_size=unet["sample_size"] * scale,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        scheduler=name_of(scheduler.get("_class_name", "")) or "pndm",
        vae_scale=scale,
        latent_scaling=float(vae.get("scaling_factor", 0.18215)),  # AutoencoderKL's default
        latent_channels=vae.get("latent_channels", 4),
    )
    channels = unet.get("in_channels", 4)
    if channels == 2 * common["latent_channels"] + 1:  # diffusers' inpainting UNets (SD 1.5/2 inpainting)
        common["inpainting_unet"] = True
    elif channels != common["latent_channels"]:
        raise ValueError(
            f"model: {source}: the UNet reads {channels} channels; served: {common['latent_channels']} (the VAE's latents) "
            f"or {2 * common['latent_channels'] + 1} (an inpainting UNet: latents, mask and the masked image's latents)"
        )
    if unet.get("addition_embed_type") == "text_time":
        if common.get("inpainting_unet"):
            raise ValueError(f"model: {source}: an SDXL inpainting UNet is not served (SD 1.x/2.x inpainting UNets are)")
        text_2 = _config(root, "text_encoder_2")
        pooled = text_2.get("projection_dim", 0)
        expected = unet["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * unet["addition_time_embed_dim"]
        if pooled != expected:
            raise ValueError(
                f"model: {source}: text_encoder_2 projects to {pooled} but the UNet's add_embedding expects "
                f"a pooled embedding of {expected} (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)"
            )
        index = _config(root, ".", "model_index.json")
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        if mean is not None and std is not None:
            common |= dict(latents_mean=tuple(mean), latents_std=tuple(std))
        return ModelFamily("sdxl", pooled_dim=pooled, zero_negative=bool(index.get("force_zeros_for_empty_prompt", True)), **common)
    if unet.get("addition_embed_type") is not None:
        raise ValueError(f"model: {source}: the UNet's addition_embed_type {unet['addition_embed_type']!r} is not served; allowed: none (SD 1.x/2.x) or 'text_time' (SDXL)")
    return ModelFamily("sd2" if unet.get("cross_attention_dim") == 1024 else "sd1", **common)
