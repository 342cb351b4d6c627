"""diffusers' GEGLU with the gate from sd_kernels.geglu on the kernel device."""

from __future__ import annotations

from diffusers.models.activations import GEGLU

from ..runtime import FastPath, no_autograd
from .norms import NORM_DTYPES


class TritonGEGLU(GEGLU):
    """The projection on torch, then value * gelu(gate) in one kernel."""

    fast_path: FastPath  # set by patch_model

    def forward(self, hidden_states, *args, **kwargs):
        hidden_states = self.proj(hidden_states)  # (..., 2F)
        if not (
            self.fast_path.on_kernel_device(hidden_states)
            and hidden_states.dtype in NORM_DTYPES
            and no_autograd(hidden_states)
        ):
            return self.torch_gate(hidden_states)
        from sd_kernels import geglu

        return self.fast_path.choose(
            ("geglu", tuple(hidden_states.shape), hidden_states.dtype),
            lambda: geglu(hidden_states),
            lambda: self.torch_gate(hidden_states),
            hidden_states.device,
        )

    def torch_gate(self, projected):
        hidden_states, gate = projected.chunk(2, dim=-1)
        return hidden_states * self.gelu(gate)
