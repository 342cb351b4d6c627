"""The three stages of Stable Diffusion, each what one Triton model runs.

Reads like diffusers' `StableDiffusionPipeline.__call__`, split where the ensemble
splits it: encode the prompt (`TextEncoderStage`), prepare latents and denoise
(`UNetStage`), decode (`VAEStage`). Each stage takes a list of requests (one dynamic
batch) and returns one result per request, in order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from typing import Any, Sequence

from . import loading
from .config import DeploymentConfig
from .deepcache import check_branch
from .denoise import denoise, prepare_latents
from .family import ModelFamily
from .lora import fuse_loras, parse_loras
from .lora_choices import AdapterSwitch, parse_lora_choices
from .params import GenerationParams, check_params
from .prompt_encoder import PromptEncoder
from .schedulers import make_scheduler
from .streaming import Cancelled, group_reporter
from .vae_stages import VAEEncoderStage, VAEStage, latent_statistics

__all__ = ["DenoiseJob", "EncodedPrompt", "TextEncoderStage", "UNetStage", "VAEEncoderStage", "VAEStage"]

log = logging.getLogger("sd_backend")


@dataclasses.dataclass
class EncodedPrompt:
    """Text-encoder output for one request (sd_backend.prompt_encoder)."""

    prompt_embeds: Any  # (77, hidden) torch tensor
    negative_embeds: Any  # (77, hidden) torch tensor
    dropped_tokens: int  # prompt tokens cut off at the tokenizer's 77-token limit
    pooled: Any = None  # (pooled width,): SDXL's pooled embedding of the prompt
    negative_pooled: Any = None  # the same of the negative prompt


@dataclasses.dataclass
class DenoiseJob:
    """UNet-stage input for one request."""

    params: GenerationParams
    prompt_embeds: Any  # (77, hidden)
    negative_embeds: Any  # (77, hidden)
    pooled: Any = None  # SDXL: (pooled width,)
    negative_pooled: Any = None
    init_moments: Any = None  # image-to-image: INIT_IMAGE's latent distribution (2 x 4, h, w), VAEEncoderStage's
    masked_moments: Any = None  # inpainting: the masked image's latent distribution, likewise
    latent_mask: Any = None  # inpainting: (1, h, w) 0/1, MASK_IMAGE at the latents' size
    progress: Any = None  # the streaming model's request: its sd_backend.streaming.JobProgress


class TextEncoderStage:
    """Tokenize and encode prompts and negative prompts with the model's text encoder(s).

    The ensemble's first step, so it also checks the whole request (`check`) before any
    work: a bad request fails here, not after waiting in the UNet's queue.
    """

    def __init__(self, config: DeploymentConfig, encoder: PromptEncoder, device, switches: Sequence = ()):
        self.config = config
        self.encoder = encoder
        self.family = encoder.family
        self.device = device
        self.switches = tuple(switches)  # sd_backend.lora_choices.AdapterSwitch of each encoder with lora_choices

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None) -> "TextEncoderStage":
        source, device, dtype = loading.placement(config, instance_device)
        family = loading.family(source)
        encoders = loading.load_text_encoders(source, device, dtype, family)
        loras, switches = parse_loras(config.lora), []
        for suffix, (_, text_encoder) in zip(family.text_encoders, encoders):
            fuse_loras(text_encoder, f"text_encoder{suffix}", loras, family.is_sdxl)
            if config.lora_choices:
                switches.append(AdapterSwitch(text_encoder, f"text_encoder{suffix}", parse_lora_choices(config.lora_choices), family.is_sdxl))
        return cls(config, PromptEncoder(encoders, family), device, switches)

    def check(self, **raw) -> GenerationParams:
        """The request's generation parameters as the UNet stage will check them (raises ValueError)."""
        return check_params(self.config, self.family, **raw)

    def __call__(
        self, prompts: Sequence[str], negatives: Sequence[str | None], adapters: Sequence[tuple[str, float]] | None = None
    ) -> list[EncodedPrompt]:
        """A negative of None is an absent NEGATIVE_PROMPT: "" as diffusers takes it, or
        zeros where the model asks for them (SDXL's force_zeros_for_empty_prompt).
        `adapters`: each prompt's (LORA, LORA_SCALE) of lora_choices; prompts that share
        one are encoded together, with the encoders' weights switched to it."""
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for i, adapter in enumerate(adapters or [("", 1.0)] * len(prompts)):
            groups[adapter].append(i)
        results: list[Any] = [None] * len(prompts)
        for (name, scale), indices in groups.items():
            for switch in self.switches:
                switch.select(name, scale)
            for i, encoded in zip(indices, self._encode([prompts[i] for i in indices], [negatives[i] for i in indices])):
                results[i] = encoded
        return results

    def _encode(self, prompts: Sequence[str], negatives: Sequence[str | None]) -> list[EncodedPrompt]:
        import torch

        zero = self.family.zero_negative
        # prompts and negatives in two calls, as diffusers' encode_prompt makes them: a batch
        # of both would round the negatives unlike diffusers does (CPU kernels vary with the batch)
        embeds, pooled = self.encoder(list(prompts))
        encoded = [n or "" for n in negatives if not (zero and n is None)]
        neg_all, neg_pooled_all = self.encoder(encoded) if encoded else (None, None)
        results, row = [], 0
        for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
            if zero and negative is None:
                neg_embeds, neg_pooled = torch.zeros_like(embeds[i]), torch.zeros_like(pooled[i])
            else:
                neg_embeds, neg_pooled, row = neg_all[row], neg_pooled_all[row], row + 1
            dropped = self.encoder.dropped_tokens(prompt)
            if dropped:
                log.warning("prompt truncated to %d tokens: %d dropped", self.encoder.max_tokens, dropped)
            results.append(EncodedPrompt(embeds[i], neg_embeds, dropped, pooled[i], neg_pooled))
        return results


class UNetStage:
    """Prepare latents and run the whole denoising loop for a dynamic batch.

    Requests that differ in steps, size, scheduler or use of guidance are grouped;
    each group runs as one batch (split at the largest batch bucket).
    """

    def __init__(self, config: DeploymentConfig, unet, scheduler_config, vae_scale: int, device, dtype, family: ModelFamily):
        self.config = config
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.vae_scale = vae_scale
        self.device = device
        self.dtype = dtype
        self.family = family
        self.graphs = None  # sd_backend.fast.graphs.LoopGraphs on the `triton` and `deepspeed` levels
        self.fast_path = None  # sd_backend.fast.runtime.FastPath of the patched UNet (its dispatch decisions)
        self.adapters = None  # sd_backend.lora_choices.AdapterSwitch with lora_choices

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None, capture: bool = True) -> "UNetStage":
        """`capture=False` skips capturing the default request's loops at load."""
        source, device, dtype = loading.placement(config, instance_device)
        start = time.perf_counter()
        unet = loading.load_unet(source, device, dtype)
        log.info("UNet weights loaded onto %s in %.1f s", device, time.perf_counter() - start)
        family = loading.family(source)
        fuse_loras(unet, "unet", parse_loras(config.lora), family.is_sdxl)  # before the fast path patches it
        stage = cls(config, unet, loading.load_scheduler_config(source), family.vae_scale, device, dtype, family)
        if config.lora_choices:  # before the fast path too: it patches the plain model the switch leaves
            stage.adapters = AdapterSwitch(unet, "unet", parse_lora_choices(config.lora_choices), family.is_sdxl)
        check_branch(unet, config.cache_branch)  # a deployment setting: wrong for this UNet fails the load
        if config.opt_level != "eager":
            from .fast.levels import optimize_unet_stage

            optimize_unet_stage(stage, capture)
        return stage

    def check(self, **raw) -> GenerationParams:
        """Fill defaults and check one request's parameters (raises ValueError)."""
        return check_params(self.config, self.family, **raw)

    def lora_defaults(self) -> dict[str, float]:
        """{name: scale without LORA_SCALE} of each adapter a request may name in LORA."""
        return {} if self.adapters is None else {name: spec.scale for name, spec in self.adapters.choices.items()}

    def __call__(self, jobs: Sequence[DenoiseJob]) -> list[Any]:
        """One latent tensor (1, 4, h, w) per job, in order; None for a job whose stream
        was cancelled (its progress says so)."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.params.group_key()].append(i)
        chunk = max(self.config.batch_buckets)
        for indices in groups.values():
            for start in range(0, len(indices), chunk):
                part = indices[start : start + chunk]
                try:
                    latents = self.run_group([jobs[i] for i in part])
                except Cancelled:  # every job of the part is a cancelled stream
                    continue
                for i, row in zip(part, latents.split(1)):
                    results[i] = row
        return results

    def run_group(self, jobs: Sequence[DenoiseJob]):
        """Denoise jobs that share a group key as one batch; returns (B, 4, h, w). Jobs with
        progress get a report after every step (on the captured loop where it is one graph
        per step); Cancelled when all of them are streams their clients cancelled."""
        import torch

        params = [job.params for job in jobs]
        first = params[0]
        self._select_adapter(first)
        scheduler = make_scheduler(first.scheduler, self.scheduler_config)
        scheduler.set_timesteps(first.steps, device=self.device)
        timesteps, inpaint = None, None  # all of the scheduler's; no mask
        if first.inpaint:
            latents, generators, timesteps, inpaint = self._inpainting(jobs, scheduler)
        elif first.strength is None:
            latents, generators = prepare_latents(
                params, self.family.latent_channels, self.vae_scale, self.device, self.dtype, scheduler.init_noise_sigma
            )
        else:
            latents, generators, timesteps = self._noised_images(jobs, scheduler)
        embeds, added = self.conditioning(jobs)
        guidance = None
        if first.uses_guidance:
            guidance = torch.tensor([p.guidance for p in params], device=self.device).view(-1, 1, 1, 1)
        callback = group_reporter([job.progress for job in jobs])
        # image-to-image and inpainting replay a loop captured for their start step
        graphed = self.graphs is not None
        captured = self.graphs.find(first, len(jobs), reports=callback is not None) if graphed else None
        if captured is not None:
            return captured.run(latents, embeds, guidance, generators, added, callback=callback, inpaint=inpaint)
        return denoise(
            self.unet, scheduler, latents, embeds, guidance, generators, callback=callback, added_cond_kwargs=added,
            timesteps=timesteps, guidance_cutoff=first.guidance_cutoff, cache_interval=first.cache_interval,
            cache_branch=self.config.cache_branch, inpaint=inpaint,
        )

    def _select_adapter(self, params: GenerationParams) -> None:
        """Switch the UNet's weights to the group's lora_choices adapter (in place: the captured
        loops read them where they are), and the fast path's copies derived from them."""
        if self.adapters is not None and self.adapters.select(params.lora, params.lora_scale) and self.fast_path is not None:
            from .fast.modules.attention import refresh_fused_projections

            refresh_fused_projections(self.unet)

    def _noised_images(self, jobs: Sequence[DenoiseJob], scheduler):
        """(latents, generators, the loop's timesteps) of image-to-image, as diffusers'
        StableDiffusionImg2ImgPipeline prepares them: the loop starts at the params'
        start_step; each image's generator first samples INIT_IMAGE's latent distribution,
        then draws the noise it is blended with at the start step's noise level."""
        from diffusers.utils.torch_utils import randn_tensor

        timesteps, generators = self._start_part_way(jobs, scheduler)
        init = self._image_latents([job.init_moments for job in jobs], generators)
        noise = randn_tensor(init.shape, generator=generators, device=self.device, dtype=self.dtype)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(len(jobs))), generators, timesteps

    def _inpainting(self, jobs: Sequence[DenoiseJob], scheduler):
        """(latents, generators, the loop's timesteps, Inpainting) as diffusers'
        StableDiffusionInpaintPipeline prepares them. Each image's generator samples, in the
        pipeline's order: INIT_IMAGE's latents (where a plain UNet blends them in, or the
        loop starts part way), the initial noise, then the masked image's latents. At
        strength 1 the loop starts from the noise alone."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from .inpaint import Inpainting

        first = jobs[0].params
        timesteps, generators = self._start_part_way(jobs, scheduler)
        blend, full_strength = not self.family.inpainting_unet, first.strength == 1.0
        image = None
        if blend or not full_strength:  # contiguous as the pipeline's (its repeat per prompt copies them so)
            image = self._image_latents([job.init_moments for job in jobs], generators).contiguous()
        shape = (len(jobs), self.family.latent_channels) + tuple(jobs[0].latent_mask.shape[-2:])
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        if full_strength:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image, noise, timesteps[:1].repeat(len(jobs)))
        masked = self._image_latents([job.masked_moments for job in jobs], generators)
        mask = torch.stack([job.latent_mask.to(self.device, self.dtype) for job in jobs])  # (B, 1, h, w)
        if first.uses_guidance:
            mask, masked = torch.cat([mask] * 2), torch.cat([masked] * 2)
        inpainting = Inpainting(mask, masked, image if blend else None, noise if blend else None)
        inpainting.prepare_blend(scheduler, timesteps)
        return latents, generators, timesteps, inpainting

    def _start_part_way(self, jobs: Sequence[DenoiseJob], scheduler):
        """(the loop's timesteps from the params' start_step on, one generator per image),
        the scheduler's begin index set to match, as diffusers' image pipelines do."""
        import torch

        begin = jobs[0].params.start_step * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler.timesteps[begin:], [torch.Generator("cpu").manual_seed(job.params.seed) for job in jobs]

    def _image_latents(self, moments: Sequence[Any], generators):
        """(B, C, h, w): each image's latent distribution sampled with its generator, scaled
        (and, for SDXL, normalized) as diffusers' image pipelines do."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # channels-last, as diffusers' moments are (the encoder's input is laid out so, see
        # VAEEncoderStage): the latents keep that layout through the loop, and the UNet's
        # convolutions round by the layout they get
        # (contiguous first: a size-1 batch dimension's stride can make a view pass for channels-last)
        moments = [m[None].to(self.device, self.dtype).contiguous().contiguous(memory_format=torch.channels_last) for m in moments]
        init = torch.cat([DiagonalGaussianDistribution(m).sample(g) for m, g in zip(moments, generators)])
        statistics = latent_statistics(self.family, init)
        if statistics is not None:  # as SDXL's image-to-image pipeline normalizes them
            mean, std = statistics
            return (init - mean) * self.family.latent_scaling / std
        return self.family.latent_scaling * init

    def conditioning(self, jobs: Sequence[DenoiseJob]):
        """(encoder_hidden_states, added_cond_kwargs) of one group's UNet calls, as diffusers'
        pipelines build them: rows negatives first, then prompts, when the group uses guidance.
        added_cond_kwargs is SDXL's pooled text_embeds and time ids (None for SD 1.x/2.x):
        original size = target size = (HEIGHT, WIDTH), crop top-left (0, 0), the same for
        the negative rows, diffusers' defaults."""
        import torch

        def rows(field: str, negative_field: str):
            # inputs may sit on another GPU (the text encoder's instance): move each, then stack
            fields = (negative_field, field) if jobs[0].params.uses_guidance else (field,)
            return torch.cat([torch.stack([getattr(job, f).to(self.device, self.dtype) for job in jobs]) for f in fields])

        embeds = rows("prompt_embeds", "negative_embeds")
        if not self.family.is_sdxl:
            return embeds, None
        p = jobs[0].params
        time_ids = torch.tensor([[p.height, p.width, 0, 0, p.height, p.width]], device=self.device, dtype=self.dtype)
        return embeds, {"text_embeds": rows("pooled", "negative_pooled"), "time_ids": time_ids.repeat(embeds.shape[0], 1)}
