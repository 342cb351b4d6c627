"""GEGLU activation of the SD transformer feed-forward, after its Linear projection.

x is (..., 2F); its first half is the value a, its second half the gate (as diffusers'
GEGLU does with proj(x).chunk(2, dim=-1)):

    out = a * gelu(gate),   gelu(g) = 0.5 g (1 + erf(g / sqrt(2)))   (exact erf form, fp32)

F is 1280, 2560, 5120 in the SD 1.x UNet. One read of x, one write of (..., F), instead of
torch's gelu pass and multiply pass.
"""

import torch
import triton
import triton.language as tl

from ._checks import check_tensor

_TILE = 2048  # elements of output per program
_MAX_BLOCK_F = 1024


@triton.jit
def _geglu_fwd_kernel(
    X,  # input (rows, 2F), last dim contiguous
    Out,  # output (rows, F), contiguous
    stride_xm,  # input row stride, in elements
    stride_om,  # output row stride, in elements
    rows, F,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m < rows)[:, None] & (offs_f < F)[None, :]
    # int64 row offsets: rows * 2F passes 2**31 at large batch
    x_row = X + offs_m.to(tl.int64)[:, None] * stride_xm
    a = tl.load(x_row + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_row + F + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    out = a * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_f[None, :], out.to(Out.dtype.element_ty), mask=mask)


def geglu(x):
    """x[..., :F] * gelu(x[..., F:]) with exact (erf) GELU, for x of shape (..., 2F).

    float16, bfloat16 or float32. Returns a contiguous (..., F) tensor of x's dtype.
    """
    check_tensor("geglu", "x", x)
    if x.dim() < 1:
        raise ValueError("geglu: x is a 0-dim tensor; allowed: (..., 2F) with at least 1 dim")
    two_f = x.shape[-1]
    if two_f % 2 != 0:
        raise ValueError(f"geglu: x.shape[-1] is {two_f}; allowed: an even size (value half, then gate half)")
    F = two_f // 2

    x2 = x.reshape(-1, two_f)  # (rows, 2F)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((*x.shape[:-1], F), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    out2 = out.view(-1, F)

    block_f = min(triton.next_power_of_2(F), _MAX_BLOCK_F)
    block_m = max(1, min(_TILE // block_f, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(F, block_f))
    _geglu_fwd_kernel[grid](
        x2, out2,
        x2.stride(0), out2.stride(0),
        rows, F,
        BLOCK_M=block_m,
        BLOCK_F=block_f,
        num_warps=4,
    )
    return out


def geglu_reference(x):
    """diffusers' GEGLU after the projection, in fp32; returns fp32."""
    a, gate = x.float().chunk(2, dim=-1)
    return a * torch.nn.functional.gelu(gate)
