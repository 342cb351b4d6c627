"""The denoising loop of diffusers' pipeline and its initial noise, shared by the UNet
stage and the fast path's captured loops."""

from __future__ import annotations

from typing import Sequence

from .deepcache import DeepCache, full_steps
from .params import GenerationParams
from .schedulers import step_kwargs


def prepare_latents(params: Sequence[GenerationParams], channels: int, scale: int, device, dtype, init_sigma):
    """Initial noise, one CPU generator per image, so a seed gives the same noise alone or batched."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in params]
    first = params[0]
    shape = (len(params), channels, first.height // scale, first.width // scale)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    return latents * init_sigma, generators


def denoise(
    unet, scheduler, latents, embeds, guidance, generators, unet_timesteps=None, callback=None, step_constants=None,
    added_cond_kwargs=None, timesteps=None, guidance_cutoff: float = 1.0, cache_interval: int = 1, cache_branch: int = 0,
    inpaint=None,
):
    """The denoising loop of diffusers' pipeline, with a guidance scale per image.

    `embeds` is (2B, 77, hidden) negatives first when `guidance` is given (classifier-free
    guidance), else (B, 77, hidden); `guidance` is (B, 1, 1, 1) or None; `added_cond_kwargs`
    is SDXL's {"text_embeds": (rows, pooled), "time_ids": (rows, 6)}, rows as `embeds`'.
    `timesteps`, when given, is the part of the scheduler's timesteps the loop runs
    (image-to-image starts part way, the scheduler's begin index set to match).
    `guidance_cutoff` below 1 stops guidance after the step at int(steps x cutoff), as
    diffusers' SDCFGCutoffCallback / SDXLCFGCutoffCallback do: the later steps run the
    conditional rows alone, guidance 0 (not with step_constants: their tables hold every row).
    `cache_interval` above 1 runs the whole UNet at every cache_interval-th step only and its
    shallow branch `cache_branch` in between, as DeepCache's DeepCacheSDHelper
    (sd_backend.deepcache; not with step_constants either). `inpaint`, when given, is the
    group's sd_backend.inpaint.Inpainting: the UNet's extra inputs or the blend after each
    step, as diffusers' StableDiffusionInpaintPipeline. `unet_timesteps`,
    when given, holds the UNet's timestep for each step (a device tensor made before a
    CUDA-graph capture); the scheduler always gets its own. `callback(index, count, latents)`,
    when given, runs after each of the `count` steps (progress, previews; it raises to stop
    the loop). `step_constants`, when given, is the sd_backend.fast StepConstants made from
    this loop's `unet_timesteps`, `embeds` and `added_cond_kwargs`: it makes the UNet calls.
    PNDM runs one more UNet step than asked for, as in diffusers.
    """
    import torch

    extra = step_kwargs(scheduler, generators)
    with torch.inference_mode():
        timesteps = scheduler.timesteps if timesteps is None else timesteps
        cutoff = int(len(timesteps) * guidance_cutoff) if guidance is not None else len(timesteps)
        if cutoff < len(timesteps) and step_constants is not None:
            raise ValueError("denoise: a guidance cutoff needs the loop without step constants")
        deep_cache = None
        if cache_interval > 1:
            if step_constants is not None:
                raise ValueError("denoise: DeepCache needs the loop without step constants")
            deep_cache = DeepCache(unet, full_steps(scheduler.timesteps, timesteps, cache_interval), cache_branch)
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guidance is not None else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if inpaint is not None:
                model_input = inpaint.unet_input(model_input)
            unet_t = t if unet_timesteps is None else unet_timesteps[i]
            if step_constants is not None:
                noise = step_constants.unet_step(i, model_input)
            elif deep_cache is not None:
                noise = deep_cache(i, model_input, unet_t, embeds, added_cond_kwargs)
            else:
                noise = unet(model_input, unet_t, encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
            if guidance is not None:
                uncond, cond = noise.chunk(2)
                noise = (uncond + guidance * (cond - uncond)).to(latents.dtype)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if inpaint is not None:
                latents = inpaint.blend(latents, i)
            if i == cutoff:  # the conditional half of every row set from here on (negatives come first)
                rows = embeds.shape[0] // 2
                embeds, guidance = embeds[rows:], None
                if deep_cache is not None:
                    deep_cache.keep_rows(rows)
                if inpaint is not None:
                    inpaint.keep_rows(rows)
                if added_cond_kwargs is not None:
                    added_cond_kwargs = {name: value[rows:] for name, value in added_cond_kwargs.items()}
            if callback is not None:
                callback(i, len(timesteps), latents)
    return latents
