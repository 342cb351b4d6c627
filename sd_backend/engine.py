"""The three stages in one process: what the ensemble does, without the server.

Used by the benchmarks (in-process against served) and for quick experiments.
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import DeploymentConfig
from .stages import DenoiseJob, TextEncoderStage, UNetStage, VAEStage


class Engine:
    def __init__(self, config: DeploymentConfig):
        self.config = config
        self.text_encoder = TextEncoderStage.from_config(config)
        self.unet = UNetStage.from_config(config)
        self.vae = VAEStage.from_config(config)

    def latents(self, prompts: Sequence[str], negatives: Sequence[str] | None = None, **params: Any) -> list:
        """Final latents per prompt; `params` as the ensemble's inputs (seed may be a list)."""
        negatives = list(negatives) if negatives is not None else [None] * len(prompts)  # None: no NEGATIVE_PROMPT
        seeds = params.pop("seed", None)
        seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds] * len(prompts)
        checked = [self.unet.check(seed=seed, **params) for seed in seeds]
        encoded = self.text_encoder(prompts, negatives, [(p.lora, p.lora_scale) for p in checked])
        jobs = [DenoiseJob(p, e.prompt_embeds, e.negative_embeds, e.pooled, e.negative_pooled) for p, e in zip(checked, encoded)]
        return self.unet(jobs)

    def generate(self, prompts: Sequence[str], negatives: Sequence[str] | None = None, **params: Any) -> list:
        """uint8 (height, width, 3) images per prompt."""
        return self.vae(self.latents(prompts, negatives, **params))
