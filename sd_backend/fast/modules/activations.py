"""diffusers' GEGLU with the gate from sd_kernels.geglu (or the projection and gate from
sd_kernels.geglu_linear) on the kernel device."""

from __future__ import annotations

import torch.nn as nn
from diffusers.models.activations import GEGLU

from ..runtime import FastPath, no_autograd
from .norms import NORM_DTYPES


class TritonGEGLU(GEGLU):
    """With fast_path.geglu_linear, the projection and the gate as one GEMM
    (sd_kernels.geglu_linear) where the dispatch finds it faster than the two ops; else the
    projection on torch, then value * gelu(gate) in one kernel."""

    fast_path: FastPath  # set by patch_model

    def forward(self, hidden_states, *args, **kwargs):
        if not (
            self.fast_path.on_kernel_device(hidden_states)
            and hidden_states.dtype in NORM_DTYPES
            and no_autograd(hidden_states, *self.proj.parameters())
        ):
            return self.torch_gate(self.proj(hidden_states))
        if (
            self.fast_path.options.geglu_linear
            and type(self.proj) is nn.Linear  # a wrapper's forward (an adapter) would be skipped
            and self.proj.weight.dtype == hidden_states.dtype
        ):
            from sd_kernels import geglu_linear

            return self.fast_path.choose(
                ("geglu_linear", tuple(hidden_states.shape), hidden_states.dtype, tuple(self.proj.weight.shape)),
                lambda: geglu_linear(hidden_states, self.proj.weight, self.proj.bias),
                lambda: self.gate(self.proj(hidden_states)),
                hidden_states.device,
            )
        return self.gate(self.proj(hidden_states))

    def gate(self, projected):
        """value * gelu(gate) of the projection's output: the kernel or torch, by the dispatch."""
        from sd_kernels import geglu

        return self.fast_path.choose(
            ("geglu", tuple(projected.shape), projected.dtype),
            lambda: geglu(projected),
            lambda: self.torch_gate(projected),
            projected.device,
        )

    def torch_gate(self, projected):
        hidden_states, gate = projected.chunk(2, dim=-1)
        return hidden_states * self.gelu(gate)
