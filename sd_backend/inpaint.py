"""Inpainting as diffusers' StableDiffusionInpaintPipeline computes it.

MASK_IMAGE (uint8 (h, w), 255 = repaint) becomes the pipeline's mask condition (/255, then
0 below 0.5 and 1 from it: VaeImageProcessor with do_binarize and do_convert_grayscale);
the masked image is INIT_IMAGE's pixels where the mask is 0 (and 0, mid-gray, where it is
1), encoded by the VAE like INIT_IMAGE; the latent mask is the condition resized to the
latents' size (nearest). Then, per UNet kind (the UNet's own in_channels say which):
- an inpainting UNet (9 channels) reads the latents, the latent mask and the masked image's
  latents side by side at every step;
- a plain UNet (4 channels) denoises the latents alone, and after every step the unmasked
  part is put back: INIT_IMAGE's latents noised to the next step's level, blended by the
  latent mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def mask_condition(mask) -> Any:
    """(1, 1, h, w) float32 of 0 and 1 from a uint8 (h, w) mask, as the pipeline's mask processor
    prepares a grayscale image (the same ops, so the same numbers and memory layout)."""
    import numpy as np
    import torch

    condition = torch.from_numpy((mask.astype(np.float32) / 255.0)[None, ..., None].transpose(0, 3, 1, 2))
    condition[condition < 0.5] = 0
    condition[condition >= 0.5] = 1
    return condition


def masked_pixels(pixels, condition):
    """The pipeline's masked image: the pixels where the mask is 0."""
    return pixels * (condition < 0.5)


def latent_mask(condition, scale: int):
    """(1, 1, h/scale, w/scale): the condition resized to the latents, as prepare_mask_latents does."""
    import torch

    return torch.nn.functional.interpolate(condition, size=(condition.shape[-2] // scale, condition.shape[-1] // scale))


@dataclasses.dataclass
class Inpainting:
    """What one group's loop needs beyond its latents.

    mask: (rows, 1, h, w) latent masks, rows as the UNet's (both halves under guidance).
    masked: (rows, C, h, w) the masked images' latents (an inpainting UNet's extra input).
    image_latents: (B, C, h, w) INIT_IMAGE's latents, and noise: (B, C, h, w) the initial
    noise, for a plain UNet's blend (None for an inpainting UNet).
    """

    mask: Any
    masked: Any
    image_latents: Any = None
    noise: Any = None

    @property
    def concat(self) -> bool:
        """Whether the UNet reads mask and masked latents (an inpainting UNet) rather than blending."""
        return self.image_latents is None

    def unet_input(self, model_input):
        import torch

        return torch.cat([model_input, self.mask, self.masked], dim=1) if self.concat else model_input

    def blend(self, latents, scheduler, timesteps, index: int):
        """A plain UNet's latents after step `index`, the unmasked part put back."""
        if self.concat:
            return latents
        import torch

        init_mask = self.mask[: latents.shape[0]]  # the first half under guidance: both halves are equal
        proper = self.image_latents
        if index < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[index + 1]]))
        return (1 - init_mask) * proper + init_mask * latents

    def keep_rows(self, start: int) -> None:
        """Keep the rows from `start` on (a guidance cutoff keeps the conditional half)."""
        self.mask, self.masked = self.mask[start:], self.masked[start:]
