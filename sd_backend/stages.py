"""The three stages of Stable Diffusion, each what one Triton model runs.

Reads like diffusers' `StableDiffusionPipeline.__call__`, split where the ensemble
splits it: encode the prompt (`TextEncoderStage`), prepare latents and denoise
(`UNetStage`), decode (`VAEStage`). Each stage takes a list of requests (one dynamic
batch) and returns one result per request, in order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, Sequence

from . import loading
from .config import DeploymentConfig
from .denoise import denoise, prepare_latents
from .params import GenerationParams, check_params
from .schedulers import make_scheduler

log = logging.getLogger("sd_backend")


@dataclasses.dataclass
class EncodedPrompt:
    """Text-encoder output for one request."""

    prompt_embeds: Any  # (77, hidden) torch tensor
    negative_embeds: Any  # (77, hidden) torch tensor
    dropped_tokens: int  # prompt tokens cut off at the tokenizer's 77-token limit


@dataclasses.dataclass
class DenoiseJob:
    """UNet-stage input for one request."""

    params: GenerationParams
    prompt_embeds: Any  # (77, hidden)
    negative_embeds: Any  # (77, hidden)


class TextEncoderStage:
    """Tokenize and encode prompts and negative prompts with CLIP.

    The ensemble's first step, so it also checks the whole request (`check`) before any
    work: a bad request fails here, not after waiting in the UNet's queue.
    """

    def __init__(self, config: DeploymentConfig, tokenizer, text_encoder, device, native_size: int):
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.native_size = native_size

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None) -> "TextEncoderStage":
        source, device, dtype = loading.placement(config, instance_device)
        text_encoder = loading.load_text_encoder(source, device, dtype)
        return cls(config, loading.load_tokenizer(source), text_encoder, device, loading.native_size(source))

    def check(self, **raw) -> GenerationParams:
        """The request's generation parameters as the UNet stage will check them (raises ValueError)."""
        return check_params(self.config, self.native_size, **raw)

    def count_dropped_tokens(self, prompt: str) -> int:
        """Tokens past the 77-token limit that truncation removes (diffusers warns of the same)."""
        full = len(self.tokenizer(prompt, truncation=False).input_ids)
        return max(0, full - self.tokenizer.model_max_length)

    def _encode(self, texts: Sequence[str]):
        import torch

        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.inference_mode():
            return self.text_encoder(ids.to(self.device))[0]  # (n, 77, hidden)

    def __call__(self, prompts: Sequence[str], negatives: Sequence[str]) -> list[EncodedPrompt]:
        embeds = self._encode(list(prompts) + list(negatives))
        n = len(prompts)
        results = []
        for i, prompt in enumerate(prompts):
            dropped = self.count_dropped_tokens(prompt)
            if dropped:
                log.warning("prompt truncated to %d tokens: %d dropped", self.tokenizer.model_max_length, dropped)
            results.append(EncodedPrompt(embeds[i], embeds[n + i], dropped))
        return results


class UNetStage:
    """Prepare latents and run the whole denoising loop for a dynamic batch.

    Requests that differ in steps, size, scheduler or use of guidance are grouped;
    each group runs as one batch (split at the largest batch bucket).
    """

    def __init__(self, config: DeploymentConfig, unet, scheduler_config, vae_scale: int, device, dtype, native_size: int):
        self.config = config
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.vae_scale = vae_scale
        self.device = device
        self.dtype = dtype
        self.native_size = native_size
        self.graphs = None  # sd_backend.fast.graphs.LoopGraphs on the `triton` and `deepspeed` levels
        self.fast_path = None  # sd_backend.fast.runtime.FastPath of the patched UNet (its dispatch decisions)

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None, capture: bool = True) -> "UNetStage":
        """`capture=False` skips the whole-loop CUDA graphs of the default request (for a
        loop that runs step by step, as the streaming model's does)."""
        source, device, dtype = loading.placement(config, instance_device)
        unet = loading.load_unet(source, device, dtype)
        scale, native = loading.vae_scale_factor(source), loading.native_size(source)
        stage = cls(config, unet, loading.load_scheduler_config(source), scale, device, dtype, native)
        if config.opt_level != "eager":
            from .fast.levels import optimize_unet_stage

            optimize_unet_stage(stage, capture)
        return stage

    def check(self, **raw) -> GenerationParams:
        """Fill defaults and check one request's parameters (raises ValueError)."""
        return check_params(self.config, self.native_size, **raw)

    def __call__(self, jobs: Sequence[DenoiseJob]) -> list[Any]:
        """One latent tensor (1, 4, h, w) per job, in order."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.params.group_key()].append(i)
        chunk = max(self.config.batch_buckets)
        for indices in groups.values():
            for start in range(0, len(indices), chunk):
                part = indices[start : start + chunk]
                latents = self.run_group([jobs[i] for i in part])
                for i, row in zip(part, latents.split(1)):
                    results[i] = row
        return results

    def run_group(self, jobs: Sequence[DenoiseJob], callback=None):
        """Denoise jobs that share a group key as one batch; returns (B, 4, h, w).
        With a per-step `callback` (see `denoise`) the loop runs step by step, not as a graph."""
        import torch

        params = [job.params for job in jobs]
        first = params[0]
        scheduler = make_scheduler(first.scheduler, self.scheduler_config)
        scheduler.set_timesteps(first.steps, device=self.device)
        latents, generators = prepare_latents(
            params, self.unet.config.in_channels, self.vae_scale, self.device, self.dtype, scheduler.init_noise_sigma
        )
        # inputs may sit on another GPU (the text encoder's instance): move each, then stack
        embeds = torch.stack([job.prompt_embeds.to(self.device, self.dtype) for job in jobs])
        guidance = None
        if first.uses_guidance:
            negatives = torch.stack([job.negative_embeds.to(self.device, self.dtype) for job in jobs])
            embeds = torch.cat([negatives, embeds])  # (2B, 77, hidden): unconditional first, as diffusers
            guidance = torch.tensor([p.guidance for p in params], device=self.device).view(-1, 1, 1, 1)
        captured = self.graphs.find(first, len(jobs)) if self.graphs is not None and callback is None else None
        if captured is not None:
            return captured.run(latents, embeds, guidance, generators)
        return denoise(self.unet, scheduler, latents, embeds, guidance, generators, callback=callback)


class VAEStage:
    """Decode latents to uint8 RGB images."""

    def __init__(self, vae, device, dtype):
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.fast_path = None  # sd_backend.fast.runtime.FastPath of the patched VAE

    @classmethod
    def from_config(cls, config: DeploymentConfig, instance_device: str | None = None) -> "VAEStage":
        source, device, dtype = loading.placement(config, instance_device)
        stage = cls(loading.load_vae(source, device, dtype), device, dtype)
        if str(device).startswith("cuda"):
            if config.opt_level != "eager":
                from .fast.levels import optimize_vae_stage

                optimize_vae_stage(stage, config)
            stage.warm_up(config)
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
                images = self.vae.decode(batch / self.vae.config.scaling_factor, return_dict=False)[0]
            # diffusers' postprocess: denormalize and clamp, float32 NHWC, then round to uint8
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            images = (images * 255).round().astype("uint8")
            for i, image in zip(indices, images):
                results[i] = image
        return results
