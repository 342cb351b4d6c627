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
    proper: Any = None  # a plain UNet's (steps, B, C, h, w): what the blend puts back after each step (prepare_blend)

    @property
    def concat(self) -> bool:
        """Whether the UNet reads mask and masked latents (an inpainting UNet) rather than blending."""
        return self.image_latents is None

    def unet_input(self, model_input):
        import torch

        return torch.cat([model_input, self.mask, self.masked], dim=1) if self.concat else model_input

    def prepare_blend(self, scheduler, timesteps) -> None:
        """A plain UNet's blend targets, made before the loop: after step i the pipeline puts back
        INIT_IMAGE's latents noised to timesteps[i + 1] (the image itself after the last step) by
        the scheduler's add_noise, which Euler's and DPM++'s read at their step index, then
        begin index + i + 1; it is set so for each, so every row is the pipeline's to the bit.
        The loop only reads the table (a captured loop holds it as a static input)."""
        if self.concat:
            return
        import torch

        keeps_index = hasattr(scheduler, "_step_index")  # diffusers' schedulers with a step index (pinned)
        saved = getattr(scheduler, "_step_index", None)
        begin = getattr(scheduler, "begin_index", None) or 0
        rows = []
        try:
            for index in range(len(timesteps) - 1):
                if keeps_index:
                    scheduler._step_index = begin + index + 1
                rows.append(scheduler.add_noise(self.image_latents, self.noise, torch.tensor([timesteps[index + 1]])))
        finally:
            if keeps_index:
                scheduler._step_index = saved
        self.proper = torch.stack(rows + [self.image_latents])

    def blend(self, latents, index: int):
        """A plain UNet's latents after step `index`, the unmasked part put back."""
        if self.concat:
            return latents
        init_mask = self.mask[: latents.shape[0]]  # the first half under guidance: both halves are equal
        return (1 - init_mask) * self.proper[index] + init_mask * latents

    def keep_rows(self, start: int) -> None:
        """Keep the rows from `start` on (a guidance cutoff keeps the conditional half)."""
        self.mask = self.mask[start:]
        if self.masked is not None:
            self.masked = self.masked[start:]
