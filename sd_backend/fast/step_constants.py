"""Work that is the same at every step of one denoising loop, done once for the loop.

Within a loop the timesteps are known before the first step and the text embeddings never
change, yet the UNet recomputes from them at every call:
- the time embedding (time_proj's sinusoids, then time_embedding's two linears);
- in every ResnetBlock2D, time_emb_proj(silu(emb)) plus conv1's bias;
- in every cross-attention, the keys and values of the text embeddings.

StepConstants computes all of it when it is made (for every step at once: one GEMM per
table) and makes the loop's UNet calls itself, so a call's timestep and embeddings are the
tables' by construction:

    constants = StepConstants(unet, timesteps, embeds)   # inside the loop's CUDA graph
    for i in range(len(timesteps)):
        noise = constants.unet_step(i, latent_input)    # unet(latent_input, timesteps[i], embeds)

For the duration of `unet_step(i, ...)` each patched module that owns a table holds its
row i (`loop_row`, `loop_pre_add`, `loop_kv`); before and after, every module computes as
diffusers' does. For SD 1.5 at batch 2 that is about 90 small kernels fewer per UNet call.
"""

from __future__ import annotations

import contextlib

import torch

from .modules.attention import TritonAttnProcessor
from .modules.embeddings import TritonTimestepEmbedding, TritonTimesteps
from .modules.resnet import TritonResnetBlock2D


class StepConstants:
    """Step-invariant results of one denoising loop (see the module docstring).

    unet: a UNet2DConditionModel patched by sd_backend.fast.modules.patch_model.
    timesteps: (steps,) device tensor, the UNet's timestep of each step.
    embeds: the encoder_hidden_states of every UNet call of the loop, (batch, 77, hidden).
    added_cond_kwargs: SDXL's text_embeds and time_ids of every call (None for SD 1.x/2.x).
    """

    def __init__(self, unet, timesteps: torch.Tensor, embeds: torch.Tensor, added_cond_kwargs: dict | None = None):
        if timesteps.dim() != 1:
            raise ValueError(f"StepConstants: timesteps.shape is {tuple(timesteps.shape)}; allowed: (steps,)")
        self.unet = unet
        self.timesteps = timesteps
        self.embeds = embeds
        self.added_cond_kwargs = added_cond_kwargs
        self._tables: list[tuple[object, str, torch.Tensor]] = []  # (owner, attribute, (steps, ...) table)
        self._constants: list[tuple[object, str, object]] = []  # (owner, attribute, the same value at every step)
        with torch.inference_mode():
            if time_table_applies(unet):
                self._time_tables(unet, timesteps)
            for m in unet.modules():
                processor = getattr(m, "processor", None)
                if isinstance(processor, TritonAttnProcessor) and m.is_cross_attention:
                    self._constants.append((processor, "loop_kv", processor.project_kv(m, embeds)))

    def _time_tables(self, unet, timesteps):
        # get_time_embed reads only the batch size, device and dtype of `sample`
        probe = torch.empty(len(timesteps), device=timesteps.device, dtype=unet.dtype)
        t_emb = unet.get_time_embed(sample=probe, timestep=timesteps)  # (steps, 320), the UNet's dtype
        emb = unet.time_embedding(t_emb)  # (steps, 1280)
        self._tables += [(unet.time_proj, "loop_row", t_emb), (unet.time_embedding, "loop_row", emb)]
        for m in unet.modules():
            if isinstance(m, TritonResnetBlock2D) and m.time_emb_proj is not None and m.time_embedding_norm == "default":
                self._tables.append((m, "loop_pre_add", m.pre_add(emb)))  # (steps, C)

    @property
    def tables(self) -> list[torch.Tensor]:
        """The (steps, ...) tables, in the order `holding` takes their rows."""
        return [table for _, _, table in self._tables]

    def unet_step(self, step: int, sample: torch.Tensor) -> torch.Tensor:
        """The noise prediction unet(sample, timesteps[step], embeds), the tables' rows `step`
        standing in for what they hold."""
        if not 0 <= step < len(self.timesteps):
            raise IndexError(f"StepConstants.unet_step: step {step} is outside the loop's {len(self.timesteps)} steps")
        with self.holding([table[step] for table in self.tables]):
            return self.call(sample, self.timesteps[step])

    def call(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for `sample` at `timestep` on the loop's embeddings
        (inside `holding`, the tables' modules read the rows it gave them)."""
        return self.unet(
            sample, timestep, encoder_hidden_states=self.embeds, added_cond_kwargs=self.added_cond_kwargs, return_dict=False
        )[0]

    @contextlib.contextmanager
    def holding(self, rows: list[torch.Tensor]):
        """Each table's module holds its row in `rows` (one per table, in `tables`' order), each
        constant's module its value; afterwards every module computes as diffusers' does."""
        if len(rows) != len(self._tables):
            raise ValueError(f"StepConstants.holding: {len(rows)} rows for {len(self._tables)} tables")
        for (owner, name, _), row in zip(self._tables, rows):
            setattr(owner, name, row)
        for owner, name, value in self._constants:
            setattr(owner, name, value)
        try:
            yield
        finally:
            for owner, name, _ in self._tables + self._constants:
                setattr(owner, name, None)


def time_table_applies(unet) -> bool:
    """Whether the UNet's time embedding is time_embedding(time_proj(t)) alone, through the patched classes."""
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
