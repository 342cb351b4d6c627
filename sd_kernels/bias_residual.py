"""Per-channel bias, residual and scale in one pass: the end of the SD UNet/VAE ResNet block.

x and residual are (N, C, H, W) in the same memory format; bias and residual_bias are (C,):

    y = (x + bias[c] + residual + residual_bias[c]) / scale      (fp32, any term may be absent)

In a ResNet block x is conv2's output computed without its bias and residual is the block
input, or conv_shortcut's output computed without its bias: torch would spend a bias pass
per convolution, an add and a divide; this reads each tensor once and writes once.

The program walks the flat storage. Channel of a flat offset: off % C for channels_last,
(off // (H * W)) % C for contiguous NCHW. Each program takes the int64 division once for
its first element and steps from there in int32.
"""

import torch
import triton
import triton.language as tl

from ._checks import check_channel_vector, check_tensor, contiguous_or_none

_BLOCK = 1024  # elements per program


@triton.jit
def _bias_residual_fwd_kernel(
    X,  # input (N, C, H, W), contiguous NCHW or channels_last, viewed as its flat storage
    R,  # residual, x's shape and memory format, or a dummy when HAS_RESIDUAL is False
    B,  # bias (C,), or a dummy when HAS_BIAS is False
    RB,  # residual_bias (C,), or a dummy when HAS_RESIDUAL_BIAS is False
    Y,  # output, x's shape and memory format
    numel, C, HW,  # total elements, channels, H * W
    scale,
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # flat storage is (N, H, W, C), else (N, C, H, W)
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RESIDUAL_BIAS: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: numel can pass 2**31
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    y = tl.load(X + start + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS or HAS_RESIDUAL_BIAS:
        # channel of start + offs; the int64 division once per program, the rest in int32
        if CHANNELS_LAST:
            c = ((start % C).to(tl.int32) + offs) % C
        else:
            r = (start % HW).to(tl.int32)
            c = (((start // HW) % C).to(tl.int32) + (r + offs) // HW) % C
        if HAS_BIAS:
            y += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL_BIAS:
            y += tl.load(RB + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y += tl.load(R + start + offs, mask=mask, other=0.0).to(tl.float32)
    y = y / scale
    tl.store(Y + start + offs, y.to(Y.dtype.element_ty), mask=mask)


def _memory_format(t):
    """torch.contiguous_format or torch.channels_last when t is dense in it (contiguous first), else None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def bias_residual(x, bias, residual=None, residual_bias=None, scale=1.0):
    """(x + bias[c] + residual + residual_bias[c]) / scale, with any of bias, residual, residual_bias None.

    x: (N, C, H, W), contiguous NCHW or channels_last; float16, bfloat16 or float32.
    residual: x's shape and memory format, any of those dtypes. bias, residual_bias: (C,),
    any floating dtype. Math in fp32. Returns a tensor of x's shape, dtype and memory format.
    """
    check_tensor("bias_residual", "x", x)
    if x.dim() != 4:
        raise ValueError(f"bias_residual: x.shape is {tuple(x.shape)}; allowed: (N, C, H, W)")
    fmt = _memory_format(x)
    if fmt is None:
        raise ValueError(
            f"bias_residual: x.stride() is {x.stride()}; allowed: contiguous NCHW or channels_last"
        )
    N, C, H, W = x.shape
    if residual is not None:
        check_tensor("bias_residual", "residual", residual, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(
                f"bias_residual: residual is {tuple(residual.shape)}; allowed: None or x's shape {tuple(x.shape)}"
            )
        if not residual.is_contiguous(memory_format=fmt):
            name = "channels_last" if fmt == torch.channels_last else "contiguous NCHW"
            raise ValueError(
                f"bias_residual: residual.stride() is {residual.stride()}; allowed: x's memory format ({name})"
            )
    check_channel_vector("bias_residual", "bias", bias, C, x.device)
    check_channel_vector("bias_residual", "residual_bias", residual_bias, C, x.device)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0 or scale != scale:
        raise ValueError(f"bias_residual: scale is {scale!r}; allowed: a nonzero number")

    out = torch.empty_like(x, memory_format=fmt)
    numel = x.numel()
    if numel == 0:
        return out
    bias, residual_bias = contiguous_or_none(bias), contiguous_or_none(residual_bias)
    _bias_residual_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](
        x,
        residual if residual is not None else x,
        bias if bias is not None else x,
        residual_bias if residual_bias is not None else x,
        out,
        numel, C, H * W,
        float(scale),
        BLOCK=_BLOCK,
        CHANNELS_LAST=fmt == torch.channels_last,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_RESIDUAL_BIAS=residual_bias is not None,
        num_warps=4,
    )
    return out


def bias_residual_reference(x, bias, residual=None, residual_bias=None, scale=1.0):
    """The same sum and division in fp32 with torch broadcasting; returns fp32."""
    y = x.float()
    if bias is not None:
        y = y + bias.float()[:, None, None]
    if residual is not None:
        y = y + residual.float()
    if residual_bias is not None:
        y = y + residual_bias.float()[:, None, None]
    return y / scale
