"""The UNet's time embedding, taking a captured loop's precomputed row when one is bound.

Within one loop the timesteps are known before the first step, so
sd_backend.fast.step_constants computes time_proj and time_embedding for every step at once
and binds each call's row here (`loop_row`) for the duration of that UNet call. Unbound,
both compute what diffusers' Timesteps and TimestepEmbedding compute.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps


class TritonTimesteps(Timesteps):
    loop_row: torch.Tensor | None = None  # (dim,) this step's sinusoidal projection, when bound

    def forward(self, timesteps):
        if self.loop_row is None:
            return super().forward(timesteps)
        return self.loop_row.expand(len(timesteps), -1)


class TritonTimestepEmbedding(TimestepEmbedding):
    loop_row: torch.Tensor | None = None  # (time_embed_dim,) this step's embedding, when bound

    def forward(self, sample, condition=None):
        if self.loop_row is None:
            return super().forward(sample, condition)
        if condition is not None:
            raise ValueError("TritonTimestepEmbedding: a loop's time-embedding table holds no timestep condition")
        return self.loop_row.expand(sample.shape[0], -1)
