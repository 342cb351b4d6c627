"""Swap the Triton kernels into a diffusers model (UNet2DConditionModel, AutoencoderKL), in place.

    patch_model(unet)              # attention, group_norm (+ fused SiLU), layer_norm, geglu
    patch_model(vae, ops=("attention", "group_norm"))

Patched modules keep their parameters, buffers, state_dict keys and hooks: norms and
GEGLU get a subclass of their own class (an in-place class swap), attention modules get
a new processor. Each patched forward runs the Triton kernel only when it can (CUDA
input, a supported dtype, no autograd needed) and the torch op it replaces otherwise, so
on CPU a patched model computes exactly what the unpatched one does. With "group_norm",
ResnetBlock2D blocks also run their tail through group_norm's pre_add (conv1's bias and the
time embedding) and bias_residual (conv2's and conv_shortcut's biases, the residual, the
output scale). With "attention", Transformer2DModel blocks keep a channels-last input
channels-last through proj_in and proj_out (1x1 convs as GEMMs on the pixel rows) and
the attention kernel writes its output in the layout to_out reads: the transposing
copies diffusers makes there are gone (SD_KEEP_LAYOUT=0 brings them back, for A/B runs).
Inside a denoising loop's kernels.loop_constants block, the fused ResnetBlock2D tails and
the cross-attention keys and values are computed once for the loop, not at every step.

Triton is imported on first use of a kernel, not here: without it this module imports
and CPU models work.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from kernels import dispatch, loop_constants

OPS = ("attention", "group_norm", "layer_norm", "geglu")

_ATTN_DTYPES = (torch.float16, torch.bfloat16)
_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # kernels.flash_attention pads head_dim to a power of two up to 256
_MAX_GROUP_CHANNELS = 4096  # kernels.group_norm keeps a group's channels in one tile
_MAX_LAYER_NORM_DIM = 8192  # kernels.layer_norm keeps a row in registers


def _is_kernel_device(t):
    """Whether the Triton kernels can take this tensor (tests swap this to run them on CPU)."""
    return t.is_cuda


def _no_autograd(*tensors):
    # the kernels are forward only: keep torch's ops wherever a gradient would be recorded
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


class TritonAttnProcessor:
    """diffusers' AttnProcessor2_0 with kernels.flash_attention for the unmasked fp16/bf16 CUDA case.

    min_kv_len: use the kernel only when the key length is at least this (e.g. 78 keeps the
    77-token cross-attention on torch's SDPA, if the benchmark says it is faster there).
    """

    def __init__(self, min_kv_len=0):
        self.min_kv_len = min_kv_len

    def _use_kernel(self, query, key, value, attention_mask):
        return (
            attention_mask is None
            and _is_kernel_device(query)
            and query.dtype in _ATTN_DTYPES
            and query.shape[-1] <= _MAX_HEAD_DIM
            and key.shape[-2] >= self.min_kv_len
            and _no_autograd(query, key, value)
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Same steps as AttnProcessor2_0 (diffusers 0.42), attention call aside.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, q_len, kv_len), as scaled_dot_product_attention expects
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        fused = _fused_projection(attn, ("to_q", "to_k", "to_v") if self_attention else ("to_k", "to_v"), hidden_states)
        if fused is None:
            query = attn.to_q(hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        elif self_attention:
            query, key, value = F.linear(hidden_states, *fused).chunk(3, dim=-1)  # one GEMM for q, k, v
        else:
            query = attn.to_q(hidden_states)
            constants = loop_constants.active()
            if constants is not None and encoder_hidden_states is constants.embeds:
                # the text embeddings are the same at every step: k and v once per loop
                kv = constants.memo(("kv", attn), lambda: F.linear(encoder_hidden_states, *fused))
            else:
                kv = F.linear(encoder_hidden_states, *fused)  # one GEMM for k, v
            key, value = kv.chunk(2, dim=-1)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        # (batch, heads, seq, head_dim) views of (batch, seq, heads * head_dim)
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Default scale 1/sqrt(head_dim) in both paths, as AttnProcessor2_0 (it ignores attn.scale).
        if self._use_kernel(query, key, value, attention_mask):
            from kernels import flash_attention

            # rows of (batch, q_len, heads * head_dim), as to_out reads them: no transposing copy
            out = None
            if _keep_layout():
                out = query.new_empty(batch_size, query.shape[2], attn.heads, head_dim).transpose(1, 2)
            hidden_states = dispatch.run(
                ("attention", tuple(query.shape), key.shape[-2], query.dtype),
                lambda: flash_attention(query, key, value, out=out),
                lambda: _sdpa_cudnn_first(query, key, value),
                query.device,
            )
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        if attn.rescale_output_factor != 1.0 or not _keep_layout():  # x / 1.0 is x, without a pass over memory
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _sdpa_cudnn_first(query, key, value):
    """torch's SDPA trying cuDNN's fused attention first, the alternative `measure` times per shape.

    On an H200 cuDNN's Hopper kernel ran SD's 4096-token self-attention (head_dim 40) 16-22%
    faster than our kernel, and torch's default choice (FlashAttention-2 for these strided
    views) 30-45% slower (benchmarks/results, kernels table of 2026-11-27). Shapes cuDNN
    refuses fall through to torch's usual order.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value)


def _keep_layout():
    """SD_KEEP_LAYOUT=0 restores diffusers' layout copies (for the benchmark's A/B), read per call."""
    return os.environ.get("SD_KEEP_LAYOUT", "1") != "0"


class TritonTransformer2DModel(Transformer2DModel):
    """Transformer2DModel whose continuous-input path keeps a channels-last input channels-last.

    diffusers turns the blocks' (batch, h*w, C) output into an NCHW-contiguous tensor
    before proj_out (a transposing copy, and cuDNN converts back for the channels-last
    weights). Rows of (batch, h*w, C) already are a channels-last (batch, C, h, w) tensor,
    so here the 1x1 projections run as GEMMs on those rows (F.linear with the conv's
    weight viewed (C_out, C_in)) and the output is a channels-last view. NCHW inputs,
    other projections and autograd take diffusers' own path.
    """

    def _keeps_layout(self, hidden_states):
        return (
            _keep_layout()
            and _is_kernel_device(hidden_states)
            and _no_autograd(hidden_states)
            and hidden_states.dim() == 4
            and hidden_states.is_contiguous(memory_format=torch.channels_last)
            and (self.use_linear_projection or (_is_pointwise(self.proj_in) and _is_pointwise(self.proj_out)))
        )

    def _operate_on_continuous_inputs(self, hidden_states):
        if not self._keeps_layout(hidden_states):
            return super()._operate_on_continuous_inputs(hidden_states)
        batch, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not hidden_states.is_contiguous(memory_format=torch.channels_last):
            hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
        rows = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # a view
        hidden_states = self.proj_in(rows) if self.use_linear_projection else _pointwise(self.proj_in, rows)
        return hidden_states, hidden_states.shape[-1]

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not self._keeps_layout(residual) or not hidden_states.is_contiguous():
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width, inner_dim)
        hidden_states = self.proj_out(hidden_states) if self.use_linear_projection else _pointwise(self.proj_out, hidden_states)
        # (batch, h*w, C) rows are the channels-last (batch, C, h, w) tensor
        hidden_states = hidden_states.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
        return hidden_states + residual


def _is_pointwise(conv):
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _pointwise(conv, rows):
    """A 1x1 Conv2d applied to (batch, pixels, C_in) rows: (batch, pixels, C_out)."""
    return F.linear(rows, conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)


def _fused_projection(attn, names, hidden_states):
    """(weight, bias) of the named projections concatenated, built once per module, or None.

    One wide GEMM instead of two or three narrow ones; only on the kernel device and
    without autograd, so CPU models compute exactly what the unpatched ones do. The cached
    copy assumes inference weights that do not change after the first call.
    """
    if not (_is_kernel_device(hidden_states) and _no_autograd(hidden_states)):
        return None
    if os.environ.get("SD_FUSE_PROJECTIONS", "1") == "0":
        return None
    cache = attn.__dict__.setdefault("_sd_fused_projections", {})
    if names not in cache:
        layers = [getattr(attn, name) for name in names]
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            cache[names] = None
        else:
            weight = torch.cat([layer.weight for layer in layers])  # (n * inner, in)
            bias = None if biases[0] is None else torch.cat(biases)
            cache[names] = (weight, bias)
    return cache[names]


class TritonGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose forward runs kernels.group_norm on CUDA; activation="silu" fuses F.silu."""

    def forward(self, input, activation=None):
        if (
            _is_kernel_device(input)
            and input.dtype in _NORM_DTYPES
            and self.num_channels // self.num_groups <= _MAX_GROUP_CHANNELS
            and _no_autograd(input, self.weight, self.bias)
        ):
            from kernels import group_norm

            return dispatch.run(
                ("group_norm", tuple(input.shape), input.stride(), input.dtype, activation),
                lambda: group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=activation),
                lambda: self._torch_forward(input, activation),
                input.device,
            )
        return self._torch_forward(input, activation)

    def _torch_forward(self, input, activation):
        out = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        out = F.silu(out) if activation == "silu" else out
        # torch's GroupNorm returns NCHW for a channels-last input; convert back here, where the
        # per-shape timing sees it, rather than in the convolution that follows
        if input.is_cuda and input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class TritonLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward runs kernels.layer_norm on CUDA for a last-dim normalized_shape."""

    def forward(self, input):
        if (
            len(self.normalized_shape) == 1
            and _is_kernel_device(input)
            and input.dtype in _NORM_DTYPES
            and input.shape[-1] <= _MAX_LAYER_NORM_DIM
            and _no_autograd(input, self.weight, self.bias)
        ):
            from kernels import layer_norm

            return dispatch.run(
                ("layer_norm", tuple(input.shape), input.dtype),
                lambda: layer_norm(input, self.weight, self.bias, self.eps),
                lambda: F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps),
                input.device,
            )
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class TritonGEGLU(GEGLU):
    """diffusers' GEGLU: the projection on torch, then kernels.geglu on CUDA."""

    def forward(self, hidden_states, *args, **kwargs):
        hidden_states = self.proj(hidden_states)  # (..., 2F)
        if _is_kernel_device(hidden_states) and hidden_states.dtype in _NORM_DTYPES and _no_autograd(hidden_states):
            from kernels import geglu

            return dispatch.run(
                ("geglu", tuple(hidden_states.shape), hidden_states.dtype),
                lambda: geglu(hidden_states),
                lambda: self._torch_gate(hidden_states),
                hidden_states.device,
            )
        return self._torch_gate(hidden_states)

    def _torch_gate(self, projected):
        hidden_states, gate = projected.chunk(2, dim=-1)
        return hidden_states * self.gelu(gate)


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


class TritonResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D (diffusers 0.42) with norm1 -> SiLU as one op, and its tail fused on the kernel device.

    The tail (time_embedding_norm "default", dropout a no-op, plain convolutions) becomes
    conv1 without bias; group_norm of it with pre_add = conv1.bias + time embedding, and
    SiLU; conv2 and conv_shortcut without bias; bias_residual adding both biases, the
    residual and dividing by output_scale_factor. That drops the bias, time-embedding add,
    residual add and divide passes over the activations. Elsewhere (CPU, autograd,
    SD_KERNEL_DISPATCH=never, other configurations) the tail is diffusers' own, with
    norm2 -> SiLU as one op when nothing sits between.

    Set by patch_norms only on blocks whose nonlinearity is nn.SiLU and whose norms are
    TritonGroupNorm.
    """

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

        if self._can_fuse_tail(hidden_states, input_tensor, temb):
            return dispatch.run(
                (
                    "resnet_tail",
                    tuple(hidden_states.shape),
                    hidden_states.stride(),
                    hidden_states.dtype,
                    tuple(self.conv1.weight.shape),
                    tuple(self.conv2.weight.shape),
                    self.conv_shortcut is not None,
                ),
                lambda: self._fused_tail(hidden_states, input_tensor, temb),
                lambda: self._torch_tail(hidden_states, input_tensor, temb),
                hidden_states.device,
            )
        return self._torch_tail(hidden_states, input_tensor, temb)

    def _can_fuse_tail(self, hidden_states, input_tensor, temb):
        convs = (self.conv1, self.conv2) + ((self.conv_shortcut,) if self.conv_shortcut is not None else ())
        return (
            self.time_embedding_norm == "default"
            # a temb without time_emb_proj (added as is) or the reverse (an error) stays on diffusers' path
            and (temb is None) == (self.time_emb_proj is None)
            and (temb is None or temb.dim() == 2)  # (N, temb_channels)
            and isinstance(self.dropout, nn.Dropout)
            and (self.dropout.p == 0 or not self.training)
            and all(_plain_conv(conv) for conv in convs)
            and _is_kernel_device(hidden_states)
            and _is_kernel_device(input_tensor)
            and hidden_states.dim() == 4
            and hidden_states.dtype in _NORM_DTYPES
            and self.norm2.num_channels // self.norm2.num_groups <= _MAX_GROUP_CHANNELS
            # is_grad_enabled first: no walk over the parameters on the inference path
            and (not torch.is_grad_enabled() or _no_autograd(hidden_states, input_tensor, temb, *self.parameters()))
        )

    def _fused_tail(self, hidden_states, input_tensor, temb):
        from kernels import bias_residual, group_norm

        hidden_states = _conv_no_bias(self.conv1, hidden_states)  # (N, C, H, W), no bias yet
        n, c = hidden_states.shape[:2]

        pre_add = self._loop_pre_add(temb)  # inside a loop: this step's row of a table made for all steps
        if pre_add is None:
            pre_add = self._pre_add(temb)
        if pre_add is not None:
            pre_add = pre_add.expand(n, c)  # (N, C); a batch-1 temb broadcasts as in the torch tail

        norm = self.norm2
        hidden_states = group_norm(
            hidden_states, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu", pre_add=pre_add
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
            hidden_states,
            self.conv2.bias,
            residual=input_tensor,
            residual_bias=residual_bias,
            scale=self.output_scale_factor,
        )

    def _pre_add(self, temb):
        """conv1.bias + time_emb_proj(silu(temb)), (N, C), or whichever of the two exists, or None."""
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)  # (N, C)
        pre_add = self.conv1.bias[None, :] if self.conv1.bias is not None else None
        if temb is not None:
            pre_add = temb if pre_add is None else pre_add + temb
        return pre_add

    def _loop_pre_add(self, temb):
        """(1, C): this step's _pre_add from a table of every step of the running loop, or None
        outside a loop (kernels.loop_constants) or when temb is not the loop's time embedding."""
        constants = loop_constants.active()
        if temb is None or constants is None or constants.emb is None:
            return None
        if temb.data_ptr() != constants.emb[constants.step].data_ptr():
            return None
        table = constants.memo(("pre_add", self), lambda: self._pre_add(constants.emb))  # (steps, C)
        return table[constants.step][None]

    def _torch_tail(self, hidden_states, input_tensor, temb):
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


def patch_attention(module, min_kv_len=0):
    """Give every diffusers Attention under module (itself included) a TritonAttnProcessor.

    Only the default processors (AttnProcessor2_0, AttnProcessor) are replaced: custom ones
    (IP-Adapter, LoRA, ...) are left alone. Returns how many were replaced.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) in (AttnProcessor2_0, AttnProcessor, TritonAttnProcessor):
            m.set_processor(TritonAttnProcessor(min_kv_len=min_kv_len))
            count += 1
    return count


def patch_transformers(module):
    """Swap Transformer2DModel -> TritonTransformer2DModel (channels-last kept), in place. Returns how many."""
    return sum(_swap_class(m, Transformer2DModel, TritonTransformer2DModel) for m in list(module.modules()))


def _swap_class(module, base, patched):
    # exact type only: a subclass of base may have its own forward
    if type(module) is base:
        module.__class__ = patched
        return True
    return False


def patch_norms(module, group_norm=True, layer_norm=True):
    """Swap nn.GroupNorm -> TritonGroupNorm and nn.LayerNorm -> TritonLayerNorm, in place.

    With group_norm, ResnetBlock2D blocks whose norms became TritonGroupNorm and whose
    nonlinearity is SiLU become TritonResnetBlock2D (norm + SiLU in one kernel).
    Returns counts: {"group_norm": n, "resnet_silu_fused": n, "layer_norm": n}.
    """
    counts = {"group_norm": 0, "resnet_silu_fused": 0, "layer_norm": 0}
    for m in module.modules():
        if group_norm and _swap_class(m, nn.GroupNorm, TritonGroupNorm):
            counts["group_norm"] += 1
        elif layer_norm and _swap_class(m, nn.LayerNorm, TritonLayerNorm):
            counts["layer_norm"] += 1
    if group_norm:
        for m in module.modules():
            if (
                type(m) is ResnetBlock2D
                and isinstance(m.nonlinearity, nn.SiLU)
                and isinstance(m.norm1, TritonGroupNorm)
                and isinstance(m.norm2, TritonGroupNorm)
            ):
                m.__class__ = TritonResnetBlock2D
                counts["resnet_silu_fused"] += 1
    return counts


def patch_time_embedding(module):
    """Swap Timesteps -> TritonTimesteps and TimestepEmbedding -> TritonTimestepEmbedding
    (kernels.loop_constants), in place. Returns how many."""
    pairs = ((Timesteps, loop_constants.TritonTimesteps), (TimestepEmbedding, loop_constants.TritonTimestepEmbedding))
    return sum(_swap_class(m, base, patched) for m in list(module.modules()) for base, patched in pairs)


def patch_geglu(module):
    """Swap diffusers GEGLU -> TritonGEGLU, in place. Returns how many."""
    return sum(_swap_class(m, GEGLU, TritonGEGLU) for m in list(module.modules()))


def patch_model(module, ops=OPS, min_kv_len=0):
    """Patch the selected ops ("attention", "group_norm", "layer_norm", "geglu") into module, in place.

    Returns the counts replaced, e.g. {"attention": 32, "transformer_layout": 16,
    "time_embedding": 2, "group_norm": 61, "resnet_silu_fused": 22, "layer_norm": 48,
    "geglu": 16} for the SD 1.5 UNet. "attention" also swaps Transformer2DModel for
    TritonTransformer2DModel. The time embedding's modules are always swapped: they read
    a loop's precomputed table inside kernels.loop_constants.LoopConstants, and compute as
    before elsewhere.
    """
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"patch_model: ops contains {unknown}; allowed: {', '.join(OPS)}")
    counts = {}
    if "attention" in ops:
        counts["attention"] = patch_attention(module, min_kv_len=min_kv_len)
        counts["transformer_layout"] = patch_transformers(module)
    # loop-invariant time embedding (kernels.loop_constants); computes as before outside a loop
    counts["time_embedding"] = patch_time_embedding(module)
    if "group_norm" in ops or "layer_norm" in ops:
        norm_counts = patch_norms(module, group_norm="group_norm" in ops, layer_norm="layer_norm" in ops)
        if "group_norm" in ops:
            counts["group_norm"] = norm_counts["group_norm"]
            counts["resnet_silu_fused"] = norm_counts["resnet_silu_fused"]
        if "layer_norm" in ops:
            counts["layer_norm"] = norm_counts["layer_norm"]
    if "geglu" in ops:
        counts["geglu"] = patch_geglu(module)
    return counts
