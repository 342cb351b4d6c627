"""diffusers' Attention with this project's flash attention and fused projections.

TritonAttnProcessor takes AttnProcessor2_0's steps (diffusers 0.42, sd_backend.fast.compat)
with three changes on the kernel device: q, k, v (or k, v) as one GEMM; the attention
product from sd_kernels.flash_attention or cuDNN's, whichever the dispatch picks for the
shape; and, with keep_layout, the output written as the (batch, seq, heads * head_dim)
rows to_out reads, without a transposing copy. Inside a captured loop a cross-attention's
keys and values of the text are bound once for the loop (`loop_kv`, set by
sd_backend.fast.step_constants). Elsewhere it computes what AttnProcessor2_0 computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..runtime import FastPath, no_autograd

_MAX_HEAD_DIM = 256  # sd_kernels.flash_attention pads head_dim to a power of two up to 256


class TritonAttnProcessor:
    """AttnProcessor2_0 on the fast path (module docstring).

    min_kv_len: the kernel only from this key length up (78 keeps the 77-token
    cross-attention on torch's SDPA).
    """

    loop_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (key, value) of the loop's text, when bound

    def __init__(self, fast: FastPath, min_kv_len: int = 0):
        self.fast = fast
        self.min_kv_len = min_kv_len

    def use_kernel(self, query, key, value, attention_mask) -> bool:
        return (
            attention_mask is None
            and self.fast.on_kernel_device(query)
            and query.dtype in self.fast.attention_dtypes
            and query.shape[-1] <= _MAX_HEAD_DIM
            and key.shape[-2] >= self.min_kv_len
            and no_autograd(query, key, value)
        )

    def project_kv(self, attn: Attention, encoder_hidden_states):
        """(key, value), each (batch, kv_len, inner): one GEMM where the projections fuse."""
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        fused = self._fused(attn, ("to_k", "to_v"), encoder_hidden_states)
        if fused is None:
            return attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key, value = F.linear(encoder_hidden_states, *fused).chunk(2, dim=-1)
        return key, value

    def _fused(self, attn, names, hidden_states):
        """(weight, bias) of the named projections concatenated, built once per module, or None
        (off the kernel device, under autograd, or with fuse_projections off). The cached copy
        is rewritten in place by refresh_fused_projections when the weights change (a LoRA switch)."""
        if not (self.fast.options.fuse_projections and self.fast.on_kernel_device(hidden_states) and no_autograd(hidden_states)):
            return None
        cache = attn.__dict__.setdefault("_sd_fused_projections", {})
        if names not in cache:
            layers = [getattr(attn, name) for name in names]
            biases = [layer.bias for layer in layers]
            if any(b is None for b in biases) and not all(b is None for b in biases):
                cache[names] = None
            else:
                bias = None if biases[0] is None else torch.cat(biases)
                cache[names] = (torch.cat([layer.weight for layer in layers]), bias)  # (n * inner, in)
        return cache[names]

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

        if encoder_hidden_states is None:  # self-attention
            fused = self._fused(attn, ("to_q", "to_k", "to_v"), hidden_states)
            if fused is None:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            else:
                query, key, value = F.linear(hidden_states, *fused).chunk(3, dim=-1)  # one GEMM for q, k, v
        else:
            query = attn.to_q(hidden_states)
            key, value = self.loop_kv if self.loop_kv is not None else self.project_kv(attn, encoder_hidden_states)

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

        # default scale 1/sqrt(head_dim) in both paths, as AttnProcessor2_0 (it ignores attn.scale)
        if self.use_kernel(query, key, value, attention_mask):
            hidden_states = self._attend(query, key, value, batch_size, attn.heads, head_dim)
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

        keep_layout = self.fast.options.keep_layout
        if attn.rescale_output_factor != 1.0 or not keep_layout:  # x / 1.0 is x, without a pass over memory
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _attend(self, query, key, value, batch_size, heads, head_dim):
        from sd_kernels import flash_attention

        options = self.fast.options
        out = None
        if options.keep_layout:  # rows of (batch, q_len, heads * head_dim), as to_out reads them
            out = query.new_empty(batch_size, query.shape[2], heads, head_dim).transpose(1, 2)
        return self.fast.choose(
            ("attention", tuple(query.shape), key.shape[-2], query.dtype),
            lambda: flash_attention(
                query, key, value, out=out, split_head_dim=options.split_head_dim, compile_workers=options.compile_workers
            ),
            lambda: sdpa_cudnn_first(query, key, value),
            query.device,
        )


def sdpa_cudnn_first(query, key, value):
    """torch's SDPA trying cuDNN's fused attention first: the alternative `measure` times.
    cuDNN's Hopper kernel beats ours at SD's 4096-token self-attention (benchmarks/NOTES.md);
    shapes cuDNN refuses fall through to torch's usual order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value)


def refresh_fused_projections(model) -> None:
    """Rewrite, in place, every fused projection copy `TritonAttnProcessor._fused` built in
    `model`, from its projections' current weights (after a LoRA switch rewrote them): the
    copies keep their storage, which the captured graphs read."""
    import torch

    with torch.inference_mode():  # the copies were made under it (inference tensors)
        for attn in model.modules():
            for names, fused in attn.__dict__.get("_sd_fused_projections", {}).items():
                if fused is None:
                    continue
                weight, bias = fused
                layers = [getattr(attn, name) for name in names]
                weight.copy_(torch.cat([layer.weight for layer in layers]))
                if bias is not None:
                    bias.copy_(torch.cat([layer.bias for layer in layers]))
