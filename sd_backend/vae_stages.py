"""The VAE's two stages: INIT_IMAGE to latents (`VAEEncoderStage`, image-to-image and
inpainting) and latents to images (`VAEStage`, every ensemble's last step)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

from . import loading
from .config import DeploymentConfig
from .family import ModelFamily
from .params import GenerationParams, check_params

log = logging.getLogger("sd_backend")


def latent_statistics(family: ModelFamily | None, like):
    """The family's per-channel latents_mean and latents_std as (1, C, 1, 1) tensors on
    `like`'s device and dtype, or None where it has none (all but some SDXL VAEs)."""
    import torch

    if family is None or family.latents_mean is None:
        return None
    return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (family.latents_mean, family.latents_std))


def _upcast_sdxl_vae(vae, dtype, family: ModelFamily):
    """(vae, dtype) as diffusers' SDXL pipelines run the VAE: float32 where its config says
    force_upcast and the deployment's dtype is float16 (SDXL's VAE overflows in float16)."""
    import torch

    if family.is_sdxl and dtype == torch.float16 and vae.config.force_upcast:
        return vae.to(torch.float32), torch.float32
    return vae, dtype


class VAEEncoderStage:
    """INIT_IMAGE to the VAE's latent distribution: image-to-image's first step beside the
    text encoder. Prepared as diffusers' VaeImageProcessor prepares an RGB image (float32
    /255, then 2x - 1) and encoded one image at a time, as the image-to-image pipeline
    encodes each image of a batch (`image[i : i + 1]`), so a request's moments do not depend
    on its batch. The seed's sample of the distribution is the UNet stage's, which owns the
    request's generator."""

    def __init__(self, config: DeploymentConfig, vae, device, dtype, family: ModelFamily):
        self.config = config
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.family = family

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None) -> "VAEEncoderStage":
        source, device, dtype = loading.placement(config, instance_device)
        family = loading.family(source)
        vae, dtype = _upcast_sdxl_vae(loading.load_vae(source, device, dtype), dtype, family)
        return cls(config, vae, device, dtype, family)

    def check(self, image, mask=None, **raw) -> GenerationParams:
        """The request's parameters with INIT_IMAGE's size as the result's, MASK_IMAGE's
        checked against it (raises ValueError)."""
        mask_size = None if mask is None else tuple(mask.shape[:2])
        return check_params(self.config, self.family, image_size=tuple(image.shape[:2]), mask_size=mask_size, inpaint=mask is not None, **raw)

    def __call__(self, images: Sequence[Any]) -> list[Any]:
        """One (2 x latent channels, h/8, w/8) float32 tensor of moments (mean, log-variance) per uint8 image."""
        return [self.encode(image)[0] for image in images]

    def encode(self, image, mask=None) -> tuple[Any, Any, Any]:
        """(INIT_IMAGE's moments, the masked image's moments, the (1, h/8, w/8) latent mask) of
        one request, the last two None without a mask (sd_backend.inpaint)."""
        import numpy as np
        import torch

        from . import inpaint

        with torch.inference_mode():
            # laid out as diffusers' numpy_to_pt lays it ((1, h, w, 3) memory seen as NCHW): the
            # convolutions pick their kernel by the layout, and another one rounds differently
            pixels = torch.from_numpy((image.astype(np.float32) / 255.0)[None].transpose(0, 3, 1, 2))
            pixels = 2.0 * pixels - 1.0
            moments = self._moments(pixels)
            if mask is None:
                return moments, None, None
            condition = inpaint.mask_condition(mask)
            return moments, self._moments(inpaint.masked_pixels(pixels, condition)), inpaint.latent_mask(condition, self.family.vae_scale)[0]

    def _moments(self, pixels):
        return self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters[0].float()


class VAEStage:
    """Decode latents to uint8 RGB images.

    SDXL as diffusers' SDXL pipeline decodes it: in float32 when the VAE's config says
    force_upcast (SDXL's VAE overflows in float16), and denormalized with the VAE's
    latents_mean/latents_std where its config has them."""

    def __init__(self, vae, device, dtype, family: ModelFamily | None = None):
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.family = family
        self.fast_path = None  # sd_backend.fast.runtime.FastPath of the patched VAE

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None) -> "VAEStage":
        source, device, dtype = loading.placement(config, instance_device)
        family = loading.family(source)
        vae, dtype = _upcast_sdxl_vae(loading.load_vae(source, device, dtype), dtype, family)
        stage = cls(vae, device, dtype, family)
        if str(device).startswith("cuda"):
            if config.opt_level != "eager":
                from .fast.levels import optimize_vae_stage

                optimize_vae_stage(stage, config)
            stage.warm_up(config)
            from .fast.load_caches import remember

            remember(stage.fast_path)  # the warm-up met every batch size's shapes
        return stage

    def warm_up(self, config: DeploymentConfig) -> list[int]:
        """Decode the default size at every batch size up to the largest bucket, largest first.

        The dynamic batcher hands the VAE any batch size up to max_batch_size. Decoding each
        once at load lets cuDNN pick its algorithms and the allocator reach its plateau
        before the server reports ready, instead of under load: without it, a mixed
        sequence of batch sizes grew torch's reserved memory from 170 to 7984 MiB on an
        H200 (benchmarks/vae_memory.py), and with it by 0. Returns the sizes decoded.
        """
        import torch

        cfg = self.vae.config
        scale = 2 ** (len(cfg.block_out_channels) - 1)
        height, width = config.default_height or cfg.sample_size, config.default_width or cfg.sample_size
        latent = torch.zeros(1, cfg.latent_channels, height // scale, width // scale)
        sizes = list(range(max(config.batch_buckets), 0, -1))
        for n in sizes:
            self([latent] * n)
        return sizes

    def __call__(self, latents: Sequence[Any]) -> list[Any]:
        """One (height, width, 3) uint8 numpy image per (1, 4, h, w) latent, in order."""
        import torch

        results: list[Any] = [None] * len(latents)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, lat in enumerate(latents):
            by_shape[tuple(lat.shape)].append(i)
        for indices in by_shape.values():
            batch = torch.cat([latents[i].to(self.device, self.dtype) for i in indices])
            with torch.inference_mode():
                images = self.vae.decode(self._denormalize(batch), return_dict=False)[0]
            # diffusers' postprocess: denormalize and clamp, float32 NHWC, then round to uint8
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            images = (images * 255).round().astype("uint8")
            for i, image in zip(indices, images):
                results[i] = image
        return results

    def _denormalize(self, latents):
        scaling = self.vae.config.scaling_factor
        statistics = latent_statistics(self.family, latents)
        if statistics is not None:  # as SDXL's pipeline denormalizes them
            mean, std = statistics
            return latents * std / scaling + mean
        return latents / scaling
