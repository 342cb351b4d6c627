"""Work that is the same at every step of one denoising loop, done once for the loop.

Within a loop the timesteps are known before the first step and the text embeddings never
change, yet the UNet recomputes from them at every call:
- the time embedding (time_proj's sinusoids, then time_embedding's two linears);
- in every ResnetBlock2D, time_emb_proj(silu(emb)) plus conv1's bias;
- in every cross-attention, the keys and values of the text embeddings.

    with LoopConstants(unet, timesteps, embeds) as constants:
        for i, t in enumerate(...):
            constants.step = i  # timesteps[i] is this call's timestep
            unet(latents, timesteps[i], encoder_hidden_states=embeds)

Inside the block the patched UNet takes row `step` of a time-embedding table made for all
steps at once, each fused ResnetBlock2D tail takes row `step` of a (steps, C) table made in
one GEMM over the steps (kernels.patch), and cross-attention on `embeds` computes its keys
and values at the first step and reuses them. For SD 1.5 at batch 2 that is about 90 small
kernels fewer per UNet call. The captured loops use it (sd_backend.optimize); outside the
block every patched module computes as before. SD_LOOP_CONSTANTS=0 turns it off (A/B runs).
"""

from __future__ import annotations

import contextvars
import os
from typing import Callable, Hashable

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

_ACTIVE: contextvars.ContextVar[LoopConstants | None] = contextvars.ContextVar("sd_loop_constants", default=None)


def enabled() -> bool:
    """SD_LOOP_CONSTANTS=0 keeps the per-step computation (read when a loop starts)."""
    return os.environ.get("SD_LOOP_CONSTANTS", "1") != "0"


def active() -> LoopConstants | None:
    """The LoopConstants of the loop running now, or None."""
    return _ACTIVE.get()


class LoopConstants:
    """Step-invariant results of one denoising loop (see the module docstring).

    timesteps: (steps,) device tensor holding the UNet's timestep of each step.
    embeds: the encoder_hidden_states tensor passed to every UNet call of the loop.
    """

    def __init__(self, unet, timesteps: torch.Tensor, embeds: torch.Tensor):
        if timesteps.dim() != 1:
            raise ValueError(f"LoopConstants: timesteps.shape is {tuple(timesteps.shape)}; allowed: (steps,)")
        self.timesteps = timesteps
        self.embeds = embeds
        self.step = 0
        self._memo: dict[Hashable, torch.Tensor] = {}
        self._token = None
        self.emb = None  # (steps, time_embed_dim): the UNet's time embedding at every step
        self._time_proj = self._time_embedding = None
        if _time_table_applies(unet):
            # get_time_embed reads only the batch size, device and dtype of `sample`
            probe = torch.empty(len(timesteps), device=timesteps.device, dtype=unet.dtype)
            with torch.inference_mode():
                self._t_emb = unet.get_time_embed(sample=probe, timestep=timesteps)  # (steps, 320), unet dtype
                self.emb = unet.time_embedding(self._t_emb)  # (steps, 1280)
            self._time_proj, self._time_embedding = unet.time_proj, unet.time_embedding

    def __enter__(self) -> LoopConstants:
        if self._token is not None:
            raise RuntimeError("LoopConstants: already entered")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None
        self._memo.clear()  # the tables belong to this loop only

    def memo(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute() the first time `key` is asked for in this loop, the same tensor after."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def time_row(self, module, timesteps: torch.Tensor) -> torch.Tensor | None:
        """time_proj's output for this step, broadcast over the batch, or None if `module`
        is not the table's time_proj. Raises if the UNet got another timestep than the
        table's row `step` (a loop that forgot to set `step`)."""
        if module is not self._time_proj:
            return None
        expected = self.timesteps[self.step]
        if timesteps.data_ptr() != expected.data_ptr() or timesteps.dim() != 1:
            raise RuntimeError(
                f"LoopConstants: the UNet got a timestep that is not row {self.step} of the loop's "
                f"timesteps; set constants.step before each UNet call and pass timesteps[step]"
            )
        # get_time_embed's cast to the UNet's dtype is then a no-op: the table already has it
        return self._t_emb[self.step].expand(len(timesteps), -1)

    def emb_row(self, module, batch: int) -> torch.Tensor | None:
        """time_embedding's output for this step, (batch, dim), or None if `module` is not the table's."""
        if module is not self._time_embedding:
            return None
        return self.emb[self.step].expand(batch, -1)


def _time_table_applies(unet) -> bool:
    """Whether the time embedding is time_embedding(time_proj(t)) alone, through the patched classes."""
    config = getattr(unet, "config", None)
    return (
        config is not None
        and type(getattr(unet, "time_proj", None)) is TritonTimesteps
        and type(getattr(unet, "time_embedding", None)) is TritonTimestepEmbedding
        and getattr(unet, "class_embedding", None) is None
        and config.get("addition_embed_type") is None
        and getattr(unet, "time_embed_act", None) is None
        and hasattr(unet, "get_time_embed")
    )


class TritonTimesteps(Timesteps):
    """Timesteps (sinusoidal projection) that returns the loop's precomputed row inside a LoopConstants block."""

    def forward(self, timesteps):
        constants = active()
        row = constants.time_row(self, timesteps) if constants is not None else None
        return super().forward(timesteps) if row is None else row


class TritonTimestepEmbedding(TimestepEmbedding):
    """TimestepEmbedding that returns the loop's precomputed row inside a LoopConstants block."""

    def forward(self, sample, condition=None):
        constants = active()
        row = constants.emb_row(self, sample.shape[0]) if constants is not None and condition is None else None
        return super().forward(sample, condition) if row is None else row

