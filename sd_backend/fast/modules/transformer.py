"""diffusers' Transformer2DModel keeping a channels-last input channels-last.

diffusers turns the blocks' (batch, h*w, C) output into an NCHW-contiguous tensor before
proj_out (a transposing copy, and cuDNN converts back for the channels-last weights). Rows
of (batch, h*w, C) already are a channels-last (batch, C, h, w) tensor, so here the 1x1
projections run as GEMMs on those rows (F.linear with the conv's weight viewed (C_out,
C_in)) and the output is a channels-last view. Mirrors diffusers 0.42's
`_operate_on_continuous_inputs` / `_get_output_for_continuous_inputs`; NCHW inputs, other
projections, autograd and keep_layout off take diffusers' own path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..runtime import FastPath, no_autograd


class TritonTransformer2DModel(Transformer2DModel):
    fast_path: FastPath  # set by patch_model

    def _keeps_layout(self, hidden_states):
        return (
            self.fast_path.options.keep_layout
            and self.fast_path.on_kernel_device(hidden_states)
            and no_autograd(hidden_states)
            and hidden_states.dim() == 4
            and hidden_states.is_contiguous(memory_format=torch.channels_last)
            and (self.use_linear_projection or (is_pointwise(self.proj_in) and is_pointwise(self.proj_out)))
        )

    def _operate_on_continuous_inputs(self, hidden_states):
        if not self._keeps_layout(hidden_states):
            return super()._operate_on_continuous_inputs(hidden_states)
        batch, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not hidden_states.is_contiguous(memory_format=torch.channels_last):
            hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
        rows = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # a view
        hidden_states = self.proj_in(rows) if self.use_linear_projection else pointwise(self.proj_in, rows)
        return hidden_states, hidden_states.shape[-1]

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not self._keeps_layout(residual) or not hidden_states.is_contiguous():
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width, inner_dim)
        hidden_states = self.proj_out(hidden_states) if self.use_linear_projection else pointwise(self.proj_out, hidden_states)
        # (batch, h*w, C) rows are the channels-last (batch, C, h, w) tensor
        hidden_states = hidden_states.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
        return hidden_states + residual


def is_pointwise(conv) -> bool:
    """A plain 1x1 Conv2d: a GEMM over the pixels."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def pointwise(conv, rows):
    """A 1x1 Conv2d applied to (batch, pixels, C_in) rows: (batch, pixels, C_out)."""
    return F.linear(rows, conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)
