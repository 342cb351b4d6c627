"""Swap the fast path's modules into a diffusers model (UNet2DConditionModel, AutoencoderKL), in place.

    fast = FastPath(options)
    patch_model(unet, fast)                                # every op in options.kernels
    patch_model(vae, fast, ops=("attention", "group_norm"))

Norms, GEGLU, the transformer blocks, the ResNet blocks and the time embedding get a
subclass of their own class (an in-place class swap that keeps parameters, buffers,
state_dict keys and hooks); attention modules get a new processor. Off the kernel device a
patched model computes exactly what the unpatched one does.
"""

from __future__ import annotations

import torch.nn as nn
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ...config import KERNEL_OPS
from ..compat import check_diffusers
from ..runtime import FastPath
from .activations import TritonGEGLU
from .attention import TritonAttnProcessor
from .embeddings import TritonTimestepEmbedding, TritonTimesteps
from .norms import TritonGroupNorm, TritonLayerNorm
from .resnet import TritonResnetBlock2D
from .transformer import TritonTransformer2DModel

OPS = KERNEL_OPS


def patch_model(module: nn.Module, fast: FastPath, ops: tuple[str, ...] | None = None, min_kv_len: int = 0) -> dict:
    """Patch `ops` (default: fast.options.kernels) into module. Returns the counts replaced,
    e.g. {"attention": 32, "transformer_layout": 16, "time_embedding": 2, "group_norm": 61,
    "resnet_silu_fused": 22, "layer_norm": 48, "geglu": 16} for the SD 1.5 UNet. The time
    embedding is always swapped: it computes as before unless a loop binds its table."""
    check_diffusers()
    ops = tuple(fast.options.kernels if ops is None else ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"patch_model: ops contains {unknown}; allowed: {', '.join(OPS)}")
    counts = {}
    if "attention" in ops:
        counts["attention"] = patch_attention(module, fast, min_kv_len)
        counts["transformer_layout"] = _swap_all(module, Transformer2DModel, TritonTransformer2DModel, fast)
    counts["time_embedding"] = _swap_all(module, Timesteps, TritonTimesteps, fast) + _swap_all(
        module, TimestepEmbedding, TritonTimestepEmbedding, fast
    )
    if "group_norm" in ops:
        counts["group_norm"] = _swap_all(module, nn.GroupNorm, TritonGroupNorm, fast)
        counts["resnet_silu_fused"] = _swap_resnets(module, fast)
    if "layer_norm" in ops:
        counts["layer_norm"] = _swap_all(module, nn.LayerNorm, TritonLayerNorm, fast)
    if "geglu" in ops:
        counts["geglu"] = _swap_all(module, GEGLU, TritonGEGLU, fast)
    return counts


def patch_attention(module: nn.Module, fast: FastPath, min_kv_len: int = 0) -> int:
    """A TritonAttnProcessor for every Attention whose processor is diffusers' default;
    custom processors (IP-Adapter, LoRA, ...) are left alone. Returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) in (AttnProcessor2_0, AttnProcessor, TritonAttnProcessor):
            m.set_processor(TritonAttnProcessor(fast, min_kv_len=min_kv_len))
            count += 1
    return count


def _swap_all(module: nn.Module, base: type, patched: type, fast: FastPath) -> int:
    """Swap every module of exactly type `base` (a subclass may have its own forward)."""
    count = 0
    for m in list(module.modules()):
        if type(m) is base:
            m.__class__ = patched
            m.fast_path = fast
            count += 1
    return count


def _swap_resnets(module: nn.Module, fast: FastPath) -> int:
    """ResnetBlock2D -> TritonResnetBlock2D where SiLU follows norms that are now TritonGroupNorm."""
    count = 0
    for m in module.modules():
        if (
            type(m) is ResnetBlock2D
            and isinstance(m.nonlinearity, nn.SiLU)
            and isinstance(m.norm1, TritonGroupNorm)
            and isinstance(m.norm2, TritonGroupNorm)
        ):
            m.__class__ = TritonResnetBlock2D
            m.fast_path = fast
            count += 1
    return count
