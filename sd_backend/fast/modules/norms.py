"""nn.GroupNorm and nn.LayerNorm running this project's kernels on the kernel device.

Each is a subclass of the torch module it replaces (an in-place class swap keeps its
parameters, state_dict keys and hooks); off the kernel device, under autograd or where the
dispatch picks torch, it computes what the torch module computes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import FastPath, no_autograd

NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP_CHANNELS = 4096  # sd_kernels.group_norm keeps a group's channels in one tile
_MAX_LAYER_NORM_DIM = 8192  # sd_kernels.layer_norm keeps a row in registers


def group_norm_schedule(fast_path: FastPath) -> str:
    """sd_kernels.group_norm's schedule for the fast path's options (fast_path.group_norm_looped)."""
    return "auto" if fast_path.options.group_norm_looped else "split"


class TritonGroupNorm(nn.GroupNorm):
    """nn.GroupNorm via sd_kernels.group_norm; activation="silu" fuses F.silu."""

    fast_path: FastPath  # set by patch_model

    def takes(self, input) -> bool:
        return (
            self.fast_path.on_kernel_device(input)
            and input.dtype in NORM_DTYPES
            and self.num_channels // self.num_groups <= MAX_GROUP_CHANNELS
            and no_autograd(input, self.weight, self.bias)
        )

    def forward(self, input, activation=None):
        if not self.takes(input):
            return self.torch_forward(input, activation)
        from sd_kernels import group_norm

        return self.fast_path.choose(
            ("group_norm", tuple(input.shape), input.stride(), input.dtype, activation),
            lambda: group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=activation, schedule=group_norm_schedule(self.fast_path)),
            lambda: self.torch_forward(input, activation),
            input.device,
        )

    def torch_forward(self, input, activation=None):
        out = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        out = F.silu(out) if activation == "silu" else out
        # torch's GroupNorm returns NCHW for a channels-last input; convert back here, where the
        # per-shape timing sees it, rather than in the convolution that follows
        if input.is_cuda and input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class TritonLayerNorm(nn.LayerNorm):
    """nn.LayerNorm via sd_kernels.layer_norm, for a last-dim normalized_shape."""

    fast_path: FastPath  # set by patch_model

    def forward(self, input):
        if not (
            len(self.normalized_shape) == 1
            and self.fast_path.on_kernel_device(input)
            and input.dtype in NORM_DTYPES
            and input.shape[-1] <= _MAX_LAYER_NORM_DIM
            and no_autograd(input, self.weight, self.bias)
        ):
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        from sd_kernels import layer_norm

        return self.fast_path.choose(
            ("layer_norm", tuple(input.shape), input.dtype),
            lambda: layer_norm(input, self.weight, self.bias, self.eps),
            lambda: F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps),
            input.device,
        )
