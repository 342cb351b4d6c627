"""diffusers' ResnetBlock2D with norm1 -> SiLU as one op and its tail fused on the kernel device.

The tail (time_embedding_norm "default", dropout a no-op, plain convolutions) becomes:
conv1 without bias; group_norm of it with pre_add = conv1.bias + time embedding, and SiLU;
conv2 and conv_shortcut without bias; bias_residual adding both biases and the residual and
dividing by output_scale_factor. That drops the bias, time-embedding add, residual add and
divide passes over the activations. Inside a captured loop the pre_add of this step is
bound (`loop_pre_add`, a row of a table sd_backend.fast.step_constants made for every step
in one GEMM). Elsewhere (CPU, autograd, the dispatch picking torch, other configurations)
the tail is diffusers' own, with norm2 -> SiLU as one op. Mirrors diffusers 0.42's
ResnetBlock2D.forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from ..runtime import FastPath, no_autograd
from .norms import MAX_GROUP_CHANNELS, NORM_DTYPES, group_norm_schedule


class TritonResnetBlock2D(ResnetBlock2D):
    """Set by patch_model only on blocks whose nonlinearity is nn.SiLU and whose norms are TritonGroupNorm."""

    fast_path: FastPath  # set by patch_model
    loop_pre_add: torch.Tensor | None = None  # (C,) this step's conv1.bias + time projection, when bound

    def forward(self, input_tensor, temb, *args, **kwargs):
        hidden_states = self.norm1(input_tensor, activation="silu")

        if self.upsample is not None:
            # upsample_nearest_nhwc fails with large batch sizes (diffusers issue 984)
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        if not self.can_fuse_tail(hidden_states, input_tensor, temb):
            return self.torch_tail(hidden_states, input_tensor, temb)
        key = (
            "resnet_tail",
            tuple(hidden_states.shape),
            hidden_states.stride(),
            hidden_states.dtype,
            tuple(self.conv1.weight.shape),
            tuple(self.conv2.weight.shape),
            self.conv_shortcut is not None,
        )
        return self.fast_path.choose(
            key,
            lambda: self.fused_tail(hidden_states, input_tensor, temb),
            lambda: self.torch_tail(hidden_states, input_tensor, temb),
            hidden_states.device,
        )

    def can_fuse_tail(self, hidden_states, input_tensor, temb) -> bool:
        convs = (self.conv1, self.conv2) + ((self.conv_shortcut,) if self.conv_shortcut is not None else ())
        return (
            self.time_embedding_norm == "default"
            # a temb without time_emb_proj (added as is) or the reverse (an error) stays on diffusers' path
            and (temb is None) == (self.time_emb_proj is None)
            and (temb is None or temb.dim() == 2)  # (N, temb_channels)
            and isinstance(self.dropout, nn.Dropout)
            and (self.dropout.p == 0 or not self.training)
            and all(_plain_conv(conv) for conv in convs)
            and self.fast_path.on_kernel_device(hidden_states, input_tensor)
            and hidden_states.dim() == 4
            and hidden_states.dtype in NORM_DTYPES
            and self.norm2.num_channels // self.norm2.num_groups <= MAX_GROUP_CHANNELS
            # is_grad_enabled first: no walk over the parameters on the inference path
            and (not torch.is_grad_enabled() or no_autograd(hidden_states, input_tensor, temb, *self.parameters()))
        )

    def fused_tail(self, hidden_states, input_tensor, temb):
        from sd_kernels import bias_residual, group_norm

        hidden_states = _conv_no_bias(self.conv1, hidden_states)  # (N, C, H, W), no bias yet
        n, c = hidden_states.shape[:2]
        pre_add = self.loop_pre_add[None] if self.loop_pre_add is not None else self.pre_add(temb)
        if pre_add is not None:
            pre_add = pre_add.expand(n, c)  # (N, C); a batch-1 temb broadcasts as in the torch tail

        norm = self.norm2
        hidden_states = group_norm(
            hidden_states, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu", pre_add=pre_add,
            schedule=group_norm_schedule(self.fast_path),
        )
        hidden_states = _conv_no_bias(self.conv2, hidden_states)

        residual_bias = None
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            residual_bias = self.conv_shortcut.bias
            input_tensor = _conv_no_bias(self.conv_shortcut, input_tensor)
        fmt = torch.contiguous_format if hidden_states.is_contiguous() else torch.channels_last
        if not input_tensor.is_contiguous(memory_format=fmt):
            # e.g. the NCHW input of a large-batch upsampling block against a channels_last conv output
            input_tensor = input_tensor.contiguous(memory_format=fmt)

        return bias_residual(
            hidden_states, self.conv2.bias, residual=input_tensor, residual_bias=residual_bias, scale=self.output_scale_factor
        )

    def pre_add(self, temb):
        """conv1.bias + time_emb_proj(silu(temb)), (N, C), or whichever of the two exists, or None.
        Given every step's time embedding (steps, temb_channels), every step's pre_add."""
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)  # (N, C)
        pre_add = self.conv1.bias[None, :] if self.conv1.bias is not None else None
        if temb is not None:
            pre_add = temb if pre_add is None else pre_add + temb
        return pre_add

    def torch_tail(self, hidden_states, input_tensor, temb):
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states, activation="silu")
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
            hidden_states = self.nonlinearity(hidden_states)
        else:
            hidden_states = self.norm2(hidden_states, activation="silu")

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        return (input_tensor + hidden_states) / self.output_scale_factor


def _plain_conv(conv):
    # exactly nn.Conv2d with zero padding and no hooks, so F.conv2d on its weight is its forward
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
    )


def _conv_no_bias(conv, x):
    """conv(x) without conv.bias: the bias is added later, in the kernel that reads the output."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
