"""Layer normalization over the last dimension, for the SD transformer blocks and CLIP.

For each row x of length D (320, 640, 1280 in the UNet; 768 or 1024 in CLIP):

    mean = sum(x) / D
    var  = sum((x - mean)^2) / D              (two passes over the row held in registers, fp32)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

A program normalizes BLOCK_M whole rows, so that short rows still give each program a
few thousand elements.
"""

import torch
import triton
import triton.language as tl

from ._checks import check_channel_vector, check_tensor, contiguous_or_none

_MAX_D = 8192  # a whole row lives in registers
_TILE = 4096  # elements per program


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input (rows, D), last dim contiguous
    Y,  # output (rows, D), contiguous
    W,  # weight (D,), or a dummy when HAS_WEIGHT is False
    B,  # bias (D,), or a dummy when HAS_BIAS is False
    stride_xm,  # input row stride, in elements
    stride_ym,  # output row stride, in elements
    rows, D,
    eps,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_m < rows)[:, None] & mask_d[None, :]
    # int64 row offsets: rows * D can pass 2**31
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    d = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


def layer_norm(x, weight, bias, eps=1e-5):
    """F.layer_norm(x, (x.shape[-1],), weight, bias, eps).

    x: (..., D), float16, bfloat16 or float32, D <= 8192; weight, bias: (D,) or None.
    Statistics in fp32. Returns a contiguous tensor of x's shape and dtype.
    """
    check_tensor("layer_norm", "x", x)
    if x.dim() < 1:
        raise ValueError("layer_norm: x is a 0-dim tensor; allowed: (..., D) with at least 1 dim")
    D = x.shape[-1]
    if not 1 <= D <= _MAX_D:
        raise ValueError(f"layer_norm: x.shape[-1] is {D}; allowed: 1 to {_MAX_D}")
    check_channel_vector("layer_norm", "weight", weight, D, x.device)
    check_channel_vector("layer_norm", "bias", bias, D, x.device)

    x2 = x.reshape(-1, D)  # (rows, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    y2 = y.view(-1, D)
    weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)

    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(_TILE // block_d, triton.next_power_of_2(rows)))
    num_warps = 4 if block_m * block_d <= 2048 else 8
    _layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x2, y2,
        weight if weight is not None else x2,
        bias if bias is not None else x2,
        x2.stride(0), y2.stride(0),
        rows, D, float(eps),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return y


def layer_norm_reference(x, weight, bias, eps=1e-5):
    """F.layer_norm over the last dim in fp32; returns fp32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
